"""Gated Attention Unit and FLASH (Hua et al., 2022, "Transformer Quality in Linear Time"), pure torch.

Notation: T time, B batch, C channels (the paper's d), E = expansion * C or --gau-hidden-dim (e), S key dim (s),
L chunk size, G = ceil(T / L) chunks, P = number of (query or key) projections made from Z.

One unit replaces attention + FFN's gating:

    U = silu(X W_u), V = silu(X W_v)    [B, T, E]
    Z = silu(X W_z)                     [B, T, S]   shared base of all queries and keys
    Q_p = rope(Z * gamma_p + beta_p)    per-dimension scale and offset, then rotary position
    O = (U * A V) W_o                   A: relu^2 attention, single head

FLASH-Quad (``chunk_size=0``): A over the whole sequence (P = 2: q, k).
FLASH (``chunk_size=L``): mixed chunk attention (P = 4: quad q, quad k, linear q, linear k): relu^2
attention inside each chunk of L frames, plus linear attention across chunks, over all chunks when
non-causal and over earlier chunks only (exclusive cumulative sum) when causal.

Scaling. The paper's GAU code listing (Code 1; transcribed in JunnYu/FLASHQuad_pytorch) computes
``relu(QK^T / n + bias)^2`` with n the (padded) sequence length; lucidrains/FLASH-pytorch's mixed
chunk version uses ``relu(QK^T / L)^2`` inside a chunk and divides the linear part by L (causal) or n.
Dividing *inside* the relu^2 by n makes the kernel depend on the batch's padded length, and n is
unknown while decoding. We use instead, for query i,

    y_i = (sum_{j quad} relu(q_i . k_j / sqrt(S))^2 v_j + sum_{j lin} (q'_i . k'_j / sqrt(S)) v_j) / n_i

with n_i = the number of real (non-pad) keys query i can see: the sentence length in the encoder,
the real frames up to and including i in the decoder. 1/sqrt(S) keeps the logit scale of dot-product
attention at any length; 1/n_i (the paper's 1/n, per query) makes y_i a mean over what i sees. n_i
never depends on the future, so step-by-step decoding reproduces the full causal forward exactly.

Position. Rotary embedding (RoPE, as in the paper's code) on every query and key, the position being
the frame index (the step count when decoding). It is relative (q_i . k_j depends on i - j only), so
left padding does not change what real frames see. The cos/sin table holds ``max_positions`` rows.

Padding. V and all keys are zeroed at padded frames before any sum, so pads contribute nothing
(relu(0)^2 = 0 and a zero value adds zero); outputs at padded frames are zero.

Incremental state (decoder, one frame per call), batch first so beams reorder on dim 0:
    position [B] long, count [B] (n_i so far), and
    FLASH-Quad: key [B, t, S], value [B, t, E], the full cache (grows with t);
    FLASH: key [B, L, S], value [B, L, E] ring buffers of the current chunk's quad keys/values,
        kv [B, S, E] (sum of k'^T v over completed chunks), kv_chunk [B, S, E] (the current chunk's);
        a fixed size whatever the length. Slots are written by position % L; a query at slot p sees
        slots <= p only, so stale entries of the previous chunk never need clearing.

Only reshapes, pads, matmuls, cumsum and masks (no ``unfold``/``as_strided``); configuration is the
only Python branching on the fast path, and training: FLASH's causal pass then leaves out the linear
part no query reads (chunk 0's, the last chunk's k'^T v), which the paper's form computes and the
MACs count.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from fairseq.incremental_decoding_utils import with_incremental_state
from torch import Tensor, nn

from lite.modules.incremental import IncrementalState, StateSlot, reorder_batch_first

if TYPE_CHECKING:  # lite.modules imports this module to register it
    from lite.modules import MixerSpec


STATE_NAMES = ("position", "count", "key", "value", "kv", "kv_chunk")


def rotary_tables(max_positions: int, key_dim: int) -> Tuple[Tensor, Tensor]:
    """cos, sin of position * 10000^(-k / (S/2)), k < S/2: [max_positions, S/2] each."""
    half = key_dim // 2
    inv_freq = 10000.0 ** (-torch.arange(half, dtype=torch.float32) / half)  # [S/2]
    angles = torch.arange(max_positions, dtype=torch.float32).unsqueeze(1) * inv_freq  # [max_positions, S/2]
    return angles.cos(), angles.sin()


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the pairs (x[k], x[k + S/2]) by the angles whose cos/sin are given. x: [..., S]."""
    x1, x2 = x.chunk(2, dim=-1)  # [..., S/2] each
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


@with_incremental_state
class GAU(nn.Module):
    """Gated attention unit: FLASH-Quad when ``chunk_size == 0``, FLASH (mixed chunk attention) otherwise.

    Shape:
        Input: T x B x C, padding mask B x T (True = pad)
        Output: T x B x C (zero at padded frames)
    """

    def __init__(self, embed_dim: int, expansion: int = 2, key_dim: int = 128, *, causal: bool,
                 chunk_size: int = 0, dropout: float = 0.0, max_positions: int = 1024,
                 hidden_dim: Optional[int] = None):
        """``hidden_dim``: E, the width of U and V; None: ``expansion`` x embed_dim."""
        super().__init__()
        if key_dim <= 0 or key_dim % 2:
            raise ValueError(f"GAU: key_dim (--gau-key-dim) must be a positive even number for rotary "
                             f"positions, got {key_dim}")
        if expansion <= 0:
            raise ValueError(f"GAU: expansion (--gau-expansion) must be positive, got {expansion}")
        if hidden_dim is not None and hidden_dim <= 0:
            raise ValueError(f"GAU: hidden_dim (--gau-hidden-dim) must be positive, got {hidden_dim}")
        if chunk_size < 0:
            raise ValueError(f"GAU: chunk_size (--chunk-size) must be 0 (FLASH-Quad) or positive (FLASH), "
                             f"got {chunk_size}")
        self.embed_dim, self.key_dim, self.hidden_dim = embed_dim, key_dim, \
            expansion * embed_dim if hidden_dim is None else hidden_dim
        self.causal, self.chunk_size, self.dropout, self.max_positions = causal, chunk_size, dropout, max_positions
        self.scale = key_dim ** -0.5
        num_projections = 4 if chunk_size else 2  # quad q, quad k (, linear q, linear k)
        self.proj = nn.Linear(embed_dim, 2 * self.hidden_dim + key_dim)  # -> U, V, Z
        self.gamma = nn.Parameter(torch.empty(num_projections, key_dim))  # [P, S]
        self.beta = nn.Parameter(torch.zeros(num_projections, key_dim))  # [P, S]
        self.out_proj = nn.Linear(self.hidden_dim, embed_dim)
        cos, sin = rotary_tables(max_positions, key_dim)
        self.register_buffer("cos", cos, persistent=False)  # [max_positions, S/2]
        self.register_buffer("sin", sin, persistent=False)
        nn.init.xavier_uniform_(self.proj.weight)
        nn.init.xavier_uniform_(self.out_proj.weight)
        nn.init.zeros_(self.proj.bias)
        nn.init.zeros_(self.out_proj.bias)
        nn.init.normal_(self.gamma, std=0.02)  # the paper's scale_offset init

    # ---------------------------------------------------------------- shared pieces

    def _project(self, x: Tensor, cos: Tensor, sin: Tensor, real: Tensor) -> Tuple[Tensor, Tensor, List[Tensor]]:
        """x [B, T, C] -> U [B, T, E], V [B, T, E] (zero at pads), P rotated queries/keys [B, T, S] (zero at pads).

        cos, sin broadcast against [B, T, P, S/2]; real [B, T] is 1 at tokens, 0 at pads.
        """
        u, v, z = F.silu(self.proj(x)).split([self.hidden_dim, self.hidden_dim, self.key_dim], dim=-1)
        qk = z.unsqueeze(2) * self.gamma + self.beta  # [B, T, P, S]
        qk = rotate(qk, cos, sin) * real[:, :, None, None]
        return u, v * real.unsqueeze(-1), list(qk.unbind(2))

    def _kernel(self, q: Tensor, k: Tensor) -> Tensor:
        """relu(q k^T / sqrt(S))^2 with attention dropout: [..., Tq, S] x [..., Tk, S] -> [..., Tq, Tk]."""
        attn = F.relu(torch.matmul(q, k.transpose(-1, -2)) * self.scale) ** 2
        return F.dropout(attn, p=self.dropout, training=self.training)

    def _finish(self, u: Tensor, y: Tensor, count: Tensor, real: Tensor) -> Tensor:
        """Gate, normalise by the visible-key count, project: [B, T, E] -> [B, T, C], zero at pads."""
        y = u * y / count.clamp(min=1.0).unsqueeze(-1)
        return self.out_proj(y) * real.unsqueeze(-1)

    # ---------------------------------------------------------------- full sequence

    def forward(self, x: Tensor, padding_mask: Optional[Tensor] = None,
                incremental_state: IncrementalState = None) -> Tensor:
        if incremental_state is not None:
            if not self.causal:
                raise ValueError("GAU: incremental_state is only for the causal (decoder) unit")
            steps = [self._step(x[t], None if padding_mask is None else padding_mask[:, t], incremental_state)
                     for t in range(x.size(0))]
            return torch.stack(steps)  # [T, B, C]
        length = x.size(0)
        if not torch.jit.is_tracing() and length > self.max_positions:
            raise ValueError(f"GAU: sequence of {length} frames is longer than max_positions={self.max_positions}; "
                             f"build the unit with a larger max_positions")
        x = x.transpose(0, 1)  # [B, T, C]
        real = x.new_ones(x.shape[:2]) if padding_mask is None else (~padding_mask).to(x.dtype)  # [B, T]
        cos, sin = self.cos[:length].unsqueeze(1), self.sin[:length].unsqueeze(1)  # [T, 1, S/2]
        u, v, qk = self._project(x, cos, sin, real)
        count = real.cumsum(1) if self.causal else real.sum(1, keepdim=True).expand_as(real)  # [B, T]
        y = self._quadratic(qk[0], qk[1], v) if self.chunk_size == 0 else self._mixed_chunks(*qk, v)
        return self._finish(u, y, count, real).transpose(0, 1)  # [T, B, C]

    def _quadratic(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """FLASH-Quad: [B, T, S], [B, T, S], [B, T, E] -> [B, T, E] (sum, not yet normalised)."""
        attn = self._kernel(q, k)  # [B, T, T]
        if self.causal:
            length = q.size(1)
            future = torch.ones(length, length, dtype=torch.bool, device=q.device).triu(1)  # [T, T]
            attn = attn.masked_fill(future, 0.0)
        return torch.matmul(attn, v)

    def _mixed_chunks(self, q: Tensor, k: Tensor, q_lin: Tensor, k_lin: Tensor, v: Tensor) -> Tensor:
        """FLASH: quad q/k, linear q/k [B, T, S], V [B, T, E] -> [B, T, E] (sum, not yet normalised)."""
        batch, length = v.shape[:2]
        size = self.chunk_size
        pad = (size - length % size) % size  # the last chunk is padded with zero frames
        chunks = (length + pad) // size

        def split(t: Tensor) -> Tensor:  # [B, T, D] -> [B, G, L, D]
            return F.pad(t, (0, 0, 0, pad)).view(batch, chunks, size, t.size(-1))

        q, k, q_lin, k_lin, v = split(q), split(k), split(q_lin), split(k_lin), split(v)
        attn = self._kernel(q, k)  # [B, G, L, L]
        if self.causal:
            future = torch.ones(size, size, dtype=torch.bool, device=q.device).triu(1)  # [L, L]
            attn = attn.masked_fill(future, 0.0)
        quad = torch.matmul(attn, v)  # [B, G, L, E]
        if self.causal and self.training:
            # chunk g reads the chunks before it: chunk 0 reads none, none reads the last one's k'^T v; training
            # skips both (a flash_100m step on 15-token sentences, a single chunk, 1.3x cheaper), with the same sums
            earlier = torch.matmul(k_lin[:, :-1].transpose(-1, -2), v[:, :-1]).cumsum(1)  # [B, G-1, S, E]
            lin = F.pad(torch.matmul(q_lin[:, 1:], earlier), (0, 0, 0, 0, 1, 0)) * self.scale  # [B, G, L, E]
        else:  # the paper's form (Hua et al. 2022, code 8), whose work the MACs count, as attention's masked T x T
            kv = torch.matmul(k_lin.transpose(-1, -2), v)  # [B, G, S, E]: each chunk's k'^T v
            if self.causal:
                total = kv.cumsum(1)  # [B, G, S, E]
                kv = torch.cat([torch.zeros_like(kv[:, :1]), total[:, :-1]], dim=1)  # exclusive: earlier chunks
            else:
                kv = kv.sum(1, keepdim=True)  # [B, 1, S, E]: all chunks
            lin = torch.matmul(q_lin, kv) * self.scale  # [B, G, L, E]
        return (quad + lin).view(batch, chunks * size, -1)[:, :length]  # [B, T, E]

    # ---------------------------------------------------------------- one decoding step

    def initial_state(self, batch: int, like: Tensor) -> Dict[StateSlot, Tensor]:
        """The fresh state ``_state`` builds for itself, for ``batch`` rows."""
        return {(name, None): t for name, t in self._state({}, like.new_zeros(batch, self.embed_dim)).items()}

    def _state(self, incremental_state: Dict[str, Dict[str, Optional[Tensor]]], x: Tensor) -> Dict[str, Tensor]:
        """The stored state, or a fresh one for a batch of x [B, C]."""
        state = {name: self.get_incremental_state(incremental_state, name) for name in STATE_NAMES}
        if state["position"] is not None:
            return state
        batch = x.size(0)
        slots = self.chunk_size  # 0: the FLASH-Quad cache starts empty and grows
        state = {"position": torch.zeros(batch, dtype=torch.long, device=x.device),
                 "count": x.new_zeros(batch),
                 "key": x.new_zeros(batch, slots, self.key_dim),
                 "value": x.new_zeros(batch, slots, self.hidden_dim)}
        if self.chunk_size:
            state["kv"] = x.new_zeros(batch, self.key_dim, self.hidden_dim)
            state["kv_chunk"] = x.new_zeros(batch, self.key_dim, self.hidden_dim)
        return state

    def _step(self, x: Tensor, padding_mask: Optional[Tensor],
              incremental_state: Dict[str, Dict[str, Optional[Tensor]]]) -> Tensor:
        """One frame: x [B, C], padding mask [B] -> [B, C]; updates the state."""
        state = self._state(incremental_state, x)
        position = state["position"]  # [B]
        real = x.new_ones(x.size(0)) if padding_mask is None else (~padding_mask).to(x.dtype)  # [B]
        cos = self.cos.index_select(0, position)[:, None, None]  # [B, 1, 1, S/2]
        sin = self.sin.index_select(0, position)[:, None, None]
        u, v, qk = self._project(x.unsqueeze(1), cos, sin, real.unsqueeze(1))  # [B, 1, E], [B, 1, E], [B, 1, S]
        if self.chunk_size == 0:
            key = torch.cat([state["key"], qk[1]], dim=1)  # [B, t + 1, S]
            value = torch.cat([state["value"], v], dim=1)  # [B, t + 1, E]
            y = torch.matmul(self._kernel(qk[0], key), value)  # [B, 1, E]
        else:
            y, key, value = self._chunk_step(position, qk, v, state)
        count = state["count"] + real
        updates = {"position": position + 1, "count": count, "key": key, "value": value}
        if self.chunk_size:
            updates["kv"], updates["kv_chunk"] = state["kv"], state["kv_chunk"]
        for name, tensor in updates.items():
            self.set_incremental_state(incremental_state, name, tensor)
        return self._finish(u, y, count.unsqueeze(1), real.unsqueeze(1)).squeeze(1)

    def _chunk_step(self, position: Tensor, qk: List[Tensor], v: Tensor,
                    state: Dict[str, Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
        """FLASH step: write slot position % L, attend to slots <= it, then fold a finished chunk into kv.

        Returns the unnormalised output [B, 1, E] and the new key/value buffers; kv, kv_chunk updated in state.
        """
        q, k, q_lin, k_lin = qk  # [B, 1, S] each
        slot = (position % self.chunk_size).unsqueeze(1)  # [B, 1]
        slots = torch.arange(self.chunk_size, device=position.device).unsqueeze(0)  # [1, L]
        here = (slots == slot).unsqueeze(-1)  # [B, L, 1]
        key = torch.where(here, k, state["key"])  # [B, L, S]
        value = torch.where(here, v, state["value"])  # [B, L, E]
        attn = self._kernel(q, key).masked_fill((slots > slot).unsqueeze(1), 0.0)  # [B, 1, L]
        y = torch.matmul(attn, value) + torch.matmul(q_lin, state["kv"]) * self.scale  # [B, 1, E]
        kv_chunk = state["kv_chunk"] + torch.matmul(k_lin.transpose(1, 2), v)  # [B, S, E]
        done = (slot == self.chunk_size - 1).to(v.dtype).unsqueeze(-1)  # [B, 1, 1]: chunk complete
        state["kv"] = state["kv"] + done * kv_chunk
        state["kv_chunk"] = kv_chunk * (1.0 - done)
        return y, key, value

    def reorder_incremental_state(self, incremental_state: Dict[str, Dict[str, Optional[Tensor]]], new_order: Tensor):
        reorder_batch_first(self, incremental_state, STATE_NAMES, new_order)

    # ---------------------------------------------------------------- readable definition

    def reference_forward(self, x: Tensor, padding_mask: Optional[Tensor] = None) -> Tensor:
        """Readable definition, one query and one key at a time, explicit masks; for tests (no dropout)."""
        length, batch = x.size(0), x.size(1)
        real = torch.ones(batch, length, dtype=torch.bool, device=x.device) if padding_mask is None else ~padding_mask
        u, v, z = F.silu(self.proj(x.transpose(0, 1))).split([self.hidden_dim, self.hidden_dim, self.key_dim], -1)
        # rotary as complex multiplication: (x_k + i x_{k+S/2}) * exp(i t theta_k)
        half = self.key_dim // 2
        theta = 10000.0 ** (-torch.arange(half, dtype=torch.float32, device=x.device) / half)
        times = torch.arange(length, dtype=torch.float32, device=x.device)[:, None]
        turn = torch.polar(torch.ones_like(times * theta), times * theta)  # [T, S/2]

        def rotated(p: int) -> Tensor:  # [B, T, S]
            t = z * self.gamma[p] + self.beta[p]
            c = torch.complex(t[..., :half], t[..., half:]) * turn
            return torch.cat([c.real, c.imag], dim=-1)

        q, k = rotated(0), rotated(1)
        q_lin, k_lin = (rotated(2), rotated(3)) if self.chunk_size else (None, None)

        def chunk(t: int) -> int:
            return t // self.chunk_size if self.chunk_size else 0

        y = x.new_zeros(batch, length, self.hidden_dim)
        for b in range(batch):
            for i in range(length):
                if not real[b, i]:
                    continue
                visible = [j for j in range(length) if real[b, j] and (j <= i or not self.causal)]
                acc = x.new_zeros(self.hidden_dim)
                for j in visible:
                    if chunk(j) == chunk(i):  # quadratic part: same chunk (FLASH-Quad: one chunk)
                        acc = acc + F.relu(q[b, i] @ k[b, j] / math.sqrt(self.key_dim)) ** 2 * v[b, j]
                    if self.chunk_size and (chunk(j) < chunk(i) or not self.causal):  # linear part
                        acc = acc + (q_lin[b, i] @ k_lin[b, j]) / math.sqrt(self.key_dim) * v[b, j]
                y[b, i] = u[b, i] * acc / len(visible)
        return (self.out_proj(y) * real.unsqueeze(-1)).transpose(0, 1)  # [T, B, C]


def gau_from_spec(spec: MixerSpec) -> GAU:
    """Builder for the mixer registry (FLASH-Quad when ``spec.chunk_size == 0``, FLASH otherwise)."""
    return GAU(spec.embed_dim, spec.gau_expansion, spec.gau_key_dim, causal=spec.causal,
               chunk_size=spec.chunk_size, dropout=spec.attention_dropout, hidden_dim=spec.gau_hidden_dim)
