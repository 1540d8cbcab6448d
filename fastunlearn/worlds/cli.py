"""What the embedded worlds' commands share (`python -m fastunlearn.worlds.digits`, `... .styles`): their common
arguments and the world they load, rebuilt first with --rebuild (`world_command`), and the labelled grid of
samples they write (`save_digit_grid`)."""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..errors import FastUnlearnError


def world_command(argv, prog: str, description: str, out: str, samples: tuple[str, str], ensure_world, load_world,
                  add_arguments=lambda p: None):
    """(arguments, world) of a world's command: --cache-dir, --out (default `out`), the count of samples
    `samples` = (flag, what it counts; at least 1, default 20), the world's own arguments (`add_arguments(parser)`)
    and --rebuild; the world loaded from --cache-dir, rebuilt first with --rebuild."""
    flag, what = samples
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--cache-dir", default=None, help="cache directory (default: $FASTUNLEARN_CACHE or ~/.cache/fastunlearn)")
    p.add_argument("--out", default=out, help="where to write grid.png and samples.json (default: %(default)s)")
    p.add_argument(flag, type=int, default=20, help=f"{what} (default: %(default)s)")
    add_arguments(p)
    p.add_argument("--rebuild", action="store_true", help="rebuild the world even if a complete one is cached")
    args = p.parse_args(argv)
    if getattr(args, flag[2:].replace("-", "_")) < 1:
        raise FastUnlearnError(f"{flag} must be at least 1")
    if args.rebuild:
        ensure_world(args.cache_dir, rebuild=True)
    return args, load_world(args.cache_dir)


def save_digit_grid(images: torch.Tensor, labels, path: Path, title: str | None = None, row_names=None) -> None:
    """One row per digit (labelled), samples along the row. images: (N, 3, H, W) in [0, 1]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(int(x) for x in labels)
    rows = sorted(set(labels))
    cols = max(labels.count(r) for r in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(0.6 * cols + 1.2, 0.62 * len(rows) + 0.4), squeeze=False)
    for r, d in enumerate(rows):
        idx = [i for i, lab in enumerate(labels) if lab == d]
        for c in range(cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            for s in ax.spines.values():
                s.set_visible(False)
            if c < len(idx):
                ax.imshow(images[idx[c]].permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
        axes[r][0].set_ylabel(row_names[r] if row_names else f'"{d}"', rotation=0, ha="right", va="center",
                              fontsize=10)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
