"""The digits world: a tiny Stable Diffusion pipeline trained on scikit-learn's bundled digits, its
digit classifier (the judge) and its prompts. `World` is what the rest of fastunlearn uses
(fastunlearn.worlds); the building blocks stay importable for tests and scripts."""
from __future__ import annotations

from pathlib import Path

from .classifier import DigitClassifier, train_classifier  # noqa: F401
from .world import (  # noqa: F401
    DIGIT_WORDS,
    FAST_RECIPE,
    WORLD_VERSION,
    DigitsWorld,
    Recipe,
    build_world,
    digit_of_prompt,
    digit_prompts,
    ensure_world,
    eval_pairs,
    heldout_split,
    load_digit_images,
    load_world,
    main,
    prompt_words,
    save_digit_grid,
    score_pipeline,
    world_path,
    world_problem,
)


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

    def __init__(self, cache_dir=None):
        self.cache_dir = cache_dir

    def pipeline_path(self) -> Path:
        return ensure_world(self.cache_dir) / "pipeline"

    def clip_path(self) -> Path:
        """The world's CLIP folder (transformers CLIPModel + CLIPProcessor), built on first use (.clip)."""
        from .clip import ensure_clip

        return ensure_clip(ensure_world(self.cache_dir))

    def prompts(self, forget, retain, cfg):
        """(forget, retain, info): defaults from `cfg.forget_digit`; info names the forgotten digit when
        every forget prompt names the same one (else None: no digit-level evaluation)."""
        if forget is None:
            forget = digit_prompts(cfg.forget_digit)[:self.TRAINED_PHRASINGS]
        labels = {digit_of_prompt(p) for p in forget}
        if len(labels) != 1 or None in labels:
            return forget, retain, None
        d = labels.pop()
        if retain is None:
            retain = [p for k in range(10) if k != d for p in digit_prompts(k)]
        return forget, retain, {"forget_digit": d}

    def _loaded(self) -> DigitsWorld:
        if not hasattr(self, "_world"):
            self._world = load_world(self.cache_dir, progress=False)
        return self._world

    def perceptual(self):
        from ...metrics import DigitsPerceptual

        return DigitsPerceptual(self._loaded().classifier)

    def evaluation(self, info, n_forget: int, n_retain: int) -> dict:
        """Keyword arguments of fastunlearn.evaluate.Evaluator: `n_forget` samples of the forgotten digit and
        `n_retain` of every other one, the `lpips-digits` perceptual network, the classifier as judge, and
        real images of the retained digits for `fid-digits`."""
        d = info["forget_digit"]
        forget = eval_pairs([d], n_forget)
        retain = eval_pairs([k for k in range(10) if k != d], n_retain)
        images, labels = load_digit_images()
        real = ((images[labels != d] + 1) / 2).expand(-1, 3, -1, -1)
        return dict(forget=forget[:2], retain=retain[:2], perceptual=self.perceptual(),
                    classifier=self._loaded().classifier, forget_label=d, retain_labels=retain[2], real_retain=real,
                    retain_groups=retain[2], group_key="digit")

    def report_fields(self, info) -> dict:
        return {"forget_digit": info["forget_digit"], "world": "digits (fastunlearn embedded world)"}

    def eval_prompts(self) -> list[str]:
        """The canonical prompt of every digit."""
        return [digit_prompts(d)[0] for d in range(10)]
