"""The styles world's images and its exact style judge.

Every sklearn digit is drawn in every style: its ink skeleton (Zhang-Suen thinning of the binarised digit at
64x64) is redrawn with a disk pen of the stroke's radius, area-downsampled to 32x32 (anti-aliased), and
coloured with the ink colour on a black background. The palette colours all have max channel 1, so the ink
map (max over channels) is the same for every colour and the colour rule below sees the hue alone.

The judge's rules (docs/worlds-styles.md):

* ink map      max over RGB of the image in [0, 1]; ink pixels: ink map >= INK_THRESHOLD.
* colour       mean RGB of the ink pixels, divided by its largest channel, nearest palette colour (Euclidean);
               no ink pixels: no colour (-1).
* stroke       mean chessboard depth of the ink pixels (1 + the number of 3x3 erosions a pixel survives);
               bold iff >= STROKE_THRESHOLD, else thin; no ink pixels: no stroke (-1).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IMAGE_SIZE = 32
RENDER_SIZE = 64  # thinned and drawn at twice the size, then area-downsampled (anti-aliasing)
COLOURS = {  # max channel 1 each: the ink map does not depend on the colour
    "red": (1.0, 0.1, 0.1),
    "green": (0.1, 1.0, 0.1),
    "blue": (0.1, 0.3, 1.0),
    "yellow": (1.0, 1.0, 0.1),
}
STROKES = {"thin": 1.5, "bold": 4.5}  # pen radius in pixels of the 64x64 drawing
COLOUR_NAMES, STROKE_NAMES = list(COLOURS), list(STROKES)
STYLES = [f"{c} {s}" for c in COLOUR_NAMES for s in STROKE_NAMES]  # style index = 2 * colour + stroke
SKELETON_THRESHOLD = 0.5  # binarising the upsampled digit; 0.35 fills more small loops (8s thinned to 1s)
INK_THRESHOLD = 0.5
STROKE_THRESHOLD = 1.25  # renders: thin 1.00-1.09, bold 1.47-2.4 (docs/worlds-styles.md)
MAX_DEPTH = 8


def style_index(colour: int, stroke: int) -> int:
    return colour * len(STROKES) + stroke


def _zhang_suen_tables() -> torch.Tensor:
    """(2, 256) bool: whether Zhang-Suen's sub-iteration 0/1 removes a pixel whose neighbours P2..P9
    (N, NE, E, SE, S, SW, W, NW) are the bits 0..7 of the index."""
    table = torch.zeros(2, 256, dtype=torch.bool)
    for code in range(256):
        n = [(code >> i) & 1 for i in range(8)]
        transitions = sum(n[i] == 0 and n[(i + 1) % 8] == 1 for i in range(8))
        base = 2 <= sum(n) <= 6 and transitions == 1
        table[0, code] = base and n[0] * n[2] * n[4] == 0 and n[2] * n[4] * n[6] == 0
        table[1, code] = base and n[0] * n[2] * n[6] == 0 and n[0] * n[4] * n[6] == 0
    return table


_ZHANG_SUEN = _zhang_suen_tables()


def thin(mask: torch.Tensor) -> torch.Tensor:
    """Zhang-Suen thinning of a (B, H, W) bool mask to its one-pixel skeleton (bool, same shape)."""
    x = mask.bool().clone()
    while True:
        changed = False
        for sub in (0, 1):
            p = F.pad(x.to(torch.uint8), (1, 1, 1, 1))
            shifted = [p[:, :-2, 1:-1], p[:, :-2, 2:], p[:, 1:-1, 2:], p[:, 2:, 2:],
                       p[:, 2:, 1:-1], p[:, 2:, :-2], p[:, 1:-1, :-2], p[:, :-2, :-2]]
            code = torch.zeros_like(x, dtype=torch.uint8)
            for i, n in enumerate(shifted):
                code |= n << i
            remove = x & _ZHANG_SUEN[sub][code.long()]
            if remove.any():
                x &= ~remove
                changed = True
        if not changed:
            return x


def _disk(radius: float) -> torch.Tensor:
    r = int(radius)
    yy, xx = torch.meshgrid(torch.arange(-r, r + 1), torch.arange(-r, r + 1), indexing="ij")
    return ((yy ** 2 + xx ** 2) <= radius ** 2 + 1e-6).float()


def skeletons(digits: torch.Tensor) -> torch.Tensor:
    """(N, 1, 8, 8) sklearn digits in [0, 16] -> (N, 64, 64) bool ink skeletons."""
    x = F.interpolate(digits.float() / 16.0, size=(RENDER_SIZE, RENDER_SIZE), mode="bilinear",
                      align_corners=False)
    return thin(x[:, 0] >= SKELETON_THRESHOLD)


def draw(skel: torch.Tensor, stroke: str) -> torch.Tensor:
    """(N, 64, 64) bool skeletons -> (N, 1, 32, 32) ink alpha in [0, 1], drawn with the stroke's disk pen."""
    disk = _disk(STROKES[stroke])
    ink = F.conv2d(skel[:, None].float(), disk[None, None], padding=disk.shape[-1] // 2) > 0
    return F.avg_pool2d(ink.float(), RENDER_SIZE // IMAGE_SIZE)


def colourise(alpha: torch.Tensor, colour: str) -> torch.Tensor:
    """(N, 1, H, W) ink alpha in [0, 1] -> (N, 3, H, W) RGB in [-1, 1]: the ink colour on black."""
    return alpha * torch.tensor(COLOURS[colour]).view(1, 3, 1, 1) * 2 - 1


def render_styles(digits: torch.Tensor):
    """Every digit in every style: (N * len(STYLES), 3, 32, 32) fp32 in [-1, 1] and the style index of each
    image (style-major: all digits in style 0, then style 1, ...)."""
    skel = skeletons(digits)
    alphas = {s: draw(skel, s) for s in STROKE_NAMES}
    images, styles = [], []
    for c, colour in enumerate(COLOUR_NAMES):
        for k, stroke in enumerate(STROKE_NAMES):
            images.append(colourise(alphas[stroke], colour))
            styles.append(torch.full((len(digits),), style_index(c, k), dtype=torch.long))
    return torch.cat(images), torch.cat(styles)


# ---- the exact judge's rules -------------------------------------------------------------------------------
def ink_map(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) in [0, 1] -> (N, 1, H, W) ink intensity in [0, 1] (max over the channels)."""
    return images.float().clamp(0, 1).amax(1, keepdim=True)


def colour_of(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) in [0, 1] -> (N,) palette index of the ink colour, -1 where there is no ink."""
    x = images.float().clamp(0, 1)
    ink = (ink_map(x) >= INK_THRESHOLD).float()
    count = ink.sum((1, 2, 3))
    mean = (x * ink).sum((2, 3)) / count.clamp(min=1)[:, None]
    hue = mean / mean.amax(1, keepdim=True).clamp(min=1e-6)
    palette = torch.tensor(list(COLOURS.values()))
    pred = torch.cdist(hue, palette).argmin(1)
    return pred.masked_fill(count == 0, -1)


def stroke_depth(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) in [0, 1] -> (N,) mean chessboard depth of the ink pixels (0 where there is no ink)."""
    mask = (ink_map(images) >= INK_THRESHOLD).float()
    depth, m = mask.clone(), mask
    for _ in range(MAX_DEPTH - 1):
        m = -F.max_pool2d(-m, 3, 1, 1)  # 3x3 erosion (the border counts as ink: only the background erodes)
        depth = depth + m
    return depth.sum((1, 2, 3)) / mask.sum((1, 2, 3)).clamp(min=1)


def stroke_of(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) in [0, 1] -> (N,) stroke index (0 thin, 1 bold), -1 where there is no ink."""
    depth = stroke_depth(images)
    return (depth >= STROKE_THRESHOLD).long().masked_fill(depth == 0, -1)


def style_of(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) in [0, 1] -> (N,) style index (colour, stroke), -1 where there is no ink."""
    colour, stroke = colour_of(images), stroke_of(images)
    return (colour * len(STROKES) + stroke).masked_fill((colour < 0) | (stroke < 0), -1)
