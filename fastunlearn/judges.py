"""Forget judges: does an image show a concept?

One interface, `Judge.rates(images, concept_prompt, contrast_prompts)`: images (N, 3, H, W) in [0, 1]
-> (N,) bool, True where the judge says the image shows the concept of `concept_prompt`. The
decision rules (docs/metrics.md, "Forget judges"):

* `digits`   the digits world's digit classifier: arg-max digit == the digit of `concept_prompt`.
* `clip`     zero-shot CLIP from a local folder: softmax over [concept] + contrast prompts (the retain
             prompts, the anchors, and the neutral prompt "a photo"); shows the concept iff
             p(concept) > max p(contrast) + margin.
* `classifier` a torchvision classifier from a weights file: arg-max class in the concept's class list
             (ESD's object-erasure protocol with an ImageNet ResNet-50); the prompts are not used.

`make_judge` picks and builds the judge of a training run from its EvalConfig.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .errors import FastUnlearnError

JUDGES = ("none", "digits", "clip", "classifier")
NEUTRAL_PROMPT = "a photo"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def parse_classes(value) -> list[int]:
    """Class indices from an int, "954" / "954,955" or a list; [] for None. Raises a one-line error."""
    if value is None:
        return []
    items = value if isinstance(value, (list, tuple)) else str(value).strip("[]").split(",")
    try:
        out = [int(str(x).strip()) for x in items if str(x).strip()]
    except ValueError:
        raise FastUnlearnError(f"eval.judge_classes must be class indices like 954 or 954,955, got {value!r}") from None
    if not out or min(out) < 0:
        raise FastUnlearnError(f"eval.judge_classes must be class indices >= 0 like 954 or 954,955, got {value!r}")
    return out


class Judge:
    """Says per image whether it shows the concept of a prompt."""

    name = "judge"

    def rates(self, images: torch.Tensor, concept_prompt: str, contrast_prompts=()) -> torch.Tensor:
        raise NotImplementedError


class DigitsJudge(Judge):
    """The digits world's classifier: an image shows the concept iff its predicted digit is the label of
    `concept_prompt` (`labels`: prompt -> digit; an int prompt is taken as the digit itself)."""

    name = "digits"

    def __init__(self, classifier, labels: dict | None = None):
        self.classifier, self.labels = classifier, dict(labels or {})

    def label(self, prompt) -> int:
        if isinstance(prompt, int):
            return prompt
        if prompt not in self.labels:
            raise FastUnlearnError(f"digits judge: {prompt!r} is not a prompt of the digits world")
        return self.labels[prompt]

    @torch.no_grad()
    def rates(self, images, concept_prompt, contrast_prompts=()):
        pred = self.classifier.predict(images * 2 - 1)  # the classifier takes [-1, 1], as Evaluator.accuracy
        return (pred.cpu() == self.label(concept_prompt)).cpu()


class CLIPJudge(Judge):
    """Zero-shot CLIP: p = softmax(logit_scale * cos(image, prompt)) over [concept_prompt] + the contrast
    prompts (deduplicated, without the concept prompt itself, with NEUTRAL_PROMPT added); an image shows
    the concept iff p[concept] > max(p[contrast]) + margin. margin 0: the concept is the arg-max."""

    name = "clip"

    def __init__(self, path_or_scorer, margin: float = 0.0, device="cpu", neutral: str = NEUTRAL_PROMPT):
        from .metrics import CLIPScore

        score = path_or_scorer if isinstance(path_or_scorer, CLIPScore) else CLIPScore(str(path_or_scorer), device)
        self.model, self.processor, self.device = score.model, score.processor, score.device
        self.margin, self.neutral, self.batch_size = float(margin), neutral, 64
        self.name = f"clip ({score.name})"

    def prompts(self, concept_prompt, contrast_prompts) -> list[str]:
        """[concept] + the contrast prompts, deduplicated, without the concept, with the neutral prompt."""
        contrast = [q for q in dict.fromkeys([*contrast_prompts, self.neutral]) if q != concept_prompt]
        return [concept_prompt, *contrast]

    @torch.no_grad()
    def probs(self, images, prompts) -> torch.Tensor:
        """(N, len(prompts)) zero-shot probabilities (CLIP's logits_per_image, softmaxed over the prompts)."""
        from .metrics import CLIPScore

        text = self.processor(text=list(prompts), return_tensors="pt", padding=True, truncation=True)
        txt = CLIPScore._tensor(self.model.get_text_features(
            input_ids=text["input_ids"].to(self.device), attention_mask=text["attention_mask"].to(self.device))).float()
        img = []
        for i in range(0, len(images), self.batch_size):  # in chunks: a final evaluation can hold many images
            pixels = self.processor(images=[im.float().clamp(0, 1) for im in images[i:i + self.batch_size]],
                                    return_tensors="pt", do_rescale=False)["pixel_values"].to(self.device)
            img.append(CLIPScore._tensor(self.model.get_image_features(pixel_values=pixels)).float())
        img = torch.cat(img)
        img, txt = img / img.norm(dim=-1, keepdim=True), txt / txt.norm(dim=-1, keepdim=True)
        logits = self.model.logit_scale.exp().float() * img @ txt.T
        return logits.softmax(dim=-1).cpu()

    def decide(self, probs: torch.Tensor) -> torch.Tensor:
        """The rule on (N, 1 + contrasts) probabilities, concept first."""
        return probs[:, 0] > probs[:, 1:].max(dim=1).values + self.margin

    def rates(self, images, concept_prompt, contrast_prompts=()):
        if len(images) == 0:
            return torch.zeros(0, dtype=torch.bool)
        return self.decide(self.probs(images, self.prompts(concept_prompt, contrast_prompts)))


def _load_state(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise FastUnlearnError(f"eval.judge_weights {path} is not a file (torchvision classifier weights)")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(p))
        state = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001  (any unreadable file is the same one-line error)
        raise FastUnlearnError(f"cannot read classifier weights {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise FastUnlearnError(f"classifier weights {path} are not a state dict of tensors")
    return state


class ClassifierJudge(Judge):
    """A torchvision image classifier (`arch`, weights from a file; the number of classes is read from its
    last 2-D weight): images are resized to 224x224 and ImageNet-normalised; an image shows the concept
    iff its arg-max class is in `classes`. The prompts are not used (ESD's object-erasure protocol)."""

    name = "classifier"

    def __init__(self, weights: str, classes, arch: str = "resnet50", device="cpu", size: int = 224):
        import torchvision

        if arch not in torchvision.models.list_models(torchvision.models):
            raise FastUnlearnError(f"eval.judge_arch {arch!r} is not a torchvision classification model (e.g. resnet50)")
        state = _load_state(weights)
        last = [v for k, v in state.items() if k.endswith("weight") and v.dim() == 2]
        if not last:
            raise FastUnlearnError(f"classifier weights {weights} have no linear layer: not a {arch} classifier")
        num_classes = last[-1].shape[0]
        self.classes = parse_classes(classes)
        if max(self.classes) >= num_classes:
            raise FastUnlearnError(f"eval.judge_classes {self.classes} out of range: {weights} has {num_classes} classes")
        model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise FastUnlearnError(f"classifier weights {weights} do not fit {arch}: "
                                   f"{str(exc).splitlines()[0]}") from None
        self.model, self.device, self.size = model.eval().to(device), device, size
        self.name = f"classifier ({arch}, classes {','.join(map(str, self.classes))})"

    @torch.no_grad()
    def predict(self, images) -> torch.Tensor:
        mean, std = (torch.tensor(v, device=self.device).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
        out = []
        for i in range(0, len(images), 64):  # in chunks: a final evaluation can hold many images
            x = torch.nn.functional.interpolate(images[i:i + 64].float().clamp(0, 1).to(self.device),
                                                size=(self.size, self.size), mode="bilinear", antialias=True,
                                                align_corners=False)
            out.append(self.model((x - mean) / std).argmax(dim=1).cpu())
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)

    def rates(self, images, concept_prompt=None, contrast_prompts=()):
        if len(images) == 0:
            return torch.zeros(0, dtype=torch.bool)
        return torch.isin(self.predict(images), torch.tensor(self.classes))


def check_eval_config(e, prefix: str = "eval.", world=None) -> None:
    """The forget judge's and the metrics' keys of an EvalConfig `e`: one-line errors before anything is loaded.
    `world`: the run's embedded world (fastunlearn.worlds), which may bring its own CLIP."""
    if e.judge is not None and (not isinstance(e.judge, str) or e.judge not in JUDGES):
        raise FastUnlearnError(f"unknown {prefix}judge {e.judge!r}; choose one of {', '.join(JUDGES)}")
    if e.judge == "classifier":
        if not e.judge_weights:
            raise FastUnlearnError(f"{prefix}judge classifier needs a weights file: --set {prefix}judge_weights=FILE")
        if not parse_classes(e.judge_classes):
            raise FastUnlearnError(f"{prefix}judge classifier needs the concept's class index(es): "
                                   f"--set {prefix}judge_classes=954")
    if e.judge_weights and not Path(e.judge_weights).is_file():
        raise FastUnlearnError(f"{prefix}judge_weights {e.judge_weights} is not a file (classifier weights)")
    if e.fid not in ("none", "inception"):
        raise FastUnlearnError(f"unknown {prefix}fid {e.fid!r}; choose none or inception")
    if e.fid_weights is not None and e.fid != "inception":
        raise FastUnlearnError(f"{prefix}fid_weights is given but {prefix}fid is {e.fid}: set "
                               f"{prefix}fid=inception (--fid-weights PATH sets both)")
    for key, what in (("fid_weights", "torch-fidelity's InceptionV3 weights"),
                      ("lpips_weights", "torchvision's alexnet weights for LPIPS")):
        value = getattr(e, key)
        if value is not None and not Path(str(value)).expanduser().is_file():
            raise FastUnlearnError(f"{prefix}{key} {value} is not a file ({what})")
    if e.judge == "clip" and not e.clip_model and not hasattr(world, "clip_path"):
        raise FastUnlearnError(f"{prefix}judge clip needs a local CLIP model folder: --set {prefix}clip_model=DIR")
    if e.clip_model and not Path(e.clip_model).is_dir():
        raise FastUnlearnError(f"{prefix}clip_model {e.clip_model} is not a folder (a local CLIP model)")


def judge_kind(e, in_world: bool) -> str:
    """The judge `e` (an EvalConfig) asks for: eval.judge, else digits in the digits world, clip with a
    CLIP model, else none."""
    if e.judge:
        return e.judge
    return "digits" if in_world else "clip" if e.clip_model else "none"


def make_judge(e, in_world: bool, device="cpu", clip=None, note=lambda text: None) -> Judge | None:
    """The judge of a training run outside its world's own classifier path: None for `none` and for
    `digits` (the digits world measures forget/retain accuracy with its classifier itself)."""
    kind = judge_kind(e, in_world)
    if kind == "digits":
        if not in_world:
            raise FastUnlearnError("eval.judge digits needs the digits world (--model digits); use clip or classifier")
        return None
    if kind == "none":
        if not in_world:
            note("forget rate not measured: no forget judge (give eval.clip_model for the clip judge, or "
                 "eval.judge=classifier with eval.judge_weights and eval.judge_classes)")
        return None
    if kind == "clip":
        if not e.clip_model and clip is None:
            raise FastUnlearnError("eval.judge clip needs a local CLIP model folder: --set eval.clip_model=DIR")
        return CLIPJudge(clip if clip is not None else e.clip_model, e.judge_margin, device)
    return ClassifierJudge(e.judge_weights, e.judge_classes, e.judge_arch, device)


# ---- the commands' judge flags (python -m fastunlearn.attack / .evaluate) --------------------------------
def add_judge_args(p, clip_flag: str, what: str) -> None:
    """--judge, --judge-margin, --judge-weights, --judge-arch, --judge-classes; the CLIP folder is `clip_flag`."""
    p.add_argument("--judge", default=None, choices=("none", "clip", "classifier"),
                   help=f"forget judge scoring {what} (docs/metrics.md): clip ({clip_flag}; the digits world has its "
                        "own) or classifier (--judge-weights, --judge-classes); default: the digits world's "
                        f"classifier, clip with {clip_flag}, else none")
    p.add_argument("--judge-margin", type=float, default=0.0, help="clip judge margin (default: %(default)s)")
    p.add_argument("--judge-weights", default=None, help="classifier judge: torchvision weights file")
    p.add_argument("--judge-arch", default="resnet50", help="classifier judge: architecture (default: %(default)s)")
    p.add_argument("--judge-classes", default=None, help="classifier judge: the concept's class index(es), e.g. 954")


def judge_from_args(args, world=None, device="cpu") -> Judge | None:
    """The judge the flags of `add_judge_args` ask for (None: none asked; the digits world then uses its
    classifier). `args.clip_model` is the CLIP folder; `world` (fastunlearn.worlds) may supply its own."""
    if args.judge == "none" or not (args.judge or args.clip_model):
        return None
    from .config import EvalConfig

    kind, clip_model = args.judge or "clip", args.clip_model
    if kind == "clip" and not clip_model and hasattr(world, "clip_path"):
        clip_model = str(world.clip_path())  # the digits world's own CLIP
    if kind == "clip" and not clip_model:
        raise FastUnlearnError("--judge clip needs a local CLIP model folder: --clip-model DIR")
    if kind == "classifier" and not (args.judge_weights and args.judge_classes):
        raise FastUnlearnError("--judge classifier needs --judge-weights FILE and --judge-classes N[,M]")
    if clip_model and not Path(clip_model).is_dir():
        raise FastUnlearnError(f"--clip-model {clip_model} is not a folder (a local CLIP model)")
    if not 0 <= args.judge_margin <= 1:
        raise FastUnlearnError(f"--judge-margin must be in [0, 1], got {args.judge_margin}")
    e = EvalConfig(judge=kind, clip_model=clip_model, judge_margin=args.judge_margin,
                   judge_weights=args.judge_weights, judge_arch=args.judge_arch, judge_classes=args.judge_classes)
    return make_judge(e, in_world=False, device=device)
