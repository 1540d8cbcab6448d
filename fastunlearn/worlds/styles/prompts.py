"""The styles world's prompts: every one names a digit and a style (ink colour and stroke), in six phrasings.

A concept of the world is a digit ("3") or a style: a colour ("red"), a stroke ("bold") or both ("red bold").
"""
from __future__ import annotations

import re

from ...errors import FastUnlearnError
from ..digits.data import DIGIT_WORDS
from .render import COLOUR_NAMES, STROKE_NAMES, STYLES

TEMPLATES = [
    "a handwritten digit {word} in {colour} ink, {stroke} strokes",
    "the number {digit} in {stroke} {colour} ink",
    "a drawing of the digit {digit} with {stroke} {colour} strokes",
    "handwritten {word}, {colour} ink, {stroke} lines",
    "an image of the number {word} written in {colour} with {stroke} strokes",
    "digit {digit}, {stroke}, {colour}",
]
COMBINATIONS = [(d, s) for s in range(len(STYLES)) for d in range(10)]  # (digit, style index)


def combo_prompts(digit: int, style: int) -> list[str]:
    """The six phrasings of one digit in one style (index into render.STYLES); the first is canonical."""
    colour, stroke = STYLES[style].split()
    return [t.format(word=DIGIT_WORDS[digit], digit=digit, colour=colour, stroke=stroke) for t in TEMPLATES]


def _words(prompt: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", prompt.lower())


def parse_prompt(prompt: str) -> tuple[int | None, int | None, int | None]:
    """(digit, colour index, stroke index) a prompt names; None for what it does not name (or names twice)."""
    words = _words(prompt)

    def one(found):
        return found[0] if len(set(found)) == 1 else None

    digit = one([d for d, w in enumerate(DIGIT_WORDS) for x in words if x in (w, str(d))])
    colour = one([c for c, w in enumerate(COLOUR_NAMES) if w in words])
    stroke = one([k for k, w in enumerate(STROKE_NAMES) if w in words])
    return digit, colour, stroke


def prompt_words() -> list[str]:
    return sorted({w for d, s in COMBINATIONS for p in combo_prompts(d, s)
                   for w in p.replace(",", " ").split()})


def parse_style(name: str) -> tuple[int | None, int | None]:
    """(colour, stroke) of a style concept: "red", "bold" or "red bold" (either order); else a one-line
    error."""
    words = _words(str(name))
    colour = [COLOUR_NAMES.index(w) for w in words if w in COLOUR_NAMES]
    stroke = [STROKE_NAMES.index(w) for w in words if w in STROKE_NAMES]
    if len(words) != len(colour) + len(stroke) or len(colour) > 1 or len(stroke) > 1 or not words:
        raise FastUnlearnError(f"forget_style {name!r} is not a style of the styles world: give a colour "
                               f"({', '.join(COLOUR_NAMES)}), a stroke ({', '.join(STROKE_NAMES)}) or both, "
                               "e.g. 'red bold'")
    return (colour[0] if colour else None), (stroke[0] if stroke else None)


def style_name(colour: int | None, stroke: int | None) -> str:
    return " ".join(n for n in ((COLOUR_NAMES[colour] if colour is not None else None),
                                (STROKE_NAMES[stroke] if stroke is not None else None)) if n)


def has_style(style: int, colour: int | None, stroke: int | None) -> bool:
    """Whether the style index `style` is of the style concept (colour, stroke); None matches any."""
    c, k = divmod(style, len(STROKE_NAMES))
    return (colour is None or c == colour) and (stroke is None or k == stroke)


def eval_pairs(combos, n: int, seed_offset: int = 0):
    """(prompts, seeds, digits, styles) of `n` samples spread over `combos` ((digit, style) pairs): sample i
    draws combination i % len(combos), in phrasing (i // len(combos)) % 6, from seed seed_offset + i."""
    prompts, seeds, digits, styles = [], [], [], []
    for i in range(n):
        d, s = combos[i % len(combos)]
        prompts.append(combo_prompts(d, s)[(i // len(combos)) % len(TEMPLATES)])
        seeds.append(seed_offset + i)
        digits.append(d)
        styles.append(s)
    return prompts, seeds, digits, styles
