"""Routing attention (Roy et al., 2021, "Efficient Content-Based Sparse Attention with Routing Transformers":
content-based sparse attention, queries and keys routed to the nearest of c k-means centroids), pure torch, encoder
and causal decoder.

Notation: T time, B batch, C channels, H heads of D = C / H channels, c centroids a head (``--routing-clusters``),
lambda the centroids' decay (``--routing-decay``), t frames decoded so far.

    q, k, v = X W_q, X W_k, X W_v                   [B, T, C] -> heads [B, H, T, D]
    q, k = LN(q), LN(k)                             layer norm over D, no scale or bias (as the paper): |q| ~ sqrt(D)
    cluster(x) = argmax_m <x / |x|, mu_m>           mu [H, c, D] unit vectors: the nearest centroid on the sphere
    encoder: i sees j when cluster(q_i) = cluster(k_j)
    decoder: i sees j when j <= i and cluster(q_i) = cluster(k_j)
    a query that sees no key (no real key of its cluster; decoder: none up to i) sees its own frame alone
    out = W_o (heads concatenated)

Clusters by membership: each query and key joins its nearest centroid, so clusters differ in size; the paper's
balanced variant (each centroid takes its top-k nearest queries and keys, clusters of equal size) is not used.

Centroids: a buffer ``centroids`` [H, c, D], drawn once at build time from a fixed seed (standard normal, scaled to unit
length) and kept in the state dict, so a checkpoint carries the routing it was trained with. In training mode
(``module.train()``) a full forward pass moves them by the paper's exponential moving average of the (unit-normalized)
queries and keys assigned to them, after routing with the old ones:

    mu_m <- lambda mu_m + (1 - lambda) / 2 mean{q_i : cluster(q_i) = m} + (1 - lambda) / 2 mean{k_j : cluster(k_j) = m}

over the batch's real frames, each mean taken as mu_m itself when no vector is assigned (the paper writes sums; means
keep the step the same whatever the batch's token count), then rescaled to unit length. In eval mode (validation,
decoding, export) and in decoding steps they are frozen.

Fast path, written here because no maintained package offers routing attention for variable-length, left-padded CPU
batches that also traces to ONNX: dense attention under a [B, H, T, T] cluster mask built with tensor ops (argmax and
comparisons), O(T^2 D) a head plus O(T c D) for the centroid distances; at translation lengths (T ~ 15-30) sorting
queries and keys into clusters would save little. Routing depends on content alone, so left padding changes nothing.

Padding: pad keys are masked; outputs at pads are zero. Masked logits take the dtype's lowest finite value, not -inf.

Incremental state (one frame per call), batch first so beams reorder on dim 0: ``key``, ``value`` [B, H, t, D] (the
normalized keys), ``key_cluster`` [B, H, t] long (each cached key's centroid, -1 for a pad), every frame decoded so far:
O(t), as standard attention caches it. A step routes its query and key, appends the frame and masks the cache to the
query's cluster.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from lite.modules.incremental import IncrementalState
from lite.modules.pattern_attention import PatternAttention

if TYPE_CHECKING:  # lite.modules imports this module to register it
    from lite.modules import MixerSpec

SEED = 0  # the initial centroids' generator seed: every build draws the same ones
STATE_NAMES = ("key", "value", "key_cluster")


def initial_centroids(heads: int, clusters: int, head_dim: int, seed: int = SEED) -> Tensor:
    """mu [H, c, D]: standard normal from a fixed seed, scaled to unit length."""
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(heads, clusters, head_dim, generator=generator), dim=-1)


class RoutingAttention(PatternAttention):
    """Multi-head attention within content clusters (nearest of c centroids a head, moved by an exponential moving
    average in training); causal in the decoder.

    Shape:
        Input: T x B x C, padding mask B x T (True = pad)
        Output: T x B x C (zero at padded frames)
    """

    STATE_NAMES = STATE_NAMES

    def __init__(self, embed_dim: int, num_heads: int, clusters: int, decay: float, *, causal: bool,
                 dropout: float = 0.0):
        super().__init__("routing attention", embed_dim, num_heads, causal=causal, dropout=dropout)
        if clusters < 1:
            raise ValueError(f"routing attention: --routing-clusters must be >= 1, got {clusters}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"routing attention: --routing-decay must be in [0, 1), got {decay}")
        self.clusters, self.decay = clusters, decay
        self.register_buffer("centroids", initial_centroids(num_heads, clusters, self.head_dim))  # [H, c, D]

    def _normalized_heads(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """x [..., C] -> q, k (layer-normalized over D, no scale or bias), v [..., H, D]."""
        q, k, v = self._heads(x)
        return F.layer_norm(q, (self.head_dim,)), F.layer_norm(k, (self.head_dim,)), v

    def route(self, x: Tensor) -> Tensor:
        """x [B, H, T, D] -> [B, H, T] long: the nearest centroid of each vector (the largest cosine; |x| does not
        change the argmax, so x is not rescaled here)."""
        return torch.matmul(x.detach(), self.centroids.transpose(-1, -2)).argmax(-1)  # [B, H, T, c] -> [B, H, T]

    # ---------------------------------------------------------------- full sequence

    def forward(self, x: Tensor, padding_mask: Optional[Tensor] = None,
                incremental_state: IncrementalState = None) -> Tensor:
        if incremental_state is not None:
            return self._steps(x, padding_mask, incremental_state)  # [T, B, C]
        x = x.transpose(0, 1)  # [B, T, C]
        length = x.size(1)
        real = self._real(x, padding_mask)  # [B, T]
        q, k, v = (t.transpose(1, 2) for t in self._normalized_heads(x))  # [B, H, T, D]
        query_cluster, key_cluster = self.route(q), self.route(k)  # [B, H, T]
        visible = (query_cluster.unsqueeze(-1) == key_cluster.unsqueeze(-2)) & real[:, None, None, :]  # [B, H, T, T]
        frame = torch.arange(length, device=x.device)
        if self.causal:
            visible = visible & (frame.unsqueeze(1) >= frame.unsqueeze(0))  # j <= i
        own = frame.unsqueeze(1) == frame.unsqueeze(0)  # [T, T]: j = i
        visible = visible | (own & ~visible.any(-1, keepdim=True))  # a query that sees nothing sees itself
        if self.training and not torch.jit.is_tracing():
            self._update_centroids(q, k, query_cluster, key_cluster, real)
        out = self._attend(q, k, v, visible)  # [B, H, T, D]
        out = self.out_proj(out.transpose(1, 2).flatten(2)).masked_fill(~real.unsqueeze(-1), 0.0)  # [B, T, C]
        return out.transpose(0, 1)  # [T, B, C]

    @torch.no_grad()
    def _update_centroids(self, q: Tensor, k: Tensor, query_cluster: Tensor, key_cluster: Tensor,
                          real: Tensor) -> None:
        """The exponential moving average above, over the real frames: q, k [B, H, T, D], clusters [B, H, T]."""
        weight = real[:, None, :, None].to(q.dtype)  # [B, 1, T, 1]
        mean = []
        for vectors, cluster in ((q, query_cluster), (k, key_cluster)):
            member = F.one_hot(cluster, self.clusters).to(q.dtype) * weight  # [B, H, T, c]
            total = torch.einsum("bhtm,bhtd->hmd", member, F.normalize(vectors, dim=-1))
            count = member.sum((0, 2)).unsqueeze(-1)  # [H, c, 1]
            mean.append(torch.where(count > 0, total / count.clamp(min=1.0), self.centroids))  # [H, c, D]
        moved = self.decay * self.centroids + (1.0 - self.decay) / 2 * (mean[0] + mean[1])
        self.centroids.copy_(F.normalize(moved, dim=-1))

    # ---------------------------------------------------------------- one decoding step

    def _state(self, incremental_state: Dict[str, Dict[str, Optional[Tensor]]], x: Tensor) -> Dict[str, Tensor]:
        state = {name: self.get_incremental_state(incremental_state, name) for name in STATE_NAMES}
        if state["key_cluster"] is None:
            batch = x.size(0)
            state = {"key": x.new_zeros(batch, self.num_heads, 0, self.head_dim),
                     "value": x.new_zeros(batch, self.num_heads, 0, self.head_dim),
                     "key_cluster": torch.zeros(batch, self.num_heads, 0, dtype=torch.long, device=x.device)}
        return state

    def _step(self, x: Tensor, padding_mask: Optional[Tensor],
              incremental_state: Dict[str, Dict[str, Optional[Tensor]]]) -> Tensor:
        """One frame: x [B, C], padding mask [B] -> [B, C]; the frame joins the cache, then its cluster masks it."""
        state = self._state(incremental_state, x)
        batch = x.size(0)
        real = torch.ones(batch, dtype=torch.bool, device=x.device) if padding_mask is None else ~padding_mask  # [B]
        q, k, v = (t.unsqueeze(2) for t in self._normalized_heads(x))  # [B, H, 1, D]
        query_cluster = self.route(q)  # [B, H, 1]
        own_cluster = torch.where(real[:, None, None], self.route(k), -1)  # [B, H, 1]: -1 marks a pad key
        key = torch.cat([state["key"], k], dim=2)  # [B, H, t, D]
        value = torch.cat([state["value"], v], dim=2)
        key_cluster = torch.cat([state["key_cluster"], own_cluster], dim=2)  # [B, H, t]
        visible = key_cluster == query_cluster  # [B, H, t]
        own = torch.arange(key.size(2), device=x.device) == key.size(2) - 1  # [t]: the frame itself
        visible = visible | (own & ~visible.any(-1, keepdim=True))
        out = self._attend(q, key, value, visible.unsqueeze(2))  # [B, H, 1, D]
        updates = {"key": key, "value": value, "key_cluster": key_cluster}
        for name, tensor in updates.items():
            self.set_incremental_state(incremental_state, name, tensor)
        return self.out_proj(out.flatten(1)).masked_fill(~real.unsqueeze(1), 0.0)

    # ---------------------------------------------------------------- readable definition

    def reference_forward(self, x: Tensor, padding_mask: Optional[Tensor] = None) -> Tensor:
        """Readable definition, one query and one head at a time: the nearest centroid of each normalized query and
        key by Euclidean distance between unit vectors, the real keys of the query's cluster (causal: not after it),
        or the query's own frame when there is none; for tests (eval mode: no dropout, no centroid update)."""
        length, batch = x.size(0), x.size(1)
        real = torch.ones(batch, length, dtype=torch.bool, device=x.device) if padding_mask is None else ~padding_mask
        q, k, v = self._normalized_heads(x.transpose(0, 1))  # [B, T, H, D]

        def nearest(vector: Tensor, h: int) -> int:
            unit = (vector / vector.norm()).detach()
            return min(range(self.clusters), key=lambda m: float((unit - self.centroids[h, m]).norm()))

        out = x.new_zeros(batch, length, self.embed_dim)
        for b in range(batch):
            for i in range(length):
                if not real[b, i]:
                    continue
                heads = []
                for h in range(self.num_heads):
                    cluster = nearest(q[b, i, h], h)
                    keys = [j for j in range(length) if real[b, j] and (j <= i or not self.causal)
                            and nearest(k[b, j, h], h) == cluster] or [i]
                    logits = torch.stack([q[b, i, h] @ k[b, j, h] / math.sqrt(self.head_dim) for j in keys])
                    heads.append(torch.softmax(logits, 0) @ torch.stack([v[b, j, h] for j in keys]))
                out[b, i] = self.out_proj(torch.cat(heads))
        return out.transpose(0, 1)  # [T, B, C]


def routing_attention_from_spec(spec: MixerSpec) -> RoutingAttention:
    """Builder for the mixer registry; heads = the side's attention heads, c = --routing-clusters, lambda =
    --routing-decay."""
    spec.check_equal_heads("routing attention")
    return RoutingAttention(spec.embed_dim, spec.attention_heads, spec.routing_clusters, spec.routing_decay,
                            causal=spec.causal, dropout=spec.attention_dropout)
