#!/usr/bin/env python
"""The whole unlearning step against a plain diffusers-style fine-tuning step, same process, same data.

    python benchmarks/bench_train_step.py --arch tiny-sd                    # CPU smoke (CI), seconds
    python benchmarks/bench_train_step.py --arch sdxl --resolution 1024 --batch 1 --precision bf16 \\
        --grad-ckpt on --zero 2 --params full,attn2                          # one GPU
    python benchmarks/bench_train_step.py --arch sd15 --resolution 128 --params attn2 --lora 0,4,16,64

Real SD 1.5 / SDXL UNets are built from configs/arch/*.json with random weights (time and memory do
not depend on the weights). A step of Saddle or OVW is exactly what the trainer runs: one batched
teacher forward (no grad), one batched student forward + backward, the DeepSpeed optimizer step,
with `--batch` forget rows and `--batch` retain rows. The baseline ("finetune") is a plain
denoising step on the same 2 x `--batch` rows: student forward, MSE to the noise, backward, step.

Each configuration runs in a fresh subprocess so its peak memory is its own: CUDA
max_memory_allocated (everything: weights, teacher, optimizer states, activations) on the GPU,
the process's peak RSS (VmHWM, including ~0.5 GB of libraries) on the CPU. `teacher_extra_mb` is
the exact size of what the teacher holds beyond the student (a full copy, or only the original
values of the trained subset when shared; 0 for LoRA, whose teacher is the student with its adapters
off). LoRA rows are labelled `<params>+lora<rank>`, and their fine-tuning baseline trains the same
adapter. Rows go to benchmarks/results/train_step.csv.
"""
from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ARCHS = {"sd15": ROOT / "configs" / "arch" / "sd15_unet.json", "sdxl": ROOT / "configs" / "arch" / "sdxl_unet.json"}
FIELDS = ["date", "device", "torch", "arch", "resolution", "batch_rows", "method", "zero", "precision", "grad_ckpt",
          "params", "teacher", "attention", "s_per_step", "images_per_s", "peak_mb", "teacher_extra_mb",
          "trained_params", "ratio_to_finetune", "steps", "status"]


def build_unet(arch: str, device):
    import torch
    from diffusers import UNet2DConditionModel

    if arch.startswith("tiny"):
        from fastunlearn.testing import tiny_sd_pipeline, tiny_sdxl_pipeline

        return (tiny_sdxl_pipeline() if arch == "tiny-sdxl" else tiny_sd_pipeline()).unet.to(device)
    config = json.loads(ARCHS[arch].read_text())
    with torch.device(device):  # random weights made in place on the device
        return UNet2DConditionModel(**config)


class RandomConditioner:
    """Stands in for fastunlearn.models.Conditioner: prompt ids -> fixed random text embeddings."""

    def __init__(self, unet, n_prompts, device, dtype, seq=77):
        import torch

        c = unet.config
        g = torch.Generator().manual_seed(0)
        self.emb = torch.randn(n_prompts, seq, c.cross_attention_dim, generator=g).to(device, dtype)
        self.sdxl = c.addition_embed_type == "text_time"
        if self.sdxl:
            pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
            self.pooled = torch.randn(n_prompts, pooled, generator=g).to(device, dtype)

    def kwargs(self, ids):
        import torch

        out = {"encoder_hidden_states": self.emb[ids.to(self.emb.device)]}
        if self.sdxl:
            res = 8 * 128  # original/target size 1024, no crop
            time_ids = torch.tensor([res, res, 0, 0, res, res], dtype=self.emb.dtype, device=self.emb.device)
            out["added_cond_kwargs"] = {"text_embeds": self.pooled[ids.to(self.emb.device)],
                                        "time_ids": time_ids.expand(len(ids), -1)}
        return out


def run_one(spec: dict) -> dict:
    """Build, warm up and time one configuration in this process."""
    import deepspeed
    import torch

    from benchmarks.bench_common import _status_kb, env_fields
    from fastunlearn.config import TrainConfig
    from fastunlearn.engine import StepGuard, deepspeed_config, init_distributed, unet_call
    from fastunlearn.methods import Step, make_method
    from fastunlearn.models import AdapterTeacher, SharedTeacher, add_lora, param_subset

    device, _, world = init_distributed()
    dev = device.type
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}[spec["precision"]]
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    unet = build_unet(spec["arch"], device).to(dtype)
    if spec["attention"] == "xformers":
        unet.enable_xformers_memory_efficient_attention()
    rank, subset = spec.get("lora", 0), spec["params"].split("+")[0]
    trained = set(add_lora(unet, rank, None, None, subset) if rank else param_subset(unet, subset))
    for n, p in unet.named_parameters():
        p.requires_grad_(n in trained)
    teacher, extra = None, 0
    if spec["method"] != "finetune":
        if rank:  # the student with its adapters off: nothing extra
            teacher = AdapterTeacher(unet)
        elif spec["teacher"] == "shared":
            teacher = SharedTeacher(unet, trained)
            extra = teacher.extra_bytes()
        else:
            teacher = copy.deepcopy(unet).eval().requires_grad_(False)
            extra = sum(p.numel() * p.element_size() for p in teacher.parameters())
    if spec["grad_ckpt"] == "on":
        unet.enable_gradient_checkpointing()
    unet.train()
    B = spec["batch"]
    cfg = TrainConfig(method=spec["method"] if spec["method"] != "finetune" else "ovw", params=subset,
                      zero_stage=spec["zero"], mixed_precision=spec["precision"], forget_batch_size=B,
                      retain_batch_size=B, gradient_checkpointing=spec["grad_ckpt"] == "on").validate()
    params = [p for p in unet.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(model=unet, model_parameters=params, config=deepspeed_config(cfg, world),
                                      optimizer=torch.optim.AdamW(params, lr=1e-5))
    StepGuard(engine.basic_optimizer)  # the trainer's finiteness check is part of its step
    cond = RandomConditioner(unet, 8, device, dtype)
    c = unet.config
    h = spec["resolution"] // 8
    g = torch.Generator().manual_seed(1)

    def rows(n):
        return torch.randn(n, c.in_channels, h, h, generator=g).to(device, dtype)

    def call(model, items, grad):
        return unet_call(model, items, cond, device, dtype, grad)

    method = make_method(cfg)
    if hasattr(method, "g0"):  # Saddle without its G0 measurement: the step's cost does not depend on it
        method.g0, method.tau = 1.0, 0.2

    def batch():
        t = torch.randint(0, 1000, (B,), generator=g)
        ids = torch.randint(1, 8, (B,), generator=g)
        return Step(x_f=rows(B), x_r=rows(B), t_f=t, t_r=t.flip(0), c_f=ids, c_r=ids.flip(0), a_f=ids * 0,
                    alt_r=ids, eps_f=rows(B), eps_r=rows(B), fresh_f=rows(B),
                    student=lambda *items, grad=True: call(engine, items, grad),
                    teacher=lambda *items: call(teacher, items, False))

    def step():
        st = batch()
        if spec["method"] == "finetune":
            (out,) = call(engine, [(st.x_all, st.t_all, torch.cat([st.c_f, st.c_r]))], True)
            loss = torch.nn.functional.mse_loss(out.float(), torch.cat([st.eps_f, st.eps_r]).float())
        else:
            loss, _ = method.loss(st)
        engine.backward(loss)
        engine.step()

    for _ in range(spec["warmup"]):
        step()
    times = []
    for _ in range(spec["steps"]):
        if dev == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if dev == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    s = times[len(times) // 2]
    peak = torch.cuda.max_memory_allocated() / 2**20 if dev == "cuda" else (_status_kb("VmHWM") or 0) / 1024
    env = env_fields(dev)
    return {"date": env["date"], "device": env["device"], "torch": env["torch"], **{k: spec[k] for k in (
        "arch", "resolution", "method", "zero", "precision", "grad_ckpt", "params", "attention")},
        "teacher": spec["teacher"] if spec["method"] != "finetune" else "-", "batch_rows": 2 * B,
        "s_per_step": s, "images_per_s": 2 * B / s, "peak_mb": peak, "teacher_extra_mb": extra / 2**20,
        "trained_params": sum(p.numel() for p in params), "steps": spec["steps"], "status": "ok"}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="tiny-sd", choices=["tiny-sd", "tiny-sdxl", "sd15", "sdxl"])
    p.add_argument("--resolution", type=int, default=None, help="pixels (default: the architecture's native size)")
    p.add_argument("--batch", type=int, default=1, help="forget rows = retain rows = BATCH; fine-tuning gets 2*BATCH")
    p.add_argument("--methods", default="finetune,saddle,ovw")
    p.add_argument("--zero", default="0", help="comma-separated ZeRO stages, e.g. 0,2,3")
    p.add_argument("--precision", default=None, help="no,bf16,fp16 (default: bf16 on a GPU, no on the CPU)")
    p.add_argument("--grad-ckpt", default="off", help="off,on")
    p.add_argument("--params", default="full", help="full,attn2,non-attn2")
    p.add_argument("--teacher", default="copy,shared", help="copy,shared (shared only applies to a parameter subset)")
    p.add_argument("--attention", default="sdpa", help="sdpa,xformers (xformers rows are skipped if it is not installed)")
    p.add_argument("--lora", default="0", help="comma-separated LoRA ranks (0: train the weights themselves), e.g. 0,4,16,64; "
                                              "LoRA rows train adapters on the attention projections of --params")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--csv", default=str(ROOT / "benchmarks" / "results" / "train_step.csv"))
    p.add_argument("--no-csv", action="store_true", help="print only (smoke runs)")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print("ROW " + json.dumps(run_one(json.loads(args.one))), flush=True)
        return 0
    import torch

    gpu = torch.cuda.is_available()
    native = {"tiny-sd": 32, "tiny-sdxl": 32, "sd15": 512, "sdxl": 1024}[args.arch]
    precisions = (args.precision or ("bf16" if gpu else "no")).split(",")
    try:
        import xformers  # noqa: F401
        has_xformers = True
    except ImportError:
        has_xformers = False
    specs = []
    for method, zero, prec, gc_, params, attention, rank in itertools.product(
            args.methods.split(","), map(int, args.zero.split(",")), precisions, args.grad_ckpt.split(","),
            args.params.split(","), args.attention.split(","), map(int, args.lora.split(","))):
        if attention == "xformers" and not has_xformers or rank and zero == 3:
            continue
        teachers = (["-"] if method == "finetune" else ["adapters off"] if rank else
                    [t for t in args.teacher.split(",") if t == "copy" or (params != "full" and zero < 3)])
        for teacher in teachers:
            specs.append(dict(arch=args.arch, resolution=args.resolution or native, batch=args.batch, method=method,
                              zero=zero, precision=prec, grad_ckpt=gc_, params=f"{params}+lora{rank}" if rank else params,
                              lora=rank, attention=attention, teacher=teacher, steps=args.steps, warmup=args.warmup))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    results = []
    from tqdm.auto import tqdm

    for spec in tqdm(specs, desc="train-step configurations"):
        proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True, text=True, env=env)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("ROW ")), None)
        if line:
            results.append(json.loads(line[4:]))
        else:
            err = (proc.stderr.strip().splitlines() or ["?"])[-1]
            status = "out of memory" if "out of memory" in proc.stderr.lower() else f"failed: {err[:120]}"
            results.append({**{k: spec[k] for k in ("arch", "resolution", "method", "zero", "precision", "grad_ckpt",
                                                     "params", "attention", "teacher", "steps")},
                            "batch_rows": 2 * spec["batch"], "status": status})
    base = {(r["zero"], r["precision"], r["grad_ckpt"], r["params"], r["attention"]): r.get("s_per_step")
            for r in results if r["method"] == "finetune" and r["status"] == "ok"}
    for r in results:
        b = base.get((r["zero"], r["precision"], r["grad_ckpt"], r["params"], r["attention"]))
        r["ratio_to_finetune"] = r["s_per_step"] / b if b and r.get("s_per_step") else None
    cols = ["method", "zero", "precision", "grad_ckpt", "params", "teacher", "s_per_step", "images_per_s", "peak_mb",
            "teacher_extra_mb", "ratio_to_finetune", "status"]
    print(f"{args.arch} at {args.resolution or native} px, {2 * args.batch} rows per step, "
          f"{results[0].get('device', '?') if results else '?'}")
    print("| " + " | ".join(cols) + " |\n" + "|---" * len(cols) + "|")
    for r in results:
        print("| " + " | ".join(f"{r.get(c):.3f}" if isinstance(r.get(c), float) else str(r.get(c, "—")) for c in cols) + " |")
    if not args.no_csv:
        from benchmarks.bench_common import append_csv

        path = append_csv(args.csv, results, FIELDS)
        print(f"appended {len(results)} rows to {path}")
    return 0 if all(r["status"] == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
