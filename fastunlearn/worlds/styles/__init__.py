"""The styles world: the sklearn digits drawn in 8 ink styles (4 colours x 2 strokes), a tiny Stable
Diffusion pipeline prompted by digit and style, a digit classifier and an exact style judge. Erasure has
neighbours on two axes: erase a style (all digits in red ink; neighbours: the other styles) or a digit (the 3
in every style; neighbours: the other digits). `World` is what the rest of fastunlearn uses
(fastunlearn.worlds)."""
from __future__ import annotations

import re
from pathlib import Path

import torch

from .judge import (  # noqa: F401
    AxisClassifier,
    InkDigitClassifier,
    StyleJudge,
    StylesPerceptual,
    digit_judge,
    train_ink_classifier,
)
from .prompts import (  # noqa: F401
    COMBINATIONS,
    TEMPLATES,
    combo_prompts,
    eval_pairs,
    has_style,
    parse_prompt,
    parse_style,
    prompt_words,
    style_name,
)
from .render import COLOUR_NAMES, STROKE_NAMES, STYLES, render_styles, style_index  # noqa: F401
from .world import (  # noqa: F401
    FAST_RECIPE,
    WORLD_VERSION,
    Recipe,
    StylesWorld,
    build_world,
    ensure_world,
    heldout_split,
    load_styled_images,
    load_world,
    main,
    score_pipeline,
    world_path,
    world_problem,
)

# The colour an anchor names in place of the forgotten one (anchor_prompts): the next in the palette, a fixed rule,
# not tuned (on green, blue and red were compared only at tau 0.2, where neither forgot: benchmarks/RESULTS.md).
ANCHOR_COLOUR = {c: COLOUR_NAMES[(i + 1) % len(COLOUR_NAMES)] for i, c in enumerate(COLOUR_NAMES)}
REAL_RETAIN_IMAGES = 2000  # real images of the retained concepts (fid-styles' reference), a fixed subsample


def task_of_prompts(prompts) -> dict | None:
    """The world's info for forget prompts given by the user: a digit task when they all name one digit (in
    more than one style), a style task when they name more than one digit and share a colour and/or a stroke
    (the concept is what they share); None otherwise (no world-level evaluation)."""
    parsed = [parse_prompt(q) for q in prompts]
    if not parsed or any(None in p for p in parsed):
        return None
    digits, colours, strokes = ({p[i] for p in parsed} for i in range(3))
    if len(digits) == 1:
        return {"task": "digit", "forget_digit": digits.pop()} if len(colours) * len(strokes) > 1 else None
    colour = colours.pop() if len(colours) == 1 else None
    stroke = strokes.pop() if len(strokes) == 1 else None
    if colour is None and stroke is None:
        return None
    return {"task": "style", "forget_style": style_name(colour, stroke)}


def concept_combos(info: dict) -> list[tuple[int, int]]:
    """The (digit, style) combinations of the forgotten concept."""
    if info["task"] == "digit":
        return [(d, s) for d, s in COMBINATIONS if d == info["forget_digit"]]
    colour, stroke = parse_style(info["forget_style"])
    return [(d, s) for d, s in COMBINATIONS if has_style(s, colour, stroke)]


class World:
    """The styles world behind the interface of fastunlearn.worlds. Two tasks, chosen by the config:
    `forget_style` ("red", "bold" or "red bold") erases a style in every digit; otherwise `forget_digit`
    erases a digit in every style. Defaults: the forget prompts are the first TRAINED_PHRASINGS phrasings of
    every combination of the concept (evaluated on all six, as the digits world), the retain prompts the
    canonical phrasing of every other combination.

    Metrics (docs/worlds-styles.md): the in-domain axis is the forgotten concept's (colour, stroke, style or
    digit), the cross-domain axis the other one (digit identity, or the full style). forget_accuracy is the
    share of forget samples the in-domain judge sees as the concept (unlearning accuracy = 1 - it),
    retain_accuracy the in-domain accuracy on the retain samples, cross_domain_retain_accuracy the other
    axis' accuracy on them; I_retain and retain accuracy per neighbour group (retain style, or digit)."""

    name = "styles"
    guidance_scale = 4.0
    TRAINED_PHRASINGS = 3
    default_recipe = Recipe()  # what `--model styles` builds; tests of the trainer set FAST_RECIPE here
    # {method: {config key: value}}: this world's own defaults (fastunlearn.cli). Saddle: the world's anchor as its
    # forget target (anchor_prompts: the next colour, the next digit), with the tight constraint that target needs
    # (at tau 0.2 it is met while the samples keep the colour: most of the anchor's gap does not decide it) and
    # lr 1e-4 (at 2e-4 Adam drifts the retained styles once the constraint is met). Chosen on the tuning tasks
    # green and the 8, seed 0, never on red or the 3 (RESULTS.md, "Anchors in the styles world").
    method_defaults: dict = {"saddle": {"forget_target": "anchor", "saddle.tau": 0.01, "lr": 1e-4}}
    # ... with, where the world also chooses the retain set (its groups are their styles or digits; a user's retain
    # prompts, groups or images may have none), one retain constraint per neighbour group (each other style; each
    # other digit) at rho 0.02 beside the full mean retain loss: on green, blue and the 8 it cut I_retain (0.043 ->
    # 0.027, 0.102 -> 0.061, 0.097 -> 0.092) at full forgetting, and on green and the 8 the worst group's share of
    # it (2.55x -> 2.01x, 3.15x -> 1.85x of the mean; blue 1.82x -> 2.10x) (RESULTS.md, "Group constraints on the
    # anchor target").
    group_method_defaults: dict = {"saddle": {"saddle.retain": "constraints", "saddle.retain_weight": 1.0,
                                              "saddle.rho": 0.02}}
    # ... and over them for a style task (--forget-style) only: a multiplier that starts at 1 (green: forget
    # accuracy 0.13 -> 0.01 in 400 steps); every forget row starting from the teacher's sample of its anchor
    # (forget_x0_anchor 1: the x_t the sampler visits once the student draws the anchor colour), which forgets the
    # tuning task green bold that the rest left half unforgotten (unlearning accuracy 0.44 -> 1.00); and each
    # group's bound at rho 0.01: on green bold, green and yellow the pair keeps I_retain where it was (mean 0.033
    # against 0.035 before) with the worst group within 2x of the mean on all three (1.47-1.59x; 1.95-2.01x before)
    # (RESULTS.md, "Anchor samples as forget rows"). The bound only where the world's groups are (as above).
    style_method_defaults: dict = {"saddle": {"saddle.lambda_init": 1.0, "forget_x0_anchor": 1.0}}
    style_group_method_defaults: dict = {"saddle": {"saddle.rho": 0.01}}

    def __init__(self, cache_dir=None, recipe: Recipe | None = None):
        self.cache_dir, self.recipe = cache_dir, recipe if recipe is not None else self.default_recipe

    def pipeline_path(self) -> Path:
        return ensure_world(self.cache_dir, self.recipe) / "pipeline"

    def _loaded(self) -> StylesWorld:
        if not hasattr(self, "_world"):
            self._world = load_world(self.cache_dir, self.recipe, progress=False)
        return self._world

    # ---- prompts ---------------------------------------------------------------------------------------
    def task(self, cfg) -> dict:
        """The info of the configured task: forget_style when given, else forget_digit (default 3)."""
        style = getattr(cfg, "forget_style", None)
        if style:
            return {"task": "style", "forget_style": style_name(*parse_style(style))}
        return {"task": "digit", "forget_digit": int(getattr(cfg, "forget_digit", 3))}

    def forget_prompts(self, info: dict) -> list[str]:
        return [q for d, s in concept_combos(info) for q in combo_prompts(d, s)[:self.TRAINED_PHRASINGS]]

    def retain_prompts(self, info: dict) -> list[str]:
        forgotten = set(concept_combos(info))
        return [combo_prompts(d, s)[0] for d, s in COMBINATIONS if (d, s) not in forgotten]

    def prompts(self, forget, retain, cfg, concepts=None):
        """(forget, retain, info). info: {"task": "style", "forget_style": name} or {"task": "digit",
        "forget_digit": d}; None when the prompts are not one concept of the world (or several concepts: not
        yet supported in this world), and then no world-level evaluation."""
        if concepts:
            return forget, retain, None
        if forget is None:
            info = self.task(cfg)
            forget = self.forget_prompts(info)
        else:
            info = task_of_prompts(forget)
            if info is None:
                return forget, retain, None
        if retain is None:
            retain = self.retain_prompts(info)
        return forget, retain, info

    def retain_groups(self, info, retain) -> list[str] | None:
        """The neighbour group of each retain prompt (Saddle's `retain: constraints | dro`): its style ("blue
        thin") for a style task, its digit for a digit task; None when a prompt does not name it."""
        parsed = [parse_prompt(q) for q in retain]
        if info.get("task") == "digit":
            return None if any(d is None for d, _, _ in parsed) else [str(d) for d, _, _ in parsed]
        if any(c is None or k is None for _, c, k in parsed):
            return None
        return [style_name(c, k) for _, c, k in parsed]

    def method_defaults_for(self, cfg) -> dict:
        """{config key: value}: this world's defaults for the run's method, with those of a style task over them
        when the run names a style (fastunlearn.cli). None when the user gives the forget prompts: the defaults
        rest on the world's own anchors, which such prompts may not have; `group_method_defaults` (and, for a style
        task, `style_group_method_defaults`) only when the world chooses the retain set too (they rest on its
        groups)."""
        if cfg.forget_prompts is not None or cfg.forget_data_dir:
            return {}
        defaults = dict(self.method_defaults.get(cfg.method, {}))
        groups = cfg.retain_prompts is None and cfg.retain_groups is None and not cfg.retain_data_dir
        style = bool(getattr(cfg, "forget_style", None))
        if groups:
            defaults.update(self.group_method_defaults.get(cfg.method, {}))
        if style:
            defaults.update(self.style_method_defaults.get(cfg.method, {}))
        if groups and style:
            defaults.update(self.style_group_method_defaults.get(cfg.method, {}))
        return defaults

    def anchor_prompts(self, info, forget) -> list[str] | None:
        """The anchor of each forget prompt, when the user gives none (the Concept Ablation recipe: a neighbour
        concept, everything else kept). A style task: the prompt with the forgotten colour named as another
        (ANCHOR_COLOUR: red -> green, green -> blue, ...; "red bold" -> "green bold"), or, for a stroke alone, the
        other stroke, so the digit and the stroke stay. The prompt without its colour word is no
        anchor here: the original draws it in a colour of its own, mostly green (RESULTS.md, issue 26). A digit
        task: the next digit, numeral and word (the 3 -> the 4), so the style stays."""
        if info.get("task") == "digit":
            from ..digits.data import DIGIT_WORDS

            d, e = info["forget_digit"], (info["forget_digit"] + 1) % 10
            swaps = {str(d): str(e), DIGIT_WORDS[d]: DIGIT_WORDS[e]}
        elif info.get("task") == "style":
            colour, stroke = parse_style(info["forget_style"])
            swaps = ({COLOUR_NAMES[colour]: ANCHOR_COLOUR[COLOUR_NAMES[colour]]} if colour is not None
                     else {STROKE_NAMES[stroke]: STROKE_NAMES[1 - stroke]})
        else:
            return None
        words = re.compile(r"\b(" + "|".join(map(re.escape, swaps)) + r")\b", re.IGNORECASE)
        return [words.sub(lambda m: swaps[m.group(1).lower()], q) for q in forget]

    def concept_words(self, info) -> list[str] | None:
        """The words that name the concept in its prompts, what --robust replaces: the digit ("3", "three") or a
        one-word style ("red"); None for a two-word style, whose words stand apart (give robust.concept)."""
        if info.get("task") == "digit":
            from ..digits.data import DIGIT_WORDS

            return [str(info["forget_digit"]), DIGIT_WORDS[info["forget_digit"]]]
        words = str(info.get("forget_style", "")).split()
        return words if len(words) == 1 else None

    def eval_prompts(self) -> list[str]:
        """The canonical prompt of every (digit, style)."""
        return [combo_prompts(d, s)[0] for d, s in COMBINATIONS]

    # ---- evaluation ------------------------------------------------------------------------------------
    def perceptual(self):
        return StylesPerceptual(self._loaded().classifier)

    def judges(self) -> dict:
        """Both axes behind fastunlearn.judges.Judge: {"digit": the classifier, "style": the exact rules}."""
        return {"digit": digit_judge(self._loaded().classifier, self.eval_prompts() + [
            q for d, s in COMBINATIONS for q in combo_prompts(d, s)]), "style": StyleJudge()}

    def sets(self, info: dict, n_forget: int, n_retain: int) -> dict:
        """The evaluation sets without any network: forget (prompts, seeds), retain (prompts, seeds), and per
        sample its digit and style; `axis` (in-domain: colour, stroke, style or digit), the concept's label on
        it, the groups (retain style names, or retain digits) and their key. n_forget samples spread over the
        concept's combinations; n_retain samples per neighbour group, spread over the other axis."""
        forget = eval_pairs(concept_combos(info), n_forget)
        forgotten = set(concept_combos(info))
        if info["task"] == "digit":
            groups = [k for k in range(10) if k != info["forget_digit"]]
            parts = [eval_pairs([(k, s) for s in range(len(STYLES))], n_retain) for k in groups]
            axis, label = "digit", info["forget_digit"]
        else:
            colour, stroke = parse_style(info["forget_style"])
            groups = [s for s in range(len(STYLES)) if not has_style(s, colour, stroke)]
            parts = [eval_pairs([(d, s) for d in range(10)], n_retain) for s in groups]
            if colour is not None and stroke is not None:
                axis, label = "style", style_index(colour, stroke)
            else:
                axis, label = ("colour", colour) if colour is not None else ("stroke", stroke)
        retain = tuple([x for part in parts for x in part[i]] for i in range(4))
        assert not forgotten & set(zip(retain[2], retain[3]))  # the retain set never shows the concept
        return {"forget": forget, "retain": retain, "axis": axis, "label": label,
                "groups": retain[2] if axis == "digit" else [STYLES[s] for s in retain[3]],
                "group_key": "digit" if axis == "digit" else "style"}

    @staticmethod
    def axis_labels(axis: str, digits, styles) -> list[int]:
        n = len(STROKE_NAMES)
        return {"digit": list(digits), "style": list(styles), "colour": [s // n for s in styles],
                "stroke": [s % n for s in styles]}[axis]

    def axis_classifier(self, axis: str):
        """The judge of one axis (`sets`' axis), with DigitClassifier's `predict` ([-1, 1] images -> labels):
        the digit classifier for "digit", else the exact style rules on that axis. The in-domain judge of
        `evaluation` (forget_accuracy) and of the attack (fastunlearn.attack)."""
        return self._loaded().classifier if axis == "digit" else AxisClassifier(axis)

    def evaluation(self, info, n_forget: int, n_retain: int) -> dict:
        """Keyword arguments of fastunlearn.evaluation.Evaluator (see `sets`): the in-domain judge as
        `classifier` (the digit classifier, or the exact style rules on the concept's axis), the other axis as
        `cross`, the lpips-styles perceptual network and real styled images of the retained combinations."""
        sets = self.sets(info, n_forget, n_retain)
        (fp, fs, fd, fst), (rp, rs, rd, rst) = sets["forget"], sets["retain"]
        ink = self._loaded().classifier
        in_domain = self.axis_classifier(sets["axis"])
        other, other_axis = (AxisClassifier("style"), "style") if sets["axis"] == "digit" else (ink, "digit")
        images, digits, styles = load_styled_images()
        forgotten = torch.tensor([s * 10 + d for d, s in concept_combos(info)])
        keep = torch.nonzero(~torch.isin(styles * 10 + digits, forgotten)).flatten()
        order = torch.randperm(len(keep), generator=torch.Generator().manual_seed(0))
        keep = keep[order[:REAL_RETAIN_IMAGES]]
        return dict(forget=(fp, fs), retain=(rp, rs), perceptual=StylesPerceptual(ink), classifier=in_domain,
                    forget_label=sets["label"], retain_labels=self.axis_labels(sets["axis"], rd, rst),
                    real_retain=(images[keep] + 1) / 2, retain_groups=sets["groups"],
                    group_key=sets["group_key"],
                    cross={"classifier": other, "axis": other_axis,
                           "forget_labels": self.axis_labels(other_axis, fd, fst),
                           "retain_labels": self.axis_labels(other_axis, rd, rst)})

    def report_fields(self, info) -> dict:
        concept = (f"digit {info['forget_digit']} in every style" if info["task"] == "digit"
                   else f"{info['forget_style']} in every digit")
        other = "style" if info["task"] == "digit" else "digit"
        if info["task"] == "digit":
            judge = "in-domain: the styles world's digit classifier; cross-domain: the exact style rules"
        else:
            judge = (f"in-domain: the exact style rules ({self.sets(info, 1, 1)['axis']}); cross-domain: the "
                     "styles world's digit classifier")
        return {**info, "world": "styles (fastunlearn embedded world)", "forget_concept": concept,
                "judge": judge,
                "metric_definitions": {
                    "unlearning_accuracy": "1 - forget_accuracy: share of forget samples not judged "
                                           f"{concept}",
                    "in_domain_retain_accuracy": "retain_accuracy: retain samples judged as their prompt on "
                                                 f"the forgotten concept's axis ({info['task']})",
                    "cross_domain_retain_accuracy": f"retain samples judged as their prompt's {other}"}}
