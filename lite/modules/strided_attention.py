"""Strided sparse attention (Child et al., 2019, "Generating Long Sequences with Sparse Transformers", the strided
pattern; a "fixed pattern" of Tay et al.'s "Efficient Transformers: A Survey"), pure torch, encoder and causal decoder.

Notation: T time, B batch, C channels, H heads of D = C / H channels, s the stride (``--stride``), G = ceil(T / s);
i a query's position, j a key's, both counted from the sentence's first real token.

    q, k, v = X W_q, X W_k, X W_v                   [B, T, C] -> heads [B, H, T, D]
    local heads (the first H - H // 2):  j with |i - j| < s         (decoder: 0 <= i - j < s)
    strided heads (the last H // 2):     j with (i - j) % s == 0    (decoder: and j <= i)
    out = W_o (heads concatenated)

The paper splits the heads between the two patterns so that, together, every query reaches every earlier position in
two layers. Fast path: the local heads gather a window of 2 s - 1 keys a query (s in the decoder), O(T s D) a head;
the strided heads regroup the frames by position mod s into s columns of G frames and attend within each column,
O(T G D) a head: O(T sqrt(T) D) with s ~ sqrt(T), not O(T^2 D). Both patterns depend only on i - j, and left padding
shifts i and j alike, so frames are used where they are; pads are masked.

Padding: pad keys are masked; outputs at pads are zero. Masked logits take the dtype's lowest finite value, not -inf,
so that a window of pads only (a pad query's) gives finite weights, zeroed with its output.

Incremental state (one frame per call), batch first so beams reorder on dim 0: ``key``, ``value`` [B, H, t, D], every
frame decoded so far (O(t), as standard attention caches them: the strided heads reach back to the first frame),
``key_position`` [B, t] long (each cached frame's position, -1 for a pad), ``count`` [B] long (real frames so far: the
next frame's position). A step appends its frame and masks the cache by the same two patterns.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from lite.modules.incremental import IncrementalState
from lite.modules.pattern_attention import CachedPatternAttention

if TYPE_CHECKING:  # lite.modules imports this module to register it
    from lite.modules import MixerSpec

STATE_NAMES = CachedPatternAttention.STATE_NAMES


class StridedAttention(CachedPatternAttention):
    """Multi-head attention, half the heads local (the last s positions), half strided (every s-th); causal in the
    decoder.

    Shape:
        Input: T x B x C, padding mask B x T (True = pad)
        Output: T x B x C (zero at padded frames)
    """

    def __init__(self, embed_dim: int, num_heads: int, stride: int, *, causal: bool, dropout: float = 0.0):
        super().__init__("strided attention", embed_dim, num_heads, causal=causal, dropout=dropout)
        if num_heads < 2:
            raise ValueError(f"strided attention: needs at least 2 heads (one local, one strided), got {num_heads}")
        if stride < 1:
            raise ValueError(f"strided attention: --stride must be positive, got {stride}")
        self.local_heads = num_heads - num_heads // 2
        self.stride = stride

    # ---------------------------------------------------------------- full sequence

    def forward(self, x: Tensor, padding_mask: Optional[Tensor] = None,
                incremental_state: IncrementalState = None) -> Tensor:
        if incremental_state is not None:
            return self._steps(x, padding_mask, incremental_state)  # [T, B, C]
        x = x.transpose(0, 1)  # [B, T, C]
        batch, length = x.shape[:2]
        real = self._real(x, padding_mask)  # [B, T]
        q, k, v = (t.transpose(1, 2) for t in self._heads(x))  # [B, H, T, D]
        n = self.local_heads
        local = self._local(q[:, :n], k[:, :n], v[:, :n], real)  # [B, H_l, T, D]
        strided = self._strided(q[:, n:], k[:, n:], v[:, n:], real)  # [B, H_s, T, D]
        out = torch.cat([local, strided], dim=1).transpose(1, 2).flatten(2)  # [B, T, C]
        out = self.out_proj(out).masked_fill(~real.unsqueeze(-1), 0.0)
        return out.transpose(0, 1)  # [T, B, C]

    def _local(self, q: Tensor, k: Tensor, v: Tensor, real: Tensor) -> Tensor:
        """Each query against the window of keys at offsets -(s-1)..(s-1) (decoder: -(s-1)..0):
        q, k, v [B, h, T, D], real [B, T] -> [B, h, T, D]."""
        length, size = q.size(2), self.stride
        right = 0 if self.causal else size - 1
        offsets = range(-(size - 1), right + 1)

        def window(t: Tensor, axis: int) -> Tensor:  # T along ``axis`` -> a new axis after it, one per offset
            padded = F.pad(t, [0, 0] * (t.dim() - 1 - axis) + [size - 1, right])
            return torch.stack([padded.narrow(axis, size - 1 + o, length) for o in offsets], dim=axis + 1)

        visible = window(real.to(q.dtype), 1)[:, None, :, None, :] > 0  # [B, 1, T, 1, W]: real keys inside the sequence
        out = self._attend(q.unsqueeze(-2), window(k, 2), window(v, 2), visible)  # [B, h, T, 1, D]
        return out.squeeze(-2)

    def _strided(self, q: Tensor, k: Tensor, v: Tensor, real: Tensor) -> Tensor:
        """Frames regrouped by position mod s (s columns of G frames), attention within each column:
        q, k, v [B, h, T, D], real [B, T] -> [B, h, T, D]."""
        batch, heads, length, dim = q.shape
        size = self.stride
        pad = (size - length % size) % size  # the last row is padded with masked frames
        groups = (length + pad) // size

        def columns(t: Tensor) -> Tensor:  # [B, h, T, D] -> [B, h, s, G, D]: column r holds positions g s + r
            return F.pad(t, (0, 0, 0, pad)).view(batch, heads, groups, size, dim).transpose(2, 3)

        visible = F.pad(real.to(q.dtype), (0, pad)).view(batch, 1, groups, size).transpose(2, 3).unsqueeze(-2) > 0
        # [B, 1, s, 1, G]
        if self.causal:  # query g of a column sees that column's frames g' <= g
            index = torch.arange(groups, device=q.device)
            visible = visible & (index <= index.unsqueeze(1))  # [B, 1, s, G, G]
        out = self._attend(columns(q), columns(k), columns(v), visible)  # [B, h, s, G, D]
        return out.transpose(2, 3).reshape(batch, heads, groups * size, dim)[:, :, :length]

    # ---------------------------------------------------------------- one decoding step

    def _visible_cache(self, position: Tensor, key_position: Tensor) -> Tensor:
        """position [B], key_position [B, t] -> [B, H, t]: local heads the last s positions, strided every s-th."""
        back = position.unsqueeze(1) - key_position  # [B, t]: i - j
        cached = key_position >= 0
        local = cached & (back < self.stride)  # [B, t]
        strided = cached & (torch.remainder(back, self.stride) == 0)
        groups = torch.arange(self.num_heads, device=position.device) < self.local_heads  # [H]: True = a local head
        groups = groups[None, :, None]  # (logical ops, not a where: ONNX Runtime has no Where on booleans)
        return (groups & local[:, None, :]) | (~groups & strided[:, None, :])  # [B, H, t]

    # ---------------------------------------------------------------- readable definition

    def reference_forward(self, x: Tensor, padding_mask: Optional[Tensor] = None) -> Tensor:
        """Readable definition, one query and one head at a time: the real keys that the head's pattern admits, by
        positions counted from the first real token (and, causal, not after the query); for tests (no dropout)."""
        length, batch = x.size(0), x.size(1)
        real = torch.ones(batch, length, dtype=torch.bool, device=x.device) if padding_mask is None else ~padding_mask
        q, k, v = self._heads(x.transpose(0, 1))  # [B, T, H, D]
        out = x.new_zeros(batch, length, self.embed_dim)
        for b in range(batch):
            frames = [j for j in range(length) if real[b, j]]
            for pi, i in enumerate(frames):  # pi: the query's position, pj: a key's
                heads = []
                for h in range(self.num_heads):
                    local = h < self.local_heads
                    keys = [j for pj, j in enumerate(frames)
                            if (abs(pi - pj) < self.stride if local else (pi - pj) % self.stride == 0)
                            and (pj <= pi or not self.causal)]
                    logits = torch.stack([q[b, i, h] @ k[b, j, h] / math.sqrt(self.head_dim) for j in keys])
                    heads.append(torch.softmax(logits, 0) @ torch.stack([v[b, j, h] for j in keys]))
                out[b, i] = self.out_proj(torch.cat(heads))
        return out.transpose(0, 1)  # [T, B, C]


def strided_attention_from_spec(spec: MixerSpec) -> StridedAttention:
    """Builder for the mixer registry; heads = the side's attention heads, stride = --stride."""
    spec.check_equal_heads("strided attention")
    return StridedAttention(spec.embed_dim, spec.attention_heads, spec.stride, causal=spec.causal,
                            dropout=spec.attention_dropout)
