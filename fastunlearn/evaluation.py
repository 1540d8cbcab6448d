"""Evaluation of an unlearned model against its original, as a library: integrity I, and in an embedded world
forget/retain accuracy as judged by the world's classifier (`Evaluator`); the evaluation sets and networks of a
training run (`training_evaluator`, `training_metrics`); whether two pipelines can be compared at all
(`_compatible`); and the comparison grids (`comparison_rows`, `save_comparison_grid`). The command
`python -m fastunlearn.evaluate` is fastunlearn/evaluate.py.

Teacher samples and their perceptual features are computed once per `Evaluator` and reused by
every later evaluation of a student.
"""
from __future__ import annotations

import torch

from .metrics import frechet_distance, paired_distance
from .sampling import SamplerConfig, sample_sharded


class Evaluator:
    """Fixed (prompt, seed) sets for forget and retain; `labels_*` (digits world) enable accuracy.

    `retain_groups` (one name per retain sample, e.g. its digit) adds I_retain and retain accuracy per
    group under `*_by_<group_key>`; `trained_forget` (the prompts the run trained on) splits forget
    accuracy into the samples drawn from those prompts (`_seen`) and from the others (`_unseen`);
    `forget_groups` (one concept name per forget sample, a run with several concepts) adds forget
    accuracy, the judge's forget rate and I_forget per concept under `*_by_concept`. `cross` (a world with two
    axes, e.g. styles: {"classifier", "forget_labels", "retain_labels"}, the other axis' judge and labels) adds
    unlearning_accuracy (1 - forget_accuracy), in_domain_retain_accuracy (= retain_accuracy) and the other axis'
    accuracy on the retain and forget samples (cross_domain_retain_accuracy, cross_domain_forget_accuracy)."""

    def __init__(self, teacher_pipe, forget, retain, sampler: SamplerConfig, perceptual=None, classifier=None,
                 forget_label=None, retain_labels=None, real_retain=None, clip=None, retain_groups=None,
                 group_key="prompt", trained_forget=None, judge=None, judge_contrast=(), fid=None,
                 forget_groups=None, cross=None):
        self.teacher_pipe, self.sampler = teacher_pipe, sampler
        self.cross = cross
        self.fid, self._fid_teacher = fid, None  # a metrics.InceptionFID (eval.fid inception); teacher features
        self.judge, self.judge_contrast = judge, list(judge_contrast)  # a fastunlearn.judges.Judge; extra contrasts
        self.forget, self.retain = forget, retain  # (prompts, seeds)
        self.retain_groups, self.group_key = retain_groups, group_key
        self.forget_groups = list(forget_groups) if forget_groups is not None else None
        self.forget_seen = (torch.tensor([p in set(trained_forget) for p in forget[0]])
                            if trained_forget is not None else None)
        self.perceptual, self.classifier = perceptual, classifier
        self.forget_label = (torch.tensor(forget_label) if isinstance(forget_label, (list, tuple)) else forget_label)
        self.retain_labels = torch.tensor(retain_labels) if retain_labels is not None else None
        self.real_retain = real_retain  # (N, 3, H, W) in [0, 1]: real images of the retain concepts, if any
        self.clip = clip  # a metrics.CLIPScore, or None
        self._teacher = None

    def teacher(self):
        if self._teacher is None:
            imgs = {k: sample_sharded(self.teacher_pipe, *getattr(self, k), self.sampler) for k in ("forget", "retain")}
            feats = {k: self.perceptual.features(v) if self.perceptual else None for k, v in imgs.items()}
            self._teacher = (imgs, feats)
        return self._teacher

    def accuracy(self, forget_images, retain_images) -> dict:
        f = (self.classifier.predict(forget_images * 2 - 1) == self.forget_label).float()
        r = (self.classifier.predict(retain_images * 2 - 1) == self.retain_labels).float()
        out = {"forget_accuracy": float(f.mean()), "retain_accuracy": float(r.mean())}
        if self.forget_seen is not None:
            for name, mask in (("seen", self.forget_seen), ("unseen", ~self.forget_seen)):
                out[f"forget_accuracy_{name}"] = float(f[mask].mean()) if mask.any() else None
        if self.retain_groups is not None:
            out[f"retain_accuracy_by_{self.group_key}"] = self.by_group(r)
        if self.forget_groups is not None:
            out["forget_accuracy_by_concept"] = self.by_group(f, self.forget_groups)
        if self.cross is not None:
            out.update(self.cross_accuracy(forget_images, retain_images, out))
        return out

    def cross_accuracy(self, forget_images, retain_images, acc) -> dict:
        """The metrics of a two-axis world (UnlearnCanvas' UA, IRA and CRA) from `accuracy`'s `acc`."""
        judge = self.cross["classifier"]
        out = {"unlearning_accuracy": 1 - acc["forget_accuracy"], "in_domain_retain_accuracy": acc["retain_accuracy"]}
        for kind, images in (("retain", retain_images), ("forget", forget_images)):
            ok = (judge.predict(images * 2 - 1).cpu() == torch.tensor(self.cross[f"{kind}_labels"])).float()
            out[f"cross_domain_{kind}_accuracy"] = float(ok.mean())
            if kind == "retain" and self.retain_groups is not None:
                out[f"cross_domain_retain_accuracy_by_{self.group_key}"] = self.by_group(ok)
        return out

    def by_group(self, values: torch.Tensor, groups=None) -> dict:
        """Mean of per-sample `values` for each group (default: the retain groups), in first-seen order."""
        groups = self.retain_groups if groups is None else groups
        return {str(g): round(float(values[[x == g for x in groups]].float().mean()), 6) for g in dict.fromkeys(groups)}

    def judged(self, forget_images, retain_images) -> dict:
        """The judge's rates: `forget_rate`, the share of forget samples it says show their forget prompt's
        concept; `retain_rate`, the share of retain samples it says show none of the forget prompts' concepts.
        Contrast prompts: the retain prompts and `judge_contrast` (the anchors), never a forget prompt of the
        same concept (with several concepts, the other concepts' forget prompts are contrasts too)."""
        f = self.shows_concept(forget_images, self.forget[0], judge_only=True)
        hit = torch.zeros(len(self.retain[0]), dtype=torch.bool)
        for q in dict.fromkeys(self.forget[0]):
            hit |= self.judge.rates(retain_images, q, self.contrast(q)).cpu().bool()
        out = {"forget_rate": float(f.float().mean()) if len(f) else None,
               "retain_rate": float((~hit).float().mean()) if len(hit) else None}
        if self.forget_seen is not None:
            for name, mask in (("seen", self.forget_seen), ("unseen", ~self.forget_seen)):
                out[f"forget_rate_{name}"] = float(f[mask].float().mean()) if mask.any() else None
        if self.retain_groups is not None and len(hit):
            out[f"retain_rate_by_{self.group_key}"] = self.by_group(~hit)
        if self.forget_groups is not None and len(f):
            out["forget_rate_by_concept"] = self.by_group(f, self.forget_groups)
        return out

    def contrast(self, q: str) -> list[str]:
        """The judge's contrast prompts for forget prompt `q`: the retain prompts and `judge_contrast` (the anchors),
        never a forget prompt of the same concept (with several concepts, the other concepts' forget prompts too)."""
        forget_prompts = list(dict.fromkeys(self.forget[0]))
        concept = dict(zip(self.forget[0], self.forget_groups or [None] * len(self.forget[0])))
        plain = [p for p in dict.fromkeys([*self.retain[0], *self.judge_contrast]) if p not in set(forget_prompts)]
        return plain + [o for o in forget_prompts if concept[o] != concept[q]]

    def shows_concept(self, images, prompts, judge_only: bool = False) -> torch.Tensor | None:
        """Whether each image, drawn for forget prompt `prompts[i]` (one of this evaluator's), shows that prompt's
        concept: the classifier reads its forget label (forget accuracy), else the judge says so (forget rate);
        None without either. fastunlearn.robust judges its adversarial samples with it."""
        if self.classifier is not None and not judge_only:
            label = self.forget_label
            if torch.is_tensor(label) and label.ndim:  # one label per forget sample (several concepts)
                label = torch.tensor([dict(zip(self.forget[0], label.tolist()))[p] for p in prompts])
            return self.classifier.predict(images * 2 - 1).cpu() == label
        if self.judge is None:
            return None
        out = torch.zeros(len(prompts), dtype=torch.bool)
        for q in dict.fromkeys(prompts):
            idx = [i for i, p in enumerate(prompts) if p == q]
            out[idx] = self.judge.rates(images[idx], q, self.contrast(q)).cpu().bool()
        return out

    def base(self) -> dict:
        imgs, _ = self.teacher()
        out = self.clip_scores(imgs, "base_")
        if self.judge is not None:
            rates = self.judged(imgs["forget"], imgs["retain"])
            out.update(base_forget_rate=rates["forget_rate"], base_retain_rate=rates["retain_rate"])
            if "forget_rate_by_concept" in rates:
                out["base_forget_rate_by_concept"] = rates["forget_rate_by_concept"]
        if self.classifier is None:
            return out
        acc = self.accuracy(imgs["forget"], imgs["retain"])
        out.update(base_forget_accuracy=acc["forget_accuracy"], base_retain_accuracy=acc["retain_accuracy"])
        if "cross_domain_retain_accuracy" in acc:
            out.update(base_cross_domain_retain_accuracy=acc["cross_domain_retain_accuracy"],
                       base_cross_domain_forget_accuracy=acc["cross_domain_forget_accuracy"])
        if "forget_accuracy_by_concept" in acc:
            out["base_forget_accuracy_by_concept"] = acc["forget_accuracy_by_concept"]
        if self.real_retain is not None and hasattr(self.perceptual, "embed"):  # scale: the teacher against real data
            out["fid_teacher_vs_real"] = frechet_distance(self.perceptual.embed(self.real_retain),
                                                          self.perceptual.embed(imgs["retain"]))
        return out

    @torch.no_grad()
    def evaluate(self, student_pipe) -> tuple[dict, dict]:
        """(metrics, student images). Metrics: integrity_{retain,forget}(_ci95), accuracies when labelled."""
        t_imgs, t_feats = self.teacher()
        s_imgs = {k: sample_sharded(student_pipe, *getattr(self, k), self.sampler) for k in ("forget", "retain")}
        out = {"integrity_retain": None, "integrity_retain_ci95": None, "integrity_forget": None,
               "integrity_forget_ci95": None}
        if self.perceptual is not None:
            for k in ("retain", "forget"):
                res = paired_distance(self.perceptual, t_imgs[k], s_imgs[k], t_feats[k])
                out[f"integrity_{k}"], out[f"integrity_{k}_ci95"] = res["mean"], res["ci95"]
                if k == "retain" and self.retain_groups is not None:
                    out[f"integrity_retain_by_{self.group_key}"] = self.by_group(res["values"])
                if k == "forget" and self.forget_groups is not None:
                    out["integrity_forget_by_concept"] = self.by_group(res["values"], self.forget_groups)
        if self.classifier is not None:
            out.update(self.accuracy(s_imgs["forget"], s_imgs["retain"]))
        if self.judge is not None:
            out.update(self.judged(s_imgs["forget"], s_imgs["retain"]))
        if hasattr(self.perceptual, "embed"):
            out["fid_retain"] = frechet_distance(self.perceptual.embed(t_imgs["retain"]),
                                                 self.perceptual.embed(s_imgs["retain"]))
            out["fid_network"] = getattr(self.perceptual, "fid_name", "fid-digits")
        elif self.fid is not None and min(len(t_imgs["retain"]), len(s_imgs["retain"])) >= 2:
            if self._fid_teacher is None:
                self._fid_teacher = self.fid.embed(t_imgs["retain"])
            res = self.fid.compare(t_imgs["retain"], s_imgs["retain"], self._fid_teacher)
            out.update(fid_retain=res["fid"], kid_retain=res["kid"], kid_retain_std=res["kid_std"],
                       fid_network=self.fid.name)
        out.update(self.clip_scores(s_imgs))
        return out, s_imgs

    def clip_scores(self, imgs, prefix="") -> dict:
        if self.clip is None:
            return {}
        return {f"{prefix}clip_score_{k}": float(self.clip(imgs[k], getattr(self, k)[0]).mean()) for k in ("retain", "forget")}


def save_comparison_grid(path, rows, title=None):
    """rows: list of (label, teacher images (S,3,H,W), student images (S,3,H,W)); two image rows per entry."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = max(len(t) for _, t, _ in rows)
    fig, axes = plt.subplots(2 * len(rows), cols, figsize=(0.75 * cols + 2.6, 0.8 * 2 * len(rows) + 0.5),
                             squeeze=False)
    for r, (label, teacher, student) in enumerate(rows):
        for k, (name, imgs) in enumerate((("original", teacher), ("unlearned", student))):
            for c in range(cols):
                ax = axes[2 * r + k][c]
                ax.set_xticks([])
                ax.set_yticks([])
                if c < len(imgs):
                    ax.imshow(imgs[c].permute(1, 2, 0).clamp(0, 1).float().numpy(), interpolation="nearest")
            axes[2 * r + k][0].set_ylabel(f"{textwrap.fill(label, 34)}\n{name}" if k == 0 else name, rotation=0, ha="right",
                                          va="center", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _compatible(a, b) -> None:
    """Refuse to compare pipelines that cannot draw comparable images from the same noise."""
    from .errors import FastUnlearnError

    if type(a.scheduler).__name__ != type(b.scheduler).__name__:
        raise FastUnlearnError(f"the pipelines have different schedulers ({type(a.scheduler).__name__} vs "
                               f"{type(b.scheduler).__name__}): their images are not comparable")
    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type", "timestep_spacing")
    for k in keys:
        if a.scheduler.config.get(k) != b.scheduler.config.get(k):
            raise FastUnlearnError(f"the pipelines' schedulers differ in {k} ({a.scheduler.config.get(k)!r} vs "
                                   f"{b.scheduler.config.get(k)!r}): their images are not comparable")
    size = [p.unet.config.sample_size * p.vae_scale_factor for p in (a, b)]
    if size[0] != size[1] or a.unet.config.in_channels != b.unet.config.in_channels:
        raise FastUnlearnError(f"the pipelines draw different image sizes ({size[0]} vs {size[1]} px): "
                               "their images are not comparable")


def training_metrics(e, teacher_pipe, world_info=None, note=lambda text: None) -> dict:
    """The networks behind a training run's integrity and FID (`e`: its EvalConfig), built when the run starts
    so that a missing weights file fails it in one line before training, never after. An embedded world's run
    uses the world's own (`{}`); any other run gets `perceptual`: LPIPS-alex (`e.lpips_weights`, else the torch
    hub cache, downloaded there when online), None with a note for images under 32 px, and `fid`: an
    InceptionFID when `e.fid` is inception (`e.fid_weights` likewise)."""
    from .metrics import LPIPS, InceptionFID

    if world_info is not None:
        if e.fid == "inception":
            note("eval.fid inception not used in an embedded world: it reports its own fid-digits")
        return {}
    size = teacher_pipe.unet.config.sample_size * teacher_pipe.vae_scale_factor
    if size < 32:
        perceptual = None
        note(f"integrity not computed: {size} px images are too small for LPIPS-alex")
    else:
        perceptual = LPIPS("alex", backbone_weights=e.lpips_weights)
    if e.fid == "inception":
        return {"perceptual": perceptual, "fid": InceptionFID(e.fid_weights)}
    note("FID (Inception) not computed: not asked for (eval.fid: inception, or --fid-weights PATH); "
         "fid-digits exists only in the digits world")
    return {"perceptual": perceptual, "fid": None}


def training_evaluator(e, teacher_pipe, forget, retain, final: bool, world=None, world_info=None, clip=None,
                       note=lambda text: None, judge=None, judge_contrast=(), metrics=None, concepts=None) -> Evaluator:
    """The evaluation sets of a training run (`e`: its EvalConfig). An embedded world's run uses the world's
    sets, perceptual network and judge; any other run cycles through its forget prompts and takes
    `retain_samples_per_prompt` seeds of each retain prompt, measured with `metrics` (`training_metrics`: LPIPS-alex,
    and Inception FID/KID with eval.fid inception; built here when not given). `judge` (fastunlearn.judges) adds
    forget_rate/retain_rate, with `judge_contrast` (the anchors) among its contrast prompts. `concepts`
    ({name: forget prompts}, several concepts) adds the per-concept figures."""
    sampler = SamplerConfig(e.num_inference_steps, e.guidance_scale)
    n_f = e.forget_samples if final else e.train_forget_samples
    n_r = e.retain_samples_per_prompt if final else e.train_retain_samples_per_prompt
    if world_info is not None:
        return Evaluator(teacher_pipe, sampler=sampler, clip=clip, trained_forget=forget, judge=judge,
                         judge_contrast=judge_contrast, **world.evaluation(world_info, n_f, n_r))
    forget_set = ([forget[i % len(forget)] for i in range(n_f)], list(range(n_f)))
    retain_set = ([p for p in retain for _ in range(n_r)], [s for _ in retain for s in range(n_r)])
    metrics = metrics if metrics is not None else training_metrics(e, teacher_pipe, world_info, note)
    if metrics.get("fid") is not None and len(retain_set[0]) < 2:
        note("FID (Inception) not computed: it needs at least 2 retain samples")
    groups = None
    if concepts:
        name = {q: c for c, prompts in concepts.items() for q in prompts}
        groups = [name[q] for q in forget_set[0]]
    return Evaluator(teacher_pipe, forget_set, retain_set, sampler, metrics.get("perceptual"), clip=clip,
                     retain_groups=retain_set[0], trained_forget=forget, judge=judge, judge_contrast=judge_contrast,
                     fid=metrics.get("fid"), forget_groups=groups)


def comparison_rows(evaluator: Evaluator, teacher_images: dict, student_images: dict, per_row: int) -> list:
    """Rows of (label, teacher images, student images) for a grid: the first forget prompt and up to three
    retain prompts spread over the set, `per_row` seeds each. Where every prompt has fewer samples than a row
    (a world that spreads its samples over many prompts, like styles), a row is a group instead: the first
    `per_row` forget samples, and up to three retain groups (`retain_groups`, e.g. a style) spread over the set."""
    from collections import Counter

    rows = []
    for kind in ("forget", "retain"):
        prompts = list(evaluator.forget[0] if kind == "forget" else evaluator.retain[0])
        groups = evaluator.retain_groups if kind == "retain" else evaluator.forget_groups
        by_prompt = max(Counter(prompts).values(), default=0) >= min(per_row, len(prompts))
        if by_prompt:
            keys, names = prompts, {q: q for q in prompts}
        elif groups is not None:
            keys = [str(g) for g in groups]
            names = {k: f"{evaluator.group_key} {k}" for k in keys} if kind == "retain" else None
        else:  # one row of the first samples, whatever their prompts
            keys, names = ["all"] * len(prompts), None
        unique = list(dict.fromkeys(keys))
        shown = unique[:1] if kind == "forget" else unique[:: max(1, len(unique) // 3)][:3]
        for k in shown:
            idx = [i for i, q in enumerate(keys) if q == k][:per_row]
            what = names[k] if names else f"{len(idx)} prompts, first: {prompts[idx[0]]}"
            rows.append((f"{kind}: {what}", teacher_images[kind][idx], student_images[kind][idx]))
    return rows
