"""The digits world: a tiny Stable Diffusion pipeline trained on scikit-learn's bundled digits, its
digit classifier (the judge) and its prompts. `World` is what the rest of fastunlearn uses
(fastunlearn.worlds); the building blocks stay importable for tests and scripts."""
from __future__ import annotations

from pathlib import Path

import torch

from ..cli import save_digit_grid  # noqa: F401
from .build import FAST_RECIPE, WORLD_VERSION, Recipe, build_world, score_pipeline  # noqa: F401
from .classifier import DigitClassifier, train_classifier  # noqa: F401
from .cli import main  # noqa: F401
from .data import (  # noqa: F401
    DIGIT_WORDS,
    digit_of_prompt,
    digit_prompts,
    eval_pairs,
    heldout_split,
    load_digit_images,
    prompt_words,
)
from .world import DigitsWorld, ensure_world, load_world, world_path, world_problem  # noqa: F401


class World:
    """The digits world behind the interface of fastunlearn.worlds. Forgetting one digit: the default
    forget prompts are its six phrasings, the retain prompts those of the nine others, and the judge is
    the digit classifier (forget/retain accuracy).

    Paraphrase hold-out: by default the run trains on the first TRAINED_PHRASINGS of the forgotten
    digit's six phrasings and is evaluated on all six, so the report gives forget accuracy on the
    phrasings it never saw (`forget_accuracy_unseen`) beside those it trained on (`_seen`)."""

    name = "digits"
    guidance_scale = 4.0  # the sampler the world was built and checked with (world.json)
    TRAINED_PHRASINGS = 3
    method_defaults: dict = {}  # {method: {config key: value}}: this world's own defaults (fastunlearn.cli)

    def __init__(self, cache_dir=None):
        self.cache_dir = cache_dir

    def pipeline_path(self) -> Path:
        return ensure_world(self.cache_dir) / "pipeline"

    def clip_path(self) -> Path:
        """The world's CLIP folder (transformers CLIPModel + CLIPProcessor), built on first use (.clip)."""
        from .clip import ensure_clip

        return ensure_clip(ensure_world(self.cache_dir))

    def prompts(self, forget, retain, cfg, concepts=None):
        """(forget, retain, info): defaults from `cfg.forget_digit`; info names the forgotten digit(s) when every
        forget prompt names a digit (else None: no digit-level evaluation). Several digits are several concepts:
        `concepts` ({name: prompts}, each naming one digit) or, without it, one concept per digit, named by it."""
        if forget is None:
            forget = digit_prompts(cfg.forget_digit)[:self.TRAINED_PHRASINGS]
        labels = [digit_of_prompt(p) for p in forget]
        if None in labels:
            return forget, retain, None
        digits = sorted(set(labels))
        if concepts:
            names = {}
            for name, prompts in concepts.items():
                ds = {digit_of_prompt(q) for q in prompts}
                if len(ds) != 1:
                    return forget, retain, None  # a concept that is not one digit: no digit-level evaluation
                names[ds.pop()] = name
            if len(names) != len(concepts):
                return forget, retain, None
        else:
            names = {d: str(d) for d in digits}
        if retain is None:
            retain = [p for k in range(10) if k not in digits for p in digit_prompts(k)]
        if len(digits) == 1:
            return forget, retain, {"forget_digit": digits[0]}
        return forget, retain, {"forget_digits": digits, "concepts": {names[d]: d for d in digits}}

    def retain_groups(self, info, retain) -> list[str] | None:
        """The neighbour group of each retain prompt (Saddle's `retain: constraints | dro`): the digit it names;
        None when one names none."""
        digits = [digit_of_prompt(q) for q in retain]
        return None if None in digits else [str(d) for d in digits]

    def method_defaults_for(self, cfg) -> dict:
        """{config key: value}: this world's defaults for the run's method (fastunlearn.cli)."""
        return self.method_defaults.get(cfg.method, {})

    def anchor_prompts(self, info, forget) -> None:
        """No anchors of its own: the empty prompt, as outside a world."""
        return None

    def concept_words(self, info) -> list[str]:
        """The words that name the forgotten digit(s) in their prompts ("3", "three"): what --robust replaces."""
        return [w for d in info.get("forget_digits", [info.get("forget_digit")]) for w in (str(d), DIGIT_WORDS[d])]

    def _loaded(self) -> DigitsWorld:
        if not hasattr(self, "_world"):
            self._world = load_world(self.cache_dir, progress=False)
        return self._world

    def perceptual(self):
        from ...metrics import DigitsPerceptual

        return DigitsPerceptual(self._loaded().classifier)

    def evaluation(self, info, n_forget: int, n_retain: int) -> dict:
        """Keyword arguments of fastunlearn.evaluation.Evaluator: `n_forget` samples of each forgotten digit and
        `n_retain` of every other one, the `lpips-digits` perceptual network, the classifier as judge, and
        real images of the retained digits for `fid-digits`. Several digits: `forget_groups` names each forget
        sample's concept."""
        digits = info.get("forget_digits", [info.get("forget_digit")])
        forget = eval_pairs(digits, n_forget)
        retain = eval_pairs([k for k in range(10) if k not in digits], n_retain)
        images, labels = load_digit_images()
        keep = ~torch.isin(labels, torch.tensor(digits))
        real = ((images[keep] + 1) / 2).expand(-1, 3, -1, -1)
        out = dict(forget=forget[:2], retain=retain[:2], perceptual=self.perceptual(),
                   classifier=self._loaded().classifier, forget_label=forget[2] if len(digits) > 1 else digits[0],
                   retain_labels=retain[2], real_retain=real, retain_groups=retain[2], group_key="digit")
        if len(digits) > 1:
            name = {d: n for n, d in info["concepts"].items()}
            out["forget_groups"] = [name[d] for d in forget[2]]
        return out

    def report_fields(self, info) -> dict:
        if "forget_digits" in info:
            return {"forget_digits": info["forget_digits"], "forget_concepts_digits": info["concepts"],
                    "world": "digits (fastunlearn embedded world)"}
        return {"forget_digit": info["forget_digit"], "world": "digits (fastunlearn embedded world)"}

    def eval_prompts(self) -> list[str]:
        """The canonical prompt of every digit."""
        return [digit_prompts(d)[0] for d in range(10)]
