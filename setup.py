"""Build script: the pure-Python package plus the C++/CUDA ops of csrc/.

* fastunlearn._C       CPU kernels (C++/OpenMP), always built when torch is importable;
* fastunlearn._C_cuda  CUDA kernels, built when a CUDA toolkit (nvcc) is found.

FASTUNLEARN_BUILD_CUDA=0/1 forces the CUDA part off/on; TORCH_CUDA_ARCH_LIST picks the GPU
architectures (default here "8.0;9.0+PTX" when no GPU is visible). Both extensions are optional:
if one fails to compile the install goes on and fastunlearn JIT-builds the ops on first use
(fastunlearn/_ext.py), unless FASTUNLEARN_BUILD_STRICT=1.
"""
import os
import sys
from pathlib import Path

from setuptools import setup

CSRC = "csrc"


def _cuda_home():
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    return "/usr/local/cuda" if Path("/usr/local/cuda/bin/nvcc").exists() else None


def _extensions():
    want_cuda = os.environ.get("FASTUNLEARN_BUILD_CUDA", "auto")
    home = _cuda_home()
    if want_cuda == "1" and home is None:
        sys.exit("FASTUNLEARN_BUILD_CUDA=1 but no CUDA toolkit found: set CUDA_HOME")
    build_cuda = home is not None and want_cuda != "0"
    if build_cuda:
        os.environ.setdefault("CUDA_HOME", home)  # cpp_extension reads it at import
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError as exc:
        print(f"fastunlearn: torch not importable ({exc}); C++ ops will be JIT-built on first use", file=sys.stderr)
        return [], {}
    optional = os.environ.get("FASTUNLEARN_BUILD_STRICT") != "1"
    exts = [CppExtension(
        "fastunlearn._C", [f"{CSRC}/module.cpp", f"{CSRC}/ops.cpp"], include_dirs=[os.path.abspath(CSRC)],
        extra_compile_args={"cxx": ["-O3", "-fopenmp"]}, extra_link_args=["-fopenmp"], optional=optional)]
    if build_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
        exts.append(CUDAExtension(
            "fastunlearn._C_cuda", [f"{CSRC}/module_cuda.cpp", f"{CSRC}/ops_cuda.cu"], include_dirs=[os.path.abspath(CSRC)],
            extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-std=c++20", "-lineinfo"]}, optional=optional))
    return exts, {"build_ext": BuildExtension}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
