"""Blockwise local attention (Parmar et al., 2018, "Image Transformer", 1D local attention; the "local attention" of
Tay et al.'s "Efficient Transformers: A Survey"), pure torch, encoder and causal decoder form.

Notation: T time, B batch, C channels, H heads of D = C / H channels, L block size (``--local-block``),
G = ceil(T / L) blocks.

    q, k, v = X W_q, X W_k, X W_v                   [B, T, C] -> blocks [B, H, G, L, D]
    block g's queries attend to the 2 L keys of blocks g - 1 and g (block -1: none)
    encoder: all of them;  decoder: those at or before the query (causal)
    out = W_o (heads concatenated)

Every query sees at most 2 L keys: O(T L D) a head instead of O(T^2 D). Blocks are counted from a sentence's first
real token (as fairseq's positions are), so padding never moves a block boundary: the fast path moves each row's real
frames to the front (a permutation: scatter in, gather back), runs the blocks there and puts the outputs back.

Padding: pad keys are masked; outputs at pads are zero. Masked logits take the dtype's lowest finite value, not -inf,
so that a window of pads only (a pad query's) gives finite weights, zeroed with its output.

Incremental state (one frame per call), batch first so beams reorder on dim 0: ``key``, ``value`` [B, H, 2L, D] —
a ring buffer of the last 2 L real frames (a frame at position p sits in slot p % 2L; older ones are overwritten),
``slot_position`` [B, 2L] long (the position each slot holds, -1 when empty), ``count`` [B] long (real frames so
far: the next frame's position). A step at position p in block b = p // L reads the slots holding positions
>= (b - 1) L: the current and the previous block, which the last 2 L positions always contain. A fixed size
whatever the length.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from lite.modules.incremental import IncrementalState
from lite.modules.pattern_attention import PatternAttention

if TYPE_CHECKING:  # lite.modules imports this module to register it
    from lite.modules import MixerSpec

STATE_NAMES = ("key", "value", "slot_position", "count")


def front_order(padding_mask: Tensor) -> Tensor:
    """[B, T] (True = pad) -> [B, T] long: where each frame goes when a row's real frames move to the front, in order
    (real frame j -> its real position, pad j -> after the real ones). A permutation of each row."""
    real = (~padding_mask).long()
    return torch.where(padding_mask, real.sum(1, keepdim=True) + (1 - real).cumsum(1) - 1, real.cumsum(1) - 1)


def to_front(x: Tensor, padding_mask: Optional[Tensor]) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """x [B, T, C] with each row's real frames moved to the front (so blocks count from the first real token):
    (moved x, real [B, T] = the frame is a real one, the scatter order [B, T, C] or None without a mask)."""
    batch, length = x.shape[:2]
    if padding_mask is None:
        return x, torch.ones(batch, length, dtype=torch.bool, device=x.device), None
    order = front_order(padding_mask).unsqueeze(-1).expand_as(x)  # [B, T, C]
    real = (~padding_mask).sum(1, keepdim=True) > torch.arange(length, device=x.device)  # [B, T]
    return torch.zeros_like(x).scatter(1, order, x), real, order


class LocalAttention(PatternAttention):
    """Multi-head attention within blocks of ``block`` frames and the block before; causal in the decoder.

    Shape:
        Input: T x B x C, padding mask B x T (True = pad)
        Output: T x B x C (zero at padded frames)
    """

    STATE_NAMES = STATE_NAMES

    def __init__(self, embed_dim: int, num_heads: int, block: int, *, causal: bool, dropout: float = 0.0):
        super().__init__("local attention", embed_dim, num_heads, causal=causal, dropout=dropout)
        if block < 1:
            raise ValueError(f"local attention: --local-block must be positive, got {block}")
        self.block = block

    # ---------------------------------------------------------------- full sequence

    def forward(self, x: Tensor, padding_mask: Optional[Tensor] = None,
                incremental_state: IncrementalState = None) -> Tensor:
        if incremental_state is not None:
            return self._steps(x, padding_mask, incremental_state)  # [T, B, C]
        x, real, order = to_front(x.transpose(0, 1), padding_mask)  # [B, T, C], [B, T], [B, T, C] | None
        batch, length = x.shape[:2]
        size = self.block
        pad = (size - length % size) % size  # the last block is padded with masked frames
        blocks = (length + pad) // size

        def split(t: Tensor) -> Tensor:  # [B, T, H, D] -> [B, H, G, L, D]
            t = F.pad(t, (0, 0, 0, 0, 0, pad)).view(batch, blocks, size, self.num_heads, self.head_dim)
            return t.permute(0, 3, 1, 2, 4)

        def window(t: Tensor) -> Tensor:  # [B, ..., G, L, *] -> [B, ..., G, 2L, *]: the previous block, then this one
            previous = torch.cat([torch.zeros_like(t.narrow(-3, 0, 1)), t.narrow(-3, 0, blocks - 1)], dim=-3)
            return torch.cat([previous, t], dim=-2)

        q, k, v = (split(t) for t in self._heads(x))  # [B, H, G, L, D]
        real_blocks = F.pad(real.to(x.dtype), (0, pad)).view(batch, 1, blocks, size, 1)  # [B, 1, G, L, 1]
        visible = window(real_blocks).transpose(-1, -2) > 0  # [B, 1, G, 1, 2L]: real keys
        if self.causal:  # query i of a block (window slot L + i) sees window slots <= L + i
            slots = torch.arange(2 * size, device=x.device)
            visible = visible & (slots <= torch.arange(size, device=x.device).unsqueeze(1) + size)  # [.., L, 2L]
        out = self._attend(q, window(k), window(v), visible)  # [B, H, G, L, D]
        out = out.permute(0, 2, 3, 1, 4).reshape(batch, blocks * size, self.embed_dim)[:, :length]  # [B, T, C]
        out = self.out_proj(out).masked_fill(~real.unsqueeze(-1), 0.0)
        if order is not None:  # back to the input's frame order
            out = out.gather(1, order)
        return out.transpose(0, 1)  # [T, B, C]

    # ---------------------------------------------------------------- one decoding step

    def _state(self, incremental_state: Dict[str, Dict[str, Optional[Tensor]]], x: Tensor) -> Dict[str, Tensor]:
        state = {name: self.get_incremental_state(incremental_state, name) for name in STATE_NAMES}
        if state["count"] is None:
            batch, slots = x.size(0), 2 * self.block
            state = {"key": x.new_zeros(batch, self.num_heads, slots, self.head_dim),
                     "value": x.new_zeros(batch, self.num_heads, slots, self.head_dim),
                     "slot_position": torch.full((batch, slots), -1, dtype=torch.long, device=x.device),
                     "count": torch.zeros(batch, dtype=torch.long, device=x.device)}
        return state

    def _step(self, x: Tensor, padding_mask: Optional[Tensor],
              incremental_state: Dict[str, Dict[str, Optional[Tensor]]]) -> Tensor:
        """One frame: x [B, C], padding mask [B] -> [B, C]; a real frame takes the ring buffer slot p % 2L."""
        state = self._state(incremental_state, x)
        real = torch.ones_like(state["count"], dtype=torch.bool) if padding_mask is None else ~padding_mask  # [B]
        position = state["count"]  # [B]
        q, k, v = self._heads(x)  # [B, H, D]
        slots = torch.arange(2 * self.block, device=x.device)  # [2L]
        here = (slots == (position % (2 * self.block)).unsqueeze(1)) & real.unsqueeze(1)  # [B, 2L]
        key = torch.where(here[:, None, :, None], k.unsqueeze(2), state["key"])  # [B, H, 2L, D]
        value = torch.where(here[:, None, :, None], v.unsqueeze(2), state["value"])
        slot_position = torch.where(here, position.unsqueeze(1), state["slot_position"])  # [B, 2L]
        first = (torch.div(position, self.block, rounding_mode="floor") - 1) * self.block  # [B]: block b - 1 starts
        visible = (slot_position >= first.unsqueeze(1)) & (slot_position >= 0)  # [B, 2L]
        out = self._attend(q.unsqueeze(2), key, value, visible[:, None, None, :])  # [B, H, 1, D]
        updates = {"key": key, "value": value, "slot_position": slot_position, "count": position + real.long()}
        for name, tensor in updates.items():
            self.set_incremental_state(incremental_state, name, tensor)
        return self.out_proj(out.flatten(1)).masked_fill(~real.unsqueeze(1), 0.0)

    # ---------------------------------------------------------------- readable definition

    def reference_forward(self, x: Tensor, padding_mask: Optional[Tensor] = None) -> Tensor:
        """Readable definition, one query at a time: the real keys whose block (by real position) is the query's or
        the one before (and, causal, not after the query); for tests (no dropout)."""
        length, batch = x.size(0), x.size(1)
        real = torch.ones(batch, length, dtype=torch.bool, device=x.device) if padding_mask is None else ~padding_mask
        q, k, v = self._heads(x.transpose(0, 1))  # [B, T, H, D]
        out = x.new_zeros(batch, length, self.embed_dim)
        for b in range(batch):
            frames = [j for j in range(length) if real[b, j]]
            block = {j: p // self.block for p, j in enumerate(frames)}  # blocks by real position
            for p, i in enumerate(frames):
                keys = [j for j in frames if block[i] - 1 <= block[j] <= block[i] and (j <= i or not self.causal)]
                heads = []
                for h in range(self.num_heads):
                    logits = torch.stack([q[b, i, h] @ k[b, j, h] / math.sqrt(self.head_dim) for j in keys])
                    heads.append(torch.softmax(logits, 0) @ torch.stack([v[b, j, h] for j in keys]))
                out[b, i] = self.out_proj(torch.cat(heads))
        return out.transpose(0, 1)  # [T, B, C]


def local_attention_from_spec(spec: MixerSpec) -> LocalAttention:
    """Builder for the mixer registry; heads = the side's attention heads, block = --local-block."""
    spec.check_equal_heads("local attention")
    return LocalAttention(spec.embed_dim, spec.attention_heads, spec.local_block, causal=spec.causal,
                          dropout=spec.attention_dropout)
