"""Synthesizer attention (Tay et al., 2021, "Synthesizer: Rethinking Self-Attention for Transformer Models"): the
attention weights are synthesized, not computed from query-key dot products; the values still come from the input.
Pure torch, encoder and causal decoder form, two variants:

Notation: T time, B batch, C channels, H heads of D = C / H channels, N the maximum length
(``--synthesizer-max-len``); i, j positions of a query and a key, counted from a sentence's first real token.

    dense:   logits_h[i, j] = relu(X_i W_1 + b_1)_h . W_2h[:, j] + b_2h[j]     W_1 [C, C], W_2 [H, D, N], b_2 [H, N]
             (a per-token 2-layer MLP to N logits, one per position; the second layer per head on the head's D
             hidden channels, and only the columns of the positions present are computed)
    random:  logits_h[i, j] = R_h[i, j]                                         R [H, N, N], learned, input-free
    out = W_o concat_h softmax_j(logits_h[i, :] masked) (X W_v)_h

Masked: pad keys; in the decoder also keys after the query (the paper uses both variants in decoders so). The logits
of a T-frame input are the T x T corner of the N x N ones, so inputs of more than N frames are refused (an error
naming ``--synthesizer-max-len``). Positions are counted from the first real token (as fairseq's positional
embeddings are), so left padding changes nothing; outputs at pads are zero.

Incremental state (one frame per call), batch first so beams reorder on dim 0: ``value`` [B, H, t, D] (the cached
values: O(t), as attention's cache), ``position`` [B, t] long (each cached frame's position, -1 at pads), ``count``
[B] long (real frames so far: the next frame's position).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Dict, Optional

import torch
import torch.nn.functional as F
from fairseq.incremental_decoding_utils import with_incremental_state
from torch import Tensor, nn

from lite.modules.incremental import IncrementalState, StateSlot, reorder_batch_first

if TYPE_CHECKING:  # lite.modules imports this module to register it
    from lite.modules import MixerSpec

STATE_NAMES = ("value", "position", "count")
KINDS = ("dense", "random")


def real_positions(padding_mask: Tensor) -> Tensor:
    """[B, T] (True = pad) -> [B, T] long: each real frame's position counted from the row's first real token (pads:
    the position of the last real frame before them, or 0; they are masked)."""
    return ((~padding_mask).long().cumsum(1) - 1).clamp(min=0)


@with_incremental_state
class Synthesizer(nn.Module):
    """Multi-head dense or random synthesizer attention; causal in the decoder.

    Shape:
        Input: T x B x C (T <= max_len), padding mask B x T (True = pad)
        Output: T x B x C (zero at padded frames)
    """

    def __init__(self, embed_dim: int, num_heads: int, max_len: int, *, kind: str, causal: bool,
                 dropout: float = 0.0):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"synthesizer: kind {kind!r}; valid: {', '.join(KINDS)}")
        if embed_dim % num_heads:
            raise ValueError(f"synthesizer: embed dim {embed_dim} is not divisible by {num_heads} heads")
        if max_len < 1:
            raise ValueError(f"synthesizer: --synthesizer-max-len must be positive, got {max_len}")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.max_len, self.kind, self.causal, self.dropout = max_len, kind, causal, dropout
        self.value = nn.Linear(embed_dim, embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        linears = [self.value, self.out_proj]
        if kind == "dense":
            self.hidden = nn.Linear(embed_dim, embed_dim)  # W_1
            self.logit_weight = nn.Parameter(torch.empty(num_heads, self.head_dim, max_len))  # W_2 [H, D, N]
            self.logit_bias = nn.Parameter(torch.zeros(num_heads, max_len))  # b_2 [H, N]
            nn.init.normal_(self.logit_weight, std=self.head_dim ** -0.5)
            linears.append(self.hidden)
        else:
            self.logits = nn.Parameter(torch.empty(num_heads, max_len, max_len))  # R [H, N, N]
            nn.init.normal_(self.logits, std=0.02)
        for linear in linears:
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)

    def _heads(self, x: Tensor) -> Tensor:  # [B, T, C] -> [B, H, T, D]
        return x.view(x.size(0), x.size(1), self.num_heads, self.head_dim).transpose(1, 2)

    def _logits(self, x: Tensor, queries: Tensor, keys: Tensor) -> Tensor:
        """x [B, Tq, C], query positions [B, Tq], key positions [B, Tk] -> logits [B, H, Tq, Tk]."""
        if self.kind == "dense":
            hidden = self._heads(F.relu(self.hidden(x)))  # [B, H, Tq, D]
            weight = self.logit_weight[:, :, keys].permute(2, 0, 1, 3)  # [B, H, D, Tk]: the keys' columns only
            return torch.matmul(hidden, weight) + self.logit_bias[:, keys].transpose(0, 1).unsqueeze(2)
        return self.logits[:, queries.unsqueeze(2), keys.unsqueeze(1)].transpose(0, 1)  # [B, H, Tq, Tk]

    def _attend(self, logits: Tensor, visible: Tensor, value: Tensor) -> Tensor:
        """logits [B, H, Tq, Tk], visible broadcasting to it, values [B, H, Tk, D] -> [B, Tq, C]."""
        logits = logits.masked_fill(~visible, torch.finfo(logits.dtype).min)
        weights = F.dropout(torch.softmax(logits, dim=-1), p=self.dropout, training=self.training)
        out = torch.matmul(weights, value)  # [B, H, Tq, D]
        return out.transpose(1, 2).flatten(2)

    def _check_length(self, length: int) -> None:
        if not torch.jit.is_tracing() and length > self.max_len:
            raise ValueError(f"synthesizer: a sequence of {length} frames is longer than --synthesizer-max-len "
                             f"{self.max_len}; train with a larger --synthesizer-max-len")

    # ---------------------------------------------------------------- full sequence

    def forward(self, x: Tensor, padding_mask: Optional[Tensor] = None,
                incremental_state: IncrementalState = None) -> Tensor:
        if incremental_state is not None:
            if not self.causal:
                raise ValueError("synthesizer: incremental_state is only for the causal (decoder) unit")
            steps = [self._step(x[t], None if padding_mask is None else padding_mask[:, t], incremental_state)
                     for t in range(x.size(0))]
            return torch.stack(steps)  # [T, B, C]
        length = x.size(0)
        self._check_length(length)
        x = x.transpose(0, 1)  # [B, T, C]
        if padding_mask is None:
            padding_mask = torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device)
        positions = real_positions(padding_mask)  # [B, T]
        visible = ~padding_mask[:, None, None, :]  # [B, 1, 1, T]: real keys
        if self.causal:
            visible = visible & torch.ones(length, length, dtype=torch.bool, device=x.device).tril()  # [B, 1, T, T]
        out = self._attend(self._logits(x, positions, positions), visible, self._heads(self.value(x)))  # [B, T, C]
        return self.out_proj(out).masked_fill(padding_mask.unsqueeze(-1), 0.0).transpose(0, 1)  # [T, B, C]

    # ---------------------------------------------------------------- one decoding step

    def initial_state(self, batch: int, like: Tensor) -> Dict[StateSlot, Tensor]:
        """The fresh state ``_state`` builds for itself, for ``batch`` rows."""
        return {(name, None): t for name, t in self._state({}, like.new_zeros(batch, self.embed_dim)).items()}

    def _state(self, incremental_state: Dict[str, Dict[str, Optional[Tensor]]], x: Tensor) -> Dict[str, Tensor]:
        state = {name: self.get_incremental_state(incremental_state, name) for name in STATE_NAMES}
        if state["count"] is None:  # the caches start empty and grow by one frame a step
            batch = x.size(0)
            state = {"value": x.new_zeros(batch, self.num_heads, 0, self.head_dim),
                     "position": torch.zeros(batch, 0, dtype=torch.long, device=x.device),
                     "count": torch.zeros(batch, dtype=torch.long, device=x.device)}
        return state

    def _step(self, x: Tensor, padding_mask: Optional[Tensor],
              incremental_state: Dict[str, Dict[str, Optional[Tensor]]]) -> Tensor:
        """One frame: x [B, C], padding mask [B] -> [B, C]; caches the frame's value and position."""
        state = self._state(incremental_state, x)
        real = torch.ones_like(state["count"], dtype=torch.bool) if padding_mask is None else ~padding_mask  # [B]
        here = state["count"]  # [B]: this frame's position
        if not torch.jit.is_tracing():
            self._check_length(int(here.max()) + 1)
        x = x.unsqueeze(1)  # [B, 1, C]
        value = torch.cat([state["value"], self._heads(self.value(x))], dim=2)  # [B, H, t, D]
        position = torch.cat([state["position"], torch.where(real, here, -1).unsqueeze(1)], dim=1)  # [B, t]
        logits = self._logits(x, here.unsqueeze(1), position.clamp(min=0))  # [B, H, 1, t]
        out = self._attend(logits, (position >= 0)[:, None, None, :], value)  # [B, 1, C]
        updates = {"value": value, "position": position, "count": here + real.long()}
        for name, tensor in updates.items():
            self.set_incremental_state(incremental_state, name, tensor)
        return self.out_proj(out.squeeze(1)).masked_fill(~real.unsqueeze(1), 0.0)

    def reorder_incremental_state(self, incremental_state: Dict[str, Dict[str, Optional[Tensor]]], new_order: Tensor):
        reorder_batch_first(self, incremental_state, STATE_NAMES, new_order)

    # ---------------------------------------------------------------- readable definition

    def reference_forward(self, x: Tensor, padding_mask: Optional[Tensor] = None) -> Tensor:
        """Readable definition, one query at a time, the paper's formulas on the real frames; for tests (no
        dropout)."""
        length, batch = x.size(0), x.size(1)
        real = torch.ones(batch, length, dtype=torch.bool, device=x.device) if padding_mask is None else ~padding_mask
        x = x.transpose(0, 1)  # [B, T, C]
        v = self.value(x).view(batch, length, self.num_heads, self.head_dim)  # [B, T, H, D]
        out = x.new_zeros(batch, length, self.embed_dim)
        for b in range(batch):
            frames = [j for j in range(length) if real[b, j]]
            for i_pos, i in enumerate(frames):
                keys = [(j_pos, j) for j_pos, j in enumerate(frames) if j <= i or not self.causal]
                heads = []
                for h in range(self.num_heads):
                    if self.kind == "dense":  # F(X_i) = W_2 relu(W_1 X_i + b_1) + b_2, all N logits, then cut
                        hidden = F.relu(self.hidden(x[b, i])).view(self.num_heads, self.head_dim)[h]  # [D]
                        row = hidden @ self.logit_weight[h] + self.logit_bias[h]  # [N]
                    else:
                        row = self.logits[h, i_pos]  # [N]
                    weights = torch.softmax(torch.stack([row[j_pos] for j_pos, _ in keys]), 0)
                    heads.append(weights @ torch.stack([v[b, j, h] for _, j in keys]))
                out[b, i] = self.out_proj(torch.cat(heads))
        return out.transpose(0, 1)  # [T, B, C]


def _from_spec(spec: MixerSpec, kind: str) -> Synthesizer:
    spec.check_equal_heads("synthesizer")
    return Synthesizer(spec.embed_dim, spec.attention_heads, spec.synthesizer_max_len, kind=kind, causal=spec.causal,
                       dropout=spec.attention_dropout)


def dense_synthesizer_from_spec(spec: MixerSpec) -> Synthesizer:
    """Builder for the mixer registry: the dense synthesizer, N = --synthesizer-max-len."""
    return _from_spec(spec, "dense")


def random_synthesizer_from_spec(spec: MixerSpec) -> Synthesizer:
    """Builder for the mixer registry: the random synthesizer (learned N x N logits a head)."""
    return _from_spec(spec, "random")
