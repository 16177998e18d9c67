"""Memory-compressed attention (Liu et al., 2018, "Generating Wikipedia by Summarizing Long Sequences"; a
"downsampling" mechanism of Tay et al.'s "Efficient Transformers: A Survey"), pure torch, encoder only: keys and
values are compressed along the length by a strided convolution, queries stay at full length.

Notation: T time, B batch, C channels, H heads of D = C / H channels, s the stride and kernel
(``--compress-stride``), G = ceil(T / s) compressed slots; positions counted from the sentence's first real token.

    q, k, v = X W_q, X W_k, X W_v                      [B, T, C]
    K' = conv_s(k), V' = conv_s(v)                     kernel = stride = s over the length, C -> C: [B, G, C]
    out_i = W_o concat_h softmax(q_i K'^T / sqrt(D)) V'     [B, H, T, G] weights: O(T G D) a head, not O(T^2 D)

Slot g compresses the frames at positions g s .. g s + s - 1. Positions count from the first real token (the fast path
moves each row's real frames to the front, a permutation), so left padding moves no window boundary; pads are zeroed
before the convolution, the frames past the end too, and a slot that covers only pads is masked. Outputs at pads are
zero.

No causal form here. A causal one exists on paper (a query sees the slots whose whole window lies at or before it,
plus the uncompressed frames of its own, incomplete window), but its decoding state (the slots, one more every s
steps, and the pending window) has no form the exported decoder step takes: ``export/graphs.py`` makes each state
either of a fixed size or one that grows by one frame at every step, and a slot appended every s-th step of each
hypothesis (rows at different positions under left padding) is a data-dependent shape. So the mixer serves encoders
only, and its preset pairs it with the standard causal attention decoder.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lite.modules.incremental import IncrementalState
from lite.modules.local_attention import front_order

if TYPE_CHECKING:  # lite.modules imports this module to register it
    from lite.modules import MixerSpec


class MemoryCompressedAttention(nn.Module):
    """Multi-head attention over keys and values compressed s-fold along the length; encoder only.

    Shape:
        Input: T x B x C, padding mask B x T (True = pad)
        Output: T x B x C (zero at padded frames)
    """

    def __init__(self, embed_dim: int, num_heads: int, stride: int, dropout: float = 0.0):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"memory-compressed attention: embed dim {embed_dim} is not divisible by {num_heads} "
                             f"heads")
        if stride < 1:
            raise ValueError(f"memory-compressed attention: --compress-stride must be positive, got {stride}")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.stride, self.dropout = stride, dropout
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self.compress_key = nn.Conv1d(embed_dim, embed_dim, stride, stride=stride)  # weight [C, C, s]
        self.compress_value = nn.Conv1d(embed_dim, embed_dim, stride, stride=stride)
        for linear in (self.qkv, self.out_proj):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)

    def forward(self, x: Tensor, padding_mask: Optional[Tensor] = None,
                incremental_state: IncrementalState = None) -> Tensor:
        if incremental_state is not None:
            raise ValueError("memory-compressed attention: no causal form (encoder only), so no incremental state")
        x = x.transpose(0, 1)  # [B, T, C]
        batch, length = x.shape[:2]
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # [B, T, C]
        if padding_mask is None:
            padding_mask = torch.zeros(batch, length, dtype=torch.bool, device=x.device)
        order = front_order(padding_mask).unsqueeze(-1).expand_as(k)  # [B, T, C]: real frames to the front
        real_front = (~padding_mask).sum(1, keepdim=True) > torch.arange(length, device=x.device)  # [B, T]
        pad = (self.stride - length % self.stride) % self.stride
        groups = (length + pad) // self.stride

        def compress(t: Tensor, conv: nn.Conv1d) -> Tensor:  # [B, T, C] -> [B, H, G, D]
            t = torch.zeros_like(t).scatter(1, order, t).masked_fill(~real_front.unsqueeze(-1), 0.0)
            t = conv(F.pad(t, (0, 0, 0, pad)).transpose(1, 2))  # [B, C, G]
            return t.view(batch, self.num_heads, self.head_dim, groups).transpose(2, 3)

        k, v = compress(k, self.compress_key), compress(v, self.compress_value)  # [B, H, G, D]
        q = q.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, T, D]
        slots = torch.arange(groups, device=x.device) * self.stride  # [G]: each slot's first position
        visible = (slots < (~padding_mask).sum(1, keepdim=True))[:, None, None, :]  # [B, 1, 1, G]: any real frame
        logits = torch.matmul(q, k.transpose(-1, -2)) * self.scale  # [B, H, T, G]
        logits = logits.masked_fill(~visible, torch.finfo(logits.dtype).min)
        weights = F.dropout(torch.softmax(logits, dim=-1), p=self.dropout, training=self.training)
        out = self.out_proj(torch.matmul(weights, v).transpose(1, 2).flatten(2))  # [B, T, C]
        return out.masked_fill(padding_mask.unsqueeze(-1), 0.0).transpose(0, 1)  # [T, B, C]

    def reference_forward(self, x: Tensor, padding_mask: Optional[Tensor] = None) -> Tensor:
        """Readable definition: per sentence, each slot summed tap by tap over the real frames of its window (at
        their real positions), then each real query's softmax over the slots; for tests (no dropout)."""
        length, batch = x.size(0), x.size(1)
        real = torch.ones(batch, length, dtype=torch.bool, device=x.device) if padding_mask is None else ~padding_mask
        q, k, v = self.qkv(x.transpose(0, 1)).chunk(3, dim=-1)  # [B, T, C]
        out = x.new_zeros(batch, length, self.embed_dim)
        for b in range(batch):
            frames = [j for j in range(length) if real[b, j]]
            windows = [frames[g:g + self.stride] for g in range(0, len(frames), self.stride)]
            keys = torch.stack([self.compress_key.bias + sum(self.compress_key.weight[:, :, r] @ k[b, j]
                                                             for r, j in enumerate(w)) for w in windows])  # [G', C]
            values = torch.stack([self.compress_value.bias + sum(self.compress_value.weight[:, :, r] @ v[b, j]
                                                                 for r, j in enumerate(w)) for w in windows])
            for i in frames:
                heads = []
                for h in range(self.num_heads):
                    part = slice(h * self.head_dim, (h + 1) * self.head_dim)
                    weights = torch.softmax(keys[:, part] @ q[b, i, part] / math.sqrt(self.head_dim), 0)  # [G']
                    heads.append(weights @ values[:, part])
                out[b, i] = self.out_proj(torch.cat(heads))
        return out.transpose(0, 1)  # [T, B, C]


def memory_compressed_from_spec(spec: MixerSpec) -> MemoryCompressedAttention:
    """Builder for the mixer registry: encoder only (the model refuses it in a decoder before this is called)."""
    if spec.causal:
        raise ValueError("memory-compressed attention: no causal form; it serves the encoder only")
    spec.check_equal_heads("memory-compressed attention")
    return MemoryCompressedAttention(spec.embed_dim, spec.attention_heads, spec.compress_stride,
                                     dropout=spec.attention_dropout)
