"""What the mixers that restrict softmax attention to a pattern of keys share (local, strided, Longformer, BigBird):
fused q/k/v and output projections, heads, the masked softmax, decoding frame by frame, and for the patterns that
decode from every earlier frame, the key/value cache itself.

Notation: T time, B batch, C channels, H heads of D = C / H channels, t frames decoded so far.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from fairseq.incremental_decoding_utils import with_incremental_state
from torch import Tensor, nn

from lite.modules.incremental import IncrementalState, StateSlot, reorder_batch_first


@with_incremental_state
class PatternAttention(nn.Module):
    """Subclasses build their pattern in ``forward`` (a whole sequence) and, when causal, ``_step`` (one frame) over
    a state of ``STATE_NAMES``, batch first, which ``_state`` reads or starts."""

    STATE_NAMES: Tuple[str, ...] = ()

    def __init__(self, mechanism: str, embed_dim: int, num_heads: int, *, causal: bool, dropout: float,
                 projections: int = 3):
        """``projections``: the fused input projection's outputs, 3 (q, k, v) or 2 (Reformer's shared qk, and v)."""
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"{mechanism}: embed dim {embed_dim} is not divisible by {num_heads} heads")
        self.mechanism = mechanism
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.causal, self.dropout = causal, dropout
        self.scale = self.head_dim ** -0.5
        self.projections = projections
        self.qkv = nn.Linear(embed_dim, projections * embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        for linear in (self.qkv, self.out_proj):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)

    def _heads(self, x: Tensor) -> Tuple[Tensor, ...]:
        """x [..., C] -> q, k, v (or qk, v) [..., H, D]."""
        return tuple(t.view(*t.shape[:-1], self.num_heads, self.head_dim)
                     for t in self.qkv(x).chunk(self.projections, dim=-1))

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, visible: Tensor) -> Tensor:
        """Softmax attention over the last two axes: q [..., Q, D], k, v [..., K, D], visible broadcasting to
        [..., Q, K] -> [..., Q, D]. Hidden logits take the dtype's lowest finite value, not -inf, so that a row that
        sees nothing (a pad query's) gives finite weights, zeroed with its output."""
        logits = torch.matmul(q, k.transpose(-1, -2)) * self.scale
        logits = logits.masked_fill(~visible, torch.finfo(logits.dtype).min)
        weights = F.dropout(torch.softmax(logits, dim=-1), p=self.dropout, training=self.training)
        return torch.matmul(weights, v)

    @staticmethod
    def _real(x: Tensor, padding_mask: Optional[Tensor]) -> Tensor:
        """x [B, T, C], padding mask [B, T] (True = pad) or None -> [B, T] bool, True at real frames."""
        if padding_mask is None:
            return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        return ~padding_mask

    def _steps(self, x: Tensor, padding_mask: Optional[Tensor], incremental_state: IncrementalState) -> Tensor:
        """The causal unit fed T x B x C with a state: one ``_step`` a frame -> T x B x C."""
        if not self.causal:
            raise ValueError(f"{self.mechanism}: incremental_state is only for the causal (decoder) unit")
        steps = [self._step(x[t], None if padding_mask is None else padding_mask[:, t], incremental_state)
                 for t in range(x.size(0))]
        return torch.stack(steps)

    def _step(self, x: Tensor, padding_mask: Optional[Tensor], incremental_state: IncrementalState) -> Tensor:
        raise NotImplementedError

    def _state(self, incremental_state: Dict[str, Dict[str, Optional[Tensor]]], x: Tensor) -> Dict[str, Tensor]:
        raise NotImplementedError

    def initial_state(self, batch: int, like: Tensor) -> Dict[StateSlot, Tensor]:
        """The fresh state ``_state`` builds for itself, for ``batch`` rows."""
        return {(name, None): t for name, t in self._state({}, like.new_zeros(batch, self.embed_dim)).items()}

    def reorder_incremental_state(self, incremental_state: Dict[str, Dict[str, Optional[Tensor]]], new_order: Tensor):
        reorder_batch_first(self, incremental_state, self.STATE_NAMES, new_order)


class CachedPatternAttention(PatternAttention):
    """A causal pattern decoded from the cache of every earlier frame (O(t)): ``key``, ``value`` [B, H, t, D],
    ``key_position`` [B, t] long (each cached frame's position counted from the first real token, -1 for a pad),
    ``count`` [B] long (real frames so far: the next frame's position). Subclasses say which cached keys a query at
    ``position`` sees (``_visible_cache``)."""

    STATE_NAMES = ("key", "value", "key_position", "count")

    def _visible_cache(self, position: Tensor, key_position: Tensor) -> Tensor:
        """position [B], key_position [B, t] -> [B, H or 1, t] bool: the cached keys the query sees."""
        raise NotImplementedError

    def _state(self, incremental_state: Dict[str, Dict[str, Optional[Tensor]]], x: Tensor) -> Dict[str, Tensor]:
        state = {name: self.get_incremental_state(incremental_state, name) for name in self.STATE_NAMES}
        if state["count"] is None:
            batch = x.size(0)
            state = {"key": x.new_zeros(batch, self.num_heads, 0, self.head_dim),
                     "value": x.new_zeros(batch, self.num_heads, 0, self.head_dim),
                     "key_position": torch.zeros(batch, 0, dtype=torch.long, device=x.device),
                     "count": torch.zeros(batch, dtype=torch.long, device=x.device)}
        return state

    def _step(self, x: Tensor, padding_mask: Optional[Tensor],
              incremental_state: Dict[str, Dict[str, Optional[Tensor]]]) -> Tensor:
        """One frame: x [B, C], padding mask [B] -> [B, C]; the frame joins the cache, then the pattern masks it."""
        state = self._state(incremental_state, x)
        real = torch.ones_like(state["count"], dtype=torch.bool) if padding_mask is None else ~padding_mask  # [B]
        position = state["count"]  # [B]
        q, k, v = self._heads(x)  # [B, H, D]
        key = torch.cat([state["key"], k.unsqueeze(2)], dim=2)  # [B, H, t, D]
        value = torch.cat([state["value"], v.unsqueeze(2)], dim=2)
        key_position = torch.cat([state["key_position"], torch.where(real, position, -1).unsqueeze(1)], dim=1)
        visible = self._visible_cache(position, key_position)  # [B, H or 1, t]
        out = self._attend(q.unsqueeze(2), key, value, visible.unsqueeze(2))  # [B, H, 1, D]
        updates = {"key": key, "value": value, "key_position": key_position, "count": position + real.long()}
        for name, tensor in updates.items():
            self.set_incremental_state(incremental_state, name, tensor)
        return self.out_proj(out.flatten(1)).masked_fill(~real.unsqueeze(1), 0.0)
