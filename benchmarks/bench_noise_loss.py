"""Benchmark noise_prediction_loss: forward, backward, full (forward + backward); time and peak memory.

Providers: torch (eager reference, the baseline), torch_compile (torch.compile of the reference),
cpu (C++ op), triton and cuda (GPU). Shapes: SD 1.x latents (B, 4, 64, 64) and SDXL
(B, 4, 128, 128), B = 1..64, K = 2 targets (ESD target). Rows go to results/noise_loss.csv.

    python benchmarks/bench_noise_loss.py --quick            # CPU / CI smoke
    python benchmarks/bench_noise_loss.py --device cuda      # GPU sweep
"""
from __future__ import annotations

import bench_common as bc
import torch

from fastunlearn import ops
from fastunlearn.ops import noise_prediction_loss_reference

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def sweep(device: str, quick: bool):
    if quick:
        return [((8, 4, 128, 128), 2), ((1, 4, 64, 64), 2)]
    if device == "cpu":
        return [((b, 4, 64, 64), 2) for b in (1, 8, 32)] + [((b, 4, 128, 128), 2) for b in (1, 8)]
    return [((b, 4, 64, 64), 2) for b in (1, 8, 32, 64)] + [((b, 4, 128, 128), 2) for b in (1, 8, 32, 64)]


def _reference_mean(s, t, c, w):
    return noise_prediction_loss_reference(s, t, c, w, "mean")


# One compiled function for the whole sweep: after the first shape change it compiles a
# dynamic-shape version (automatic dynamic shapes), which keeps the GPU sweep's compile time bounded.
_compiled_reference = torch.compile(_reference_mean)


def make_fn(provider: str):
    if provider == "torch":
        return _reference_mean
    if provider == "torch_compile":
        return _compiled_reference
    # check_finite=False, as the trainer calls it: the default check reads the result on the host (a sync)
    # that the eager reference does not do, which on a GPU costs more than the kernels themselves
    return lambda s, t, c, w: ops.noise_prediction_loss(s, t, c, w, "mean", backend=provider, check_finite=False)


def bench_config(shape, K, dtype, provider, device, reps, modes):
    g = torch.Generator(device="cpu").manual_seed(0)
    student = torch.randn(shape, generator=g).to(device=device, dtype=dtype).requires_grad_()
    targets = [torch.randn(shape, generator=g).to(device=device, dtype=dtype) for _ in range(K)]
    coeffs = torch.randn(shape[0], K, generator=g).to(device)
    weights = torch.rand(shape[0], generator=g).to(device)
    fn = make_fn(provider)
    state = {}

    def forward():
        state["loss"] = fn(student, targets, coeffs, weights)

    def full():
        student.grad = None
        fn(student, targets, coeffs, weights).backward()

    def backward():
        state["loss"].backward(retain_graph=True)

    out = {}
    if "forward" in modes:
        out["forward"] = bc.measure(forward, device, reps)
    if "backward" in modes:
        forward()
        out["backward"] = bc.measure(backward, device, reps, setup=lambda: setattr(student, "grad", None))
    if "full" in modes:
        out["full"] = bc.measure(full, device, reps)
    return out


def check(device: str, reps: int, no_csv: bool):
    """The acceptance check: fused forward+backward vs the eager reference at (8, 4, 128, 128) fp32, K=2."""
    candidate = "cpu" if device == "cpu" else "triton"
    g = torch.Generator().manual_seed(0)
    shape = (8, 4, 128, 128)
    student = torch.randn(shape, generator=g).to(device).requires_grad_()
    targets = [torch.randn(shape, generator=g).to(device) for _ in range(2)]
    coeffs, weights = torch.randn(8, 2, generator=g).to(device), torch.rand(8, generator=g).to(device)

    def full(provider):
        fn = make_fn(provider)

        def run():
            student.grad = None
            fn(student, targets, coeffs, weights).backward()
        return run

    times = bc.interleaved({"torch": full("torch"), candidate: full(candidate)}, device, reps)
    row = bc.ratio_report(f"noise_prediction_loss fwd+bwd {shape} fp32 K=2", times, "torch", candidate, device)
    if not no_csv:
        bc.append_check(row)
    return row


def main(argv=None):
    args = bc.parser(__doc__.splitlines()[0], "(8,4,128,128)").parse_args(argv)
    bc.prepare(args)
    if args.check:
        return check(args.device, args.reps or 50, args.no_csv)
    configs = ((f"{tuple(shape)} K={K}", (shape, K)) for shape, K in sweep(args.device, args.quick))
    return bc.run_sweep(args, "noise_prediction_loss", "noise_loss", configs, lambda c, *rest: bench_config(*c, *rest), [], DTYPES)

if __name__ == "__main__":
    main()
