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
from typing import TYPE_CHECKING, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from fairseq.incremental_decoding_utils import with_incremental_state
from torch import Tensor, nn

from lite.modules.incremental import IncrementalState, StateSlot, reorder_batch_first

if TYPE_CHECKING:  # lite.modules imports this module to register it
    from lite.modules import MixerSpec

STATE_NAMES = ("key", "value", "key_position", "count")


def _masked_softmax_attend(q: Tensor, k: Tensor, v: Tensor, visible: Tensor, scale: float, dropout: float,
                           training: bool) -> Tensor:
    """q [..., Q, D], k, v [..., K, D], visible broadcasting to [..., Q, K] -> [..., Q, D]."""
    logits = torch.matmul(q, k.transpose(-1, -2)) * scale
    logits = logits.masked_fill(~visible, torch.finfo(logits.dtype).min)
    weights = F.dropout(torch.softmax(logits, dim=-1), p=dropout, training=training)
    return torch.matmul(weights, v)


@with_incremental_state
class LongformerAttention(nn.Module):
    """Multi-head attention within a window of w frames on each side (decoder: the last w), plus g global tokens;
    causal in the decoder.

    Shape:
        Input: T x B x C, padding mask B x T (True = pad)
        Output: T x B x C (zero at padded frames)
    """

    def __init__(self, embed_dim: int, num_heads: int, window: int, global_tokens: int, *, causal: bool,
                 dropout: float = 0.0):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"longformer attention: embed dim {embed_dim} is not divisible by {num_heads} heads")
        if window < 0:
            raise ValueError(f"longformer attention: --longformer-window must be >= 0, got {window}")
        if global_tokens < 0:
            raise ValueError(f"longformer attention: --longformer-global must be >= 0, got {global_tokens}")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.window, self.global_tokens, self.causal, self.dropout = window, global_tokens, causal, dropout
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        for linear in (self.qkv, self.out_proj):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)

    def _heads(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """x [..., C] -> q, k, v [..., H, D]."""
        return tuple(t.view(*t.shape[:-1], self.num_heads, self.head_dim) for t in self.qkv(x).chunk(3, dim=-1))

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, visible: Tensor) -> Tensor:
        return _masked_softmax_attend(q, k, v, visible, self.scale, self.dropout, self.training)

    # ---------------------------------------------------------------- full sequence

    def forward(self, x: Tensor, padding_mask: Optional[Tensor] = None,
                incremental_state: IncrementalState = None) -> Tensor:
        if incremental_state is not None:
            if not self.causal:
                raise ValueError("longformer attention: incremental_state is only for the causal (decoder) unit")
            steps = [self._step(x[t], None if padding_mask is None else padding_mask[:, t], incremental_state)
                     for t in range(x.size(0))]
            return torch.stack(steps)  # [T, B, C]
        x = x.transpose(0, 1)  # [B, T, C]
        batch, length = x.shape[:2]
        real = torch.ones(batch, length, dtype=torch.bool, device=x.device) if padding_mask is None \
            else ~padding_mask  # [B, T]
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

    def initial_state(self, batch: int, like: Tensor) -> Dict[StateSlot, Tensor]:
        """The fresh state ``_state`` builds for itself, for ``batch`` rows."""
        return {(name, None): t for name, t in self._state({}, like.new_zeros(batch, self.embed_dim)).items()}

    def _state(self, incremental_state: Dict[str, Dict[str, Optional[Tensor]]], x: Tensor) -> Dict[str, Tensor]:
        state = {name: self.get_incremental_state(incremental_state, name) for name in STATE_NAMES}
        if state["count"] is None:
            batch = x.size(0)
            state = {"key": x.new_zeros(batch, self.num_heads, 0, self.head_dim),
                     "value": x.new_zeros(batch, self.num_heads, 0, self.head_dim),
                     "key_position": torch.zeros(batch, 0, dtype=torch.long, device=x.device),
                     "count": torch.zeros(batch, dtype=torch.long, device=x.device)}
        return state

    def _step(self, x: Tensor, padding_mask: Optional[Tensor],
              incremental_state: Dict[str, Dict[str, Optional[Tensor]]]) -> Tensor:
        """One frame: x [B, C], padding mask [B] -> [B, C]; the frame joins the cache, then the window and the global
        positions mask it."""
        state = self._state(incremental_state, x)
        real = torch.ones_like(state["count"], dtype=torch.bool) if padding_mask is None else ~padding_mask  # [B]
        position = state["count"]  # [B]
        q, k, v = self._heads(x)  # [B, H, D]
        key = torch.cat([state["key"], k.unsqueeze(2)], dim=2)  # [B, H, t, D]
        value = torch.cat([state["value"], v.unsqueeze(2)], dim=2)
        key_position = torch.cat([state["key_position"], torch.where(real, position, -1).unsqueeze(1)], dim=1)
        back = position.unsqueeze(1) - key_position  # [B, t]: i - j
        visible = (key_position >= 0) & ((back <= self.window) | (key_position < self.global_tokens))  # [B, t]
        out = self._attend(q.unsqueeze(2), key, value, visible[:, None, None, :])  # [B, H, 1, D]
        updates = {"key": key, "value": value, "key_position": key_position, "count": position + real.long()}
        for name, tensor in updates.items():
            self.set_incremental_state(incremental_state, name, tensor)
        return self.out_proj(out.flatten(1)).masked_fill(~real.unsqueeze(1), 0.0)

    def reorder_incremental_state(self, incremental_state: Dict[str, Dict[str, Optional[Tensor]]], new_order: Tensor):
        reorder_batch_first(self, incremental_state, STATE_NAMES, new_order)

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
