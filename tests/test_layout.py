"""Import hygiene and package layout: the light modules stay light, and every package is installed."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def modules_after_import(module: str, watch: list[str]) -> list[str]:
    """Of `watch`, the modules a fresh interpreter has loaded after `import module`."""
    code = f"import sys, {module}; print(' '.join(m for m in {watch!r} if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd="/")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.split()


@pytest.mark.parametrize("module,forbidden", [
    ("fastunlearn.methods", ["fastunlearn.train", "deepspeed"]),
    ("fastunlearn.ops", ["diffusers", "deepspeed"]),
    ("fastunlearn.kernels", ["diffusers", "deepspeed", "transformers", "fastunlearn.train"]),
])
def test_light_modules_do_not_import_heavy_ones(module, forbidden):
    assert modules_after_import(module, forbidden) == []


def test_every_package_is_listed_in_pyproject():
    """[tool.setuptools] lists packages explicitly: a package missing there is missing from a wheel."""
    tomllib = pytest.importorskip("tomllib")
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    src = ROOT / "fastunlearn"
    found = {".".join(("fastunlearn", *p.parent.relative_to(src).parts)) for p in src.rglob("__init__.py")}
    # kernels/ has no __init__.py (from the root it must not shadow Hugging Face's `kernels`); it installs as
    # fastunlearn.kernels through the link fastunlearn/kernels -> ../kernels
    found.add("fastunlearn.kernels")
    assert (src / "kernels").is_symlink() and (src / "kernels").resolve() == ROOT / "kernels"
    assert "package-dir" not in setup
    assert found == set(setup["packages"])


def test_one_scale_grad_for_every_backend():
    code = ("import fastunlearn._ext as e, fastunlearn.ops._grad as g, fastunlearn.kernels.noise_loss as n, "
            "fastunlearn.kernels.lpips_distance as l; assert e.scale_grad is g.scale_grad is n.scale_grad "
            "is l.scale_grad")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd="/")
    if "No module named 'triton'" in proc.stderr:
        pytest.skip("triton is not installed")
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_train_and_evaluate_run_as_modules_and_console_scripts():
    from importlib.metadata import entry_points

    scripts = {e.name: e.value for e in entry_points(group="console_scripts") if e.name.startswith("fastunlearn-")}
    assert scripts == {"fastunlearn-train": "fastunlearn.train:main", "fastunlearn-evaluate": "fastunlearn.evaluate:main",
                       "fastunlearn-digits": "fastunlearn.worlds.digits:main", "fastunlearn-attack": "fastunlearn.attack:main"}
    for module in ("fastunlearn.train", "fastunlearn.evaluate", "fastunlearn.worlds.digits", "fastunlearn.attack"):
        proc = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=300,
                              cwd="/")
        assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr[-3000:]


def test_world_names_are_resolved_in_one_place():
    from fastunlearn import worlds

    assert worlds.get("digits").name == "digits" and worlds.get("path/to/sd15") is None
    for path in ("models.py", "train.py", "data.py", "evaluate.py"):
        text = (ROOT / "fastunlearn" / path).read_text()
        assert "worlds.digits" not in text and '== "digits"' not in text, path


def test_old_method_args_section_names_the_new_keys():
    from fastunlearn.config import TrainConfig, apply_dict
    from fastunlearn.errors import FastUnlearnError

    with pytest.raises(FastUnlearnError, match="alpha -> ovw.alpha"):
        apply_dict(TrainConfig(), {"method_args": {"alpha": 0.5}})
