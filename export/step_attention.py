"""fairseq's MultiheadAttention for one decoding step, as one ONNX Runtime kernel per attention.

fairseq's forward computes every reshape from the traced input sizes (``bsz * num_heads`` ...), which the ONNX
exporter records as Shape -> Gather -> Unsqueeze -> Concat chains, and even written with constant shapes an attention
step is a dozen small kernels (reshapes, concatenations, transposes, two matrix products, the mask, the softmax),
each costing ONNX Runtime a few microseconds at one sentence. ``step_attention`` patches the decoder's attentions
while the step is traced so that each becomes one ``com.microsoft.MultiHeadAttention`` node (ONNX Runtime's contrib
op, in every CPU build): traced as a ``lite.StepAttention`` node (the TorchScript exporter cannot leave an optional
input empty), then rewritten by ``contrib_attention``. Self attention's q, k, v projections run as one matrix
product (one int8 MatMul once quantized). In PyTorch the same step runs as the plain math below. Every other call
(the encoder, a full-sequence pass, a form this does not cover) goes to fairseq's.

    self attention:  q, k, v [N, 1, H*D]; k, v appended to the cached prev_key / prev_value [N, H, t, D]
    cross attention: the memory prev_key / prev_value [B, H, S, D] is held once per sentence; the N = B * K rows
                     (row r: sentence r // K) query it K at a time, q [B, K, H*D]; padded keys are left out
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
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


# The two steps' PyTorch bodies take no sizes off their inputs: the tracer records a body beside its node, and with a
# single head its sizes break the TorchScript exporter ("Argument passed to at() was not in the map").
def _attend(q: Tensor, k: Tensor, v: Tensor, keep: Optional[Tensor], heads: int, scaling: float) -> Tensor:
    """q [B, L, H*D] against k, v [B, H, S, D] (keep [B, S]: 1 for a key to attend to) -> [B, L, H*D]."""
    q = (q * scaling).unflatten(2, (heads, -1)).transpose(1, 2)  # [B, H, L, D]
    scores = torch.matmul(q, k.transpose(2, 3))  # [B, H, L, S]
    if keep is not None:
        scores = scores.masked_fill(keep.eq(0)[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).type_as(scores)
    return torch.matmul(probs, v).transpose(1, 2).flatten(2)  # [B, L, H*D]


class _SelfAttentionStep(torch.autograd.Function):
    """q, k, v [N, 1, H*D] (projected), prev_key, prev_value [N, H, t, D] -> out [N, 1, H*D], key, value [N, H, t+1, D]."""

    @staticmethod
    def forward(ctx, q, k, v, prev_key, prev_value, heads: int, scaling: float):
        key = torch.cat([prev_key, k.unflatten(2, (heads, -1)).transpose(1, 2)], dim=2)
        value = torch.cat([prev_value, v.unflatten(2, (heads, -1)).transpose(1, 2)], dim=2)
        return _attend(q, key, value, None, heads, scaling), key, value

    @staticmethod
    def symbolic(g, q, k, v, prev_key, prev_value, heads: int, scaling: float):
        return g.op("lite::StepAttention", q, k, v, prev_key, prev_value, num_heads_i=heads, scale_f=scaling,
                    outputs=3)


class _CrossAttentionStep(torch.autograd.Function):
    """q [1, N, H*D] (projected), groups int64 [3] = (B, -1, 0), memory key, value [B, H, S, D], keep int32 [B, S]
    -> out [B, K, H*D]: the rows grouped by sentence (ONNX Reshape: 0 keeps that axis), K queries per sentence."""

    @staticmethod
    def forward(ctx, q, groups, key, value, keep, heads: int, scaling: float):
        return _attend(q.squeeze(0).unflatten(0, (int(groups[0]), -1)), key, value, keep, heads, scaling)

    @staticmethod
    def symbolic(g, q, groups, key, value, keep, heads: int, scaling: float):
        return g.op("lite::StepAttention", g.op("Reshape", q, groups), key, value, keep, num_heads_i=heads,
                    scale_f=scaling)


def grouping(padding_mask: Tensor) -> Tensor:
    """The rows' grouping by sentence for cross attention, int64 [3] = (B, -1, 0), from the memory's padding mask
    [B, S]; built once per step and shared by every cross attention (``_shape_as_tensor``: traced as Shape, not as
    a constant)."""
    return torch.cat([torch._shape_as_tensor(padding_mask)[:1], torch.tensor([-1, 0])])


def _fused(x: Tensor, projections) -> tuple:
    """The projections of ``x`` as one matrix product (their weights concatenated; the exporter folds that into one
    initializer), split again: one int8 MatMul for three once quantized."""
    weight = torch.cat([p.weight for p in projections])  # [sum of outputs, C]
    bias = None if projections[0].bias is None else torch.cat([p.bias for p in projections])
    return F.linear(x, weight, bias).split([p.out_features for p in projections], dim=-1)


def _step(m: MultiheadAttention, query: Tensor, incremental_state) -> Tensor:
    """query 1 x N x C -> 1 x N x C; the cache in ``incremental_state`` grows by one frame for self attention."""
    saved = m._get_input_buffer(incremental_state)
    if m.self_attention:
        x = query.transpose(0, 1)  # [N, 1, C]
        q, k, v = _fused(x, (m.q_proj, m.k_proj, m.v_proj))  # [N, 1, H*D] each
        attn, saved["prev_key"], saved["prev_value"] = _SelfAttentionStep.apply(
            q, k, v, saved["prev_key"], saved["prev_value"], m.num_heads, m.scaling)
        m._set_input_buffer(incremental_state, saved)
        return m.out_proj(attn).transpose(0, 1)  # [1, N, C]
    key, value = saved["prev_key"], saved["prev_value"]  # [B, H, S, D]
    if "keep" in saved:  # put there by export/graphs.py, once for every cross attention
        groups, keep = saved["grouping"], saved["keep"]
    else:
        groups, keep = grouping(saved["prev_key_padding_mask"]), saved["prev_key_padding_mask"].eq(0).to(torch.int32)
    attn = _CrossAttentionStep.apply(m.q_proj(query), groups, key, value, keep, m.num_heads, m.scaling)  # [B, K, H*D]
    return m.out_proj(attn).reshape(1, -1, m.out_proj.out_features)  # [1, N, C]


def contrib_attention(model) -> None:
    """Rewrite the traced ``lite.StepAttention`` nodes of an ``onnx.ModelProto`` (in place) as ONNX Runtime's
    ``com.microsoft.MultiHeadAttention``: inputs (query, key, value, bias, key_padding_mask, attention_bias, past_key,
    past_value), the unused ones left empty."""
    from onnx import helper

    for node in model.graph.node:  # attributes num_heads and scale as traced
        if node.domain != "lite" or node.op_type != "StepAttention":
            continue
        q, k, v, *rest = node.input
        self_attention = len(rest) == 2  # past key and value; cross attention has the keep mask
        del node.input[:]
        node.input.extend([q, k, v, "", "", "", *rest] if self_attention else [q, k, v, "", *rest])
        node.domain, node.op_type = "com.microsoft", "MultiHeadAttention"
    imports = [o for o in model.opset_import if o.domain != "lite"]
    del model.opset_import[:]
    model.opset_import.extend([*imports, helper.make_opsetid("com.microsoft", 1)])


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
