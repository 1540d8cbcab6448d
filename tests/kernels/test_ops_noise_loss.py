"""noise_prediction_loss: the C++ op and the Triton kernel (interpreter) against the reference."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_test_utils import DTYPES, KERNEL_BACKENDS, assert_close, noncontiguous, require_interpreter

from fastunlearn import ops
from fastunlearn.errors import FastUnlearnError


def make_inputs(shape, K, dtype, seed, weights=True):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(shape, generator=g).to(dtype).requires_grad_()
    targets = [torch.randn(shape, generator=g).to(dtype) for _ in range(K)]
    coeffs = torch.randn(shape[0], K, generator=g)
    w = torch.randn(shape[0], generator=g) if weights else None  # negative weights included
    return student, targets, coeffs, w


def reference(student, targets, coeffs, weights, reduction, grad_output):
    """fp32 reference on the same (possibly low-precision) values: the 'truth' a kernel must match."""
    s = student.detach().float().requires_grad_()
    loss = ops.noise_prediction_loss(s, [t.float() for t in targets], coeffs, weights, reduction, backend="torch")
    (grad,) = torch.autograd.grad(loss, s, grad_output)
    return loss, grad


def check(backend, student, targets, coeffs, weights, reduction, seed=0):
    if backend == "triton":
        require_interpreter()
    dtype = student.dtype
    loss = ops.noise_prediction_loss(student, targets, coeffs, weights, reduction, backend=backend)
    assert loss.dtype == torch.float32
    assert loss.shape == ((student.shape[0],) if reduction == "none" else ())
    grad_output = torch.rand(loss.shape, generator=torch.Generator().manual_seed(seed + 1)) + 0.5
    (grad,) = torch.autograd.grad(loss, student, grad_output)
    ref_loss, ref_grad = reference(student, targets, coeffs, weights, reduction, grad_output)
    assert grad.dtype == dtype and grad.shape == student.shape
    assert_close(loss, ref_loss, torch.float32 if dtype == torch.float32 else dtype, f"{backend} loss")
    assert_close(grad, ref_grad, dtype, f"{backend} grad")
    # grad_output == 1 takes the no-scaling path
    loss = ops.noise_prediction_loss(student, targets, coeffs, weights, reduction, backend=backend)
    (grad1,) = torch.autograd.grad(loss, student, torch.ones_like(loss))
    _, ref_grad1 = reference(student, targets, coeffs, weights, reduction, torch.ones_like(loss))
    assert_close(grad1, ref_grad1, dtype, f"{backend} grad (grad_output=1)")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("K", [1, 2, 3, 4])
def test_odd_shape(backend, dtype, reduction, K):
    check(backend, *make_inputs((3, 5, 47, 31), K, dtype, seed=K), reduction, seed=K)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_batch_one_sd_latent(backend, reduction):
    check(backend, *make_inputs((1, 4, 64, 64), 2, torch.float32, seed=3), reduction)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_realistic_shape_no_weights(backend, dtype):
    check(backend, *make_inputs((8, 4, 64, 64), 2, dtype, seed=4, weights=False), "mean")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_noncontiguous(backend, reduction):
    student, targets, coeffs, w = make_inputs((3, 5, 47, 31), 3, torch.float32, seed=5)
    student = noncontiguous(student)
    targets = [noncontiguous(t) for t in targets]
    coeffs = coeffs.t().contiguous().t()  # (B, K) with strides (1, B)
    check(backend, student, targets, coeffs, w[::1], reduction)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_flat_and_5d_shapes(backend):
    check(backend, *make_inputs((5, 7), 1, torch.float32, seed=6), "sum")
    check(backend, *make_inputs((2, 3, 4, 5, 6), 4, torch.float32, seed=7), "none")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_no_grad_and_frozen_student(backend):
    student, targets, coeffs, w = make_inputs((3, 5, 47, 31), 2, torch.float32, seed=8)
    ref = ops.noise_prediction_loss(student.detach(), targets, coeffs, w, backend="torch")
    with torch.no_grad():
        got = ops.noise_prediction_loss(student, targets, coeffs, w, backend=backend)
    assert_close(got, ref, torch.float32, "no_grad")
    got = ops.noise_prediction_loss(student.detach(), targets, coeffs, w, backend=backend)
    assert not got.requires_grad
    assert_close(got, ref, torch.float32, "detached")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_targets_get_no_gradient(backend):
    student, targets, coeffs, w = make_inputs((2, 3, 8, 8), 2, torch.float32, seed=9)
    targets = [t.requires_grad_() for t in targets]
    loss = ops.noise_prediction_loss(student, targets, coeffs, w, backend=backend)
    loss.backward()
    assert student.grad is not None and all(t.grad is None for t in targets)


@settings(max_examples=25, deadline=None)
@given(
    B=st.integers(1, 4), C=st.integers(1, 6), H=st.integers(1, 40), W=st.integers(1, 40),
    K=st.integers(1, 4), reduction=st.sampled_from(["mean", "sum", "none"]),
    dtype=st.sampled_from(DTYPES), backend=st.sampled_from(KERNEL_BACKENDS), seed=st.integers(0, 2**31 - 1),
    scale=st.floats(1e-3, 1e3),
)
def test_hypothesis(B, C, H, W, K, reduction, dtype, backend, seed, scale):
    student, targets, coeffs, w = make_inputs((B, C, H, W), K, dtype, seed)
    student = (student.detach().float() * scale).to(dtype).requires_grad_()
    targets = [(t.float() * scale).to(dtype) for t in targets]
    check(backend, student, targets, coeffs, w, reduction, seed=seed)


def test_auto_uses_cpp_on_cpu():
    assert ops.resolve_backend("auto", torch.device("cpu"), torch.float32, "x") == "cpu"
    assert ops.resolve_backend("auto", torch.device("cpu"), torch.float64, "x") == "torch"
    student, targets, coeffs, w = make_inputs((2, 4, 8, 8), 2, torch.float64, seed=10)
    ops.noise_prediction_loss(student, targets, coeffs, w).backward()  # float64 runs the reference


def test_auto_falls_back_to_torch_with_one_warning(monkeypatch):
    from fastunlearn import _ext

    def broken(cuda=False):
        raise FastUnlearnError("fastunlearn C++ ops unavailable: test")

    monkeypatch.setattr(_ext, "load", broken)
    monkeypatch.setattr(ops._dispatch, "_warned", set())
    student, targets, coeffs, w = make_inputs((2, 4, 8, 8), 1, torch.float32, seed=11)
    with pytest.warns(RuntimeWarning, match="falls back to the PyTorch reference"):
        a = ops.noise_prediction_loss(student, targets, coeffs, w)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        b = ops.noise_prediction_loss(student, targets, coeffs, w)
    assert torch.equal(a, b)
    with pytest.raises(FastUnlearnError, match="unavailable"):
        ops.noise_prediction_loss(student, targets, coeffs, w, backend="cpu")


def test_torch_compile_cpp_op():
    """The C++ op has a fake kernel and autograd, so it traces under torch.compile (fullgraph once loaded)."""
    from fastunlearn import _ext

    _ext.load()
    student, targets, coeffs, w = make_inputs((2, 4, 16, 16), 2, torch.float32, seed=12)

    def f(s, t0, t1, c, w):
        return ops.noise_prediction_loss(s, [t0, t1], c, w, backend="cpu") * 3.0

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    loss = compiled(student, *targets, coeffs, w)
    (grad,) = torch.autograd.grad(loss, student)
    ref_loss, ref_grad = reference(student, targets, coeffs, w, "mean", torch.tensor(3.0))
    assert_close(loss, ref_loss * 3.0, torch.float32, "compiled loss")
    assert_close(grad, ref_grad, torch.float32, "compiled grad")


def test_opcheck_cpp_op():
    from fastunlearn import _ext

    _ext.load()
    student, targets, coeffs, w = make_inputs((2, 3, 5, 7), 2, torch.float32, seed=13)
    for reduction, need_grad in [(0, True), (1, True), (2, False)]:
        s = student if need_grad else student.detach()
        torch.library.opcheck(torch.ops.fastunlearn.noise_loss_fwd.default,
                              (s, targets, coeffs, w, reduction, need_grad),
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


BAD = [
    ("reduction", dict(reduction="max"), "unknown reduction"),
    ("backend", dict(backend="metal"), "unknown backend"),
    ("no targets", dict(targets=[]), "1 to 4 tensors"),
    ("five targets", dict(targets="5"), "1 to 4 tensors"),
    ("target tensor", dict(targets="tensor"), "1 to 4 tensors"),
    ("target shape", dict(targets="shape"), "targets\\[0\\] has shape"),
    ("target dtype", dict(targets="dtype"), "targets\\[0\\] is torch.float16"),
    ("coeffs shape", dict(coeffs=torch.ones(3, 2)), "coeffs must be \\(B, K\\)"),
    ("weights shape", dict(weights=torch.ones(2)), "weights must be \\(B,\\)"),
    ("int student", dict(student="int"), "floating-point"),
    ("float64 kernel", dict(student="f64"), "takes float32, float16 or bfloat16"),
    ("cuda backend on cpu", dict(backend="cuda"), "needs CUDA tensors"),
    ("target device", dict(targets="meta"), "targets\\[0\\] is on meta, student on cpu"),
]


@pytest.mark.parametrize("name,override,match", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_line_error(name, override, match):
    student, targets, coeffs, w = make_inputs((3, 2, 4, 4), 1, torch.float32, seed=14)
    kw = dict(student=student, targets=targets, coeffs=coeffs, weights=w, reduction="mean", backend="cpu")
    kw.update(override)
    if kw["targets"] == "5":
        kw["targets"] = targets * 5
    elif kw["targets"] == "tensor":
        kw["targets"] = targets[0]
    elif kw["targets"] == "shape":
        kw["targets"] = [targets[0][:, :1]]
    elif kw["targets"] == "dtype":
        kw["targets"] = [targets[0].half()]
    elif kw["targets"] == "meta":
        kw["targets"] = [targets[0].to("meta")]
    if kw["student"] == "int":
        kw["student"], kw["targets"] = torch.ones(3, 2, 4, 4, dtype=torch.int32), [torch.ones(3, 2, 4, 4, dtype=torch.int32)]
    elif kw["student"] == "f64":
        kw["student"], kw["targets"] = student.double(), [targets[0].double()]
    with pytest.raises(FastUnlearnError, match=match) as info:
        ops.noise_prediction_loss(**kw)
    assert "\n" not in str(info.value)


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    from fastunlearn.kernels import noise_loss

    monkeypatch.setattr(noise_loss, "INTERPRET", False)
    student, targets, coeffs, w = make_inputs((2, 2, 4, 4), 1, torch.float32, seed=15)
    with pytest.raises(FastUnlearnError, match="TRITON_INTERPRET=1"):
        ops.noise_prediction_loss(student, targets, coeffs, w, backend="triton")
