"""Fastformer additive attention (Wu et al., 2021, "Fastformer: Additive Attention Can Be All You Need"), pure torch,
with a causal form for the decoder.

Notation: T time, B batch, C channels, H heads of D = C / H channels.

    q, k, v = X W_q, X W_k, X W_v                       [B, T, C]
    alpha = softmax_j(w_q(q_j) / sqrt(D))               [B, T, H]   one score per head and frame
    q_g = sum_j alpha_j q_j                             global query, per head
    p_j = q_g * k_j;  beta = softmax_j(w_k(p_j) / sqrt(D));  k_g = sum_j beta_j p_j    global key
    out_i = W_r(k_g * v_i) + q_i

w_q, w_k are ``Linear(C, H)`` (as the official code, wuch15/Fastformer: each head's score reads the whole
vector). The paper's prose has a value projection; the official code reuses q as the value. We keep v.

Causal form (ours; the official code is encoder-only). Frame i may pool over frames j <= i only:

    q_g(i) = sum_{j<=i} exp(a_j) q_j / sum_{j<=i} exp(a_j)
    p_j   = q_g(j) * k_j                 each frame's key meets the global query *of its own prefix*
    k_g(i) = the same prefix pooling of p with scores b_j = w_k(p_j) / sqrt(D)

Using q_g(j) rather than q_g(i) inside p_j is what makes the global key a running sum: the state of a
prefix is, per pooling and head, the running max m, the denominator sum exp(a_j - m) and the numerator
sum exp(a_j - m) x_j; a new frame rescales both by exp(m - m') (the running-max trick of online softmax),
so no exponential ever overflows. Decoding keeps these sums only: O(1) state in the sentence length.
The full (training) pass computes the same prefix pooling as a masked softmax over a T x T score matrix
(per head, scalars only), which is exact and stable; its cost, T^2 C MACs per pooling, is counted.

Padding: pad frames get the score ``finfo.min`` and zero q, k, v, so they carry no weight next to any real
frame (exp(min - m) = 0) and outputs at pads are zero.

Incremental state (one frame per call), batch first so beams reorder on dim 0:
    query_max, query_den [B, H]; query_num [B, C]; key_max, key_den [B, H]; key_num [B, C].
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Dict, Optional, Tuple

import torch
from fairseq.incremental_decoding_utils import with_incremental_state
from torch import Tensor, nn

from lite.modules.incremental import IncrementalState, StateSlot, reorder_batch_first

if TYPE_CHECKING:  # lite.modules imports this module to register it
    from lite.modules import MixerSpec


STATE_NAMES = ("query_max", "query_den", "query_num", "key_max", "key_den", "key_num")


@with_incremental_state
class Fastformer(nn.Module):
    """Additive attention: global query and key pooled by softmax; causal (prefix pooling) in the decoder.

    Shape:
        Input: T x B x C, padding mask B x T (True = pad)
        Output: T x B x C (zero at padded frames)
    """

    def __init__(self, embed_dim: int, num_heads: int, *, causal: bool):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"Fastformer: embed dim {embed_dim} is not divisible by {num_heads} heads")
        self.embed_dim, self.num_heads, self.head_dim, self.causal = embed_dim, num_heads, embed_dim // num_heads, causal
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim)
        self.query_score = nn.Linear(embed_dim, num_heads)  # w_q
        self.key_score = nn.Linear(embed_dim, num_heads)  # w_k
        self.out_proj = nn.Linear(embed_dim, embed_dim)  # W_r
        for linear in (self.qkv, self.query_score, self.key_score, self.out_proj):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)

    def _heads(self, x: Tensor) -> Tensor:
        """[..., C] -> [..., H, D]."""
        return x.view(*x.shape[:-1], self.num_heads, self.head_dim)

    def _project(self, x: Tensor, real: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """x [B, T, C] -> q, k, v [B, T, C], zero at pads (real [B, T]: 1 at tokens, 0 at pads); or [B, C], [B]."""
        q, k, v = (t * real.unsqueeze(-1) for t in self.qkv(x).chunk(3, dim=-1))
        return q, k, v

    def _scores(self, linear: nn.Linear, x: Tensor, real: Tensor) -> Tensor:
        """Pooling scores [B, T, H] (or [B, H] for one frame); finfo.min at pads."""
        return (linear(x) * self.scale).masked_fill(real.unsqueeze(-1) == 0, torch.finfo(x.dtype).min)

    def _pool(self, scores: Tensor, x: Tensor) -> Tensor:
        """Softmax pooling per head: scores [B, T, H], x [B, T, C] -> [B, T, C] (causal: prefix) or [B, 1, C]."""
        weights = scores.transpose(1, 2)  # [B, H, T]
        values = self._heads(x).transpose(1, 2)  # [B, H, T, D]
        if self.causal:
            length = x.size(1)
            future = torch.ones(length, length, dtype=torch.bool, device=x.device).triu(1)  # [T, T]
            weights = weights.unsqueeze(2).masked_fill(future, torch.finfo(x.dtype).min)  # [B, H, T, T]
            pooled = torch.matmul(weights.softmax(-1), values)  # [B, H, T, D]
        else:
            pooled = torch.matmul(weights.softmax(-1).unsqueeze(2), values)  # [B, H, 1, D]
        return pooled.transpose(1, 2).flatten(2)

    def forward(self, x: Tensor, padding_mask: Optional[Tensor] = None,
                incremental_state: IncrementalState = None) -> Tensor:
        if incremental_state is not None:
            if not self.causal:
                raise ValueError("Fastformer: incremental_state is only for the causal (decoder) unit")
            steps = [self._step(x[t], None if padding_mask is None else padding_mask[:, t], incremental_state)
                     for t in range(x.size(0))]
            return torch.stack(steps)  # [T, B, C]
        x = x.transpose(0, 1)  # [B, T, C]
        real = x.new_ones(x.shape[:2]) if padding_mask is None else (~padding_mask).to(x.dtype)  # [B, T]
        q, k, v = self._project(x, real)
        global_query = self._pool(self._scores(self.query_score, q, real), q)  # [B, T|1, C]
        p = global_query * k  # [B, T, C]
        global_key = self._pool(self._scores(self.key_score, p, real), p)  # [B, T|1, C]
        out = (self.out_proj(global_key * v) + q) * real.unsqueeze(-1)
        return out.transpose(0, 1)  # [T, B, C]

    # ---------------------------------------------------------------- one decoding step

    def initial_state(self, batch: int, like: Tensor) -> Dict[StateSlot, Tensor]:
        """The fresh state ``_state`` builds for itself, for ``batch`` rows."""
        return {(name, None): t for name, t in self._state({}, like.new_zeros(batch, self.embed_dim)).items()}

    def _state(self, incremental_state: Dict[str, Dict[str, Optional[Tensor]]], x: Tensor) -> Dict[str, Tensor]:
        state = {name: self.get_incremental_state(incremental_state, name) for name in STATE_NAMES}
        if state["query_max"] is not None:
            return state
        batch, lowest = x.size(0), torch.finfo(x.dtype).min
        for pool in ("query", "key"):
            state[f"{pool}_max"] = x.new_full((batch, self.num_heads), lowest)
            state[f"{pool}_den"] = x.new_zeros(batch, self.num_heads)
            state[f"{pool}_num"] = x.new_zeros(batch, self.embed_dim)
        return state

    def _running_pool(self, state: Dict[str, Tensor], pool: str, score: Tensor, x: Tensor) -> Tensor:
        """Fold frame x [B, C] with score [B, H] into the pool's running sums; return the pooled [B, C]."""
        top = torch.maximum(state[f"{pool}_max"], score)  # [B, H]
        decay, weight = torch.exp(state[f"{pool}_max"] - top), torch.exp(score - top)  # [B, H]
        den = state[f"{pool}_den"] * decay + weight
        num = self._heads(state[f"{pool}_num"]) * decay.unsqueeze(-1) + self._heads(x) * weight.unsqueeze(-1)
        state[f"{pool}_max"], state[f"{pool}_den"], state[f"{pool}_num"] = top, den, num.flatten(1)
        return (num / den.unsqueeze(-1)).flatten(1)

    def _step(self, x: Tensor, padding_mask: Optional[Tensor],
              incremental_state: Dict[str, Dict[str, Optional[Tensor]]]) -> Tensor:
        """One frame: x [B, C], padding mask [B] -> [B, C]; updates the running sums."""
        state = self._state(incremental_state, x)
        real = x.new_ones(x.size(0)) if padding_mask is None else (~padding_mask).to(x.dtype)  # [B]
        q, k, v = self._project(x, real)  # [B, C] each
        global_query = self._running_pool(state, "query", self._scores(self.query_score, q, real), q)
        p = global_query * k
        global_key = self._running_pool(state, "key", self._scores(self.key_score, p, real), p)
        for name in STATE_NAMES:
            self.set_incremental_state(incremental_state, name, state[name])
        return (self.out_proj(global_key * v) + q) * real.unsqueeze(-1)

    def reorder_incremental_state(self, incremental_state: Dict[str, Dict[str, Optional[Tensor]]], new_order: Tensor):
        reorder_batch_first(self, incremental_state, STATE_NAMES, new_order)

    # ---------------------------------------------------------------- readable definition

    def reference_forward(self, x: Tensor, padding_mask: Optional[Tensor] = None) -> Tensor:
        """Readable definition, one frame at a time, explicit softmax over the visible real frames; for tests."""
        length, batch = x.size(0), x.size(1)
        real = torch.ones(batch, length, dtype=torch.bool, device=x.device) if padding_mask is None else ~padding_mask
        q, k, v = self.qkv(x.transpose(0, 1)).chunk(3, dim=-1)  # [B, T, C]
        out = x.new_zeros(batch, length, self.embed_dim)

        def pool(score: nn.Linear, vectors: Tensor, frames: list) -> Tensor:  # softmax pooling per head -> [C]
            weights = torch.stack([score(vectors[j]) * self.scale for j in frames]).softmax(0)  # [n, H]
            heads = torch.stack([self._heads(vectors[j]) for j in frames])  # [n, H, D]
            return (weights.unsqueeze(-1) * heads).sum(0).flatten()

        for b in range(batch):
            frames = [j for j in range(length) if real[b, j]]
            p = torch.zeros_like(k[b])  # [T, C]
            for i in frames:
                seen = [j for j in frames if j <= i] if self.causal else frames
                if self.causal:  # frame i's key meets the global query of its own prefix
                    p[i] = pool(self.query_score, q[b], seen) * k[b, i]
                else:
                    p = pool(self.query_score, q[b], seen) * k[b]
                global_key = pool(self.key_score, p, seen)
                out[b, i] = self.out_proj(global_key * v[b, i]) + q[b, i]
        return out.transpose(0, 1)  # [T, B, C]


def fastformer_from_spec(spec: MixerSpec) -> Fastformer:
    """Builder for the mixer registry; heads = the side's attention heads, of embed dim // heads channels."""
    spec.check_equal_heads("Fastformer")
    return Fastformer(spec.embed_dim, spec.attention_heads, causal=spec.causal)
