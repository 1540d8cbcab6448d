"""One call for the CLI and for benchmarks: run_attack loads both models, runs the chosen attacks on the
unlearned model and the controls (the original model, a retained concept), judges every run and writes the
report, grid and embedding."""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import torch

from ..errors import FastUnlearnError
from .concepts import ATTACKS, TOKEN, AttackConfig, concept_data, replace_concept
from .controls import check_same_model, judged, world_concept
from .encoding import denoise_loss, encoders
from .inversion import InvertedToken, invert, save_embedding
from .prompt_search import _with_prefix, search


def _inversion_run(name, pipe, tok, data, cfg, sampler, judge, loss_batch, device, progress):
    """One inversion run, evaluated at every budget: (result, {budget: rows}, {budget: images})."""
    snaps, wall = invert(pipe, tok, data, cfg, device, progress, desc=f"inversion ({name})")
    t0, per_budget, images = time.perf_counter(), {}, {}
    for b, rows in snaps.items():
        tok.load(rows)
        with torch.no_grad():
            rate, images[b] = judged(pipe, data.attack_prompts, cfg.eval_samples, sampler, judge)
            loss = float(denoise_loss(pipe, loss_batch, data.attack_prompts, device))
        per_budget[str(b)] = {"concept_rate": rate, "loss": loss}
    tok.load(snaps[0])  # the next run on this pipeline starts from the init word again
    return ({"concept": data.name, "budgets": per_budget, "wall_time_s": round(wall, 2),
             "eval_time_s": round(time.perf_counter() - t0, 2)}, snaps, images)


def _search_run(name, pipe, data, cfg, sampler, judge, device, progress):
    """One prompt search; its `search_top` best prefixes sampled and judged: (result, images of the best)."""
    ranked, mode, wall = search(pipe, data, cfg, device, progress, desc=f"search ({name})")
    t0, best, first = time.perf_counter(), [], None
    for prefix, loss in ranked[:cfg.search_top]:
        with torch.no_grad():
            rate, imgs = judged(pipe, _with_prefix(prefix, data.prompts), cfg.eval_samples, sampler, judge)
        best.append({"prefix": " ".join(prefix), "loss": loss, "concept_rate": rate})
        first = imgs if first is None else first
    losses = dict(ranked)
    return ({"concept": data.name, "mode": mode, "candidates": len(ranked), "plain_loss": losses.get(()),
             "best": best, "wall_time_s": round(wall, 2), "eval_time_s": round(time.perf_counter() - t0, 2)}, first)


def run_attack(original_path, unlearned_path, concept, forget_prompts=None, out_dir=None, attack="inversion",
               steps=1000, budgets=(100, 300, 1000), seed=0, controls=True, retain_concept=None,
               retain_prompts=None, forget_data_dir=None, cache_dir=None, device=None, progress=True,
               judge=None, **options) -> dict:
    """Attack `unlearned_path` to recover `concept` (a word of the forget prompts; "a,b" for alternatives) and
    return the report (also written to `out_dir` with grid.png and the embedding, when given).

    forget_prompts: list of prompts (default: the embedded world's prompts of the concept). attack: inversion |
    search | all. controls: also attack the original model and a retained concept (retain_concept +
    retain_prompts; the world's next class by default: digits world the next digit, styles world the next
    colour, the other stroke or the next digit). judge: a forget judge (fastunlearn.judges: clip or
    classifier) that scores the samples; default: the embedded world's in-domain judge (controls.world_concept),
    else none (loss only).
    options: any other AttackConfig field."""
    from .. import worlds
    from ..evaluation import save_comparison_grid
    from ..export import load_run
    from ..models import fingerprint, load_pipeline
    from ..outputs import check_output_path, strict_json
    from ..sampling import SamplerConfig

    if attack not in ATTACKS:
        raise FastUnlearnError(f"unknown attack {attack!r}; choose one of {', '.join(ATTACKS)}")
    cfg = AttackConfig(steps=steps, budgets=tuple(budgets), seed=seed, **options).check()
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        check_output_path(out, "--out")
    t_start = time.perf_counter()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    original = load_pipeline(str(original_path), cache_dir=cache_dir).to(device)
    # a pipeline folder, or a --save-format unet|trained run applied to the original (fastunlearn.export)
    unlearned = load_run(unlearned_path, base=str(original_path), cache_dir=cache_dir).to(device)
    check_same_model(original, unlearned)
    for pipe in (original, unlearned):  # gradients flow through the models to <c*> only
        for module in (pipe.unet, pipe.vae, *(enc for _, enc in encoders(pipe))):
            module.requires_grad_(False)
    world = worlds.of_pipeline(str(original_path), cache_dir)
    wc = world_concept(world, concept, cache_dir)
    words, world_prompts, label, r_words, r_prompts, r_label = (
        (wc.words, wc.prompts, wc.label, wc.retain_words, wc.retain_prompts, wc.retain_label) if wc is not None
        else (None,) * 6)
    world_judge = wc.judge if wc is not None and judge is None else None  # a given judge replaces the world's
    words = words or [w.strip() for w in concept.split(",") if w.strip()]
    if not words:
        raise FastUnlearnError("--concept is empty: give the word that names the forgotten concept")
    forget_prompts = list(forget_prompts or world_prompts or [])
    if not forget_prompts and not forget_data_dir:
        raise FastUnlearnError("give the forget prompts (--forget-prompts FILE): the concept's prompts are not known")
    if retain_concept:
        r_words, r_prompts = [w.strip() for w in retain_concept.split(",") if w.strip()], retain_prompts
        r_label = None
    notes = []
    if judge is None and world_judge is None:
        notes.append("no judge for this model: concept rates are not measured, only the denoising loss "
                     "(lower = the attacked model denoises the original's samples of the concept better)")
    guidance = cfg.guidance_scale if cfg.guidance_scale is not None else (
        world.guidance_scale if world is not None else 7.5)
    sampler = SamplerConfig(cfg.num_inference_steps, guidance)
    data_cfg = {"cache_dir": cache_dir, "sample_steps": cfg.sample_steps, "guidance_scale": guidance}
    key = fingerprint(original.unet, {"model": str(original_path), "steps": cfg.sample_steps, "g": guidance})
    targets = {"forget": concept_data("forget", original, forget_prompts, words, cfg.samples_per_prompt, key,
                                      data_cfg, forget_data_dir, label)}
    if controls and r_words and r_prompts:
        targets["retained"] = concept_data("retained", original, r_prompts, r_words, cfg.samples_per_prompt, key,
                                           data_cfg, None, r_label)
    elif controls:
        notes.append("retained-concept control not run: give --retain-concept WORD and --retain-prompts FILE")
    dropped = [p for p in forget_prompts if replace_concept(p, words) is None]
    if dropped and not forget_data_dir:
        notes.append(f"{len(dropped)} forget prompt(s) without the concept word are not attacked: {dropped[:3]}")

    def judge_of(data):
        """The judge of `data`'s samples: the world's classifier against its label; a given judge against
        data's first plain prompt, with the other concept's prompts as contrasts (a classifier judge knows
        only the forget concept's classes, so it judges the forget concept only)."""
        if world_judge is not None:
            return None if data.label is None else (lambda imgs: world_judge(imgs, data.label))
        if judge is None or (data.name != "forget" and getattr(judge, "classes", None) is not None):
            return None
        other = [q for k, d in targets.items() if d is not data for q in d.prompts]
        return lambda imgs: judge.rates(imgs, data.prompts[0], other)

    # the plain prompts: what each model draws without attack, and its loss
    loss_batch = {k: d.draw(cfg.loss_batch, torch.Generator().manual_seed(cfg.seed + 1), original.scheduler)
                  for k, d in targets.items()}
    report = {"original": str(original_path), "unlearned": str(unlearned_path), "concept": concept,
              "concept_words": words,
              "judge": wc.judge_name if world_judge else getattr(judge, "name", None),
              "attack": attack, "config": {**asdict(cfg), "guidance_scale": guidance, "token": TOKEN},
              "forget_prompts": targets["forget"].prompts, "attack_prompts": targets["forget"].attack_prompts,
              "notes": notes}
    images = {}
    with torch.no_grad():
        f = targets["forget"]
        for who, pipe in (("unlearned", unlearned), ("original", original)):
            rate, images[f"plain/{who}"] = judged(pipe, f.prompts, cfg.eval_samples, sampler, judge_of(f))
            report.setdefault("no_attack", {})[who] = {
                "concept_rate": rate, "loss": float(denoise_loss(pipe, loss_batch["forget"], f.prompts, device))}
    runs = [("unlearned", unlearned, "forget")]
    if controls:
        runs += [("original_control", original, "forget")] + ([("retained_control", unlearned, "retained")]
                                                              if "retained" in targets else [])
    tokens = {}
    if attack in ("inversion", "all"):
        res = report["inversion"] = {}
        for name, pipe, which in runs:
            data = targets[which]
            if id(pipe) not in tokens:
                tokens[id(pipe)] = InvertedToken(pipe, cfg.init_word)
            tok = tokens[id(pipe)]
            res[name], snaps, imgs = _inversion_run(name, pipe, tok, data, cfg, sampler, judge_of(data),
                                                    loss_batch[which], device, progress)
            if name == "unlearned":
                images.update({f"inversion/{b}": v for b, v in imgs.items()})
            if name == "unlearned" and out is not None:
                out.mkdir(parents=True, exist_ok=True)
                res[name]["embedding"] = [p.name for p in save_embedding(snaps[cfg.steps], out)]
        top = str(max(cfg.budgets))
        rate = res.get("original_control", {}).get("budgets", {}).get(top, {}).get("concept_rate")
        res["attack_strong_enough"] = None if rate is None else rate >= 0.9
        if rate is not None and rate < 0.9:
            notes.append(f"inversion is too weak: on the original model it reaches a concept rate of {rate:.2f} "
                         f"(< 0.9) after {top} steps, so a low rate on the unlearned model proves nothing")
    if attack in ("search", "all"):
        res = report["search"] = {}
        for name, pipe, which in runs:
            data = targets[which]
            res[name], imgs = _search_run(name, pipe, data, cfg, sampler, judge_of(data), device, progress)
            if name == "unlearned":
                images["search"] = imgs
    summary = {}
    for b, v in report.get("inversion", {}).get("unlearned", {}).get("budgets", {}).items():
        summary[f"inversion@{b}"] = v["concept_rate"]
    if "search" in report:
        rates = [x["concept_rate"] for x in report["search"]["unlearned"]["best"] if x["concept_rate"] is not None]
        summary["search"] = max(rates) if rates else None
    report["concept_rate_under_attack"] = summary
    if world_judge is not None:  # an embedded world: the concept rate is the forget accuracy
        report["forget_accuracy_under_attack"] = dict(summary)
    report["wall_time_s"] = round(time.perf_counter() - t_start, 2)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        n = 8
        rows = [(f"plain: {targets['forget'].prompts[0]}", images["plain/original"][:n], images["plain/unlearned"][:n])]
        if "inversion" in report:
            rows.append((f"inversion @{cfg.steps}: {targets['forget'].attack_prompts[0]}", images["plain/original"][:n],
                         images[f"inversion/{cfg.steps}"][:n]))
        if "search" in report:
            pre = report["search"]["unlearned"]["best"][0]["prefix"]
            rows.append((f"search: {pre} + prompt", images["plain/original"][:n], images["search"][:n]))
        save_comparison_grid(out / "grid.png", rows, f"concept {concept!r} under attack (unlearned rows) beside "
                                                     "the original model's samples")
        (out / "report.json").write_text(strict_json(report))
    return report
