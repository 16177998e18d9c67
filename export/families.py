"""What each mechanism keeps between decoding steps: one small export description per family, in one registry.

A decoder's incremental state is fairseq's dict ``{"<module id>.<key>": Tensor | {field: Tensor}}``. For
export every piece of it becomes an explicit graph input and output, so each stateful module type says here
what its state is *before the first step* (the graph has no "no state yet" branch): ``STATES`` maps a
module type to a function ``(module, batch, like) -> {(key, field): initial tensor}``.

Cross attention is not here: its keys/values are computed once from the encoder output by the encoder
graph (``memory_state``) and read, unchanged, by every step.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

from fairseq.modules import MultiheadAttention
from torch import Tensor, nn

from lite.modules.conv import _DepthwiseConv
from lite.modules.fastformer import Fastformer
from lite.modules.gau import GAU

Slot = Tuple[str, Optional[str]]  # (incremental-state key, field of a dict-valued state or None)
InitialState = Callable[[nn.Module, int, Tensor], Dict[Slot, Tensor]]


def _self_attention(m: MultiheadAttention, batch: int, like: Tensor) -> Dict[Slot, Tensor]:
    """Key/value caches [B, H, t, D], empty before the first step (they grow by one frame a step)."""
    empty = like.new_zeros(batch, m.num_heads, 0, m.head_dim)
    return {("attn_state", "prev_key"): empty, ("attn_state", "prev_value"): empty}


def _convolution(m: _DepthwiseConv, batch: int, like: Tensor) -> Dict[Slot, Tensor]:
    """The K-1 previous frames [K-1, B, C], zero before the first step (as the causal padding)."""
    return {("frames", None): like.new_zeros(m.kernel_size - 1, batch, m.channels)}


def _own_state(m: nn.Module, batch: int, like: Tensor) -> Dict[Slot, Tensor]:
    """GAU (position, count, key/value caches or chunk buffers, linear state) and Fastformer (running
    max, denominator, numerator of both poolings): the fresh state the module builds for itself."""
    return {(name, None): t for name, t in m._state({}, like.new_zeros(batch, m.embed_dim)).items()}


STATES: Dict[type, InitialState] = {
    MultiheadAttention: _self_attention,
    _DepthwiseConv: _convolution,
    GAU: _own_state,
    Fastformer: _own_state,
}


def initial_state(module: nn.Module, batch: int, like: Tensor) -> Optional[Dict[Slot, Tensor]]:
    """The state ``module`` decodes from at step 0, or None for a module that keeps none (or cross attention)."""
    if isinstance(module, MultiheadAttention) and not module.self_attention:
        return None
    for kind, build in STATES.items():
        if isinstance(module, kind):
            return build(module, batch, like)
    return None


def memory_state(m: MultiheadAttention, memory: Tensor, padding_mask: Tensor) -> Dict[Slot, Tensor]:
    """Cross attention's static keys/values from the encoder output, laid out as fairseq caches them.

    Shape: memory S x B x C, padding mask B x S -> prev_key, prev_value [B, H, S, D], prev_key_padding_mask [B, S].
    """
    batch = memory.size(1)

    def heads(x: Tensor) -> Tensor:  # [S, B, C] -> [B, H, S, D]
        return x.contiguous().view(-1, batch * m.num_heads, m.head_dim).transpose(0, 1).reshape(
            batch, m.num_heads, -1, m.head_dim)

    return {("attn_state", "prev_key"): heads(m.k_proj(memory)), ("attn_state", "prev_value"): heads(m.v_proj(memory)),
            ("attn_state", "prev_key_padding_mask"): padding_mask}
