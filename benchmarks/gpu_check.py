"""Correctness check of every kernel backend on one device, copy bandwidth, and the final table.

    python benchmarks/gpu_check.py --device cuda --json out.json   # on the GPU machine
    python benchmarks/gpu_check.py --device cpu --quick            # CPU side (CI): cpu backend
    python benchmarks/gpu_check.py --summary out.json [checks.csv] # print the short table

Each check compares outputs and gradients with the fp32 PyTorch reference on the same values
(fp32 <= 1e-5, fp16/bf16 <= 1e-2 relative to the largest reference value). Exit status 1 if any
check fails. Called by benchmarks/gpu_check.sh.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TOL = {"fp32": 1e-5, "fp16": 1e-2, "bf16": 1e-2}
ALEX_64 = [(64, 15, 15), (192, 7, 7), (384, 3, 3), (256, 3, 3), (256, 3, 3)]
ODD_LAYERS = [(5, 47, 31), (3, 1, 1), (130, 9, 2)]


def rel(got, ref) -> float:
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(got).all():
        return float("inf")
    return ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def noise_case(ops, backend, device, shape, K, dname, reduction, noncontig, seed):
    dtype = DTYPES[dname]
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(shape, generator=g).to(device=device, dtype=dtype)
    ts = [torch.randn(shape, generator=g).to(device=device, dtype=dtype) for _ in range(K)]
    if noncontig:
        s = s.transpose(1, 2).contiguous().transpose(1, 2)
        ts = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in ts]
    s.requires_grad_()
    c = torch.randn(shape[0], K, generator=g).to(device)
    w = torch.randn(shape[0], generator=g).to(device)
    loss = ops.noise_prediction_loss(s, ts, c, w, reduction, backend=backend)
    go = (torch.rand(loss.shape, generator=g) + 0.5).to(device)
    (grad,) = torch.autograd.grad(loss, s, go)
    s32 = s.detach().float().requires_grad_()
    ref = ops.noise_prediction_loss(s32, [t.float() for t in ts], c, w, reduction, backend="torch")
    (ref_grad,) = torch.autograd.grad(ref, s32, go)
    assert grad.dtype == dtype, f"grad dtype {grad.dtype}"
    return max(rel(loss, ref), rel(grad, ref_grad))


def lpips_case(ops, backend, device, layers, B, dname, seed):
    dtype = DTYPES[dname]
    g = torch.Generator().manual_seed(seed)
    f0 = [torch.randn(B, *s, generator=g).relu().add_(0.01).to(device=device, dtype=dtype).requires_grad_()
          for s in layers]
    f1 = [torch.randn(B, *s, generator=g).to(device=device, dtype=dtype).requires_grad_() for s in layers]
    ws = [torch.rand(s[0], generator=g).to(device) for s in layers]
    d = ops.lpips_distance(f0, f1, ws, backend=backend)
    go = (torch.rand(B, generator=g) + 0.5).to(device)
    grads = torch.autograd.grad(d, f0 + f1, go)
    a = [f.detach().float().requires_grad_() for f in f0]
    b = [f.detach().float().requires_grad_() for f in f1]
    ref = ops.lpips_distance(a, b, ws, backend="torch")
    ref_grads = torch.autograd.grad(ref, a + b, go)
    return max([rel(d, ref)] + [rel(x, y) for x, y in zip(grads, ref_grads)])


def run_checks(device: str, backends: list[str], quick: bool) -> list[dict]:
    from fastunlearn import ops

    results = []

    def record(name, fn):
        t0 = time.perf_counter()
        try:
            err = fn()
            tol = TOL[name.split(" ")[2]]
            ok = err <= tol
            detail = f"rel err {err:.2e} (tol {tol:g})"
        except Exception as exc:  # noqa: BLE001  every failure is reported, the run goes on
            ok, err, detail = False, float("nan"), f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            if os.environ.get("FASTUNLEARN_CHECK_TRACEBACK") == "1":
                traceback.print_exc()
        results.append({"check": name, "ok": ok, "err": err, "detail": detail, "s": time.perf_counter() - t0})
        print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)

    dnames = ["fp32", "bf16"] if quick else ["fp32", "fp16", "bf16"]
    shapes = [(3, 5, 47, 31), (1, 4, 64, 64)] + ([] if quick else [(8, 4, 128, 128)])
    for backend in backends:
        for dname in dnames:
            for shape in shapes:
                for K in ([2] if quick else [1, 2, 3, 4]):
                    for reduction in ["mean", "sum", "none"]:
                        record(f"noise {backend} {dname} {shape} K={K} {reduction}",
                               lambda: noise_case(ops, backend, device, shape, K, dname, reduction, False, K))
            record(f"noise {backend} {dname} non-contiguous",
                   lambda: noise_case(ops, backend, device, (3, 5, 47, 31), 3, dname, "none", True, 7))
            for label, layers, B in [("alex64", ALEX_64, 3), ("odd", ODD_LAYERS, 2)] + (
                    [] if quick else [("alex256", [(64, 63, 63), (192, 31, 31), (384, 15, 15)], 8)]):
                record(f"lpips {backend} {dname} {label} B={B}",
                       lambda: lpips_case(ops, backend, device, layers, B, dname, 11))
    return results


def copy_bandwidth(device: str) -> float:
    """Device-to-device copy bandwidth in GB/s (read + write), median of 20 copies."""
    n = (1 << 28) if device == "cuda" else (1 << 25)  # 1 GiB on the GPU, 128 MiB on the CPU (fp32)
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    times = []
    for i in range(25):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        dst.copy_(src)
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= 5:
            times.append(time.perf_counter() - t0)
    times.sort()
    return 2 * src.numel() * src.element_size() / times[len(times) // 2] / 1e9


def kernel_bandwidth(device: str, backend: str) -> float:
    """Effective GB/s of the fused noise loss forward (reads student + 2 targets, writes grad)."""
    from fastunlearn import ops

    shape = (64, 4, 128, 128) if device == "cuda" else (8, 4, 128, 128)
    s = torch.randn(shape, device=device, requires_grad=True)
    ts = [torch.randn(shape, device=device) for _ in range(2)]
    c, w = torch.randn(shape[0], 2, device=device), torch.rand(shape[0], device=device)
    times = []
    for i in range(25):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        ops.noise_prediction_loss(s, ts, c, w, backend=backend, check_finite=False)
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= 5:
            times.append(time.perf_counter() - t0)
    times.sort()
    return 4 * s.numel() * s.element_size() / times[len(times) // 2] / 1e9


def summary(json_path: str, checks_csv: str | None) -> None:
    data = json.loads(Path(json_path).read_text())
    res = data["checks"]
    failed = [r for r in res if not r["ok"]]
    print("=" * 78)
    print(f"fastunlearn kernel check on {data['device_name']} (torch {data['torch']}, triton {data['triton']})")
    print(f"{'correctness':<44} {len(res) - len(failed)}/{len(res)} passed")
    for backend in data["backends"]:
        rs = [r for r in res if r["check"].split(" ")[1] == backend]
        worst = max((r["err"] for r in rs if r["ok"]), default=float("nan"))
        print(f"  {backend:<42} {sum(r['ok'] for r in rs)}/{len(rs)} passed, worst rel err {worst:.1e}")
    for r in failed[:10]:
        print(f"  FAIL {r['check']}: {r['detail']}")
    print(f"{'copy bandwidth (device to device)':<44} {data['copy_gbps']:.0f} GB/s")
    for backend, gbps in data.get("kernel_gbps", {}).items():
        print(f"{'noise loss fwd effective bandwidth, ' + backend:<44} {gbps:.0f} GB/s "
              f"({100 * gbps / data['copy_gbps']:.0f}% of copy)")
    if checks_csv and Path(checks_csv).exists():
        rows = list(csv.DictReader(Path(checks_csv).open()))
        for row in rows[-4:]:
            print(f"{row['check'][:44]:<44} {row['candidate']} {float(row['candidate_ms']):.3f} ms vs "
                  f"{row['baseline']} {float(row['baseline_ms']):.3f} ms = {float(row['speedup']):.2f}x")
    print("=" * 78)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--backends", default=None, help="default: triton,cuda on cuda; cpu on cpu")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--summary", nargs="+", metavar=("JSON", "CHECKS_CSV"), help="print the table of a run")
    args = p.parse_args(argv)
    if args.summary:
        summary(args.summary[0], args.summary[1] if len(args.summary) > 1 else None)
        return 0
    backends = (args.backends or ("triton,cuda" if args.device == "cuda" else "cpu")).split(",")
    if args.device == "cuda":
        print(f"device: {torch.cuda.get_device_name()} capability {torch.cuda.get_device_capability()}", flush=True)
    results = run_checks(args.device, backends, args.quick)
    copy_gbps = copy_bandwidth(args.device)
    kernel_gbps = {}
    for b in backends:
        try:
            kernel_gbps[b] = kernel_bandwidth(args.device, b)
        except Exception as exc:  # noqa: BLE001
            print(f"bandwidth {b}: {type(exc).__name__}: {exc}")
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    from bench_common import device_name

    data = {"device": args.device, "device_name": device_name(args.device), "torch": torch.__version__,
            "triton": triton_version, "backends": backends, "checks": results, "copy_gbps": copy_gbps,
            "kernel_gbps": kernel_gbps}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(data, indent=1))
        summary(args.json, None)
    failed = sum(not r["ok"] for r in results)
    print(f"{len(results) - failed}/{len(results)} checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
