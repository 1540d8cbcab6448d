"""The digits world's prompts and data: the six phrasings of each digit (`digit_prompts`), the digit a prompt
names, the evaluation pairs, and scikit-learn's 1,797 digits with the classifier's held-out split."""
from __future__ import annotations

import torch
import torch.nn.functional as F

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TEMPLATES = [
    "a handwritten digit {word}",
    "the number {digit}",
    "a drawing of the digit {digit}",
    "handwritten {word}",
    "an image of the number {word}",
    "digit {digit}",
]
IMAGE_SIZE = 32


def digit_prompts(digit: int) -> list[str]:
    """The six phrasings of one digit; the first is the canonical prompt."""
    return [t.format(word=DIGIT_WORDS[digit], digit=digit) for t in TEMPLATES]


def digit_of_prompt(prompt: str) -> int | None:
    """The digit a digits-world prompt names, or None."""
    words = prompt.lower().split()
    for d, w in enumerate(DIGIT_WORDS):
        if w in words or str(d) in words:
            return d
    return None


def prompt_words() -> list[str]:
    return sorted({w for d in range(10) for p in digit_prompts(d) for w in p.split()})


def eval_pairs(digits, per_digit: int, seed_offset: int = 0):
    """(prompts, seeds, labels) for `per_digit` samples of each digit, cycling through the phrasings."""
    prompts, seeds, labels = [], [], []
    for d in digits:
        phrasings = digit_prompts(d)
        for i in range(per_digit):
            prompts.append(phrasings[i % len(phrasings)])
            seeds.append(seed_offset + i)
            labels.append(d)
    return prompts, seeds, labels



def load_digit_images():
    """All 1,797 sklearn digits as (N, 1, 32, 32) fp32 in [-1, 1], with labels (N,) int64."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False).clamp(0, 1)
    return x * 2 - 1, torch.tensor(data.target, dtype=torch.long)


def heldout_split(n: int, seed: int = 0, frac: float = 0.2):
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    k = int(n * frac)
    return perm[k:], perm[:k]
