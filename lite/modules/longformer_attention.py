"""Longformer attention (Beltagy et al., 2020, "Longformer: The Long-Document Transformer": sliding-window attention
with global attention on a few tokens), pure torch, encoder and causal decoder.

Notation: T time, B batch, C channels, H heads of D = C / H channels, w the window (``--longformer-window``) on each
side, g the global tokens (``--longformer-global``), W = 2 w + 1 window slots (decoder: w + 1); i a query's position,
j a key's, both counted from the sentence's first real token.

    q, k, v = X W_q, X W_k, X W_v                   [B, T, C] -> heads [B, H, T, D]
    encoder: i sees j when |i - j| <= w, or i < g, or j < g  (the first g real tokens attend to all, all to them)
    decoder: i sees j when j <= i and (i - j <= w or j < g)  (global tokens visible to every later query; they
             themselves attend causally, no look-ahead)
    out = W_o (heads concatenated)

Fast path, written here because no maintained package offers Longformer's banded + global pattern on CPU that also
traces to ONNX: each query against its W window keys and the g global keys gathered once (a global key already inside
the window is masked there, so no key counts twice), O(T (W + g) D) a head; in the encoder the g global queries also
attend to all T keys, O(g T D), and replace their rows. The window depends only on i - j, and left padding shifts i and
j alike, so frames are used where they are; the global keys are gathered from the first real frame on.

Padding: pad keys are masked; outputs at pads are zero. Masked logits take the dtype's lowest finite value, not -inf,
so that a row of pads only (a pad query's) gives finite weights, zeroed with its output.

Incremental state (one frame per call), batch first so beams reorder on dim 0: ``key``, ``value`` [B, H, t, D], every
frame decoded so far (O(t), as standard attention caches them), ``key_position`` [B, t] long (each cached frame's
position, -1 for a pad), ``count`` [B] long (real frames so far: the next frame's position). A step appends its frame
and masks the cache to the window and the global positions.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from lite.modules.incremental import IncrementalState
from lite.modules.pattern_attention import CachedPatternAttention

if TYPE_CHECKING:  # lite.modules imports this module to register it
    from lite.modules import MixerSpec

STATE_NAMES = CachedPatternAttention.STATE_NAMES


class LongformerAttention(CachedPatternAttention):
    """Multi-head attention within a window of w frames on each side (decoder: the last w), plus g global tokens;
    causal in the decoder.

    Shape:
        Input: T x B x C, padding mask B x T (True = pad)
        Output: T x B x C (zero at padded frames)
    """

    def __init__(self, embed_dim: int, num_heads: int, window: int, global_tokens: int, *, causal: bool,
                 dropout: float = 0.0):
        super().__init__("longformer attention", embed_dim, num_heads, causal=causal, dropout=dropout)
        if window < 0:
            raise ValueError(f"longformer attention: --longformer-window must be >= 0, got {window}")
        if global_tokens < 0:
            raise ValueError(f"longformer attention: --longformer-global must be >= 0, got {global_tokens}")
        self.window, self.global_tokens = window, global_tokens

    # ---------------------------------------------------------------- full sequence

    def forward(self, x: Tensor, padding_mask: Optional[Tensor] = None,
                incremental_state: IncrementalState = None) -> Tensor:
        if incremental_state is not None:
            return self._steps(x, padding_mask, incremental_state)  # [T, B, C]
        x = x.transpose(0, 1)  # [B, T, C]
        batch, length = x.shape[:2]
        real = self._real(x, padding_mask)  # [B, T]
        position = real.long().cumsum(1) - 1  # [B, T]: i for a real frame (-1 for a left pad)
        q, k, v = (t.transpose(1, 2) for t in self._heads(x))  # [B, H, T, D]
        size, right = self.window, 0 if self.causal else self.window
        offsets = range(-size, right + 1)

        def window(t: Tensor, axis: int) -> Tensor:  # T along ``axis`` -> a new axis after it, one per offset
            padded = F.pad(t, [0, 0] * (t.dim() - 1 - axis) + [size, right])
            return torch.stack([padded.narrow(axis, size + o, length) for o in offsets], dim=axis + 1)

        keys, values = window(k, 2), window(v, 2)  # [B, H, T, W, D]
        visible = window(real.to(q.dtype), 1) > 0  # [B, T, W]: real keys inside the sequence
        if self.global_tokens:
            index, present = self._global_frames(real)  # [B, g]
            gather = index[:, None, :, None].expand(batch, self.num_heads, self.global_tokens, self.head_dim)
            shape = (batch, self.num_heads, length, self.global_tokens, self.head_dim)
            keys = torch.cat([keys, k.gather(2, gather).unsqueeze(2).expand(shape)], dim=3)  # [B, H, T, W + g, D]
            values = torch.cat([values, v.gather(2, gather).unsqueeze(2).expand(shape)], dim=3)
            # global key p, unless the window holds it already: i - p > w (a global query's rows are replaced below)
            slots = torch.arange(self.global_tokens, device=x.device)
            outside = position.unsqueeze(-1) - slots > self.window  # [B, T, g]
            visible = torch.cat([visible, present.unsqueeze(1) & outside], dim=2)  # [B, T, W + g]
        out = self._attend(q.unsqueeze(-2), keys, values, visible[:, None, :, None, :]).squeeze(-2)  # [B, H, T, D]
        if self.global_tokens and not self.causal:  # the global queries attend to every real key
            rows = self._attend(q.gather(2, gather), k, v, real[:, None, None, :])  # [B, H, g, D]
            slot = position.clamp(0, self.global_tokens - 1)[:, None, :, None].expand_as(out)  # [B, H, T, D]
            is_global = (real & (position < self.global_tokens))[:, None, :, None]  # [B, 1, T, 1]
            out = torch.where(is_global, rows.gather(2, slot), out)
        out = self.out_proj(out.transpose(1, 2).flatten(2)).masked_fill(~real.unsqueeze(-1), 0.0)  # [B, T, C]
        return out.transpose(0, 1)  # [T, B, C]

    def _global_frames(self, real: Tensor) -> Tuple[Tensor, Tensor]:
        """real [B, T] -> the frame index of each global position p < g [B, g] long (0 where the sentence has no
        p-th real token) and whether it has one [B, g] bool. Real frames are contiguous (left or right padding)."""
        leading = (real.long().cumsum(1) == 0).long().sum(1, keepdim=True)  # [B, 1]: pads before the first real
        slots = torch.arange(self.global_tokens, device=real.device)  # [g]
        present = slots < real.long().sum(1, keepdim=True)  # [B, g]
        return torch.where(present, leading + slots, torch.zeros_like(leading)), present

    # ---------------------------------------------------------------- one decoding step

    def _visible_cache(self, position: Tensor, key_position: Tensor) -> Tensor:
        """position [B], key_position [B, t] -> [B, 1, t]: the window's keys and the global positions'."""
        back = position.unsqueeze(1) - key_position  # [B, t]: i - j
        visible = (key_position >= 0) & ((back <= self.window) | (key_position < self.global_tokens))  # [B, t]
        return visible.unsqueeze(1)

    # ---------------------------------------------------------------- readable definition

    def reference_forward(self, x: Tensor, padding_mask: Optional[Tensor] = None) -> Tensor:
        """Readable definition, one query and one head at a time: the real keys within the window or global (by
        positions counted from the first real token; causal: not after the query); for tests (no dropout)."""
        length, batch = x.size(0), x.size(1)
        real = torch.ones(batch, length, dtype=torch.bool, device=x.device) if padding_mask is None else ~padding_mask
        q, k, v = self._heads(x.transpose(0, 1))  # [B, T, H, D]
        w, g = self.window, self.global_tokens
        out = x.new_zeros(batch, length, self.embed_dim)
        for b in range(batch):
            frames = [j for j in range(length) if real[b, j]]
            for pi, i in enumerate(frames):  # pi: the query's position, pj: a key's
                if self.causal:
                    keys = [j for pj, j in enumerate(frames) if pj <= pi and (pi - pj <= w or pj < g)]
                else:
                    keys = [j for pj, j in enumerate(frames) if abs(pi - pj) <= w or pi < g or pj < g]
                heads = []
                for h in range(self.num_heads):
                    logits = torch.stack([q[b, i, h] @ k[b, j, h] / math.sqrt(self.head_dim) for j in keys])
                    heads.append(torch.softmax(logits, 0) @ torch.stack([v[b, j, h] for j in keys]))
                out[b, i] = self.out_proj(torch.cat(heads))
        return out.transpose(0, 1)  # [T, B, C]


def longformer_attention_from_spec(spec: MixerSpec) -> LongformerAttention:
    """Builder for the mixer registry; heads = the side's attention heads, window = --longformer-window, global
    tokens = --longformer-global."""
    spec.check_equal_heads("longformer attention")
    return LongformerAttention(spec.embed_dim, spec.attention_heads, spec.longformer_window, spec.longformer_global,
                               causal=spec.causal, dropout=spec.attention_dropout)
