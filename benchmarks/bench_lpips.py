"""Benchmark lpips_distance given feature maps: forward (no grad, the metric), backward, full.

Providers: lpips_pkg (the lpips package's own distance part: normalize_tensor + lin layers +
spatial_average, from lpips.LPIPS(net=..., pnet_rand=True); the baseline), torch (our
reference), torch_compile (compiled reference), cpu (C++ op), triton and cuda (GPU).
Feature maps: the AlexNet / VGG16 LPIPS layer shapes of 64..512 px images (post-ReLU random
values). Rows go to results/lpips.csv.

    python benchmarks/bench_lpips.py --quick
    python benchmarks/bench_lpips.py --device cuda
"""
from __future__ import annotations

import bench_common as bc
import torch

from fastunlearn import ops
from fastunlearn.ops import lpips_distance_reference

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def layer_shapes(net: str, size: int):
    """(C, H, W) of the five LPIPS taps of AlexNet (relu1..5) or VGG16 (relu1_2..relu5_3)."""
    if net == "alex":
        h1 = (size + 4 - 11) // 4 + 1
        h2 = (h1 - 3) // 2 + 1
        h3 = (h2 - 3) // 2 + 1
        return [(64, h1, h1), (192, h2, h2), (384, h3, h3), (256, h3, h3), (256, h3, h3)]
    return [(64, size, size), (128, size // 2, size // 2), (256, size // 4, size // 4),
            (512, size // 8, size // 8), (512, size // 16, size // 16)]


def sweep(device: str, quick: bool):
    if quick:
        return [("alex", 256, 8), ("alex", 64, 1)]
    if device == "cpu":
        return [("alex", 64, 8), ("alex", 256, 1), ("alex", 256, 8), ("alex", 512, 4), ("vgg", 64, 8),
                ("vgg", 256, 2)]
    return ([("alex", s, b) for s in (64, 256, 512) for b in (1, 8, 32)]
            + [("vgg", s, b) for s in (64, 256) for b in (1, 8, 32)] + [("vgg", 512, 8)])


def lpips_package_distance(net: str, device: str):
    """The distance part of lpips.LPIPS.forward, given the backbone's feature maps."""
    import lpips

    model = lpips.LPIPS(net=net, pnet_rand=True, verbose=False).eval().to(device)

    def distance(f0, f1, _weights):
        val = 0
        for kk in range(model.L):
            d = (lpips.normalize_tensor(f0[kk]) - lpips.normalize_tensor(f1[kk])) ** 2
            val = val + lpips.spatial_average(model.lins[kk](d), keepdim=True)
        return val.flatten()

    return distance, [lin.model[-1].weight.detach().reshape(-1) for lin in model.lins]


_compiled_reference = torch.compile(lpips_distance_reference)  # see bench_noise_loss.py


def make_fn(provider, net, device):
    if provider == "lpips_pkg":
        return lpips_package_distance(net, device)
    if provider == "torch":
        return lpips_distance_reference, None
    if provider == "torch_compile":
        return _compiled_reference, None
    # check_finite=False: the default check is a host sync that the baselines do not do (see bench_noise_loss.py)
    return (lambda f0, f1, w: ops.lpips_distance(f0, f1, w, backend=provider, check_finite=False)), None


def bench_config(net, size, batch, dtype, provider, device, reps, modes):
    g = torch.Generator(device="cpu").manual_seed(0)
    shapes = layer_shapes(net, size)
    f0 = [torch.randn(batch, *s, generator=g).relu().to(device=device, dtype=dtype) for s in shapes]
    f1 = [torch.randn(batch, *s, generator=g).relu().to(device=device, dtype=dtype) for s in shapes]
    fn, weights = make_fn(provider, net, device)
    if weights is None:
        weights = [torch.rand(s[0], generator=g).to(device) for s in shapes]
    if provider == "lpips_pkg" and dtype != torch.float32:
        raise RuntimeError("the lpips package runs in fp32 only")
    state = {}
    g0 = [f.detach().clone().requires_grad_() for f in f0]
    g1 = [f.detach().clone().requires_grad_() for f in f1]

    def forward():
        with torch.no_grad():
            fn(f0, f1, weights)

    def full():
        for t in g0 + g1:
            t.grad = None
        fn(g0, g1, weights).sum().backward()

    def backward():
        state["d"].backward(retain_graph=True)

    out = {}
    if "forward" in modes:
        out["forward"] = bc.measure(forward, device, reps)
    if "backward" in modes:
        state["d"] = fn(g0, g1, weights).sum()
        out["backward"] = bc.measure(backward, device, reps, setup=lambda: [setattr(t, "grad", None) for t in g0 + g1])
        state.clear()
    if "full" in modes:
        out["full"] = bc.measure(full, device, reps)
    return out


def check(device: str, reps: int, no_csv: bool):
    """The acceptance check: fused distance vs the lpips package's distance part, alex 256 px, batch 8."""
    candidate = "cpu" if device == "cpu" else "triton"
    g = torch.Generator().manual_seed(0)
    shapes = layer_shapes("alex", 256)
    f0 = [torch.randn(8, *s, generator=g).relu().to(device) for s in shapes]
    f1 = [torch.randn(8, *s, generator=g).relu().to(device) for s in shapes]
    pkg, weights = lpips_package_distance("alex", device)
    ours = make_fn(candidate, "alex", device)[0]

    def forward(fn):
        def run():
            with torch.no_grad():
                fn(f0, f1, weights)
        return run

    times = bc.interleaved({"lpips_pkg": forward(pkg), candidate: forward(ours)}, device, reps)
    row = bc.ratio_report("lpips_distance forward alex 256px B=8 fp32", times, "lpips_pkg", candidate, device)
    if not no_csv:
        bc.append_check(row)
    return row


def main(argv=None):
    args = bc.parser(__doc__.splitlines()[0], "alex 256 px, B=8").parse_args(argv)
    bc.prepare(args)
    if args.check:
        return check(args.device, args.reps or 50, args.no_csv)
    configs = ((f"{net} {size}px B={batch}", (net, size, batch)) for net, size, batch in sweep(args.device, args.quick))
    return bc.run_sweep(args, "lpips_distance", "lpips", configs, lambda c, *rest: bench_config(*c, *rest), ["lpips_pkg"], DTYPES)

if __name__ == "__main__":
    main()
