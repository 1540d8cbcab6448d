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
    for path in ("models.py", "train.py", "data.py", "evaluate.py", "evaluation.py", "report.py", "cli.py"):
        text = (ROOT / "fastunlearn" / path).read_text()
        assert "worlds.digits" not in text and '== "digits"' not in text, path


def test_old_method_args_section_names_the_new_keys():
    from fastunlearn.config import TrainConfig, apply_dict
    from fastunlearn.errors import FastUnlearnError

    with pytest.raises(FastUnlearnError, match="alpha -> ovw.alpha"):
        apply_dict(TrainConfig(), {"method_args": {"alpha": 0.5}})


# ---- the architecture stays visible: modules of a readable size, imports that run one way ----------------------
MAX_LINES = 450


def _modules() -> dict[str, Path]:
    """Every module of the package, by dotted name (kernels/ as fastunlearn.kernels)."""
    out = {}
    for base, prefix in ((ROOT / "fastunlearn", ("fastunlearn",)), (ROOT / "kernels", ("fastunlearn", "kernels"))):
        for path in base.rglob("*.py"):
            if base.name == "fastunlearn" and "kernels" in path.relative_to(base).parts[:1]:
                continue  # the link to kernels/: counted once, from there
            parts = (*prefix, *path.relative_to(base).with_suffix("").parts)
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict) -> set[str]:
    """The package's modules that `name` imports anywhere in its file (at the top, in functions, under
    TYPE_CHECKING), read with ast; a parent package it imports implicitly is not counted."""
    import ast

    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name and not name.startswith(target + "."):
                found.add(target)
    return found


def test_no_module_is_over_450_lines():
    long = {name: n for name, path in _modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_the_package_has_no_import_cycle():
    """Lazy imports included: a cycle through a function-level import still ties the two modules together."""
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_config_is_the_bottom_layer():
    modules = _modules()
    assert _imports("fastunlearn.config", modules["fastunlearn.config"], modules) == {
        "fastunlearn.errors", "fastunlearn.settings"}


def test_the_checker_sees_a_lazy_cycle(tmp_path):
    """The cycle test is not vacuous: a function-level import back is found."""
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("from . import b\n")
    b.write_text("def f():\n    from .a import x\n")
    modules = {"p.a": a, "p.b": b}
    assert _imports("p.a", a, modules) == {"p.b"} and _imports("p.b", b, modules) == {"p.a"}
