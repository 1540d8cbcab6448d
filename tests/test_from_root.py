"""A newcomer's first commands, run the way the README shows them: from the repository root, in subprocesses
with a plain environment. From the root the checkout's own folders are first on sys.path (`python -m`,
`python -c`, a notebook), so none of them may shadow an installed distribution's import name."""
import json
import os
import re
import subprocess
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

from fastunlearn.testing import SMALL

ROOT = Path(__file__).resolve().parents[1]


def test_no_top_level_name_of_the_checkout_shadows_an_installed_distribution():
    """A folder with `__init__.py` (or a .py file) at the root is importable from there, before site-packages.
    Folders without one never shadow: a regular package found later on sys.path wins over them."""
    importable = {p.stem for p in ROOT.iterdir() if p.suffix == ".py"}
    importable |= {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert importable - {"setup"} == {"fastunlearn"}, "only fastunlearn may be importable from the root"
    taken = set(packages_distributions())
    assert not (importable - {"fastunlearn"}) & taken
    assert not (ROOT / "kernels" / "__init__.py").exists()  # `kernels` is Hugging Face's (transformers needs it)


def _plain_env(tmp_path) -> dict:
    """What a user's shell has: no PYTHONPATH, no test-suite settings; offline (no network here)."""
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1",
           "FASTUNLEARN_CACHE": str(tmp_path / "cache"), "LANG": "C.UTF-8"}
    if os.environ.get("TORCH_EXTENSIONS_DIR"):  # the compiled ops, if they were JIT-built: not built again
        env["TORCH_EXTENSIONS_DIR"] = os.environ["TORCH_EXTENSIONS_DIR"]
    return env


def _run(args, tmp_path, timeout=600):
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=_plain_env(tmp_path), capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(args)}:\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.slow  # a tiny run, evaluated, in fresh interpreters: about a minute
def test_the_readme_commands_work_from_the_repository_root(tiny_sd_path, tmp_path):
    import torch
    import torchvision
    from diffusers import DiffusionPipeline
    from huggingface_hub import ModelCard

    _run(["-c", "import kernels, fastunlearn.kernels.noise_loss; from diffusers import DiffusionPipeline, "
                "StableDiffusionPipeline; assert 'site-packages' in kernels.__file__, kernels.__file__"], tmp_path)
    _run(["-m", "fastunlearn.attack", "--help"], tmp_path)

    # a tiny run with `python -m fastunlearn.train`, then `python -m fastunlearn.evaluate` on its output
    pipe = DiffusionPipeline.from_pretrained(tiny_sd_path)
    pipe.unet.register_to_config(sample_size=32)  # 64 px images: big enough for the perceptual network
    pipe.save_pretrained(tmp_path / "original")
    (tmp_path / "forget.txt").write_text("a photo of cat\na painting of cat\n")
    (tmp_path / "retain.txt").write_text("a photo of dog\na photo of car\n")
    (tmp_path / "prompts.txt").write_text("a photo of cat\na photo of dog\na photo of car\n")
    out = tmp_path / "run"
    weights, alex = tmp_path / "squeeze.pth", tmp_path / "alexnet.pth"  # random backbones: no download here
    torch.save(torchvision.models.squeezenet1_1(weights=None).state_dict(), weights)
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), alex)
    _run(["-m", "fastunlearn.train", "--model", str(tmp_path / "original"), "--forget-prompts",
          str(tmp_path / "forget.txt"), "--retain-prompts", str(tmp_path / "retain.txt"), *SMALL,
          "--max-steps", "2", "--lpips-weights", str(alex), "--output-dir", str(out)], tmp_path)
    _run(["-m", "fastunlearn.evaluate", "--original", str(tmp_path / "original"), "--unlearned", str(out),
          "--prompts", str(tmp_path / "prompts.txt"), "--steps", "2", "--seeds", "2", "--perceptual", "squeeze", "--backbone-weights", str(weights),
          "--out", str(tmp_path / "ev")], tmp_path)
    assert json.loads((tmp_path / "ev" / "report.json").read_text())["integrity_retain"] is not None

    # the finished folder: the model card renders (front matter parses, every image link resolves inside the
    # folder), and no bookkeeping file is left behind
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "diffusers" and card.data.base_model == str(tmp_path / "original")
    assert {"fastunlearn", "unlearning", "saddle"} <= set(card.data.tags)
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", card.text)
    assert links and all((out / link).is_file() for link in links)
    assert "I_retain" in card.text and "--max-steps 2" in card.text and "a photo of cat" in card.text
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
