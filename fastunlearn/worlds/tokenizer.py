"""A real CLIP tokenizer built offline from a word list: one BPE token per word.

A `CLIPTokenizer()` made without vocabulary files silently maps every word to end-of-text;
this builds `vocab.json` + `merges.txt` whose merges assemble each word into a single token,
then checks that they do.
"""
from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable
from pathlib import Path

from transformers import CLIPTokenizer

from ..errors import FastUnlearnError

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _train_bpe(words: list[str]) -> list[tuple[str, str]]:
    """Greedy BPE until every word is one symbol: the most frequent adjacent pair is merged first
    (ties broken alphabetically), so applying the merges by rank reproduces one token per word."""
    segs = [list(w[:-1]) + [w[-1] + "</w>"] for w in words]
    merges = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for seg in segs:
            for pair in zip(seg, seg[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return merges
        best = min(counts, key=lambda pr: (-counts[pr], pr))
        merges.append(best)
        for i, seg in enumerate(segs):
            out, j = [], 0
            while j < len(seg):
                if j + 1 < len(seg) and (seg[j], seg[j + 1]) == best:
                    out.append(seg[j] + seg[j + 1])
                    j += 2
                else:
                    out.append(seg[j])
                    j += 1
            segs[i] = out


def build_clip_tokenizer(words: Iterable[str], model_max_length: int = 12) -> CLIPTokenizer:
    words = sorted({w.lower() for w in words if w})
    vocab = {BOS: 0, EOS: 1}
    # Single characters first so an unseen word still tokenizes to something other than end-of-text.
    for ch in sorted({c for w in words for c in w}):
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    merges = _train_bpe(words)
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
        tok = CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"),
                            model_max_length=model_max_length, pad_token=EOS)
    check_tokenizer(tok, words)
    return tok


def check_tokenizer(tok, words: Iterable[str] = ()) -> None:
    """Raise if the tokenizer has no real vocabulary, or if a given word does not map to its own token."""
    if len(tok) <= 2:
        raise FastUnlearnError(
            f"tokenizer has only {len(tok)} tokens (no vocabulary): every prompt would encode to end-of-text")
    for w in words:
        ids = tok(w, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise FastUnlearnError(f"tokenizer splits the prompt word {w!r} into {len(ids)} tokens")
