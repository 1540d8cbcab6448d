"""What an attack is measured against: the judge of the samples, the embedded world's concept with its
retained control concept and judge, and the check that the unlearned model is a copy of the original (so that
the original-model control attacks the same architecture)."""
from __future__ import annotations

from ..errors import FastUnlearnError
from .encoding import encoders


def judged(pipe, prompts, n, sampler, judge, seed=0):
    """(concept rate or None, images): `n` samples cycling through `prompts`, seeds seed..seed+n-1."""
    from ..sampling import sample

    ps = [prompts[i % len(prompts)] for i in range(n)]
    images = sample(pipe, ps, [seed + i for i in range(n)], sampler, progress=False)
    return (float(judge(images).float().mean()) if judge is not None else None), images


def world_concept(world, concept: str, cache_dir=None):
    """In an embedded world: (concept words, default forget prompts, judge label, retained concept, its prompts,
    judge) for a concept that names one of its classes; (None,)*6 otherwise. Digits world: the concept is a
    digit ("3" or "three"), its words both spellings, the retained concept the next digit, the judge the digit
    classifier (an image counts when it reads as the digit)."""
    if world is None or world.name != "digits":
        return (None,) * 6
    from ..worlds.digits import DIGIT_WORDS, digit_of_prompt, digit_prompts, load_world

    d = digit_of_prompt(concept)
    if d is None or concept.strip().lower() not in (str(d), DIGIT_WORDS[d]):
        return (None,) * 6
    classifier = load_world(cache_dir, progress=False).classifier

    def judge(images, label):
        return classifier.predict(images * 2 - 1) == label

    r = (d + 1) % 10
    return [str(d), DIGIT_WORDS[d]], digit_prompts(d), d, [str(r), DIGIT_WORDS[r]], digit_prompts(r), judge


def check_same_model(original, unlearned) -> None:
    """An unlearned pipeline must be the original's architecture: same pipeline class, scheduler, image size,
    UNet layout and vocabulary (fastunlearn.evaluate._compatible plus the architecture)."""
    from ..evaluation import _compatible

    if type(original) is not type(unlearned):
        raise FastUnlearnError(f"the unlearned pipeline is a {type(unlearned).__name__} but the original a "
                               f"{type(original).__name__}: it cannot be an unlearned copy of it")
    _compatible(original, unlearned)
    for k in ("in_channels", "out_channels", "block_out_channels", "down_block_types", "cross_attention_dim",
              "addition_embed_type", "transformer_layers_per_block"):
        a, b = original.unet.config.get(k), unlearned.unet.config.get(k)
        if a != b:
            raise FastUnlearnError(f"the unlearned pipeline's UNet differs from the original's in {k} ({b!r} vs "
                                   f"{a!r}): it is not an unlearned copy of it")
    for (ta, _), (tb, _) in zip(encoders(original), encoders(unlearned)):
        if len(ta) != len(tb):
            raise FastUnlearnError(f"the unlearned pipeline's tokenizer has {len(tb)} tokens, the original's "
                                   f"{len(ta)}: it is not an unlearned copy of it")
