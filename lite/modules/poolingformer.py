"""Poolingformer attention (Zhang et al., 2021, "Poolingformer: Long Document Modeling with Pooling Attention": a
two-level schema, sliding-window attention, then attention over pooled keys and values in a larger window), pure
torch, encoder only.

Notation: T time, B batch, C channels, H heads of D = C / H channels, w1 the first level's window
(``--poolingformer-window``) and w2 the second's (``--poolingformer-pool-window``) on each side, k the pool's kernel
and stride (``--poolingformer-pool``), G = ceil(T / k) pools; i a query's position, j a key's, both counted from the
sentence's first real token; pool p holds the positions p k .. p k + k - 1.

    level 1    q, k, v = X W_q, X W_k, X W_v                       [B, T, C] -> heads [B, H, T, D]
               y_i = softmax(q_i k_j^T / sqrt(D)) v_j over |i - j| <= w1          Y [B, T, C] (heads concatenated)
    level 2    q', k', v' = Y W_q', Y W_k', Y W_v'                   the first level's output, projected anew
               K'_p = sum_r a_hr k'_{p k + r},  V'_p = sum_r b_hr v'_{p k + r}    a, b = softmax over the real taps r
               z_i = softmax(q'_i K'_p^T / sqrt(D)) V'_p over the pools p holding a position j with |i - j| <= w2
    out = W_o (Y + Z)                                                the second level plus the first as a residual

The paper's combination: the pooling attention reads the sliding-window attention's output Y, and Y comes back as a
residual beside it (the layer's own residual, x + out, is the Transformer layer's, outside this mixer).

Pooling: a strided convolution, kernel = stride = k, over the sequence, one kernel of k taps a head (a lightweight
convolution, Wu et al. 2019: weights shared by a head's D channels and softmax-normalised over the taps; one kernel for
the keys, one for the values). Of the poolings the paper compares (mean, max, convolutions), the learned convolutions
rank ahead of mean pooling, a lightweight dynamic one first; this is the static lightweight convolution (a kernel
predicted from each input is left out). Its kernels start at zero, so a new model pools by the mean. Pads are
excluded from the pools: the softmax runs over a pool's real taps only (a sentence's last pool may hold fewer than k),
and a pool with none is masked.

Fast path, written here because no maintained package offers the two-level window + pooled-window pattern for
variable-length, left-padded CPU batches that also traces to ONNX: level 1 gathers each query's W1 = 2 w1 + 1 window
keys (as Longformer's fast path does; the window depends only on i - j, so frames are used where they are), O(T W1 D)
a head; level 2 moves each row's real frames to the front (a permutation), pools them (two k-tap weighted sums a
frame) and gathers each query's M = ceil(2 w2 / k) + 1 pools (the most a window of 2 w2 + 1 positions can touch),
O(T M D) a head; both linear in T.

Padding: pad keys and pad-only pools are masked; outputs at pads are zero. Masked logits take the dtype's lowest
finite value, not -inf, so that a row that sees nothing (a pad query's) gives finite weights, zeroed with its output.

No causal form, by choice: the second level's pools reach w2 positions ahead of the query (and a pool is complete
only k - 1 frames after its first); the mixer serves encoders only, and its preset pairs it with the standard causal
attention decoder.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lite.modules.incremental import IncrementalState
from lite.modules.local_attention import front_order
from lite.modules.pattern_attention import PatternAttention

if TYPE_CHECKING:  # lite.modules imports this module to register it
    from lite.modules import MixerSpec


def pools_a_query(pool_window: int, pool: int) -> int:
    """M: the most pools that the positions i - w2 .. i + w2 touch, whatever i."""
    return -(-2 * pool_window // pool) + 1


class PoolingformerAttention(PatternAttention):
    """Sliding-window attention (w1 frames on each side), then attention from its output over the pools of k frames
    within w2 frames on each side, the two summed; encoder only.

    Shape:
        Input: T x B x C, padding mask B x T (True = pad)
        Output: T x B x C (zero at padded frames)
    """

    def __init__(self, embed_dim: int, num_heads: int, window: int, pool_window: int, pool: int,
                 dropout: float = 0.0):
        super().__init__("poolingformer attention", embed_dim, num_heads, causal=False, dropout=dropout)
        for flag, value in (("--poolingformer-window", window), ("--poolingformer-pool-window", pool_window)):
            if value < 0:
                raise ValueError(f"poolingformer attention: {flag} must be >= 0, got {value}")
        if pool < 1:
            raise ValueError(f"poolingformer attention: --poolingformer-pool must be positive, got {pool}")
        self.window, self.pool_window, self.pool = window, pool_window, pool
        self.pool_qkv = nn.Linear(embed_dim, 3 * embed_dim)  # the second level's W_q', W_k', W_v'
        nn.init.xavier_uniform_(self.pool_qkv.weight)
        nn.init.zeros_(self.pool_qkv.bias)
        self.pool_weight = nn.Parameter(torch.zeros(2, num_heads, pool))  # [2, H, k]: key, value kernels' logits

    # ---------------------------------------------------------------- full sequence

    def forward(self, x: Tensor, padding_mask: Optional[Tensor] = None,
                incremental_state: IncrementalState = None) -> Tensor:
        if incremental_state is not None:
            raise ValueError("poolingformer attention: no causal form (encoder only), so no incremental state")
        x = x.transpose(0, 1)  # [B, T, C]
        batch, length = x.shape[:2]
        real = self._real(x, padding_mask)  # [B, T]
        position = real.long().cumsum(1) - 1  # [B, T]: i for a real frame (-1 for a left pad)

        # level 1: each query against its 2 w1 + 1 window keys
        q, k, v = (t.transpose(1, 2) for t in self._heads(x))  # [B, H, T, D]
        size = self.window

        def window(t: Tensor, axis: int) -> Tensor:  # T along ``axis`` -> a new axis after it, one per offset
            padded = F.pad(t, [0, 0] * (t.dim() - 1 - axis) + [size, size])
            return torch.stack([padded.narrow(axis, size + o, length) for o in range(-size, size + 1)], dim=axis + 1)

        visible = window(real.to(q.dtype), 1) > 0  # [B, T, W1]: real keys inside the sequence
        y = self._attend(q.unsqueeze(-2), window(k, 2), window(v, 2), visible[:, None, :, None, :])  # [B,H,T,1,D]
        y = y.squeeze(-2).transpose(1, 2).flatten(2)  # [B, T, C]

        # level 2: Y's queries against the pools of Y's keys and values within w2
        q2, k2, v2 = self.pool_qkv(y).chunk(3, dim=-1)  # [B, T, C]
        k2, v2 = self._pools(k2, v2, real)  # [B, H, G, D]
        groups = k2.size(2)
        count = pools_a_query(self.pool_window, self.pool)
        lift = (self.pool_window + 1 + self.pool - 1) // self.pool  # keeps the floor division's numerator >= 0
        first = torch.div(position - self.pool_window + lift * self.pool, self.pool, rounding_mode="floor") - lift
        slot = first.unsqueeze(-1) + torch.arange(count, device=x.device)  # [B, T, M]: the pools a query touches
        index = slot.clamp(0, groups - 1)  # [B, T, M]
        start = slot * self.pool  # [B, T, M]: each pool's first position
        lengths = real.long().sum(1).view(batch, 1, 1)  # [B, 1, 1]
        seen = (slot >= 0) & (start <= position.unsqueeze(-1) + self.pool_window) & (start < lengths)  # [B, T, M]

        def gather(t: Tensor) -> Tensor:  # [B, H, G, D] -> [B, H, T, M, D]
            flat = index.flatten(1)[:, None, :, None].expand(batch, self.num_heads, length * count, self.head_dim)
            return t.gather(2, flat).view(batch, self.num_heads, length, count, self.head_dim)

        q2 = q2.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, T, D]
        z = self._attend(q2.unsqueeze(-2), gather(k2), gather(v2), seen[:, None, :, None, :])  # [B, H, T, 1, D]
        z = z.squeeze(-2).transpose(1, 2).flatten(2)  # [B, T, C]
        out = self.out_proj(y + z).masked_fill(~real.unsqueeze(-1), 0.0)  # [B, T, C]
        return out.transpose(0, 1)  # [T, B, C]

    def _pools(self, k: Tensor, v: Tensor, real: Tensor) -> Tuple[Tensor, Tensor]:
        """k, v [B, T, C] (the second level's), real [B, T] -> pooled keys, values [B, H, G, D]. Pools are counted
        from the first real token: real frames move to the front; a pool without real frames pools zeros."""
        batch, length = real.shape
        order = front_order(~real).unsqueeze(-1).expand_as(k)  # [B, T, C]: real frames to the front
        real_front = real.long().sum(1, keepdim=True) > torch.arange(length, device=real.device)  # [B, T]
        pad = (self.pool - length % self.pool) % self.pool
        groups = (length + pad) // self.pool
        taps = F.pad(real_front, (0, pad)).view(batch, groups, 1, self.pool)  # [B, G, 1, k]
        shape = (2, batch, groups, self.num_heads, self.pool)
        weights = self.pool_weight[:, None, None].expand(shape).masked_fill(~taps, torch.finfo(k.dtype).min)  # pads
        weights = torch.softmax(weights, dim=-1).unsqueeze(-2)  # [2, B, G, H, 1, k]: over the real taps

        def pool(t: Tensor, w: Tensor) -> Tensor:  # [B, T, C] -> [B, H, G, D]
            t = torch.zeros_like(t).scatter(1, order, t).masked_fill(~real_front.unsqueeze(-1), 0.0)
            t = F.pad(t, (0, 0, 0, pad)).view(batch, groups, self.pool, self.num_heads, self.head_dim)
            t = torch.matmul(w, t.permute(0, 1, 3, 2, 4))  # [B, G, H, 1, D]: the k taps summed
            return t.squeeze(-2).transpose(1, 2)

        return pool(k, weights[0]), pool(v, weights[1])

    # ---------------------------------------------------------------- readable definition

    def reference_forward(self, x: Tensor, padding_mask: Optional[Tensor] = None) -> Tensor:
        """Readable definition, one query and one head at a time: the real keys within w1, then, on the first level's
        output, the pools (k real positions each, the last maybe fewer) holding a position within w2, each pooled by
        its head's kernel softmax-normalised over its taps; for tests (no dropout)."""
        length, batch = x.size(0), x.size(1)
        real = torch.ones(batch, length, dtype=torch.bool, device=x.device) if padding_mask is None else ~padding_mask
        q, k, v = self._heads(x.transpose(0, 1))  # [B, T, H, D]
        w1, w2, size, d = self.window, self.pool_window, self.pool, self.head_dim
        out = x.new_zeros(batch, length, self.embed_dim)
        for b in range(batch):
            frames = [j for j in range(length) if real[b, j]]
            y = {}
            for pi, i in enumerate(frames):  # pi: the query's position, pj: a key's
                keys = [j for pj, j in enumerate(frames) if abs(pi - pj) <= w1]
                heads = []
                for h in range(self.num_heads):
                    logits = torch.stack([q[b, i, h] @ k[b, j, h] / math.sqrt(d) for j in keys])
                    heads.append(torch.softmax(logits, 0) @ torch.stack([v[b, j, h] for j in keys]))
                y[i] = torch.cat(heads)  # [C]
            q2, k2, v2 = {}, {}, {}
            for i in frames:
                q2[i], k2[i], v2[i] = self.pool_qkv(y[i]).chunk(3)
            pools = [frames[p:p + size] for p in range(0, len(frames), size)]  # by real position
            for pi, i in enumerate(frames):
                seen = [p for p in range(len(pools)) if p * size <= pi + w2 and p * size + size - 1 >= pi - w2]
                heads = []
                for h in range(self.num_heads):
                    part = slice(h * d, (h + 1) * d)
                    pooled_k, pooled_v = [], []
                    for p in seen:
                        a = torch.softmax(self.pool_weight[0, h, :len(pools[p])], 0)
                        c = torch.softmax(self.pool_weight[1, h, :len(pools[p])], 0)
                        pooled_k.append(sum(a[r] * k2[j][part] for r, j in enumerate(pools[p])))
                        pooled_v.append(sum(c[r] * v2[j][part] for r, j in enumerate(pools[p])))
                    logits = torch.stack([q2[i][part] @ key / math.sqrt(d) for key in pooled_k])
                    heads.append(torch.softmax(logits, 0) @ torch.stack(pooled_v))
                out[b, i] = self.out_proj(y[i] + torch.cat(heads))
        return out.transpose(0, 1)  # [T, B, C]


def poolingformer_from_spec(spec: MixerSpec) -> PoolingformerAttention:
    """Builder for the mixer registry: encoder only (the model refuses it in a decoder before this is called); heads =
    the encoder's attention heads, w1, w2, k = --poolingformer-window, -pool-window, -pool."""
    if spec.causal:
        raise ValueError("poolingformer attention: no causal form (the pooled windows look ahead); it serves the "
                         "encoder only")
    spec.check_equal_heads("poolingformer attention")
    return PoolingformerAttention(spec.embed_dim, spec.attention_heads, spec.poolingformer_window,
                                  spec.poolingformer_pool_window, spec.poolingformer_pool,
                                  dropout=spec.attention_dropout)
