"""Long-Short Range Attention (Wu et al., 2020, "Lite Transformer with Long-Short Range Attention").

The channels are split in half: one half goes through multi-head attention (long range), the other
through a convolution branch (short range); the two outputs are concatenated.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lite.modules.attention import SelfAttention
from lite.modules.incremental import IncrementalState


class ConvBranch(nn.Module):
    """Linear (C -> I, or C -> 2I + GLU), zero the padded frames, convolution on I channels, Linear (I -> C).

    C is the branch's width (``channels``), I its inner width, the convolution's channels (H heads x R; C unless
    --conv-head-dim sets R).

    Shape:
        Input: T x B x C, padding mask B x T (True = pad)
        Output: T x B x C
    """

    def __init__(self, channels: int, conv: nn.Module, glu: bool):
        super().__init__()
        inner = conv.channels
        self.glu = glu
        self.linear1 = nn.Linear(channels, 2 * inner if glu else inner)
        self.conv = conv
        self.linear2 = nn.Linear(inner, channels)

    def forward(self, x: Tensor, padding_mask: Optional[Tensor] = None,
                incremental_state: IncrementalState = None) -> Tensor:
        h = self.linear1(x)
        if self.glu:
            h = F.glu(h, dim=-1)
        if padding_mask is not None:
            h = h.masked_fill(padding_mask.transpose(0, 1).unsqueeze(-1), 0.0)  # pads must not leak into the window
        return self.linear2(self.conv(h, incremental_state))


class LSRA(nn.Module):
    """Attention on the first half of the channels, a convolution branch on the second half.

    Shape:
        Input: T x B x C, padding mask B x T (True = pad)
        Output: T x B x C
    """

    def __init__(self, attention: SelfAttention, conv: ConvBranch, split: int):
        super().__init__()
        self.attention, self.conv, self.split = attention, conv, split

    def forward(self, x: Tensor, padding_mask: Optional[Tensor] = None,
                incremental_state: IncrementalState = None) -> Tensor:
        long_range = self.attention(x[..., :self.split], padding_mask, incremental_state)  # [T, B, C/2]
        short_range = self.conv(x[..., self.split:], padding_mask, incremental_state)  # [T, B, C/2]
        return torch.cat([long_range, short_range], dim=-1)
