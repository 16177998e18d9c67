"""Lightweight and dynamic convolutions (Wu et al., 2019, "Pay Less Attention"), pure torch.

Notation: T time, B batch, C channels, H heads, R = C // H channels per head, K kernel size.

Both convolutions are depthwise: every channel of head h is filtered with the same
softmax-normalised kernel of K taps. A lightweight kernel is a parameter (H x K); a dynamic
kernel is predicted from the current frame (Linear C -> H*K). The causal (decoder) form reads
the K-1 previous frames, kept as incremental state; the full forward is the same computation
with a zero state, so step-by-step decoding and the teacher-forced pass agree by construction.

The window of K frames is built with pad + slices (no ``unfold``/``as_strided``) so that the
modules export to ONNX with the TorchScript exporter; only the training form of the dynamic
convolution, never exported, writes its band matrix through ``as_strided``.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F
from fairseq.incremental_decoding_utils import with_incremental_state
from torch import Tensor, nn

from lite.modules.incremental import IncrementalState, StateSlot



@with_incremental_state
class _DepthwiseConv(nn.Module):
    """Shared machinery: padding, the causal frame buffer, beam reordering."""

    def __init__(self, channels: int, kernel_size: int, num_heads: int, causal: bool,
                 weight_softmax: bool = True, weight_dropout: float = 0.0):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"channels ({channels}) must be divisible by num_heads ({num_heads})")
        self.channels, self.kernel_size, self.num_heads = channels, kernel_size, num_heads
        self.causal = causal
        self.weight_softmax = weight_softmax
        self.weight_dropout = weight_dropout
        # left padding: K-1 past frames when causal, centred otherwise (as fairseq's padding_l)
        self.padding_l = kernel_size - 1 if causal else kernel_size // 2

    def _normalise(self, weight: Tensor) -> Tensor:
        """Softmax over the K taps, then weight dropout. weight: [..., H, K]."""
        if self.weight_softmax:
            weight = F.softmax(weight.float(), dim=-1).type_as(weight)
        return F.dropout(weight, p=self.weight_dropout, training=self.training)

    def _window(self, x: Tensor, incremental_state: IncrementalState) -> Tensor:
        """Frames the output at t reads: [T + K - 1, B, C]; updates the causal buffer."""
        if not self.causal:
            return F.pad(x, (0, 0, 0, 0, self.padding_l, self.kernel_size - 1 - self.padding_l))
        past = None
        if incremental_state is not None:
            past = self.get_incremental_state(incremental_state, "frames")
        if past is None:
            past = x.new_zeros(self.kernel_size - 1, x.size(1), x.size(2))  # [K-1, B, C]
        window = torch.cat([past, x], dim=0)
        if incremental_state is not None:
            keep = window[-(self.kernel_size - 1):] if self.kernel_size > 1 else window[:0]  # constant slice bounds
            self.set_incremental_state(incremental_state, "frames", keep)
        return window

    def initial_state(self, batch: int, like: Tensor) -> Dict[StateSlot, Tensor]:
        """Causal: the K-1 previous frames [K-1, B, C], zero before the first step (as the causal padding)."""
        return {("frames", None): like.new_zeros(self.kernel_size - 1, batch, self.channels)} if self.causal else {}

    def _unfold(self, window: Tensor, length: int) -> Tensor:
        """[T + K - 1, B, C] -> [T, B, C, K] by K shifted slices."""
        return torch.stack([window[k:k + length] for k in range(self.kernel_size)], dim=-1)

    def reorder_incremental_state(self, incremental_state: Dict[str, Dict[str, Optional[Tensor]]], new_order: Tensor):
        frames = self.get_incremental_state(incremental_state, "frames")
        if frames is not None:
            self.set_incremental_state(incremental_state, "frames", frames.index_select(1, new_order))


class LightweightConv(_DepthwiseConv):
    """Depthwise convolution with a softmax-normalised kernel shared within each head.

    Shape:
        Input: T x B x C (zero the padded frames first)
        Output: T x B x C
    """

    def __init__(self, channels: int, kernel_size: int, num_heads: int, causal: bool,
                 weight_softmax: bool = True, weight_dropout: float = 0.0, bias: bool = False):
        super().__init__(channels, kernel_size, num_heads, causal, weight_softmax, weight_dropout)
        self.weight = nn.Parameter(torch.empty(num_heads, kernel_size))  # [H, K]
        self.bias = nn.Parameter(torch.zeros(channels)) if bias else None
        nn.init.xavier_uniform_(self.weight)

    def forward(self, x: Tensor, incremental_state: IncrementalState = None) -> Tensor:
        length, window = x.size(0), self._window(x, incremental_state)
        kernel = self._normalise(self.weight).repeat_interleave(self.channels // self.num_heads, dim=0)  # [C, K]
        y = F.conv1d(window.permute(1, 2, 0), kernel.unsqueeze(1), groups=self.channels)  # [B, C, T]
        y = y.permute(2, 0, 1)[:length]  # [T, B, C]
        return y if self.bias is None else y + self.bias

    def reference_forward(self, x: Tensor) -> Tensor:
        """Readable definition, y[t, b, c] = sum_k w[h(c), k] x[t - padding_l + k, b, c]; for tests."""
        length, window = x.size(0), self._window(x, None)
        kernel = self._normalise(self.weight)  # [H, K]
        heads = torch.arange(self.channels) // (self.channels // self.num_heads)  # head of each channel
        y = torch.zeros_like(x)
        for t in range(length):
            for k in range(self.kernel_size):
                y[t] += kernel[heads, k] * window[t + k]
        return y if self.bias is None else y + self.bias


class DynamicConv(_DepthwiseConv):
    """Depthwise convolution whose per-head kernel is predicted from the current frame.

    Shape:
        Input: T x B x C (zero the padded frames first)
        Output: T x B x C
    """

    def __init__(self, channels: int, kernel_size: int, num_heads: int, causal: bool,
                 weight_softmax: bool = True, weight_dropout: float = 0.0, bias: bool = False):
        super().__init__(channels, kernel_size, num_heads, causal, weight_softmax, weight_dropout)
        self.weight_linear = nn.Linear(channels, num_heads * kernel_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(channels)) if bias else None
        nn.init.xavier_uniform_(self.weight_linear.weight)

    def _kernels(self, x: Tensor) -> Tensor:
        """[T, B, C] -> [T, B, H, K]"""
        weight = self.weight_linear(x).view(x.size(0), x.size(1), self.num_heads, self.kernel_size)
        return self._normalise(weight)

    def forward(self, x: Tensor, incremental_state: IncrementalState = None) -> Tensor:
        if incremental_state is not None and x.size(0) == 1:
            return self._step(x, incremental_state)
        if self.training:
            return self._band_forward(x, incremental_state)
        length, batch = x.size(0), x.size(1)
        kernel = self._kernels(x)  # [T, B, H, K]
        frames = self._unfold(self._window(x, incremental_state), length)  # [T, B, C, K]
        frames = frames.view(length, batch, self.num_heads, self.channels // self.num_heads, self.kernel_size)
        y = (frames * kernel.unsqueeze(3)).sum(-1).view(length, batch, self.channels)  # [T, B, C]
        return y if self.bias is None else y + self.bias

    def _band_forward(self, x: Tensor, incremental_state: IncrementalState) -> Tensor:
        """Training form: the kernels laid out as a band matrix, one batched matmul with the frames (as fairseq's
        DynamicConv1dTBC). The K taps' slices cost more in backward than the band's zeros in the matmul. Inference
        keeps the taps: the exported graph and the counted MACs are the convolution's."""
        length, batch, heads, taps = x.size(0), x.size(1), self.num_heads, self.kernel_size
        kernel = self._kernels(x).view(length, batch * heads, taps).transpose(0, 1)  # [BH, T, K]
        # band[n, t, t + k] = kernel[n, t, k]: a zero buffer written through a view whose rows step by T + K
        width = length + taps - 1
        band = kernel.new_zeros(batch * heads, length, width)  # [BH, T, T + K - 1]
        band.as_strided((batch * heads, length, taps), (length * width, width + 1, 1)).copy_(kernel)
        if self.causal and incremental_state is not None:  # the window carries past frames
            frames = self._window(x, incremental_state)  # [T + K - 1, B, C]
        else:  # the window's padding is zeros: only the T columns over x itself count
            band, frames = band.narrow(2, self.padding_l, length), x  # [BH, T, T], [T, B, C]
        frames = frames.reshape(frames.size(0), batch * heads, -1).transpose(0, 1)  # [BH, W, R]
        y = torch.bmm(band, frames).transpose(0, 1).reshape(length, batch, self.channels)  # [T, B, C]
        return y if self.bias is None else y + self.bias

    def _step(self, x: Tensor, incremental_state: IncrementalState) -> Tensor:
        """One decoding step, the window as it is (no K slices) and constant shapes, so that the traced step graph
        has a handful of nodes instead of ~3K: [1, B, C] -> [1, B, C]."""
        heads, taps = self.num_heads, self.kernel_size
        kernel = self._normalise(self.weight_linear(x).reshape(-1, heads, 1, taps))  # [B, H, 1, K]
        window = self._window(x, incremental_state)  # [K, B, C]
        frames = window.permute(1, 2, 0).reshape(-1, heads, self.channels // heads, taps)  # [B, H, R, K]
        y = (frames * kernel).sum(-1).reshape(1, -1, self.channels)  # [1, B, C]
        return y if self.bias is None else y + self.bias

    def reference_forward(self, x: Tensor) -> Tensor:
        """Readable definition, one frame and one tap at a time; for tests."""
        length, window = x.size(0), self._window(x, None)
        kernel = self._kernels(x)  # [T, B, H, K]
        heads = torch.arange(self.channels) // (self.channels // self.num_heads)
        y = torch.zeros_like(x)
        for t in range(length):
            for k in range(self.kernel_size):
                y[t] += kernel[t, :, heads, k] * window[t + k]
        return y if self.bias is None else y + self.bias
