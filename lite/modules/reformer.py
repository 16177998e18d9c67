"""Reformer's LSH attention (Kitaev et al., 2020, "Reformer: The Efficient Transformer": shared-QK attention over the
keys that fall in the query's bucket under angular locality-sensitive hashing), pure torch, encoder and causal decoder.

Notation: T time, B batch, C channels, H heads of D = C / H channels, n buckets (``--reformer-buckets``, even),
R hash rounds (``--reformer-hashes``), c the chunk length (``--reformer-chunk``), G = ceil(T / c) chunks.

    qk, v = X W_qk, X W_v                           [B, T, C] -> heads [B, H, T, D]   (shared QK: no W_k)
    k_j = qk_j / |qk_j|                             the keys are the queries, unit-normalized
    h_r(x) = argmax([x A_r ; -x A_r])               A [D, R, n/2]: random rotations drawn once at build time from a
                                                    fixed seed, a buffer in the state dict; a bucket in 0 .. n - 1
    logit(i, j) = qk_i . k_j / sqrt(D)
    out = W_o (heads concatenated)

P_r(i), the keys query i sees in round r, are keys j with h_r(j) = h_r(i) (a query and its keys hash alike: they are
the same vectors), and never i itself unless P_r(i) would otherwise be empty (the paper's rule):

    encoder, the paper's chunked form: each round sorts the frames by (bucket, position) and cuts the sorted order
        into chunks of c; i sees the same-bucket keys of its own chunk and of the previous one (chunk 0: its own).
    decoder, causal and unchunked: i sees every earlier same-bucket key, j <= i. Chunks in sorted order depend on
        future tokens (a later token can push an earlier key into another chunk), so step-by-step decoding could not
        reproduce a chunked causal pass; without chunks it does, and a decoding step keeps the keys, values and
        buckets of every earlier frame (O(t), as standard attention's cache).

R rounds are combined as in the paper: o_i = sum_r exp(z_r(i) - logsumexp_r' z_r'(i)) o_r(i), where o_r(i) is the
softmax attention of i over P_r(i) and z_r(i) the logsumexp of its logits there (a key in several rounds' sets counts
once per round). One round: o_i = o_0(i).

Fast path, written here because no maintained package offers LSH attention for variable-length, left-padded CPU
batches that also traces to ONNX. Encoder: per head and round, a sort (argsort of bucket T + frame; pads after every
bucket), q, k, v and buckets gathered into sorted order and padded to G c slots, each chunk's c queries against the
2 c keys of it and the chunk before under the bucket mask, O(R T c D) a head, and the outputs scattered back. Real
frames sort before the pads and keep their order, so padding never moves a chunk boundary. Decoder: the T x T logits
once (they do not depend on the round), masked per round to the earlier same-bucket keys; the rounds' weights are
combined before a single product with the values.

Padding: pad keys are masked; outputs at pads are zero. Masked logits take the dtype's lowest finite value, not -inf,
so that a row that sees nothing (a pad query's) gives finite weights, zeroed with its output.

Incremental state (one frame per call), batch first so beams reorder on dim 0: ``key``, ``value`` [B, H, t, D], every
frame decoded so far (keys normalized), ``bucket`` [B, H, t, R] long, each cached frame's buckets (-1 for a pad). A
step appends its frame and attends to the cached frames of its bucket, itself last.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from lite.modules.incremental import IncrementalState
from lite.modules.pattern_attention import PatternAttention

if TYPE_CHECKING:  # lite.modules imports this module to register it
    from lite.modules import MixerSpec

SEED = 0  # the rotations' generator seed: every build draws the same A
STATE_NAMES = ("key", "value", "bucket")


def random_rotations(head_dim: int, hashes: int, buckets: int, seed: int = SEED) -> Tensor:
    """A [D, R, n/2]: one Gaussian random rotation of the head's D channels onto n/2 directions per round."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(head_dim, hashes, buckets // 2, generator=generator)


class ReformerAttention(PatternAttention):
    """Multi-head shared-QK attention within LSH buckets: in chunks of the bucket-sorted order in the encoder,
    over every earlier same-bucket key in the decoder.

    Shape:
        Input: T x B x C, padding mask B x T (True = pad)
        Output: T x B x C (zero at padded frames)
    """

    STATE_NAMES = STATE_NAMES

    def __init__(self, embed_dim: int, num_heads: int, buckets: int, hashes: int, chunk: int, *, causal: bool,
                 dropout: float = 0.0):
        super().__init__("reformer attention", embed_dim, num_heads, causal=causal, dropout=dropout, projections=2)
        if buckets < 2 or buckets % 2:
            raise ValueError(f"reformer attention: --reformer-buckets must be even and >= 2 (argmax over [xA; -xA]), "
                             f"got {buckets}")
        if hashes < 1:
            raise ValueError(f"reformer attention: --reformer-hashes must be >= 1, got {hashes}")
        if chunk < 1:
            raise ValueError(f"reformer attention: --reformer-chunk must be >= 1, got {chunk}")
        self.buckets, self.hashes, self.chunk = buckets, hashes, chunk
        self.register_buffer("rotations", random_rotations(self.head_dim, hashes, buckets))  # A [D, R, n/2]

    def _bucket(self, qk: Tensor) -> Tensor:
        """qk [..., D] -> [..., R] long: each round's bucket, argmax([x A_r; -x A_r])."""
        rotated = torch.matmul(qk, self.rotations.flatten(1))  # [..., R n/2]
        rotated = rotated.view(*qk.shape[:-1], self.hashes, self.buckets // 2)  # [..., R, n/2]
        return torch.cat([rotated, -rotated], dim=-1).argmax(-1)

    def _combine(self, weights: Tensor, lse: Tensor, axis: int) -> Tensor:
        """Each round's weights (or outputs) along ``axis``, lse [..., R, Q] its logsumexp per query -> the paper's
        combination, the rounds' axis summed away."""
        share = torch.softmax(lse, dim=axis)  # exp(z_r - logsumexp_r z_r)
        return (weights * share.unsqueeze(-1)).sum(axis)

    # ---------------------------------------------------------------- full sequence

    def forward(self, x: Tensor, padding_mask: Optional[Tensor] = None,
                incremental_state: IncrementalState = None) -> Tensor:
        if incremental_state is not None:
            return self._steps(x, padding_mask, incremental_state)  # [T, B, C]
        x = x.transpose(0, 1)  # [B, T, C]
        real = self._real(x, padding_mask)  # [B, T]
        qk, v = (t.transpose(1, 2) for t in self._heads(x))  # [B, H, T, D]
        key = F.normalize(qk, dim=-1)
        bucket = self._bucket(qk).permute(0, 1, 3, 2)  # [B, H, R, T]
        bucket = torch.where(real[:, None, None, :], bucket, -1)  # pads: -1, no bucket
        out = self._chunked(qk, key, v, bucket) if not self.causal else self._causal(qk, key, v, bucket)
        out = self.out_proj(out.transpose(1, 2).flatten(2)).masked_fill(~real.unsqueeze(-1), 0.0)  # [B, T, C]
        return out.transpose(0, 1)  # [T, B, C]

    def _chunked(self, qk: Tensor, key: Tensor, v: Tensor, bucket: Tensor) -> Tensor:
        """The encoder: qk, key, v [B, H, T, D], bucket [B, H, R, T] (-1 at pads) -> [B, H, T, D]."""
        batch, heads, length, dim = qk.shape
        rounds, size = self.hashes, self.chunk
        frame = torch.arange(length, device=qk.device)  # [T]
        rank = torch.where(bucket >= 0, bucket, self.buckets) * length + frame  # [B, H, R, T]: pads last
        order = torch.sort(rank, dim=-1)[1]  # [B, H, R, T]: sorted slot -> frame
        pad = (size - length % size) % size  # the last chunk is padded with masked slots
        chunks = (length + pad) // size

        def chunked(t: Tensor, fill: float) -> Tensor:  # [B, H, R, T, E] sorted -> [B, H, R, G, L, E]
            t = F.pad(t, (0, 0, 0, pad), value=fill)
            return t.view(batch, heads, rounds, chunks, size, t.size(-1))

        def window(t: Tensor, fill: float) -> Tensor:  # [B, H, R, G, L, E] -> [B, H, R, G, 2L, E]: previous, this
            first = torch.full_like(t.narrow(3, 0, 1), fill)
            return torch.cat([torch.cat([first, t.narrow(3, 0, chunks - 1)], dim=3), t], dim=4)

        gather = order.unsqueeze(-1).expand(batch, heads, rounds, length, dim)  # [B, H, R, T, D]

        def by_round(t: Tensor) -> Tensor:  # [B, H, T, D] -> [B, H, R, T, D] in each round's sorted order
            return t.unsqueeze(2).expand(batch, heads, rounds, length, dim).gather(3, gather)

        q = chunked(by_round(qk), 0.0)  # [B, H, R, G, L, D]
        keys, values = window(chunked(by_round(key), 0.0), 0.0), window(chunked(by_round(v), 0.0), 0.0)  # [.., 2L, D]
        slot_bucket = chunked(bucket.gather(3, order).unsqueeze(-1), -1.0)  # [B, H, R, G, L, 1]; -1: pad, no key
        slot_frame = chunked(order.unsqueeze(-1), -1.0)  # [B, H, R, G, L, 1]
        key_bucket = window(slot_bucket, -1.0).transpose(-1, -2)  # [B, H, R, G, 1, 2L]
        same = (slot_bucket == key_bucket) & (key_bucket >= 0)  # [B, H, R, G, L, 2L]
        itself = slot_frame == window(slot_frame, -1.0).transpose(-1, -2)
        others = same & ~itself
        visible = others | (itself & ~others.any(-1, keepdim=True))  # itself only when it sees nothing else
        logits = torch.matmul(q, keys.transpose(-1, -2)) * self.scale  # [B, H, R, G, L, 2L]
        logits = logits.masked_fill(~visible, torch.finfo(logits.dtype).min)
        weights = F.dropout(torch.softmax(logits, dim=-1), p=self.dropout, training=self.training)
        out = torch.matmul(weights, values).view(batch, heads, rounds, chunks * size, dim)[:, :, :, :length]
        out = torch.zeros_like(out).scatter(3, gather, out)  # [B, H, R, T, D]: back to frame order
        if rounds == 1:
            return out.squeeze(2)
        lse = torch.logsumexp(logits, dim=-1).view(batch, heads, rounds, chunks * size)[:, :, :, :length]
        lse = torch.zeros_like(lse).scatter(3, order, lse)  # [B, H, R, T]
        return self._combine(out, lse, axis=2)  # [B, H, T, D]

    def _causal(self, qk: Tensor, key: Tensor, v: Tensor, bucket: Tensor) -> Tensor:
        """The decoder: qk, key, v [B, H, T, D], bucket [B, H, R, T] (-1 at pads) -> [B, H, T, D]."""
        length = qk.size(2)
        frame = torch.arange(length, device=qk.device)
        same = (bucket.unsqueeze(-1) == bucket.unsqueeze(-2)) & (bucket >= 0).unsqueeze(-2)  # [B, H, R, T, T]
        others = same & (frame.unsqueeze(1) > frame)  # earlier keys of the bucket
        itself = frame.unsqueeze(1) == frame  # [T, T]
        visible = others | (itself & ~others.any(-1, keepdim=True))
        logits = torch.matmul(qk, key.transpose(-1, -2)) * self.scale  # [B, H, T, T], the same in every round
        return torch.matmul(self._weights(logits.unsqueeze(2), visible), v)  # [B, H, T, D]

    def _weights(self, logits: Tensor, visible: Tensor) -> Tensor:
        """logits [B, H, 1, Q, K], visible [B, H, R, Q, K] -> the rounds' combined weights [B, H, Q, K]."""
        logits = logits.masked_fill(~visible, torch.finfo(logits.dtype).min)  # [B, H, R, Q, K]
        weights = F.dropout(torch.softmax(logits, dim=-1), p=self.dropout, training=self.training)
        if self.hashes == 1:
            return weights.squeeze(2)
        return self._combine(weights, torch.logsumexp(logits, dim=-1), axis=2)

    # ---------------------------------------------------------------- one decoding step

    def _state(self, incremental_state: Dict[str, Dict[str, Optional[Tensor]]], x: Tensor) -> Dict[str, Tensor]:
        state = {name: self.get_incremental_state(incremental_state, name) for name in STATE_NAMES}
        if state["bucket"] is None:
            batch = x.size(0)
            state = {"key": x.new_zeros(batch, self.num_heads, 0, self.head_dim),
                     "value": x.new_zeros(batch, self.num_heads, 0, self.head_dim),
                     "bucket": torch.zeros(batch, self.num_heads, 0, self.hashes, dtype=torch.long, device=x.device)}
        return state

    def _step(self, x: Tensor, padding_mask: Optional[Tensor],
              incremental_state: Dict[str, Dict[str, Optional[Tensor]]]) -> Tensor:
        """One frame: x [B, C], padding mask [B] -> [B, C]; the frame joins the cache, then sees its bucket there."""
        state = self._state(incremental_state, x)
        real = torch.ones(x.size(0), dtype=torch.bool, device=x.device) if padding_mask is None else ~padding_mask
        qk, v = self._heads(x)  # [B, H, D]
        here = torch.where(real[:, None, None], self._bucket(qk), -1)  # [B, H, R]
        key = torch.cat([state["key"], F.normalize(qk, dim=-1).unsqueeze(2)], dim=2)  # [B, H, t, D]
        value = torch.cat([state["value"], v.unsqueeze(2)], dim=2)
        bucket = torch.cat([state["bucket"], here.unsqueeze(2)], dim=2)  # [B, H, t, R]
        same = ((bucket == here.unsqueeze(2)) & (bucket >= 0)).transpose(-1, -2)  # [B, H, R, t]
        earlier = torch.zeros_like(state["bucket"][..., 0], dtype=torch.bool)  # [B, H, t - 1]
        last = torch.ones_like(here[..., :1], dtype=torch.bool)  # [B, H, 1]
        itself = torch.cat([earlier, last], dim=2).unsqueeze(2)  # [B, H, 1, t]: the frame itself, cached last
        others = same & ~itself
        visible = others | (itself & ~others.any(-1, keepdim=True))  # [B, H, R, t]
        logits = torch.matmul(qk.unsqueeze(2), key.transpose(-1, -2)) * self.scale  # [B, H, 1, t]
        weights = self._weights(logits.unsqueeze(2), visible.unsqueeze(3))  # [B, H, 1, t]
        out = torch.matmul(weights, value)  # [B, H, 1, D]
        for name, tensor in {"key": key, "value": value, "bucket": bucket}.items():
            self.set_incremental_state(incremental_state, name, tensor)
        return self.out_proj(out.flatten(1)).masked_fill(~real.unsqueeze(1), 0.0)

    # ---------------------------------------------------------------- readable definition

    def reference_buckets(self, vector: Tensor) -> List[int]:
        """One head's qk vector [D] -> its bucket in each round: the index of the largest of x.a_m and -x.a_m."""
        found, vector = [], vector.detach()
        for r in range(self.hashes):
            projections = [float(vector @ self.rotations[:, r, m]) for m in range(self.buckets // 2)]
            candidates = projections + [-p for p in projections]
            found.append(max(range(self.buckets), key=lambda m: candidates[m]))
        return found

    def reference_keys(self, buckets: Dict[int, List[int]], frames: List[int], i: int, r: int) -> List[int]:
        """The frames query frame ``i`` sees in round ``r``, by the definition above; ``buckets`` maps each real frame
        to its buckets, ``frames`` lists the real frames in order."""
        same = [j for j in frames if buckets[j][r] == buckets[i][r]]
        if self.causal:
            seen = [j for j in same if j <= i]
        else:
            ranked = sorted(frames, key=lambda j: (buckets[j][r], j))
            chunk = {j: rank // self.chunk for rank, j in enumerate(ranked)}
            seen = [j for j in same if chunk[i] - 1 <= chunk[j] <= chunk[i]]
        others = [j for j in seen if j != i]
        return others or [i]

    def reference_forward(self, x: Tensor, padding_mask: Optional[Tensor] = None) -> Tensor:
        """Readable definition, one query, one head and one round at a time; for tests (no dropout)."""
        length, batch = x.size(0), x.size(1)
        real = torch.ones(batch, length, dtype=torch.bool, device=x.device) if padding_mask is None else ~padding_mask
        qk, v = self._heads(x.transpose(0, 1))  # [B, T, H, D]
        out = x.new_zeros(batch, length, self.embed_dim)
        for b in range(batch):
            frames = [j for j in range(length) if real[b, j]]
            heads: Dict[int, List[Tensor]] = {i: [] for i in frames}
            for h in range(self.num_heads):
                buckets = {j: self.reference_buckets(qk[b, j, h]) for j in frames}
                for i in frames:
                    outputs, sums = [], []
                    for r in range(self.hashes):
                        keys = self.reference_keys(buckets, frames, i, r)
                        logits = torch.stack([qk[b, i, h] @ (qk[b, j, h] / qk[b, j, h].norm()) for j in keys])
                        logits = logits / math.sqrt(self.head_dim)
                        outputs.append(torch.softmax(logits, 0) @ torch.stack([v[b, j, h] for j in keys]))
                        sums.append(torch.logsumexp(logits, 0))
                    share = torch.softmax(torch.stack(sums), 0)  # exp(z_r - logsumexp_r z_r)
                    heads[i].append(sum(share[r] * outputs[r] for r in range(self.hashes)))
            for i in frames:
                out[b, i] = self.out_proj(torch.cat(heads[i]))
        return out.transpose(0, 1)  # [T, B, C]


def reformer_attention_from_spec(spec: MixerSpec) -> ReformerAttention:
    """Builder for the mixer registry; heads = the side's attention heads, n, R, c = --reformer-buckets, -hashes,
    -chunk (the decoder's causal form has no chunks)."""
    spec.check_equal_heads("reformer attention")
    return ReformerAttention(spec.embed_dim, spec.attention_heads, spec.reformer_buckets, spec.reformer_hashes,
                             spec.reformer_chunk, causal=spec.causal, dropout=spec.attention_dropout)
