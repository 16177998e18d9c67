"""Induced set attention block (Lee et al., 2019, "Set Transformer: A Framework for Attention-based
Permutation-Invariant Neural Networks": ISAB(X) = MAB(X, MAB(I, X)) with m learned inducing points I), pure torch,
encoder only.

Notation: T time, B batch, C channels, H heads of D = C / H channels, m the inducing points
(``--isab-inducing-points``); L the sentence's real frames.

    Q_I = I W_q1 + b_q1                                       I [m, C] learned
    H   = LayerNorm(Q_I + concat_h softmax(Q_I^h (X W_k1^h)^T / sqrt(D)) X W_v1^h)    X's real frames only: [B, m, C]
    out = W_o concat_h softmax(X W_q2^h (H W_k2^h)^T / sqrt(D)) H W_v2^h             every frame against H: [B, T, C]

so a layer costs O(L m D) a head in the length, not O(L^2 D): the m inducing points read the sentence, its frames read
the m summaries back. Of the paper's MAB(Y, Z) = LayerNorm(H' + rFF(H')), H' = LayerNorm(Y + Multihead(Y, Z, Z)):

* the inner MAB(I, X) is written as the authors' implementation writes it (juho-lee/set_transformer, ``MAB``): the
  residual adds the projected queries Q_I to the heads' outputs, with no output projection, then LayerNorm; its
  row-wise feed-forward rFF is omitted (H feeds only the keys and values of the second attention, whose projections
  follow at once);
* the outer MAB(X, H) is plain multi-head attention with an output projection W_o, as the other mixers: its
  residual, LayerNorms and row-wise feed-forward are the surrounding encoder layer's (mixer block, then FFN block),
  and the mixer maps T x B x C to T x B x C.

X's three projections (W_q2, W_k1, W_v1) are one fused linear layer.

Padding: pad keys are masked in the first attention (a sentence's summaries depend on its real frames only); outputs
at pads are zero. Nothing depends on a frame's position, so left padding changes nothing. Masked logits take the
dtype's lowest finite value, not -inf, so that a sentence of pads only gives finite weights.

No causal form: the m inducing points summarize the whole sentence, so every frame would read the frames after it; the
mixer serves encoders only, and its preset pairs it with the standard causal attention decoder.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lite.modules.incremental import IncrementalState

if TYPE_CHECKING:  # lite.modules imports this module to register it
    from lite.modules import MixerSpec


class InducedSetAttention(nn.Module):
    """Multi-head attention through m learned inducing points (ISAB); encoder only.

    Shape:
        Input: T x B x C, padding mask B x T (True = pad)
        Output: T x B x C (zero at padded frames)
    """

    def __init__(self, embed_dim: int, num_heads: int, inducing_points: int, dropout: float = 0.0):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"isab: embed dim {embed_dim} is not divisible by {num_heads} heads")
        if inducing_points < 1:
            raise ValueError(f"isab: --isab-inducing-points must be positive, got {inducing_points}")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.inducing_points, self.dropout = inducing_points, dropout
        self.scale = self.head_dim ** -0.5
        self.inducing = nn.Parameter(torch.empty(inducing_points, embed_dim))  # I [m, C]
        self.induce_query = nn.Linear(embed_dim, embed_dim)  # W_q1 (of I)
        self.frame_proj = nn.Linear(embed_dim, 3 * embed_dim)  # of X: W_q2, W_k1, W_v1
        self.induce_norm = nn.LayerNorm(embed_dim)
        self.summary_proj = nn.Linear(embed_dim, 2 * embed_dim)  # of H: W_k2, W_v2
        self.out_proj = nn.Linear(embed_dim, embed_dim)  # W_o
        nn.init.xavier_uniform_(self.inducing)  # as the authors' implementation
        for linear in (self.induce_query, self.frame_proj, self.summary_proj, self.out_proj):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)

    def _split(self, t: Tensor) -> Tensor:
        """[..., N, C] -> [..., H, N, D]."""
        return t.view(*t.shape[:-1], self.num_heads, self.head_dim).transpose(-2, -3)

    def _merge(self, t: Tensor) -> Tensor:
        """[..., H, N, D] -> [..., N, C]."""
        return t.transpose(-2, -3).flatten(-2)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, visible: Optional[Tensor]) -> Tensor:
        """q [..., Q, D], k, v [..., K, D], visible broadcasting to [..., Q, K] or None -> [..., Q, D]."""
        logits = torch.matmul(q, k.transpose(-1, -2)) * self.scale
        if visible is not None:
            logits = logits.masked_fill(~visible, torch.finfo(logits.dtype).min)
        weights = F.dropout(torch.softmax(logits, dim=-1), p=self.dropout, training=self.training)
        return torch.matmul(weights, v)

    def forward(self, x: Tensor, padding_mask: Optional[Tensor] = None,
                incremental_state: IncrementalState = None) -> Tensor:
        if incremental_state is not None:
            raise ValueError("isab: no causal form (encoder only), so no incremental state")
        x = x.transpose(0, 1)  # [B, T, C]
        query, key, value = (self._split(t) for t in self.frame_proj(x).chunk(3, dim=-1))  # [B, H, T, D]
        induced = self.induce_query(self.inducing)  # Q_I [m, C]
        visible = None if padding_mask is None else ~padding_mask[:, None, None, :]  # [B, 1, 1, T]
        summary = self._merge(self._attend(self._split(induced), key, value, visible))  # [B, m, C]
        summary = self.induce_norm(induced + summary)  # H [B, m, C]
        key, value = (self._split(t) for t in self.summary_proj(summary).chunk(2, dim=-1))  # [B, H, m, D]
        out = self.out_proj(self._merge(self._attend(query, key, value, None)))  # [B, T, C]
        if padding_mask is not None:
            out = out.masked_fill(padding_mask.unsqueeze(-1), 0.0)
        return out.transpose(0, 1)  # [T, B, C]

    def reference_forward(self, x: Tensor, padding_mask: Optional[Tensor] = None) -> Tensor:
        """Readable definition, one query and one head at a time: per sentence, each inducing point's softmax over the
        real frames, plus its query, LayerNorm; then each real frame's softmax over the m summaries; for tests (no
        dropout)."""
        length, batch = x.size(0), x.size(1)
        real = torch.ones(batch, length, dtype=torch.bool, device=x.device) if padding_mask is None else ~padding_mask
        c, d = self.embed_dim, self.head_dim
        w_q2, w_k1, w_v1 = self.frame_proj.weight.split(c)  # [C, C] each
        b_q2, b_k1, b_v1 = self.frame_proj.bias.split(c)
        w_k2, w_v2 = self.summary_proj.weight.split(c)
        b_k2, b_v2 = self.summary_proj.bias.split(c)
        out = x.new_zeros(batch, length, c)
        for b in range(batch):
            frames = [x[j, b] for j in range(length) if real[b, j]]
            rows = []
            for point in self.inducing:  # one inducing point against the sentence's frames
                q = self.induce_query(point)
                heads = []
                for h in range(self.num_heads):
                    part = slice(h * d, (h + 1) * d)
                    logits = torch.stack([q[part] @ (w_k1[part] @ f + b_k1[part]) / math.sqrt(d) for f in frames])
                    heads.append(torch.softmax(logits, 0) @ torch.stack([w_v1[part] @ f + b_v1[part] for f in frames]))
                rows.append(self.induce_norm(q + torch.cat(heads)))
            for j in range(length):  # one frame against the m summaries
                if not real[b, j]:
                    continue
                q = w_q2 @ x[j, b] + b_q2
                heads = []
                for h in range(self.num_heads):
                    part = slice(h * d, (h + 1) * d)
                    logits = torch.stack([q[part] @ (w_k2[part] @ r + b_k2[part]) / math.sqrt(d) for r in rows])
                    heads.append(torch.softmax(logits, 0) @ torch.stack([w_v2[part] @ r + b_v2[part] for r in rows]))
                out[b, j] = self.out_proj(torch.cat(heads))
        return out.transpose(0, 1)  # [T, B, C]


def isab_from_spec(spec: MixerSpec) -> InducedSetAttention:
    """Builder for the mixer registry: encoder only (the model refuses it in a decoder before this is called); heads =
    the encoder's attention heads (or --mixer-attention-heads), m = --isab-inducing-points."""
    if spec.causal:
        raise ValueError("isab: no causal form (the inducing points summarize the whole sentence); it serves the "
                         "encoder only")
    spec.check_equal_heads("isab")
    return InducedSetAttention(spec.embed_dim, spec.attention_heads, spec.isab_inducing_points,
                               dropout=spec.attention_dropout)
