"""fairseq's MultiheadAttention for one decoding step, written with the head count and head dim as constants.

fairseq's forward computes every reshape from the traced input sizes (``bsz * num_heads`` ...), which the ONNX
exporter records as Shape -> Gather -> Unsqueeze -> Concat chains: about two thirds of the decoder-step graph's
nodes, and at one sentence a step ONNX Runtime spends more time running them than the matrix products. The same
math with constant shapes needs none of them. ``step_attention`` patches the decoder's attentions while the step
is traced; every other call (the encoder, a full-sequence pass, a form this does not cover) goes to fairseq's.

    self attention:  q, k, v [N, H, 1, D]; k, v appended to the cached prev_key / prev_value [N, H, t, D]
    cross attention: the memory prev_key / prev_value [B, H, S, D] is held once per sentence; the N = B * K rows
                     (row r: sentence r // K) query it K at a time, q [B, H, K, D]; padded keys -> -inf
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from fairseq.modules import MultiheadAttention
from torch import Tensor, nn


def _covered(m: MultiheadAttention, query: Tensor, key_padding_mask: Optional[Tensor], incremental_state,
             need_weights: bool, static_kv: bool, attn_mask: Optional[Tensor], before_softmax: bool,
             need_head_weights: bool) -> bool:
    """The single-step forms written here: self attention without a padding mask, or cross attention on memory."""
    if (incremental_state is None or query.size(0) != 1 or need_weights or need_head_weights or before_softmax
            or attn_mask is not None or m.bias_k is not None or m.add_zero_attn):
        return False
    saved = m._get_input_buffer(incremental_state)
    if m.self_attention:
        return key_padding_mask is None and "prev_key" in saved
    return m.encoder_decoder_attention and static_kv and "prev_key" in saved and key_padding_mask is None


def _step(m: MultiheadAttention, query: Tensor, incremental_state) -> Tensor:
    """query 1 x N x C -> 1 x N x C; the cache in ``incremental_state`` grows by one frame for self attention."""
    heads, dim = m.num_heads, m.head_dim
    saved = m._get_input_buffer(incremental_state)
    q = m.q_proj(query) * m.scaling  # [1, N, H*D]; query stays 3-D: MatMul, not Gemm
    if m.self_attention:
        q = q.reshape(-1, heads, 1, dim)  # [N, H, 1, D]
        k = torch.cat([saved["prev_key"], m.k_proj(query).reshape(-1, heads, 1, dim)], dim=2)  # [N, H, t + 1, D]
        v = torch.cat([saved["prev_value"], m.v_proj(query).reshape(-1, heads, 1, dim)], dim=2)
        saved["prev_key"], saved["prev_value"] = k, v
        m._set_input_buffer(incremental_state, saved)
        mask = None
    else:
        k, v, mask = saved["prev_key"], saved["prev_value"], saved.get("prev_key_padding_mask")  # [B, H, S, D]
        sentences = saved.get("sentences", k.size(0))  # B (export/graphs.py puts it there, out of this scope)
        q = q.reshape(sentences, -1, heads, dim).transpose(1, 2)  # [B, K, H, D] -> [B, H, K, D]
    scores = torch.matmul(q, k.transpose(2, 3))  # [N, H, 1, t] | [B, H, K, S]
    if mask is not None:
        scores = scores.masked_fill(mask.to(torch.bool)[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).type_as(scores)
    attn = torch.matmul(probs, v)  # [N, H, 1, D] | [B, H, K, D]
    if not m.self_attention:
        attn = attn.transpose(1, 2)  # [B, K, H, D]
    return m.out_proj(attn.reshape(1, -1, heads * dim))  # [1, N, H*D], heads in fairseq's order


@contextlib.contextmanager
def step_attention(module: nn.Module) -> Iterator[None]:
    """While inside, every fairseq MultiheadAttention in ``module`` takes ``_step`` for the forms it covers."""
    patched = [m for m in module.modules() if isinstance(m, MultiheadAttention)]

    def forward_of(m: MultiheadAttention):
        fairseq_forward = m.forward

        def forward(query, key, value, key_padding_mask=None, incremental_state=None, need_weights=True,
                    static_kv=False, attn_mask=None, before_softmax=False, need_head_weights=False):
            if _covered(m, query, key_padding_mask, incremental_state, need_weights, static_kv, attn_mask,
                        before_softmax, need_head_weights):
                return _step(m, query, incremental_state), None
            return fairseq_forward(query, key, value, key_padding_mask, incremental_state, need_weights, static_kv,
                                   attn_mask, before_softmax, need_head_weights)
        return forward

    for m in patched:
        m.forward = forward_of(m)
    try:
        yield
    finally:
        for m in patched:
            del m.forward  # the class's forward again
