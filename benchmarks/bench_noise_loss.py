"""Benchmark noise_prediction_loss: forward, backward, full (forward + backward); time and peak memory.

Providers: torch (eager reference, the baseline), torch_compile (torch.compile of the reference),
cpu (C++ op), triton and cuda (GPU). Shapes: SD 1.x latents (B, 4, 64, 64) and SDXL
(B, 4, 128, 128), B = 1..64, K = 2 targets (ESD target). Rows go to results/noise_loss.csv.

    python benchmarks/bench_noise_loss.py --quick            # CPU / CI smoke
    python benchmarks/bench_noise_loss.py --device cuda      # GPU sweep
"""
from __future__ import annotations

import argparse

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
    return lambda s, t, c, w: ops.noise_prediction_loss(s, t, c, w, "mean", backend=provider)


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
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="two shapes, fp32, few reps (CPU / CI smoke)")
    p.add_argument("--providers", default=None, help="comma list (default: all available on the device)")
    p.add_argument("--dtypes", default=None, help="comma list of fp32,bf16,fp16 (default fp32; GPU fp32,bf16)")
    p.add_argument("--modes", default="forward,backward,full")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--no-csv", action="store_true")
    p.add_argument("--exact-cpu-memory", action="store_true",
                   help="fix glibc's mmap threshold so CPU peak memory is exact (slows allocation-heavy code)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--check", action="store_true", help="only the interleaved acceptance ratio (8,4,128,128)")
    args = p.parse_args(argv)
    if args.exact_cpu_memory:
        bc.fix_malloc()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.check:
        return check(args.device, args.reps or 50, args.no_csv)
    if args.providers:
        providers = args.providers.split(",")
    elif args.device == "cuda":
        providers = ["torch", "torch_compile", "triton", "cuda"]
    else:
        providers = ["torch", "torch_compile", "cpu"]
    dtypes = (args.dtypes or ("fp32" if args.device == "cpu" or args.quick else "fp32,bf16")).split(",")
    reps = args.reps or (5 if args.quick else (20 if args.device == "cpu" else 100))
    modes = args.modes.split(",")
    env = bc.env_fields(args.device)
    rows = []
    for shape, K in sweep(args.device, args.quick):
        for dname in dtypes:
            for provider in providers:
                try:
                    res = bench_config(shape, K, DTYPES[dname], provider, args.device, reps, modes)
                except Exception as exc:  # noqa: BLE001  a provider missing here is reported, not fatal
                    print(f"skip {provider} {shape} {dname}: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
                    continue
                for mode, m in res.items():
                    rows.append({**env, "op": "noise_prediction_loss", "config": f"{tuple(shape)} K={K}",
                                 "dtype": dname, "provider": provider, "mode": mode, **m})
    bc.add_speedups(rows, "torch")
    bc.print_table(rows)
    if not args.no_csv:
        print("appended to", bc.append_rows("noise_loss", rows))
    return rows


if __name__ == "__main__":
    main()
