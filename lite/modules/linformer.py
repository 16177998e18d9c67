"""Linformer attention (Wang et al., 2020, "Linformer: Self-Attention with Linear Complexity"), pure torch, encoder
only: keys and values are projected along the length to k rows, so every query attends to k mixtures of frames.

Notation: T time, B batch, C channels, H heads of D = C / H channels, N the maximum length (``--linformer-max-len``),
k the projected length (``--linformer-k``); j a key's position, counted from the sentence's first real token.

    q, k, v = X W_q, X W_k, X W_v                      [B, T, C] -> heads [B, H, T, D]
    K' = E[:, :T] K,  V' = F[:, :T] V                  E, F [k, N] (shared by the heads: the paper's headwise sharing)
    out_i = W_o concat_h softmax(q_i K'^T / sqrt(D)) V'     [B, H, T, k] weights: O(T k D) a head, not O(T^2 D)

Padding: keys and values are zeroed at pads before the projection, so pads add nothing to K', V'; positions count from
the first real token, so left padding changes nothing; outputs at pads are zero. A T-frame input uses the first T
columns of E and F: inputs of more than N frames are refused (an error naming ``--linformer-max-len``).

No causal form: each of the k rows of K' mixes every frame, future ones included, so a query would see the future;
the mixer serves encoders only, and its preset pairs it with the standard causal attention decoder.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lite.modules.incremental import IncrementalState
from lite.modules.synthesizer import real_positions

if TYPE_CHECKING:  # lite.modules imports this module to register it
    from lite.modules import MixerSpec


class Linformer(nn.Module):
    """Multi-head attention over keys and values projected along the length; encoder only.

    Shape:
        Input: T x B x C (T <= max_len), padding mask B x T (True = pad)
        Output: T x B x C (zero at padded frames)
    """

    def __init__(self, embed_dim: int, num_heads: int, max_len: int, projected: int, dropout: float = 0.0):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"linformer: embed dim {embed_dim} is not divisible by {num_heads} heads")
        if max_len < 1 or projected < 1:
            raise ValueError(f"linformer: --linformer-max-len ({max_len}) and --linformer-k ({projected}) must be "
                             f"positive")
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.max_len, self.projected, self.dropout = max_len, projected, dropout
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim)
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self.proj_key = nn.Parameter(torch.empty(projected, max_len))  # E [k, N]
        self.proj_value = nn.Parameter(torch.empty(projected, max_len))  # F [k, N]
        for proj in (self.proj_key, self.proj_value):  # as the reference implementations: U(+-1/sqrt(k))
            nn.init.uniform_(proj, -projected ** -0.5, projected ** -0.5)
        for linear in (self.qkv, self.out_proj):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)

    def forward(self, x: Tensor, padding_mask: Optional[Tensor] = None,
                incremental_state: IncrementalState = None) -> Tensor:
        if incremental_state is not None:
            raise ValueError("linformer: no causal form (encoder only), so no incremental state")
        length, batch = x.size(0), x.size(1)
        if not torch.jit.is_tracing() and length > self.max_len:
            raise ValueError(f"linformer: a sequence of {length} frames is longer than --linformer-max-len "
                             f"{self.max_len}; train with a larger --linformer-max-len")
        x = x.transpose(0, 1)  # [B, T, C]
        if padding_mask is None:
            padding_mask = torch.zeros(batch, length, dtype=torch.bool, device=x.device)
        pad = padding_mask[:, None, :, None]  # [B, 1, T, 1]
        q, k, v = (t.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
                   for t in self.qkv(x).chunk(3, dim=-1))  # [B, H, T, D]
        positions = real_positions(padding_mask)  # [B, T]
        proj_key = self.proj_key[:, positions].transpose(0, 1).unsqueeze(1)  # [B, 1, k, T]: E's columns
        proj_value = self.proj_value[:, positions].transpose(0, 1).unsqueeze(1)
        k = torch.matmul(proj_key, k.masked_fill(pad, 0.0))  # [B, H, k, D]
        v = torch.matmul(proj_value, v.masked_fill(pad, 0.0))  # [B, H, k, D]
        weights = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * self.scale, dim=-1)  # [B, H, T, k]
        out = torch.matmul(F.dropout(weights, p=self.dropout, training=self.training), v)  # [B, H, T, D]
        out = self.out_proj(out.transpose(1, 2).flatten(2))  # [B, T, C]
        return out.masked_fill(padding_mask.unsqueeze(-1), 0.0).transpose(0, 1)  # [T, B, C]

    def reference_forward(self, x: Tensor, padding_mask: Optional[Tensor] = None) -> Tensor:
        """Readable definition: per sentence, K' and V' summed over its real frames at their real positions, then
        each real query's softmax over the k rows; for tests (no dropout)."""
        length, batch = x.size(0), x.size(1)
        real = torch.ones(batch, length, dtype=torch.bool, device=x.device) if padding_mask is None else ~padding_mask
        q, k, v = (t.view(batch, length, self.num_heads, self.head_dim)
                   for t in self.qkv(x.transpose(0, 1)).chunk(3, dim=-1))  # [B, T, H, D]
        out = x.new_zeros(batch, length, self.embed_dim)
        for b in range(batch):
            frames = [j for j in range(length) if real[b, j]]
            for i in frames:
                heads = []
                for h in range(self.num_heads):
                    keys = sum(torch.outer(self.proj_key[:, p], k[b, j, h]) for p, j in enumerate(frames))  # [k, D]
                    values = sum(torch.outer(self.proj_value[:, p], v[b, j, h]) for p, j in enumerate(frames))
                    weights = torch.softmax(keys @ q[b, i, h] / math.sqrt(self.head_dim), 0)  # [k]
                    heads.append(weights @ values)
                out[b, i] = self.out_proj(torch.cat(heads))
        return out.transpose(0, 1)  # [T, B, C]


def linformer_from_spec(spec: MixerSpec) -> Linformer:
    """Builder for the mixer registry: encoder only (the model refuses it in a decoder before this is called)."""
    if spec.causal:
        raise ValueError("linformer: no causal form; it serves the encoder only")
    spec.check_equal_heads("linformer")
    return Linformer(spec.embed_dim, spec.attention_heads, spec.linformer_max_len, spec.linformer_k,
                     dropout=spec.attention_dropout)
