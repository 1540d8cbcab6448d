"""The model card of a run (fastunlearn.card): its intervals, its table, the attack section."""
import json

import pytest

from fastunlearn.card import (
    ATTACK_HEADING,
    add_attack,
    metric_rows,
    wilson,
    write_model_card,
)

REPORT = {"method": "ovw", "model": "digits", "steps": 400, "steps_to_converge": 75, "forget_accuracy": 0.02,
          "base_forget_accuracy": 0.97, "retain_accuracy": 0.98, "base_retain_accuracy": 0.99,
          "integrity_retain": 0.031, "integrity_retain_ci95": 0.006, "integrity_forget": 0.8,
          "integrity_forget_ci95": 0.05, "forget_concept": "the digit 3", "world": "digits",
          "eval": {"forget_samples": 100, "retain_samples": 180}, "retain_prompts_count": 27}
CONFIG = {"method": "ovw", "model": "digits", "lr": 2e-4, "max_steps": 400, "seed": 1, "ovw": {"alpha": 0.5},
          "lora": {"rank": 0}}


def test_wilson_interval_against_hand_computed_values():
    lo, hi = wilson(0.5, 100)
    assert lo == pytest.approx(0.4038, abs=1e-4) and hi == pytest.approx(0.5962, abs=1e-4)
    lo, hi = wilson(0.0, 30)  # never degenerate at 0
    assert lo == 0.0 and hi == pytest.approx(0.1135, abs=1e-4)
    assert wilson(None, 10) is None and wilson(0.3, 0) is None


def test_the_table_gives_original_and_unlearned_with_intervals():
    rows = {name: (base, value) for name, base, value in metric_rows(REPORT)}
    forget = next(v for k, v in rows.items() if k.startswith("forget accuracy"))
    assert forget[0].startswith("0.970 [") and forget[1].startswith("0.020 [0.")
    assert rows[next(k for k in rows if k.startswith("I_retain"))][1] == "0.0310 ± 0.0060"


def test_the_card_has_front_matter_settings_grid_and_command(tmp_path):
    from huggingface_hub import ModelCard

    path = write_model_card(tmp_path, REPORT, CONFIG, "python fastunlearn/train.py --method ovw --seed 1")
    card = ModelCard.load(path)
    assert card.data.base_model == "digits" and card.data.library_name == "diffusers"
    assert set(card.data.tags) >= {"fastunlearn", "unlearning", "ovw"}
    assert "the digit 3" in card.text and "`alpha=0.5`" in card.text and "](grid.png)" in card.text
    assert "python fastunlearn/train.py --method ovw --seed 1" in card.text
    assert not list(tmp_path.glob(".*"))  # the temporary file is gone


def test_an_attack_adds_its_section_once(tmp_path):
    write_model_card(tmp_path, REPORT, CONFIG, "python fastunlearn/train.py")
    attack = {"concept": "three", "judge": "digit classifier", "config": {"eval_samples": 50},
              "no_attack": {"unlearned": {"concept_rate": 0.02}},
              "concept_rate_under_attack": {"inversion@100": 0.1, "inversion@1000": 0.5, "search": 0.04},
              "inversion": {"attack_strong_enough": True}}
    add_attack(tmp_path, attack, "outputs/attack/report.json")
    add_attack(tmp_path, {**attack, "concept_rate_under_attack": {"inversion@1000": 0.3}}, "elsewhere")
    text = (tmp_path / "README.md").read_text()
    assert text.count(ATTACK_HEADING) == 1 and "elsewhere" in text and "0.300 [" in text
    assert text.index(ATTACK_HEADING) < text.index("](grid.png)")
    assert add_attack(tmp_path / "nothing", attack, "x") is None


def test_the_saved_config_reproduces_the_settings(tmp_path):
    """The card's second recipe, `--config config.json`, reads back the settings the run saved."""
    from fastunlearn.config import TrainConfig, load_config

    cfg = TrainConfig(method="ovw", lr=1e-4, max_steps=7)
    cfg.ovw.alpha = 0.25
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    assert load_config(str(tmp_path / "config.json")).to_dict() == cfg.to_dict()
