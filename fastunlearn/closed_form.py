"""Closed-form edits of linear projections (UCE, RECE; docs/methods.md), as float64 linear algebra on plain tensors.

Usable on its own: nothing here knows about pipelines. Vectors are ROWS: `C` (n × d) holds n input vectors c_i.

UCE (Gandikota et al., arXiv 2308.14761). For a projection W (d_out × d) and its edit W', erase rows c_i with target
inputs c*_i (W' should send c_i where W sends c*_i: v*_i = W c*_i), preserve rows c_j:

    min_W'  s_e Σ_i ‖W' c_i − W c*_i‖²  +  s_p Σ_j ‖W' c_j − W c_j‖²  +  λ ‖W' − W‖²_F

The gradient vanishes where W' A = W M, with

    A = λ I + s_e Σ_i c_i c_iᵀ  + s_p Σ_j c_j c_jᵀ        (symmetric, positive definite for λ > 0)
    M = λ I + s_e Σ_i c*_i c_iᵀ + s_p Σ_j c_j c_jᵀ

so W' = W K with K = M A⁻¹ (`uce_map`): every target is W applied to an input, so the edit of every projection that
reads the same inputs (all cross-attention to_k and to_v) is one d × d matrix K on its right. Written as UCE writes it,
W' = (λ W + s_e Σ v*_i c_iᵀ + s_p Σ W c_j c_jᵀ)(λ I + s_e Σ c_i c_iᵀ + s_p Σ c_j c_jᵀ)⁻¹. K comes from
`torch.linalg.solve` (Kᵀ = A⁻¹ Mᵀ), never an explicit inverse.

RECE (Gong et al., arXiv 2407.12383): the input e that makes the EDITED projections W'_l = W_l K reproduce what the
ORIGINAL ones make of a concept row c, over all projections l at once, with a ridge ρ:

    min_e  Σ_l ‖W_l K e − W_l c‖² + ρ ‖e‖²    =>    e = (Kᵀ G K + ρ I)⁻¹ Kᵀ G c,    G = Σ_l W_lᵀ W_l   (`adversarial`)

`gram` gives G; `energy(G, X)` = Σ_l Σ_rows ‖W_l x‖², the measure of the residuals that fastunlearn.uce reports.
"""
from __future__ import annotations

import torch

DTYPE = torch.float64


def _rows(x: torch.Tensor, d: int, what: str) -> torch.Tensor:
    x = x.to(DTYPE).reshape(-1, d) if x.numel() else x.new_zeros((0, d), dtype=DTYPE)
    if x.shape[-1] != d:
        raise ValueError(f"{what} rows have {x.shape[-1]} entries, the inputs {d}")
    return x


def uce_map(erase: torch.Tensor, targets: torch.Tensor, preserve: torch.Tensor, erase_scale: float = 1.0,
            preserve_scale: float = 1.0, lamb: float = 0.5) -> torch.Tensor:
    """K (d × d, float64) of the UCE edit W' = W K. `erase` (n × d): the rows c_i to move; `targets` (n × d): their
    target inputs c*_i; `preserve` (m × d, m may be 0): the rows c_j to keep; weights s_e, s_p and λ > 0."""
    if not lamb > 0:
        raise ValueError(f"lamb must be > 0 (it keeps A invertible), got {lamb}")
    d = erase.shape[-1]
    C, V, P = _rows(erase, d, "erase"), _rows(targets, d, "target"), _rows(preserve, d, "preserve")
    if C.shape != V.shape:
        raise ValueError(f"{len(C)} erase rows but {len(V)} target rows")
    eye = torch.eye(d, dtype=DTYPE, device=C.device)
    keep = preserve_scale * (P.T @ P)
    A = lamb * eye + erase_scale * (C.T @ C) + keep
    M = lamb * eye + erase_scale * (V.T @ C) + keep
    return torch.linalg.solve(A, M.T).T


def uce_edit(weight: torch.Tensor, erase, targets, preserve, erase_scale=1.0, preserve_scale=1.0,
             lamb=0.5) -> torch.Tensor:
    """W' = W K (float64) for one projection `weight` (d_out × d): `uce_map`'s arguments."""
    return weight.to(DTYPE) @ uce_map(erase, targets, preserve, erase_scale, preserve_scale, lamb)


def gram(weights) -> torch.Tensor:
    """G = Σ_l W_lᵀ W_l (d × d, float64) over projections W_l (d_out_l × d) that read the same inputs."""
    weights = list(weights)
    G = torch.zeros(weights[0].shape[1], weights[0].shape[1], dtype=DTYPE, device=weights[0].device)
    for w in weights:
        w = w.to(DTYPE)
        G += w.T @ w
    return G


def adversarial(G: torch.Tensor, K: torch.Tensor, concept: torch.Tensor, reg: float) -> torch.Tensor:
    """RECE's embeddings (rows, float64): for each row c of `concept`, e = (Kᵀ G K + ρ I)⁻¹ Kᵀ G c, the input whose
    keys and values under the edited projections W_l K are closest to the original W_l c (ridge ρ = `reg` > 0)."""
    if not reg > 0:
        raise ValueError(f"reg must be > 0, got {reg}")
    G, K = G.to(DTYPE), K.to(DTYPE)
    C = _rows(concept, K.shape[0], "concept")
    KG = K.T @ G
    H = KG @ K + reg * torch.eye(K.shape[0], dtype=DTYPE, device=K.device)
    return torch.linalg.solve(H, KG @ C.T).T


def energy(G: torch.Tensor, X: torch.Tensor) -> float:
    """Σ_l Σ_rows ‖W_l x‖² = Σ_rows xᵀ G x for the rows x of X: the squared size, over every projection in G, of what
    those inputs give."""
    X = X.to(DTYPE)
    return float(((X @ G.to(DTYPE)) * X).sum())
