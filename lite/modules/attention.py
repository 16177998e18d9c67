"""Multi-head self-attention as a token mixer (fairseq's MultiheadAttention underneath).

Notation: T time, B batch, C input width, H heads, D head dim (C // H unless set), H*D the inner width.

Shape:
    Input: T x B x C, padding mask B x T (True = pad)
    Output: T x B x C
"""
from __future__ import annotations

from typing import Optional

import torch
from fairseq.modules import MultiheadAttention
from torch import Tensor, nn

from lite.modules.incremental import IncrementalState


def set_heads(attn: MultiheadAttention, num_heads: int, head_dim: int) -> MultiheadAttention:
    """Make fairseq's MultiheadAttention, whose q/k/v_proj are already C_q/C_k/C_v -> H*D and out_proj H*D -> C_q,
    run as H heads of D channels (in place; returns it).

    The state fairseq's own head pruning (``_adaptive_prune_heads``) leaves: ``num_heads``, ``head_dim``,
    ``scaling = D**-0.5``, ``embed_dim = H*D`` (the width its forward reshapes the heads back to) and
    ``skip_embed_dim_check`` (the query is C_q wide, not H*D; this also bypasses the fused kernel). Incremental
    caches are [B, H, t, D]. Used by ``multihead_attention`` and by ``compress/prune/`` after removing heads.
    """
    inner = num_heads * head_dim
    widths = (attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features, attn.out_proj.in_features)
    if num_heads < 1 or head_dim < 1 or any(w != inner for w in widths):
        raise ValueError(f"attention: {num_heads} heads of {head_dim} need q/k/v_proj outputs and out_proj input of "
                         f"{inner} channels, they have {widths}")
    attn.num_heads, attn.head_dim, attn.scaling = num_heads, head_dim, head_dim ** -0.5
    attn.embed_dim = inner
    attn.skip_embed_dim_check = True
    return attn


def multihead_attention(embed_dim: int, num_heads: int, head_dim: Optional[int] = None,
                        **kwargs) -> MultiheadAttention:
    """fairseq's MultiheadAttention over ``embed_dim`` channels with ``num_heads`` heads of ``head_dim`` channels
    (``kwargs``: its kdim, vdim, dropout, self_attention, ...).

    ``head_dim`` None, or H * head_dim == embed_dim: fairseq's own module, unchanged (head dim embed_dim // H).
    Otherwise a one-head build (H need not divide embed_dim) whose projections are replaced by H*D-wide ones,
    initialised as fairseq does, then ``set_heads``.
    """
    if head_dim is None or num_heads * head_dim == embed_dim:
        return MultiheadAttention(embed_dim, num_heads, **kwargs)
    if num_heads < 1 or head_dim < 1:
        raise ValueError(f"attention: heads ({num_heads}) and head dim ({head_dim}) must be positive")
    attn = MultiheadAttention(embed_dim, 1, **kwargs)
    inner = num_heads * head_dim
    for name in ("q_proj", "k_proj", "v_proj"):
        proj = getattr(attn, name)
        setattr(attn, name, nn.Linear(proj.in_features, inner, bias=proj.bias is not None))  # C_* -> H*D
    attn.out_proj = nn.Linear(inner, embed_dim, bias=attn.out_proj.bias is not None)  # H*D -> C
    attn.reset_parameters()
    return set_heads(attn, num_heads, head_dim)


class SelfAttention(nn.Module):
    """Scaled dot-product self-attention; causal in the decoder (cached keys/values when stepping).

    ``head_dim``: channels per head (default embed_dim // num_heads); the inner width is num_heads * head_dim.
    """

    def __init__(self, embed_dim: int, num_heads: int, causal: bool, dropout: float = 0.0,
                 head_dim: Optional[int] = None):
        super().__init__()
        self.causal = causal
        self.attn = multihead_attention(embed_dim, num_heads, head_dim, dropout=dropout, self_attention=True)

    def forward(self, x: Tensor, padding_mask: Optional[Tensor] = None,
                incremental_state: IncrementalState = None) -> Tensor:
        future_mask = None
        if self.causal and incremental_state is None:
            length = x.size(0)
            future_mask = torch.triu(x.new_full((length, length), float("-inf")), 1)  # [T, T]
        y, _ = self.attn(x, x, x, key_padding_mask=padding_mask, incremental_state=incremental_state,
                         need_weights=False, attn_mask=future_mask)
        return y
