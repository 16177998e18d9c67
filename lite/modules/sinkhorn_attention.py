"""Sparse Sinkhorn attention (Tay et al., 2020, "Sparse Sinkhorn Attention": blocks of the sequence softly sorted by a
learned permutation, each query block attending to its own block and the block sorted next to it), pure torch,
encoder and causal decoder (Causal Sinkhorn Balancing).

Notation: T time, B batch, C channels, H heads of D = C / H channels, b the block size (``--sinkhorn-block``),
N = ceil(T / b) blocks, K Sinkhorn iterations (``--sinkhorn-iterations``), tau the temperature
(``--sinkhorn-temperature``); blocks are counted from a sentence's first real token, L its real length.

    q, k, v = X W_q, X W_k, X W_v                   [B, T, C] -> blocks [B, H, N, b, D] (pads: k = v = 0)
    e_i = sum of the real frames x_t of block i     [B, N, C]: block embeddings
    R[i, j] = (r_i W_s) . e_j / (b sqrt(C))          [B, N, N]: SortNet, a bilinear score between block embeddings;
                                                     encoder r_i = e_i, decoder r_i = mean of e_0 .. e_{i-1}
    P = Sinkhorn_K(R / tau)                          [B, N, N]: K rounds of row then column normalization in log
                                                     space over the allowed entries (blocks holding a real frame;
                                                     decoder: j < i only, and entry (i, j)'s column normalized over
                                                     the rows up to i), P = exp(log P)
    k~_i, v~_i = sum_j P[i, j] k_j, v_j              [B, H, N, b, D]: the sorted block of block i (one P, all heads)
    block i's queries attend, in one softmax, to the real keys of block i (decoder: up to the query) and to the
    sorted keys k~_i (encoder: slot s visible when L > s, so every slot once the sentence fills a block; decoder:
    every slot from block 1 on, as every earlier block is whole, none in block 0)
    out = W_o (heads concatenated)

The SortNet is bilinear rather than the paper's linear layer d -> N_max: a score between two block embeddings, so it
serves any number of blocks (no fixed maximum length). 1 / (b sqrt(C)) keeps R near unit scale at initialization.

Causal: block i mixes only strictly earlier blocks' contents (R masked to j < i; its row embedding the mean of the
earlier blocks). Sinkhorn's column normalization over every row would let a later block's row change block i's
permutation; summing each column over the rows up to i instead keeps row i of P a function of blocks 0 .. i - 1, so
decoding step by step gives exactly the full causal pass. Under the causal mask the balancing's limit is the shifted
identity (block i sorted next to block i - 1: the only lower-triangular doubly stochastic matrix); after K rounds the
last (column) round leaves P[i, i - 1] = 1 and a soft weight below 1 on each block before it.

Fast path, written here because no maintained package offers Sinkhorn attention for variable-length, left-padded CPU
batches that also traces to ONNX: each row's real frames move to the front (a permutation: scatter in, gather back),
the frames are padded to N whole blocks with masked frames, and every query meets 2 b keys: O(T b D) a head, plus
O(N^2 b D) for the sorted keys, O(N C^2 + N^2 C) for the SortNet and O(K N^2) (decoder O(K N^3)) for the balancing.

Padding: pad frames count in no block embedding, give zero keys and values (so a partial block adds nothing at its
pad slots to a sorted block), blocks of pads only are left out of the balancing, pad keys are masked and outputs at
pads are zero. Masked logits take the dtype's lowest finite value, not -inf, so that masked rows stay finite.

Incremental state (one frame per call), batch first so beams reorder on dim 0, each growing by one slot a step:
``key``, ``value`` [B, H, t, D] and ``frame`` [B, t, C] (the inputs x, for the block embeddings), slot p holding
position p (zero past the real frames: a left pad's step writes nothing); ``column`` [B, K, t], slot j holding each
Sinkhorn round's log column sum of column j over the finished rows (those of whole blocks); ``count`` [B] long (real
frames so far: the next frame's position). O(t) memory; a step balances only its block's row of P against the
column sums (O(K t / b)) and adds that row to them at the block's last frame, so its work beyond the caches'
block sums and the sorted block (O(t C)) does not grow with t².
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lite.modules.incremental import IncrementalState
from lite.modules.local_attention import to_front
from lite.modules.pattern_attention import PatternAttention

if TYPE_CHECKING:  # lite.modules imports this module to register it
    from lite.modules import MixerSpec

STATE_NAMES = ("key", "value", "frame", "column", "count")


def sinkhorn(logits: Tensor, mask: Tensor, iterations: int, causal: bool) -> Tensor:
    """log P from R / tau: logits [..., N, N], mask [..., N, N] bool (the entries that take part) -> [..., N, N]: K
    rounds of row then column normalization by logsumexp over the unmasked entries; masked entries are the dtype's
    lowest value (P = 0 there). Causal: entry (i, j)'s column sum runs over the rows i' <= i only."""
    low, tiny = torch.finfo(logits.dtype).min, torch.finfo(logits.dtype).tiny
    log_p = logits.masked_fill(~mask, low)
    for _ in range(iterations):
        log_p = (log_p - torch.logsumexp(log_p, dim=-1, keepdim=True)).masked_fill(~mask, low)  # rows sum to 1
        if causal:  # the column's sum over rows up to i, a running sum in O(N^2) (ONNX has no cumulative logsumexp):
            top = log_p.amax(dim=-2, keepdim=True)  # [..., 1, N(j)] shifted by the column's largest entry
            column = torch.log(torch.cumsum(torch.exp(log_p - top), dim=-2).clamp_min(tiny)) + top
        else:
            column = torch.logsumexp(log_p, dim=-2, keepdim=True)
        log_p = (log_p - column).masked_fill(~mask, low)  # columns sum to 1 (causal: up to each row)
    return log_p


class SinkhornAttention(PatternAttention):
    """Multi-head attention within blocks of b frames and the block a learned soft permutation sorts next to each;
    causal (Causal Sinkhorn Balancing) in the decoder.

    Shape:
        Input: T x B x C, padding mask B x T (True = pad)
        Output: T x B x C (zero at padded frames)
    """

    STATE_NAMES = STATE_NAMES

    def __init__(self, embed_dim: int, num_heads: int, block: int, iterations: int, temperature: float, *,
                 causal: bool, dropout: float = 0.0):
        super().__init__("sinkhorn attention", embed_dim, num_heads, causal=causal, dropout=dropout)
        if block < 1:
            raise ValueError(f"sinkhorn attention: --sinkhorn-block must be positive, got {block}")
        if iterations < 1:
            raise ValueError(f"sinkhorn attention: --sinkhorn-iterations must be positive, got {iterations}")
        if not temperature > 0:
            raise ValueError(f"sinkhorn attention: --sinkhorn-temperature must be positive, got {temperature}")
        self.block, self.iterations, self.temperature = block, iterations, float(temperature)
        self.sort = nn.Linear(embed_dim, embed_dim, bias=False)  # W_s, the SortNet's bilinear form
        nn.init.xavier_uniform_(self.sort.weight)

    def permutation(self, embeddings: Tensor, valid: Tensor) -> Tensor:
        """Block embeddings [B, N, C], valid [B, N] bool (blocks holding a real frame) -> P [B, N, N]. Causal: row i
        scores the mean of the earlier blocks' embeddings against each earlier block j < i."""
        blocks = embeddings.size(1)
        index = torch.arange(blocks, device=embeddings.device)
        mask = valid.unsqueeze(2) & valid.unsqueeze(1)  # [B, N, N]
        rows = embeddings
        if self.causal:
            earlier = (torch.cumsum(embeddings, dim=1) - embeddings) / index.clamp(min=1).to(embeddings.dtype)[:, None]
            rows, mask = earlier, mask & (index.unsqueeze(1) > index)  # j < i
        scale = 1.0 / (self.block * math.sqrt(self.embed_dim))
        scores = torch.matmul(self.sort(rows), embeddings.transpose(1, 2)) * scale  # R [B, N, N]
        return torch.exp(sinkhorn(scores / self.temperature, mask, self.iterations, self.causal))

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
        real_blocks = F.pad(real, (0, pad)).view(batch, blocks, size)  # [B, N, b]
        x = x.masked_fill(~real.unsqueeze(-1), 0.0)
        embeddings = F.pad(x, (0, 0, 0, pad)).view(batch, blocks, size, self.embed_dim).sum(2)  # [B, N, C]
        p = self.permutation(embeddings, real_blocks.any(-1)).unsqueeze(1)  # [B, 1, N, N]

        def split(t: Tensor) -> Tensor:  # [B, T, H, D] -> [B, H, N, b, D]
            t = F.pad(t, (0, 0, 0, 0, 0, pad)).view(batch, blocks, size, self.num_heads, self.head_dim)
            return t.permute(0, 3, 1, 2, 4)

        q, k, v = (split(t.masked_fill(~real[:, :, None, None], 0.0)) for t in self._heads(x))  # [B, H, N, b, D]
        shape = (batch, self.num_heads, blocks, size * self.head_dim)
        sorted_k = torch.matmul(p, k.reshape(shape)).view(k.shape)  # [B, H, N, b, D]: sum_j P[i, j] k_j
        sorted_v = torch.matmul(p, v.reshape(shape)).view(v.shape)
        slots = torch.arange(size, device=x.device)
        own = real_blocks.unsqueeze(2).expand(batch, blocks, size, size)  # [B, N, b (queries), b (keys)]
        if self.causal:  # its own block up to the query; the sorted block (earlier, whole blocks) from block 1 on
            own = own & (slots.unsqueeze(1) >= slots)
            ranked = (torch.arange(blocks, device=x.device) > 0).view(1, blocks, 1, 1).expand(batch, blocks, size, size)
        else:  # sorted slot s visible when L > s
            filled = slots < real.long().sum(1, keepdim=True)  # [B, b]
            ranked = filled.view(batch, 1, 1, size).expand(batch, blocks, size, size)
        visible = torch.cat([own, ranked], dim=-1)  # [B, N, b, 2b]
        keys, values = torch.cat([k, sorted_k], dim=-2), torch.cat([v, sorted_v], dim=-2)  # [B, H, N, 2b, D]
        out = self._attend(q, keys, values, visible.unsqueeze(1))  # [B, H, N, b, D]
        out = out.permute(0, 2, 3, 1, 4).reshape(batch, blocks * size, self.embed_dim)[:, :length]  # [B, T, C]
        out = self.out_proj(out).masked_fill(~real.unsqueeze(-1), 0.0)
        if order is not None:  # back to the input's frame order
            out = out.gather(1, order)
        return out.transpose(0, 1)  # [T, B, C]

    # ---------------------------------------------------------------- one decoding step

    def _state(self, incremental_state: Dict[str, Dict[str, Optional[Tensor]]], x: Tensor) -> Dict[str, Tensor]:
        state = {name: self.get_incremental_state(incremental_state, name) for name in STATE_NAMES}
        if state["count"] is None:
            batch = x.size(0)
            state = {"key": x.new_zeros(batch, self.num_heads, 0, self.head_dim),
                     "value": x.new_zeros(batch, self.num_heads, 0, self.head_dim),
                     "frame": x.new_zeros(batch, 0, self.embed_dim),
                     "column": x.new_zeros(batch, self.iterations, 0),
                     "count": torch.zeros(batch, dtype=torch.long, device=x.device)}
        return state

    def _step(self, x: Tensor, padding_mask: Optional[Tensor],
              incremental_state: Dict[str, Dict[str, Optional[Tensor]]]) -> Tensor:
        """One frame: x [B, C], padding mask [B] -> [B, C]. The caches grow by a slot a step and slot p holds position
        p (slots past the real frames stay zero), so the blocks are the caches cut every b slots. Row i of P (the
        query's block) reads only the whole blocks before it and, for each round's column normalization, the rows
        before it, whose column sums the state keeps: the row is balanced alone, O(K N), not the whole P."""
        state = self._state(incremental_state, x)
        real = torch.ones_like(state["count"], dtype=torch.bool) if padding_mask is None else ~padding_mask  # [B]
        position = state["count"]  # [B]
        batch, size = x.size(0), self.block
        q, k, v = self._heads(x)  # [B, H, D]
        slots = state["key"].size(2) + 1
        # the frame goes to slot p by a scatter (a broadcast Where over the caches took 3x its kernel time in ONNX
        # Runtime); a pad's step writes zeros to slot p, which is still empty
        pad_row = ~real.view(batch, 1, 1)
        k, v, x = k.masked_fill(pad_row, 0.0), v.masked_fill(pad_row, 0.0), x.masked_fill(pad_row[:, 0], 0.0)
        at = position.view(batch, 1, 1, 1).expand(batch, self.num_heads, 1, self.head_dim)
        key = torch.cat([state["key"], torch.zeros_like(k).unsqueeze(2)], dim=2).scatter(2, at, k.unsqueeze(2))
        value = torch.cat([state["value"], torch.zeros_like(v).unsqueeze(2)], dim=2).scatter(2, at, v.unsqueeze(2))
        at = position.view(batch, 1, 1).expand(batch, 1, self.embed_dim)
        frame = torch.cat([state["frame"], torch.zeros_like(x).unsqueeze(1)], dim=1).scatter(1, at, x.unsqueeze(1))
        low = torch.finfo(x.dtype).min
        column = torch.cat([state["column"], x.new_full((batch, self.iterations, 1), low)], dim=2)  # [B, K, t]
        pad = (size - slots % size) % size
        blocks = (slots + pad) // size
        current = torch.div(position, size, rounding_mode="floor")  # [B]: the query's block i
        row, column = self._row(F.pad(frame, (0, 0, 0, pad)).view(batch, blocks, size, self.embed_dim).sum(2),
                                current, column, real & (position % size == size - 1))  # [B, N], [B, K, t]
        shape = (batch, self.num_heads, blocks, size * self.head_dim)
        key_blocks = F.pad(key, (0, 0, 0, pad)).view(shape)  # [B, H, N, b D]
        value_blocks = F.pad(value, (0, 0, 0, pad)).view(shape)
        sorted_k = torch.matmul(row[:, None, None, :], key_blocks)  # [B, H, 1, b D]: sum_j P[i, j] k_j
        sorted_v = torch.matmul(row[:, None, None, :], value_blocks)
        pick = current.view(batch, 1, 1, 1).expand(batch, self.num_heads, 1, size * self.head_dim)
        own_k, own_v = key_blocks.gather(2, pick), value_blocks.gather(2, pick)  # [B, H, 1, b D]
        keys = torch.cat([own_k, sorted_k], dim=2).view(batch, self.num_heads, 2 * size, self.head_dim)
        values = torch.cat([own_v, sorted_v], dim=2).view(batch, self.num_heads, 2 * size, self.head_dim)
        within = torch.arange(size, device=x.device) <= (position % size).unsqueeze(1)  # [B, b]: own block so far
        visible = torch.cat([within, (current > 0).unsqueeze(1).expand(batch, size)], dim=1)  # [B, 2b]
        out = self._attend(q.unsqueeze(2), keys, values, visible[:, None, None, :])  # [B, H, 1, D]
        updates = {"key": key, "value": value, "frame": frame, "column": column, "count": position + real.long()}
        for name, tensor in updates.items():
            self.set_incremental_state(incremental_state, name, tensor)
        return self.out_proj(out.flatten(1)).masked_fill(~real.unsqueeze(1), 0.0)

    def _row(self, embeddings: Tensor, current: Tensor, column: Tensor, last: Tensor) -> Tuple[Tensor, Tensor]:
        """Row i of the causal P, from the block embeddings [B, N, C] (blocks j < i whole), i = ``current`` [B], and
        ``column`` [B, K, t]: per round, slot j holds log sum_r exp(log P_round(r, j)) over the rows r < i (row-
        normalized entries; the rest of the slots the dtype's lowest value). Returns P[i] [B, N] and the column sums
        with row i added where ``last`` [B] (the block's last frame: row i is complete) -> [B, K, t]."""
        batch, blocks = embeddings.shape[:2]
        earlier = torch.arange(blocks, device=embeddings.device) < current.unsqueeze(1)  # [B, N]: j < i
        earlier_sum = embeddings.masked_fill(~earlier.unsqueeze(-1), 0.0).sum(1)  # [B, C]
        mean = earlier_sum / current.clamp(min=1).to(embeddings.dtype).unsqueeze(1)
        scale = 1.0 / (self.block * math.sqrt(self.embed_dim) * self.temperature)
        log_p = torch.matmul(embeddings, self.sort(mean).unsqueeze(-1)).squeeze(-1) * scale  # R[i, :] / tau [B, N]
        low = torch.finfo(log_p.dtype).min
        sums = []
        for k in range(self.iterations):
            log_p = log_p.masked_fill(~earlier, low)
            log_p = (log_p - torch.logsumexp(log_p, dim=-1, keepdim=True)).masked_fill(~earlier, low)  # row sums to 1
            sums.append(torch.logsumexp(torch.stack([column[:, k, :blocks], log_p]), dim=0))  # [B, N]: rows <= i
            log_p = log_p - sums[-1]
        row = torch.exp(log_p.masked_fill(~earlier, low))  # [B, N]
        added = torch.cat([torch.stack(sums, dim=1), column[:, :, blocks:]], dim=2)  # [B, K, t]
        return row, torch.where(last.view(batch, 1, 1), added, column)

    # ---------------------------------------------------------------- readable definition

    @torch.no_grad()
    def reference_forward(self, x: Tensor, padding_mask: Optional[Tensor] = None) -> Tensor:
        """Readable definition, one sentence, one query and one head at a time: block sums, R entry by entry,
        Sinkhorn row by row and column by column over the allowed entries (causal: j < i, each column summed over the
        rows up to the entry's), each sorted key a sum over blocks; for tests (no dropout)."""
        length, batch = x.size(0), x.size(1)
        real = torch.ones(batch, length, dtype=torch.bool, device=x.device) if padding_mask is None else ~padding_mask
        q, k, v = self._heads(x.transpose(0, 1))  # [B, T, H, D]
        size, c, causal = self.block, self.embed_dim, self.causal
        out = x.new_zeros(batch, length, c)

        def lse(values: List[float]) -> float:
            return float(torch.logsumexp(torch.tensor(values, dtype=torch.float64), 0))

        def allowed(i: int, j: int) -> bool:
            return j < i if causal else True

        for b in range(batch):
            frames = [j for j in range(length) if real[b, j]]
            groups: List[List[int]] = [frames[i:i + size] for i in range(0, len(frames), size)]  # blocks of frames
            n = len(groups)
            embedding = [sum(x[j, b] for j in group) for group in groups]
            if causal:  # row i: the mean of the blocks before it
                rows = [sum(embedding[:i]) / i if i else torch.zeros(c) for i in range(n)]
            else:
                rows = embedding
            log_p = [[float(self.sort(rows[i]) @ embedding[j]) / (size * math.sqrt(c)) / self.temperature
                      for j in range(n)] for i in range(n)]
            for _ in range(self.iterations):
                for i in range(n):
                    entries = [j for j in range(n) if allowed(i, j)]
                    total = lse([log_p[i][j] for j in entries]) if entries else 0.0
                    log_p[i] = [value - total for value in log_p[i]]
                columns = [[0.0] * n for _ in range(n)]
                for i in range(n):
                    for j in range(n):
                        if allowed(i, j):
                            summed = [r for r in range(n) if allowed(r, j) and (r <= i or not causal)]
                            columns[i][j] = lse([log_p[r][j] for r in summed])
                log_p = [[log_p[i][j] - columns[i][j] for j in range(n)] for i in range(n)]
            weight = [[math.exp(log_p[i][j]) if allowed(i, j) else 0.0 for j in range(n)] for i in range(n)]
            for i, group in enumerate(groups):
                # the sorted block's slots: encoder, s < L (pad slots of a partial block add nothing); causal, all b
                # slots from block 1 on (every earlier block is whole), none in block 0
                used = (range(size) if i else range(0)) if causal else range(min(size, len(frames)))
                for h in range(self.num_heads):
                    sorted_keys, sorted_values = [], []
                    for s in used:
                        held = [(weight[i][j], other[s]) for j, other in enumerate(groups) if s < len(other)]
                        sorted_keys.append(sum(w * k[b, t, h] for w, t in held))
                        sorted_values.append(sum(w * v[b, t, h] for w, t in held))
                    for pos, t in enumerate(group):
                        own = group[:pos + 1] if causal else group
                        keys = [k[b, j, h] for j in own] + sorted_keys
                        values = [v[b, j, h] for j in own] + sorted_values
                        logits = torch.stack([q[b, t, h] @ key / math.sqrt(self.head_dim) for key in keys])
                        weights = torch.softmax(logits, 0)
                        out[b, t, h * self.head_dim:(h + 1) * self.head_dim] = sum(
                            w * value for w, value in zip(weights, values))
            for t in frames:
                out[b, t] = self.out_proj(out[b, t].clone())
        return out.transpose(0, 1)  # [T, B, C]


def sinkhorn_attention_from_spec(spec: MixerSpec) -> SinkhornAttention:
    """Builder for the mixer registry; heads = the side's attention heads, b, K, tau = --sinkhorn-block, -iterations,
    -temperature."""
    spec.check_equal_heads("sinkhorn attention")
    return SinkhornAttention(spec.embed_dim, spec.attention_heads, spec.sinkhorn_block, spec.sinkhorn_iterations,
                             spec.sinkhorn_temperature, causal=spec.causal, dropout=spec.attention_dropout)
