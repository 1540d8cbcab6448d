"""The C++/CUDA sources build: nvcc compiles the CUDA kernels (compile only; nothing can run here),
the JIT fallback builds and runs the CPU op, and a broken build is a one-line error."""
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"


def find_nvcc() -> str:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and Path(home, "bin", "nvcc").exists():
            return str(Path(home, "bin", "nvcc"))
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.fail("nvcc not found (CUDA_HOME, /usr/local/cuda, PATH): the CUDA sources can't be compile-checked")
    return nvcc


def test_cuda_sources_compile_with_nvcc(tmp_path):
    import torch.utils.cpp_extension as ext

    nvcc = find_nvcc()
    includes = ext.include_paths("cuda") + [str(CSRC), sysconfig.get_paths()["include"]]
    cmd = [nvcc, "-c", str(CSRC / "ops_cuda.cu"), "-o", str(tmp_path / "ops_cuda.o"), "-std=c++20", "-O1",
           "-gencode=arch=compute_90,code=sm_90", "--compiler-options", "-fPIC",
           "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=fastunlearn_cuda",
           *ext.COMMON_NVCC_FLAGS, *[f"-I{p}" for p in includes]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"nvcc failed:\n{proc.stderr[-4000:]}"
    assert (tmp_path / "ops_cuda.o").stat().st_size > 0


HIDE_COMPILED = textwrap.dedent("""
    import sys
    class HideCompiled:  # simulates an install without (or with an unloadable) fastunlearn._C
        def find_spec(self, name, path=None, target=None):
            if name in ("fastunlearn._C", "fastunlearn._C_cuda"):
                raise ImportError("hidden by the test")
    sys.meta_path.insert(0, HideCompiled())
""")


def run_python(code: str, tmp_path: Path, **env) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext"), **env}
    return subprocess.run([sys.executable, "-c", HIDE_COMPILED + textwrap.dedent(code)], capture_output=True,
                          text=True, env=full_env, timeout=600, cwd=tmp_path)


def test_jit_fallback_builds_and_matches(tmp_path):
    proc = run_python("""
        import torch
        from fastunlearn import _ext, ops
        _ext.load()
        assert _ext._state["source"] == "jit", _ext._state
        s = torch.randn(2, 4, 9, 7, requires_grad=True); t = [torch.randn(2, 4, 9, 7)]; c = torch.randn(2, 1)
        a = ops.noise_prediction_loss(s, t, c, backend="cpu"); a.backward()
        s2 = s.detach().requires_grad_(); b = ops.noise_prediction_loss(s2, t, c, backend="torch"); b.backward()
        assert torch.allclose(a, b, rtol=1e-5) and torch.allclose(s.grad, s2.grad, rtol=1e-5, atol=1e-7)
        print("JIT OK")
    """, tmp_path)
    assert proc.returncode == 0 and "JIT OK" in proc.stdout, proc.stderr[-3000:]
    assert any((tmp_path / "ext").rglob("*.so")), "the JIT build did not use TORCH_EXTENSIONS_DIR"


def test_broken_build_is_one_line_error_and_auto_falls_back(tmp_path):
    proc = run_python(f"""
        import warnings, torch
        from pathlib import Path
        from fastunlearn import _ext, ops
        from fastunlearn.errors import FastUnlearnError
        _ext.CSRC = Path({str(tmp_path)!r}) / "nowhere"
        s = torch.randn(2, 3, requires_grad=True); t = [torch.randn(2, 3)]; c = torch.ones(2, 1)
        try:
            ops.noise_prediction_loss(s, t, c, backend="cpu")
            raise SystemExit("no error")
        except FastUnlearnError as exc:
            assert "\\n" not in str(exc) and "JIT build failed" in str(exc), str(exc)
            print("ERROR:", exc)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ops.noise_prediction_loss(s, t, c).backward()
            ops.noise_prediction_loss(s, t, c).backward()
        assert len([w for w in caught if "falls back" in str(w.message)]) == 1, [str(w.message) for w in caught]
        print("FALLBACK OK")
    """, tmp_path)
    assert proc.returncode == 0 and "FALLBACK OK" in proc.stdout, proc.stdout + proc.stderr[-3000:]


@pytest.mark.parametrize("flag,expected", [("0", ["fastunlearn._C"]), ("1", ["fastunlearn._C", "fastunlearn._C_cuda"])])
def test_setup_py_extension_selection(tmp_path, flag, expected):
    find_nvcc()
    code = ("import setuptools, sys; "
            "setuptools.setup = lambda **kw: print([e.name for e in kw.get('ext_modules', [])]); "
            "exec(open('setup.py').read())")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "FASTUNLEARN_BUILD_CUDA": flag}, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == str(expected)
