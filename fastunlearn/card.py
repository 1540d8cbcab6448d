"""The model card of a run: `README.md` in its output folder, as diffusers' training scripts write one.

YAML front matter (`base_model`, `library_name: diffusers`, tags `fastunlearn`, `unlearning` and the method),
then what was erased, the method and its settings, the metrics with their 95 % intervals (and the figures
under attack once `python -m fastunlearn.attack` ran on the folder), the comparison grid and the command that
reproduces the run. Built with huggingface_hub's `ModelCard`, so `ModelCard.load(folder / "README.md")` reads
it back and the Hub renders it.

Intervals: accuracies and judge rates are shares of n samples, with the Wilson score interval
(p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n), z = 1.96; I_retain and I_forget are means over
samples, ± 1.96 standard errors (the report's `_ci95`).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

CARD = "README.md"
GRID = "grid.png"
ATTACK_HEADING = "## Under attack"
GRID_HEADING = "## Original vs unlearned"
SETTINGS = ("params", "forget_target", "lr", "max_steps", "forget_batch_size", "retain_batch_size",
            "gradient_accumulation_steps", "seed", "zero_stage", "mixed_precision")


def wilson(p: float | None, n: int, z: float = 1.96) -> tuple[float, float] | None:
    """The Wilson score interval of a share p of n samples (not degenerate at 0 or 1, unlike
    p ± 1.96·√(p(1−p)/n)); None when p is unknown or n is 0."""
    if p is None or not n:
        return None
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return min(p, max(0.0, centre - half)), max(p, min(1.0, centre + half))  # p inside despite rounding


def _share(value, n) -> str:
    if value is None:
        return "—"
    lo_hi = wilson(float(value), n)
    return f"{value:.3f} [{lo_hi[0]:.3f}, {lo_hi[1]:.3f}]" if lo_hi else f"{value:.3f}"


def _mean(value, ci) -> str:
    if value is None:
        return "—"
    return f"{value:.4f} ± {ci:.4f}" if ci is not None else f"{value:.4f}"


def metric_rows(report: dict) -> list[tuple[str, str, str]]:
    """(metric, original, unlearned) rows of the card's table, with intervals, for the keys the report has."""
    ev = report.get("eval") or {}
    n_forget, n_retain = ev.get("forget_samples", 0), ev.get("retain_samples", 0)
    rows = []
    shares = [("forget_accuracy", "forget accuracy (share drawn as the concept)", n_forget),
              ("forget_rate", "forget rate (judge)", n_forget),
              ("unlearning_accuracy", "unlearning accuracy", n_forget),
              ("retain_accuracy", "retain accuracy", n_retain),
              ("cross_domain_retain_accuracy", "cross-domain retain accuracy", n_retain),
              ("cross_domain_forget_accuracy", "cross-domain forget accuracy", n_forget)]
    for key, label, n in shares:
        if report.get(key) is not None:
            rows.append((label, _share(report.get(f"base_{key}"), n), _share(report[key], n)))
    for key in ("forget_accuracy_by_concept", "forget_rate_by_concept"):
        concepts = report.get(key) or {}
        n = n_forget // max(len(concepts), 1)
        for name, value in concepts.items():
            base = (report.get(f"base_{key}") or {}).get(name)
            rows.append((f"{key.split('_by_')[0].replace('_', ' ')}: {name}", _share(base, n), _share(value, n)))
    rows.append(("I_retain (LPIPS to the original, retain prompts; lower is better)", "0",
                 _mean(report.get("integrity_retain"), report.get("integrity_retain_ci95"))))
    rows.append(("I_forget (LPIPS to the original, forget prompts)", "0",
                 _mean(report.get("integrity_forget"), report.get("integrity_forget_ci95"))))
    if report.get("fid_retain") is not None:
        rows.append((f"FID of the retain images to the original's ({report.get('fid_network', 'fid')})", "0",
                     f"{report['fid_retain']:.3f}"))
    return rows


def attack_rows(attack: dict) -> list[tuple[str, str, str]]:
    """(attack, steps, concept share) rows from the attack command's report (fastunlearn.attack)."""
    n = (attack.get("config") or {}).get("eval_samples", 0)
    plain = ((attack.get("no_attack") or {}).get("unlearned") or {}).get("concept_rate")
    rows = [("none (the plain forget prompts)", "—", _share(plain, n))] if plain is not None else []
    for key, value in (attack.get("concept_rate_under_attack") or {}).items():
        name, _, steps = key.partition("@")
        label = {"inversion": "Concept Inversion", "search": "discrete prefix search"}.get(name, name)
        rows.append((label, steps or "—", _share(value, n)))
    return rows


def attack_section(attack: dict, where: str) -> str:
    """The card's "Under attack" section for an attack command's report written to `where`."""
    strong = (attack.get("inversion") or {}).get("attack_strong_enough")
    control = {True: " The same inversion on the original model recovers the concept (the attack is strong "
                     "enough to mean something).",
               False: " The same inversion on the original model does *not* recover the concept: a low share "
                      "here proves little."}.get(strong, "")
    return "\n".join([
        f"{ATTACK_HEADING}", "",
        f"`python -m fastunlearn.attack` on this folder, concept word `{attack.get('concept')}` (report: "
        f"`{where}`): the share of samples the judge ({attack.get('judge') or 'none'}) reads as the concept, "
        f"with its 95 % Wilson interval.{control}", "",
        _table(("attack", "steps", "concept share"), attack_rows(attack)), "", ""])


def add_attack(folder: Path, attack: dict, where: str) -> Path | None:
    """Put (or replace) the "Under attack" section of the model card in `folder`; None if it has no card."""
    path = Path(folder) / CARD
    if not path.is_file():
        return None
    text = path.read_text()
    if ATTACK_HEADING in text:  # an earlier attack's section: replaced
        start = text.index(ATTACK_HEADING)
        text = text[:start] + text[text.index(GRID_HEADING, start):]
    if GRID_HEADING not in text:
        return None  # not a card this module wrote
    at = text.index(GRID_HEADING)
    return _write(path, text[:at] + attack_section(attack, where) + text[at:])


def _table(header: tuple, rows: list) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _erased(report: dict) -> str:
    if report.get("forget_digit") is not None:
        return f"**the digit {report['forget_digit']}** ({report.get('world', 'digits world')})"
    if report.get("forget_concept"):
        return f"**{report['forget_concept']}** ({report.get('world', 'embedded world')})"
    concepts = report.get("forget_concepts")
    if concepts:
        return "several concepts in one run: " + ", ".join(f"**{c}**" for c in concepts)
    prompts = report.get("forget_prompts") or []
    shown = ", ".join(f"`{p}`" for p in prompts[:5]) + (f" and {len(prompts) - 5} more" if len(prompts) > 5 else "")
    return f"the concept of the forget prompts {shown}"


def model_card_text(report: dict, config: dict, command: str) -> str:
    """The card as text (front matter and body)."""
    from huggingface_hub import ModelCardData

    method = report.get("method", config.get("method"))
    model = str(report.get("model", config.get("model")))
    data = ModelCardData(base_model=model, library_name="diffusers", pipeline_tag="text-to-image",
                         tags=["fastunlearn", "unlearning", method, "diffusers", "text-to-image"])
    section = config.get(method) if isinstance(config.get(method), dict) else {}
    settings = {k: config[k] for k in SETTINGS if k in config}
    if report.get("solve_seconds") is not None:  # a closed-form edit (uce, rece): no training settings
        if method != "uce" and isinstance(config.get("uce"), dict):
            section = {**section, **{f"uce.{k}": v for k, v in config["uce"].items()}}
        edited = (report.get("uce") or {}).get("edited_projections")
        settings = {"edited": f"every cross-attention to_k and to_v ({edited} projections)",
                    "mixed_precision": config.get("mixed_precision")}
    if (config.get("lora") or {}).get("rank"):
        settings["lora"] = config["lora"]
    met, solve = report.get("steps_to_converge"), report.get("solve_seconds")
    criterion = (f"forget criterion met at step {met}" if met is not None and solve is None else
                 "forget criterion met" if met is not None else
                 "forget criterion not met" if report.get("judge") else "no judge, so no forget criterion")
    how = f"a closed-form edit solved in {solve:.2f} s" if solve is not None else f"{report.get('steps')} steps"
    body = [f"# {method} unlearning of {model}", "",
            f"This model is `{model}` after fastunlearn made it forget {_erased(report)}, with the method "
            f"**{method}** ({how}, {criterion}). Everything else it draws is meant to stay "
            "as it was: "
            "the integrity I below is the LPIPS distance between what the original and this model draw from the "
            "same prompt and the same initial noise.", "",
            "## Method and settings", "",
            f"* method: `{method}`" + (", its settings: " + ", ".join(f"`{k}={v}`" for k, v in section.items())
                                      if section else ""),
            *(f"* {k}: `{v}`" for k, v in settings.items()),
            f"* retain prompts: {report.get('retain_prompts_count')}; judge: {report.get('judge') or 'none'}; "
            f"perceptual network: {report.get('perceptual_network')}", "",
            "## Metrics", "",
            f"Evaluated on {(report.get('eval') or {}).get('forget_samples')} forget and "
            f"{(report.get('eval') or {}).get('retain_samples')} retain samples; shares with their 95 % Wilson "
            "interval, integrity as mean ± 1.96 standard errors.", "",
            _table(("metric", "original", "unlearned"), metric_rows(report)), ""]
    body += [GRID_HEADING, "", f"![original and unlearned samples, same seeds]({GRID})", "",
             "Each prompt (or group) has two rows: the original's samples above, the unlearned model's below, "
             "from the same prompts and initial noise.", "",
             "## Reproduce", "", "```bash", command, "```", "",
             "or, from the settings saved beside this card (`config.json`): "
             "`python fastunlearn/train.py --config THIS_FOLDER/config.json --output-dir NEW_FOLDER`.", ""]
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body)


def write_model_card(folder: Path, report: dict, config: dict, command: str) -> Path:
    """Write the card of a finished run to `folder/README.md`."""
    return _write(Path(folder) / CARD, model_card_text(report, config, command))


def _write(path: Path, text: str) -> Path:
    """Atomically: a temporary file beside `path`, renamed over it."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path
