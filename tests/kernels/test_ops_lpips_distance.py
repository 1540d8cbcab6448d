"""lpips_distance: the C++ op and the Triton kernel (interpreter) against the reference and lpips."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_test_utils import DTYPES, KERNEL_BACKENDS, assert_close, noncontiguous, require_interpreter

from fastunlearn import ops
from fastunlearn.errors import FastUnlearnError

# Channels and spatial sizes of the AlexNet LPIPS layers for a 64x64 image, and odd ones.
ALEX_64 = [(64, 15, 15), (192, 7, 7), (384, 3, 3), (256, 3, 3), (256, 3, 3)]
ODD = [(5, 47, 31), (3, 1, 1), (130, 9, 2)]


def make_inputs(B, layers, dtype, seed, relu=False):
    g = torch.Generator().manual_seed(seed)
    f0, f1, ws = [], [], []
    for C, H, W in layers:
        a, b = torch.randn(B, C, H, W, generator=g), torch.randn(B, C, H, W, generator=g)
        if relu:  # post-ReLU features, like the real backbones
            a, b = a.relu(), b.relu()
        f0.append(a.to(dtype).requires_grad_())
        f1.append(b.to(dtype).requires_grad_())
        ws.append(torch.rand(C, generator=g))
    return f0, f1, ws


def reference(f0, f1, ws, grad_output):
    a = [f.detach().float().requires_grad_() for f in f0]
    b = [f.detach().float().requires_grad_() for f in f1]
    d = ops.lpips_distance(a, b, ws, backend="torch")
    return d, torch.autograd.grad(d, a + b, grad_output)


def check(backend, f0, f1, ws, seed=0, grads=True):
    if backend == "triton":
        require_interpreter()
    dtype = f0[0].dtype
    d = ops.lpips_distance(f0, f1, ws, backend=backend)
    assert d.dtype == torch.float32 and d.shape == (f0[0].shape[0],)
    go = torch.rand(d.shape, generator=torch.Generator().manual_seed(seed + 1)) + 0.5
    got_grads = torch.autograd.grad(d, f0 + f1, go)
    ref_d, ref_grads = reference(f0, f1, ws, go)
    assert_close(d, ref_d, torch.float32 if dtype == torch.float32 else dtype, f"{backend} distance")
    if not grads:
        return
    for i, (g, r) in enumerate(zip(got_grads, ref_grads)):
        assert g.dtype == dtype and g.shape == r.shape
        assert_close(g, r, dtype, f"{backend} grad {i}")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layers", [ALEX_64, ODD], ids=["alex64", "odd"])
def test_matches_reference(backend, dtype, layers):
    check(backend, *make_inputs(3, layers, dtype, seed=len(layers)))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_batch_one_relu_features(backend):
    check(backend, *make_inputs(1, ALEX_64, torch.float32, seed=2, relu=True))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_noncontiguous_and_lpips_shaped_weights(backend):
    f0, f1, ws = make_inputs(2, ODD, torch.float32, seed=3)
    f0 = [noncontiguous(f) for f in f0]
    f1 = [f.detach().to(memory_format=torch.channels_last).requires_grad_() for f in f1]
    ws = [w.view(1, -1, 1, 1) for w in ws]  # the lpips package's 1x1 conv weight shape
    check(backend, f0, f1, ws)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_identical_inputs_give_zero(backend):
    f0, _, ws = make_inputs(2, ALEX_64[:2], torch.float32, seed=4)
    d = ops.lpips_distance(f0, [f.detach().clone() for f in f0], ws, backend=backend)
    assert d.abs().max().item() < 1e-6


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_all_zero_feature_vector_has_finite_gradient(backend):
    """Where a position is 0 in every channel (ReLU), the reference's autograd gives NaN; the kernels don't."""
    f0, f1, ws = make_inputs(2, [(8, 5, 5)], torch.float32, seed=5)
    with torch.no_grad():
        f0[0][:, :, 2, 3] = 0
    d = ops.lpips_distance(f0, f1, ws, backend=backend)
    grads = torch.autograd.grad(d.sum(), f0 + f1)
    assert all(torch.isfinite(g).all() for g in grads)
    ref = ops.lpips_distance(f0, f1, ws, backend="torch")
    assert_close(d, ref, torch.float32, "distance with a zero vector")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_gradient_to_one_side_only(backend):
    f0, f1, ws = make_inputs(2, ODD, torch.float32, seed=6)
    f1 = [f.detach() for f in f1]
    d = ops.lpips_distance(f0, f1, ws, backend=backend)
    grads = torch.autograd.grad(d.sum(), f0)
    _, ref = reference(f0, f1, ws, torch.ones(2))
    for g, r in zip(grads, ref[: len(f0)]):
        assert_close(g, r, torch.float32, "one-sided grad")
    with torch.no_grad():
        assert_close(ops.lpips_distance(f0, f1, ws, backend=backend), d, torch.float32, "no_grad")


@pytest.mark.filterwarnings("ignore::UserWarning:torchvision")
@pytest.mark.parametrize("backend", ["torch"] + KERNEL_BACKENDS)
def test_equals_lpips_package(backend):
    """docs/metrics.md: equal to lpips.LPIPS (v0.1 linear weights) within 1e-5 given the same backbone."""
    lpips = pytest.importorskip("lpips")
    torch.manual_seed(7)
    model = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False).eval()
    x0, x1 = torch.rand(2, 3, 64, 64) * 2 - 1, torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        expected = model(x0, x1).flatten()
        feats0 = model.net.forward(model.scaling_layer(x0))
        feats1 = model.net.forward(model.scaling_layer(x1))
        ws = [lin.model[-1].weight for lin in model.lins]
        got = ops.lpips_distance(list(feats0), list(feats1), ws, backend=backend)
    assert (got - expected).abs().max().item() <= 1e-5 * max(1.0, expected.abs().max().item())


@settings(max_examples=20, deadline=None)
@given(
    B=st.integers(1, 3), C=st.integers(2, 70), H=st.integers(1, 20), W=st.integers(1, 20),
    layers=st.integers(1, 3), dtype=st.sampled_from(DTYPES), backend=st.sampled_from(KERNEL_BACKENDS),
    seed=st.integers(0, 2**31 - 1), relu=st.booleans(),
)
def test_hypothesis(B, C, H, W, layers, dtype, backend, seed, relu):
    shapes = [(C + 3 * i, max(1, H - i), W) for i in range(layers)]
    f0, f1, ws = make_inputs(B, shapes, dtype, seed, relu=relu)
    # A ReLU map can have (near-)zero feature vectors: the reference gradient is NaN there (or beyond
    # the fp16 range), so only the distance is compared then.
    min_norm = min(f.detach().float().norm(dim=1).min().item() for f in f0 + f1)
    check(backend, f0, f1, ws, seed=seed, grads=min_norm > 1e-2)


def test_torch_compile_cpp_op():
    from fastunlearn import _ext

    _ext.load()
    f0, f1, ws = make_inputs(2, ODD, torch.float32, seed=8)

    def f(a0, a1, a2, b0, b1, b2):
        return ops.lpips_distance([a0, a1, a2], [b0, b1, b2], ws, backend="cpu").sum()

    d = torch.compile(f, backend="aot_eager", fullgraph=True)(*f0, *f1)
    grads = torch.autograd.grad(d, f0 + f1)
    ref_d, ref_grads = reference(f0, f1, ws, torch.ones(2))
    assert_close(d, ref_d.sum(), torch.float32, "compiled distance")
    for g, r in zip(grads, ref_grads):
        assert_close(g, r, torch.float32, "compiled grad")


def test_opcheck_cpp_op():
    from fastunlearn import _ext

    _ext.load()
    f0, f1, ws = make_inputs(2, [(6, 5, 7)], torch.float32, seed=9)
    torch.library.opcheck(torch.ops.fastunlearn.lpips_layer_fwd.default, (f0[0], f1[0], ws[0], True),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))
    torch.library.opcheck(torch.ops.fastunlearn.lpips_layer_fwd.default,
                          (f0[0].detach(), f1[0].detach(), ws[0], False),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


def _bad_cases():
    f0, f1, ws = make_inputs(2, [(4, 3, 3), (6, 2, 2)], torch.float32, seed=10)
    return [
        ("length", (f0, f1[:1], ws), "one length"),
        ("empty", ([], [], []), "non-empty"),
        ("tensor not list", (f0[0], f1[0], ws[0]), "must be a list"),
        ("shape", (f0, [f1[0][:, :2], f1[1]], ws), "one shape"),
        ("3d", ([f[0] for f in f0], [f[0] for f in f1], ws), "\\(B, C, H, W\\)"),
        ("dtype", (f0, [f1[0].half(), f1[1]], ws), "feats1 torch.float16"),
        ("weights", (f0, f1, [ws[0][:3], ws[1]]), "3 values for 4 channels"),
        ("batch", (f0, f1, ws) if False else ([f0[0], f0[1][:1]], [f1[0], f1[1][:1]], ws), "batch 1, layer 0 has 2"),
        ("int", ([f0[0].int()], [f1[0].int()], ws[:1]), "floating-point"),
        ("device", (f0, [f1[0].to("meta"), f1[1]], ws), "all must be on cpu"),
    ]


@pytest.mark.parametrize("case", range(10))
def test_bad_input_is_one_line_error(case):
    name, args, match = _bad_cases()[case]
    with pytest.raises(FastUnlearnError, match=match) as info:
        ops.lpips_distance(*args, backend="cpu")
    assert "\n" not in str(info.value), name
