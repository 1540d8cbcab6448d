"""The styles world's judges, both behind fastunlearn.judges.Judge: the digit classifier for the object axis
(a DigitClassifier reading the ink map, so the colour does not matter to it) and the exact style rules of
render.py for the style axis; and the world's perceptual network."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...errors import FastUnlearnError
from ...judges import DigitsJudge, Judge
from ...metrics import DigitsPerceptual
from ..digits.classifier import IMAGE_SIZE, DigitClassifier, train_classifier
from .prompts import parse_prompt
from .render import colour_of, stroke_of, style_of


class InkDigitClassifier(DigitClassifier):
    """The digit classifier of the styles world: a DigitClassifier on the ink map (max over RGB) instead of
    the channel mean. Input: (B, 1 or 3, H, W) in [-1, 1]."""

    @staticmethod
    def prepare(images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if x.shape[1] == 3:
            x = x.amax(1, keepdim=True)
        if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
            x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
        return x


def train_ink_classifier(images, labels, steps: int, seed: int = 0, progress=None) -> InkDigitClassifier:
    """Train on styled (N, 3, 32, 32) images in [-1, 1] (their ink maps)."""
    base = train_classifier(InkDigitClassifier.prepare(images), labels, steps=steps, seed=seed,
                            progress=progress)
    model = InkDigitClassifier(base.channels)
    model.load_state_dict(base.state_dict())
    return model.eval().requires_grad_(False)


class AxisClassifier:
    """The exact style rules as a classifier on one axis (`colour`, `stroke` or `style`), with the `predict`
    of DigitClassifier: (B, 3, H, W) in [-1, 1] -> (B,) int64 labels, -1 for an image without ink."""

    RULES = {"colour": colour_of, "stroke": stroke_of, "style": style_of}

    def __init__(self, axis: str):
        if axis not in self.RULES:
            raise FastUnlearnError(f"style axis {axis!r}: choose one of {', '.join(self.RULES)}")
        self.axis = axis

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return self.RULES[self.axis]((images.float().cpu() + 1) / 2)


class StyleJudge(Judge):
    """The exact style judge: an image shows the style of `concept_prompt` iff its ink colour is the colour
    the prompt names (if it names one) and its stroke is the stroke the prompt names (if it names one). A
    concept is a prompt of the world or a style name ("red", "bold", "red bold"). Contrast prompts are not
    used."""

    name = "styles (exact colour and stroke rules)"

    @torch.no_grad()
    def rates(self, images, concept_prompt, contrast_prompts=()):
        _, colour, stroke = parse_prompt(concept_prompt)
        if colour is None and stroke is None:
            raise FastUnlearnError(f"style judge: {concept_prompt!r} names no colour and no stroke of the "
                                   "styles world")
        x = images.float().cpu()
        shows = torch.ones(len(x), dtype=torch.bool)
        if colour is not None:
            shows &= colour_of(x) == colour
        if stroke is not None:
            shows &= stroke_of(x) == stroke
        return shows


def digit_judge(classifier: InkDigitClassifier, prompts) -> DigitsJudge:
    """The object-axis judge: the digits judge with the styles world's classifier and every prompt's digit."""
    return DigitsJudge(classifier, {q: parse_prompt(q)[0] for q in prompts if parse_prompt(q)[0] is not None})


class StylesPerceptual(DigitsPerceptual):
    """`lpips-styles`: lpips-digits on the ink map (the digit classifier's three conv maps) plus the RGB image
    average-pooled to 8x8 (its channel-normalised colour: the hue of the ink), all with uniform weights."""

    name = "lpips-styles"
    fid_name = "fid-styles"

    def __init__(self, classifier):
        super().__init__(classifier)
        self.lin_weights = [*self.lin_weights, torch.ones(3)]

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """images: (B, 3, H, W) in [0, 1] -> the three conv maps and (B, 3, 8, 8)."""
        return [*super().features(images), F.adaptive_avg_pool2d(images.to(self.device).float(), 8)]

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 67): the fid-digits embedding of the ink map and the image's mean RGB (`fid-styles`)."""
        return torch.cat([super().embed(images), images.float().mean((2, 3)).to(self.device)], 1)
