"""Multi-head self-attention as a token mixer (fairseq's MultiheadAttention underneath).

Shape:
    Input: T x B x C, padding mask B x T (True = pad)
    Output: T x B x C
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from fairseq.modules import MultiheadAttention
from torch import Tensor, nn

IncrementalState = Optional[Dict[str, Dict[str, Optional[Tensor]]]]


class SelfAttention(nn.Module):
    """Scaled dot-product self-attention; causal in the decoder (cached keys/values when stepping)."""

    def __init__(self, embed_dim: int, num_heads: int, causal: bool, dropout: float = 0.0):
        super().__init__()
        self.causal = causal
        self.attn = MultiheadAttention(embed_dim, num_heads, dropout=dropout, self_attention=True)

    def forward(self, x: Tensor, padding_mask: Optional[Tensor] = None,
                incremental_state: IncrementalState = None) -> Tensor:
        future_mask = None
        if self.causal and incremental_state is None:
            length = x.size(0)
            future_mask = torch.triu(x.new_full((length, length), float("-inf")), 1)  # [T, T]
        y, _ = self.attn(x, x, x, key_padding_mask=padding_mask, incremental_state=incremental_state,
                         need_weights=False, attn_mask=future_mask)
        return y
