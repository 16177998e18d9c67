"""BigBird attention (Zaheer et al., 2020, "Big Bird: Transformers for Longer Sequences": a sliding window, a few
global tokens and a few random keys per query), pure torch, encoder only.

Notation: T time, B batch, C channels, H heads of D = C / H channels, w the window (``--bigbird-window``) on each side,
g the global tokens (``--bigbird-global``), r the random keys a query (``--bigbird-random``), N the longest input
(``--bigbird-max-len``); i a query's position, j a key's, both counted from the sentence's first real token.

    q, k, v = X W_q, X W_k, X W_v                   [B, T, C] -> heads [B, H, T, D]
    i sees j when |i - j| <= w, or i < g, or j < g (the first g real tokens attend to all, all to them),
             or j in R[i] mod L                     R [N, r]: drawn once at build time from a fixed seed;
                                                    L the sentence's real length
    out = W_o (heads concatenated)

R is a buffer, so a checkpoint carries the pattern it was trained with (the model is deterministic and exports); its
keys range over 0 .. N - 1 and are taken modulo the sentence's length, so every random key falls inside the sentence
(as the paper's random blocks fall inside the sequence; unwrapped, ~r L / N of them would at translation lengths). Inputs of more than N frames are
refused (an error naming ``--bigbird-max-len``); the module's ``max_len`` caps the encoder's positions.

Fast path, written here because no maintained package offers BigBird's window + global + random pattern for
variable-length, left-padded CPU batches that also traces to ONNX: dense attention under a [B, T, T] visibility mask
built with tensor ops, O(T^2 D) a head (at translation lengths, T ~ 15-30, the gather of 2 w + 1 + g + r keys a query
would save little).

Padding: pad keys are masked; outputs at pads are zero. Masked logits take the dtype's lowest finite value, not -inf,
so that a row of pads only (a pad query's) gives finite weights, zeroed with its output.

No causal form: a query's random keys may lie after it, so a query would see the future; the mixer serves encoders
only, and its preset pairs it with the standard causal attention decoder.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor

from lite.modules.incremental import IncrementalState
from lite.modules.pattern_attention import PatternAttention

if TYPE_CHECKING:  # lite.modules imports this module to register it
    from lite.modules import MixerSpec

SEED = 0  # the random keys' generator seed: every build draws the same R


def random_keys(max_len: int, count: int, seed: int = SEED) -> Tensor:
    """R [N, r] long: query position i's r random key positions, uniform over 0 .. N - 1, from a fixed seed."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, max_len, (max_len, count), generator=generator)


class BigBirdAttention(PatternAttention):
    """Multi-head attention over a window of w frames on each side, g global tokens and r random keys a query;
    encoder only.

    Shape:
        Input: T x B x C (T <= max_len), padding mask B x T (True = pad)
        Output: T x B x C (zero at padded frames)
    """

    def __init__(self, embed_dim: int, num_heads: int, window: int, global_tokens: int, random: int, max_len: int,
                 dropout: float = 0.0):
        super().__init__("bigbird attention", embed_dim, num_heads, causal=False, dropout=dropout)
        for flag, value in (("--bigbird-window", window), ("--bigbird-global", global_tokens),
                            ("--bigbird-random", random)):
            if value < 0:
                raise ValueError(f"bigbird attention: {flag} must be >= 0, got {value}")
        if max_len < 1:
            raise ValueError(f"bigbird attention: --bigbird-max-len must be positive, got {max_len}")
        self.window, self.global_tokens, self.random, self.max_len = window, global_tokens, random, max_len
        self.register_buffer("random_keys", random_keys(max_len, random))  # R [N, r], saved in the state dict

    def visibility(self, real: Tensor) -> Tensor:
        """real [B, T] bool -> [B, T, T] bool: query frame i sees key frame j (both real, the pattern above)."""
        batch, length = real.shape
        position = real.long().cumsum(1) - 1  # [B, T]: i for a real frame (-1 for a left pad)
        query, key = position.unsqueeze(2), position.unsqueeze(1)  # [B, T, 1], [B, 1, T]
        offset = query - key  # [B, T, T]: i - j
        visible = (offset <= self.window) & (offset >= -self.window)
        if self.global_tokens:
            visible = visible | (query < self.global_tokens) | (key < self.global_tokens)
        if self.random:
            rows = position.clamp(0, self.max_len - 1).flatten()  # [B T]
            lengths = real.long().sum(1).clamp(min=1).view(batch, 1, 1)  # [B, 1, 1]
            drawn = self.random_keys.index_select(0, rows).view(batch, length, self.random) % lengths  # [B, T, r]
            hit = drawn.unsqueeze(-1) == key.unsqueeze(2)  # [B, T, r, T]: R[i] holds j
            visible = visible | hit.any(2)
        return visible & real.unsqueeze(1) & real.unsqueeze(2)  # [B, T, T]

    def forward(self, x: Tensor, padding_mask: Optional[Tensor] = None,
                incremental_state: IncrementalState = None) -> Tensor:
        if incremental_state is not None:
            raise ValueError("bigbird attention: no causal form (encoder only), so no incremental state")
        length = x.size(0)
        if not torch.jit.is_tracing() and length > self.max_len:
            raise ValueError(f"bigbird attention: a sequence of {length} frames is longer than --bigbird-max-len "
                             f"{self.max_len}; train with a larger --bigbird-max-len")
        x = x.transpose(0, 1)  # [B, T, C]
        real = self._real(x, padding_mask)  # [B, T]
        q, k, v = (t.transpose(1, 2) for t in self._heads(x))  # [B, H, T, D]
        out = self._attend(q, k, v, self.visibility(real).unsqueeze(1))  # [B, H, T, D]
        out = self.out_proj(out.transpose(1, 2).flatten(2)).masked_fill(~real.unsqueeze(-1), 0.0)  # [B, T, C]
        return out.transpose(0, 1)  # [T, B, C]

    def reference_forward(self, x: Tensor, padding_mask: Optional[Tensor] = None) -> Tensor:
        """Readable definition, one query and one head at a time: the real keys within the window, global, or among
        the query's random keys (by positions counted from the first real token); for tests (no dropout)."""
        length, batch = x.size(0), x.size(1)
        real = torch.ones(batch, length, dtype=torch.bool, device=x.device) if padding_mask is None else ~padding_mask
        q, k, v = self._heads(x.transpose(0, 1))  # [B, T, H, D]
        w, g = self.window, self.global_tokens
        out = x.new_zeros(batch, length, self.embed_dim)
        for b in range(batch):
            frames = [j for j in range(length) if real[b, j]]
            for pi, i in enumerate(frames):  # pi: the query's position, pj: a key's
                drawn = {j % len(frames) for j in self.random_keys[pi].tolist()}
                keys = [j for pj, j in enumerate(frames) if abs(pi - pj) <= w or pi < g or pj < g or pj in drawn]
                heads = []
                for h in range(self.num_heads):
                    logits = torch.stack([q[b, i, h] @ k[b, j, h] / math.sqrt(self.head_dim) for j in keys])
                    heads.append(torch.softmax(logits, 0) @ torch.stack([v[b, j, h] for j in keys]))
                out[b, i] = self.out_proj(torch.cat(heads))
        return out.transpose(0, 1)  # [T, B, C]


def bigbird_attention_from_spec(spec: MixerSpec) -> BigBirdAttention:
    """Builder for the mixer registry: encoder only (the model refuses it in a decoder before this is called); heads =
    the encoder's attention heads, w, g, r, N = --bigbird-window, -global, -random, -max-len."""
    if spec.causal:
        raise ValueError("bigbird attention: no causal form (random keys look ahead); it serves the encoder only")
    spec.check_equal_heads("bigbird attention")
    return BigBirdAttention(spec.embed_dim, spec.attention_heads, spec.bigbird_window, spec.bigbird_global,
                            spec.bigbird_random, spec.bigbird_max_len, dropout=spec.attention_dropout)
