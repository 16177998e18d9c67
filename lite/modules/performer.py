"""Performer attention, FAVOR+ (Choromanski et al., 2021, "Rethinking Attention with Performers"): linear attention
(``linear_attention.py``) whose feature map estimates softmax attention's kernel without bias.

Notation: H heads of D channels, M random features; x' = x / D^(1/4) (so that q' . k' = q . k / sqrt(D)).

    phi(x) = exp(W x' - |x'|^2 / 2) / sqrt(M)          W [M, D]: orthogonal Gaussian rows (blocks of D)
    E[phi(q) . phi(k)] = exp(q . k / sqrt(D))           the softmax kernel, so phi(q) S / phi(q) . z ~ softmax attention

Positive features (not sin/cos): every weight stays positive and the estimate is stable where softmax weights are
small. Orthogonal rows with Gaussian-length norms (the paper's "regularized" variant, as performer-pytorch's
``gaussian_orthogonal_random_matrix``) lower the variance. W is drawn once, when the model is built (from torch's
RNG: fairseq's seed), and kept as a buffer: training, the checkpoint, export and decoding all use the same features
(no redrawing during training; the paper redraws, which fine-tuning at the end makes moot).

Stability: a query's features are divided by their row maximum (it cancels between numerator and denominator); keys
need no stabilizer, since W k' - |k'|^2 / 2 <= |w|^2 / 2 for every row w (about D / 2), far inside float32 — which
keeps the causal form exact (a maximum over keys would look ahead, as performer-pytorch's does).
M defaults to round(D ln D), the paper's choice.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from lite.modules.linear_attention import LinearAttention

if TYPE_CHECKING:  # lite.modules imports this module to register it
    from lite.modules import MixerSpec


def orthogonal_gaussian(rows: int, dim: int) -> Tensor:
    """[rows, dim]: blocks of ``dim`` orthonormal rows (QR of a Gaussian), each row scaled to the length of a Gaussian
    vector (chi with ``dim`` degrees of freedom), so every row is marginally N(0, I) and rows in a block orthogonal."""
    blocks = []
    for _ in range(math.ceil(rows / dim)):
        q, r = torch.linalg.qr(torch.randn(dim, dim))
        blocks.append((q * torch.sign(torch.diagonal(r))).T)  # signs fixed by R's diagonal: Haar, so isotropic rows
    directions = torch.cat(blocks)[:rows]  # [rows, dim]
    return directions * torch.randn(rows, dim).norm(dim=1, keepdim=True)


def default_features(head_dim: int) -> int:
    return max(1, round(head_dim * math.log(head_dim))) if head_dim > 1 else 1


class FavorFeatures(nn.Module):
    """phi: [..., D] -> [..., M], positive random features of the softmax kernel."""

    def __init__(self, head_dim: int, num_features: int):
        super().__init__()
        self.dim, self.head_dim = num_features, head_dim
        self.register_buffer("projection", orthogonal_gaussian(num_features, head_dim))  # W [M, D]

    def forward(self, x: Tensor, is_query: bool) -> Tensor:
        x = x * self.head_dim ** -0.25
        logits = torch.matmul(x, self.projection.t()) - 0.5 * (x * x).sum(-1, keepdim=True)  # [..., M]
        if is_query:  # a per-query constant: cancels in phi(q) S / phi(q) . z
            logits = logits - logits.amax(-1, keepdim=True).detach()
        return torch.exp(logits) * self.dim ** -0.5


def performer_from_spec(spec: MixerSpec) -> LinearAttention:
    """Builder for the mixer registry; heads = the side's attention heads; M = --performer-features or D ln D."""
    if spec.attention_head_dim is not None and spec.attention_head_dim * spec.attention_heads != spec.embed_dim:
        raise ValueError(f"performer: heads of {spec.attention_head_dim} channels (--*-attention-head-dim) are not "
                         f"supported; its {spec.attention_heads} heads split the {spec.embed_dim} channels")
    if spec.embed_dim % spec.attention_heads:
        raise ValueError(f"performer: embed dim {spec.embed_dim} is not divisible by {spec.attention_heads} heads")
    head_dim = spec.embed_dim // spec.attention_heads
    features = FavorFeatures(head_dim, spec.performer_features or default_features(head_dim))
    return LinearAttention(spec.embed_dim, spec.attention_heads, causal=spec.causal, features=features)
