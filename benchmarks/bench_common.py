"""Shared benchmark plumbing: timing, peak memory, environment description, CSV rows, table.

Timing: CUDA events on the GPU, perf_counter on the CPU; every number is the median of `reps`
runs after warm-up. Peak memory is the extra memory at the peak of one call over what was live
before it: torch.cuda.max_memory_allocated on the GPU; on the CPU the growth of the process's
resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs; Linux only, NaN
elsewhere). By default glibc keeps freed blocks for reuse, so CPU peaks are lower bounds;
--exact-cpu-memory fixes the mmap threshold at 128 KiB to make them exact, at the price of page
faults on every large allocation (which slows allocation-heavy providers: don't compare times then).
"""
from __future__ import annotations

import csv
import ctypes
import datetime as _dt
import gc
import os
import platform
import statistics
import time
from pathlib import Path

import torch

try:  # the compiled baselines are timed with backward(retain_graph=True), which donated buffers forbid
    import torch._functorch.config as _functorch_config

    _functorch_config.donated_buffer = False
except (ImportError, AttributeError):
    pass

RESULTS = Path(__file__).resolve().parent / "results"
FIELDS = ["date", "device", "torch", "triton", "python", "threads", "op", "config", "dtype", "provider", "mode",
          "ms_median", "ms_min", "ms_max", "peak_mb", "reps", "speedup_vs_baseline", "baseline"]


def fix_malloc() -> None:
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD: fixed, no dynamic growth
    except (OSError, AttributeError):
        pass


def _status_kb(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} cpus)"


def env_fields(device: str) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return {"date": _dt.datetime.now().isoformat(timespec="seconds"), "device": device_name(device),
            "torch": torch.__version__, "triton": triton_version, "python": platform.python_version(),
            "threads": torch.get_num_threads()}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_fn(fn, device: str, reps: int, warmup: int = 2, setup=None) -> list[float]:
    """Milliseconds of fn() for each of `reps` runs; setup() (untimed) runs before each."""
    for _ in range(warmup):
        if setup:
            setup()
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        if setup:
            setup()
        _sync(device)
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def peak_mb(fn, device: str, setup=None) -> float:
    """Extra memory (MiB) at the peak of one fn() call over what was live before it."""
    if setup:
        setup()
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    before = _status_kb("VmRSS")
    if before is None or not _reset_hwm():
        return float("nan")
    fn()
    peak = _status_kb("VmHWM")
    return max(0.0, (peak - before) / 1024) if peak is not None else float("nan")


def measure(fn, device: str, reps: int, setup=None) -> dict:
    times = time_fn(fn, device, reps, setup=setup)
    return {"ms_median": statistics.median(times), "ms_min": min(times), "ms_max": max(times),
            "peak_mb": peak_mb(fn, device, setup=setup), "reps": reps}


def append_csv(path, rows: list[dict], fields: list[str] | None = None) -> Path:
    """Append rows to a CSV file (header on first write; floats to 4 decimals; extra keys ignored)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields or list(rows[0]), extrasaction="ignore")
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in row.items()})
    return path


def append_rows(name: str, rows: list[dict]) -> Path:
    return append_csv(RESULTS / f"{name}.csv", rows, FIELDS)


def add_speedups(rows: list[dict], baseline: str) -> None:
    """speedup_vs_baseline = baseline median / row median, for rows of one (config, dtype, mode)."""
    base = {(r["config"], r["dtype"], r["mode"]): r["ms_median"] for r in rows if r["provider"] == baseline}
    for r in rows:
        b = base.get((r["config"], r["dtype"], r["mode"]))
        r["baseline"] = baseline
        r["speedup_vs_baseline"] = b / r["ms_median"] if b and r["ms_median"] > 0 else float("nan")


def print_table(rows: list[dict]) -> None:
    print(f"{'config':<34} {'dtype':<9} {'mode':<9} {'provider':<14} {'ms':>10} {'peak MiB':>9} {'speedup':>8}")
    for r in rows:
        print(f"{r['config']:<34} {r['dtype']:<9} {r['mode']:<9} {r['provider']:<14} {r['ms_median']:>10.3f} "
              f"{r['peak_mb']:>9.1f} {r.get('speedup_vs_baseline', float('nan')):>7.2f}x")


def interleaved(fns: dict, device: str, reps: int, warmup: int = 3) -> dict:
    """Time several callables round-robin (one run of each per round), so that load from other
    processes hits them alike. Returns {name: sorted list of ms}."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            times[name].extend(time_fn(fn, device, reps=1, warmup=0))
    return {name: sorted(t) for name, t in times.items()}


def ratio_report(label: str, times: dict, baseline: str, candidate: str, device: str) -> dict:
    """Median times and the ratio of medians baseline / candidate; one printed line."""
    mb, mc = statistics.median(times[baseline]), statistics.median(times[candidate])
    row = {**env_fields(device), "check": label, "baseline": baseline, "candidate": candidate,
           "baseline_ms": mb, "candidate_ms": mc, "speedup": mb / mc, "reps": len(times[baseline])}
    print(f"CHECK {label}: {baseline} {mb:.3f} ms, {candidate} {mc:.3f} ms -> {mb / mc:.2f}x "
          f"(median of {len(times[baseline])} interleaved runs, {row['threads']} threads, {row['device']})")
    return row


def append_check(row: dict) -> Path:
    return append_csv(RESULTS / "checks.csv", [row], ["date", "device", "torch", "triton", "python", "threads", "check",
                                                      "baseline", "candidate", "baseline_ms", "candidate_ms", "speedup",
                                                      "reps"])


def parser(description: str, check_help: str):
    """The command line both benchmark scripts share."""
    import argparse

    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="two configs, fp32, few reps (CPU / CI smoke)")
    p.add_argument("--providers", default=None, help="comma list (default: all available on the device)")
    p.add_argument("--dtypes", default=None, help="comma list of fp32,bf16,fp16 (default fp32; GPU fp32,bf16)")
    p.add_argument("--modes", default="forward,backward,full")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--no-csv", action="store_true")
    p.add_argument("--exact-cpu-memory", action="store_true",
                   help="fix glibc's mmap threshold so CPU peak memory is exact (slows allocation-heavy code)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--check", action="store_true", help=f"only the interleaved acceptance ratio ({check_help})")
    return p


def prepare(args) -> None:
    if args.exact_cpu_memory:
        fix_malloc()
    if args.threads:
        torch.set_num_threads(args.threads)


def run_sweep(args, op: str, csv_name: str, configs, bench, extra_providers, dtypes_by_name) -> list[dict]:
    """Every (config, dtype, provider) of a sweep: `bench(config, dtype, provider, device, reps, modes)` gives
    {mode: metrics}; `configs` yields (label, config). Rows go to the table and, unless --no-csv, the CSV."""
    if args.providers:
        providers = args.providers.split(",")
    else:
        providers = [*extra_providers, "torch", "torch_compile", *(["triton", "cuda"] if args.device == "cuda" else ["cpu"])]
    dtypes = (args.dtypes or ("fp32" if args.device == "cpu" or args.quick else "fp32,bf16")).split(",")
    reps = args.reps or (5 if args.quick else (20 if args.device == "cpu" else 100))
    modes = args.modes.split(",")
    env = env_fields(args.device)
    rows = []
    for label, config in configs:
        config_rows = []
        for dname in dtypes:
            for provider in providers:
                try:
                    res = bench(config, dtypes_by_name[dname], provider, args.device, reps, modes)
                except Exception as exc:  # noqa: BLE001  a provider missing here is reported, not fatal
                    print(f"skip {provider} {label} {dname}: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
                    continue
                for mode, m in res.items():
                    config_rows.append({**env, "op": op, "config": label, "dtype": dname, "provider": provider,
                                        "mode": mode, **m})
        baseline = next((p for p in (*extra_providers, "torch") if any(r["provider"] == p for r in config_rows)),
                        "torch")
        add_speedups(config_rows, baseline)
        rows += config_rows
        if not args.no_csv and config_rows:  # each config as it finishes: a sweep cut off keeps what it measured
            append_rows(csv_name, config_rows)
    print_table(rows)
    if not args.no_csv and rows:
        print("appended to", RESULTS / f"{csv_name}.csv")
    return rows
