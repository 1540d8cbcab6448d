"""What an attack is measured against: the judge of the samples, the embedded world's concept with its
retained control concept and judge, and the check that the unlearned model is a copy of the original (so that
the original-model control attacks the same architecture)."""
from __future__ import annotations

from typing import Callable, NamedTuple

from ..errors import FastUnlearnError
from .encoding import encoders


def judged(pipe, prompts, n, sampler, judge, seed=0):
    """(concept rate or None, images): `n` samples cycling through `prompts`, seeds seed..seed+n-1."""
    from ..sampling import sample

    ps = [prompts[i % len(prompts)] for i in range(n)]
    images = sample(pipe, ps, [seed + i for i in range(n)], sampler, progress=False)
    return (float(judge(images).float().mean()) if judge is not None else None), images


class WorldConcept(NamedTuple):
    """An embedded world's concept under attack: its words (what <c*> replaces), the default forget prompts,
    the judge's label of the concept, the retained control concept (words, prompts, label), the judge
    (`judge(images in [0, 1], label)` -> bool per image: the image shows the concept of `label`) and its name
    for the report."""

    words: list
    prompts: list
    label: object
    retain_words: list
    retain_prompts: list
    retain_label: object
    judge: Callable
    judge_name: str


def world_concept(world, concept: str, cache_dir=None) -> WorldConcept | None:
    """The embedded world's concept named by `concept` (WorldConcept), or None (not a world, or in the digits
    world a word that is no digit: the caller's prompts and judge then). Digits world: a digit ("3" or
    "three"). Styles world: a colour, a stroke or a digit (`_styles_concept`; anything else is a one-line
    error)."""
    if world is not None and world.name == "styles":
        return _styles_concept(world, concept)
    if world is None or world.name != "digits":
        return None
    from ..worlds.digits import DIGIT_WORDS, digit_of_prompt, digit_prompts, load_world

    d = digit_of_prompt(concept)
    if d is None or concept.strip().lower() not in (str(d), DIGIT_WORDS[d]):
        return None
    classifier = load_world(cache_dir, progress=False).classifier

    def judge(images, label):
        return classifier.predict(images * 2 - 1) == label

    r = (d + 1) % 10
    return WorldConcept([str(d), DIGIT_WORDS[d]], digit_prompts(d), d, [str(r), DIGIT_WORDS[r]], digit_prompts(r),
                        r, judge, "digit classifier (digits world)")


def _styles_concept(world, concept: str) -> WorldConcept:
    """Styles world: a colour ("red"), a stroke ("bold") or a digit ("3"/"three"). Prompts: all six phrasings
    of every (digit, style) combination of the concept, phrasing-major, so that n samples cycling through them
    are the world evaluation's n forget samples (`eval_pairs`). Judge: the world's in-domain judge of the task
    (`World.axis_classifier`: the exact colour or stroke rule, or the digit classifier), so the concept rate is
    the run report's forget_accuracy. Retained control: the next colour (COLOUR_NAMES order), the other stroke,
    or the next digit, on the same axis."""
    from ..worlds.digits import DIGIT_WORDS
    from ..worlds.styles import (
        COLOUR_NAMES,
        STROKE_NAMES,
        TEMPLATES,
        combo_prompts,
        concept_combos,
        parse_style,
        style_name,
    )

    text = " ".join(concept.lower().split())
    digit = next((d for d, w in enumerate(DIGIT_WORDS) if text in (str(d), w)), None)
    if digit is not None:
        r = (digit + 1) % 10
        infos = [{"task": "digit", "forget_digit": k} for k in (digit, r)]
        words = [[str(k), DIGIT_WORDS[k]] for k in (digit, r)]
    else:
        try:
            colour, stroke = parse_style(text)
        except FastUnlearnError:
            raise FastUnlearnError(
                f"--concept {concept!r} is not a concept of the styles world: give a colour "
                f"({', '.join(COLOUR_NAMES)}), a stroke ({', '.join(STROKE_NAMES)}) or a digit (3 or three)") from None
        if colour is not None and stroke is not None:
            raise FastUnlearnError(f"--concept {concept!r}: the attack takes a one-word concept of the styles world "
                                   "(a colour, a stroke or a digit); its prompts name colour and stroke apart")
        styles = ([(colour, None), ((colour + 1) % len(COLOUR_NAMES), None)] if colour is not None else
                  [(None, stroke), (None, (stroke + 1) % len(STROKE_NAMES))])
        infos = [{"task": "style", "forget_style": style_name(*s)} for s in styles]
        words = [[info["forget_style"]] for info in infos]
    axis = world.sets(infos[0], 1, 1)["axis"]
    labels = [world.sets(info, 1, 1)["label"] for info in infos]
    prompts = [[combo_prompts(d, s)[j] for j in range(len(TEMPLATES)) for d, s in concept_combos(info)]
               for info in infos]
    classifier = world.axis_classifier(axis)

    def judge(images, label):
        return classifier.predict(images * 2 - 1).cpu() == label

    name = "digit classifier (styles world)" if axis == "digit" else f"style judge (styles world, {axis})"
    return WorldConcept(words[0], prompts[0], labels[0], words[1], prompts[1], labels[1], judge, name)


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
