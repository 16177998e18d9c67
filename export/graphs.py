"""The two graphs a translator needs, as torch modules ready to trace: the encoder and one decoder step.

    encoder:      src_tokens [B, S] (left-padded)
                  -> encoder_padding_mask [B, S], memory.<layer>.prev_key / prev_value [B, H, S, D] per cross attention
    decoder step: tokens [N], step [] (0-based), order [N], encoder_padding_mask [B, S], memory..., state...
                  -> log_probs [N, V], state... (the next step's)

N = B * K rows, K hypotheses per sentence (row r belongs to sentence r // K); the encoder's outputs are fed to
every step as they came, once per sentence (cross attention groups the rows by sentence, export/step_attention.py).

Every piece of the decoder's incremental state is an explicit input and output (``StateSpec``). What a lite
mechanism keeps before the first step it declares itself (``initial_state``, ``lite.modules.incremental.Stateful``);
fairseq's own MultiheadAttention is described here. The graph has no "no state yet" branch. ``order`` gathers the states by hypothesis before
the step (beam search's reordering, inside the graph: no copies outside it).
"""
from __future__ import annotations

from dataclasses import asdict
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from fairseq.modules import MultiheadAttention
from torch import Tensor, nn

from export.model_dir import StateSpec
from export.step_attention import grouping
from lite.modules.incremental import Stateful, StateSlot

State = Dict[str, object]  # fairseq's incremental state: "<module id>.<key>" -> Tensor | {field: Tensor}


def initial_state(module: nn.Module, batch: int, like: Tensor) -> Optional[Dict[StateSlot, Tensor]]:
    """The state ``module`` decodes from at step 0, or None for a module that keeps none. fairseq's self attention:
    key/value caches [B, H, t, D], empty (they grow by one frame a step); cross attention reads the memory."""
    if isinstance(module, MultiheadAttention):
        if not module.self_attention:
            return None
        empty = like.new_zeros(batch, module.num_heads, 0, module.head_dim)
        return {("attn_state", "prev_key"): empty, ("attn_state", "prev_value"): empty}
    if isinstance(module, Stateful):
        return module.initial_state(batch, like) or None
    return None


def memory_state(m: MultiheadAttention, memory: Tensor, padding_mask: Tensor) -> Dict[StateSlot, Tensor]:
    """Cross attention's static keys/values from the encoder output, laid out as fairseq caches them.

    Shape: memory S x B x C, padding mask B x S -> prev_key, prev_value [B, H, S, D], prev_key_padding_mask [B, S].
    """
    batch = memory.size(1)

    def heads(x: Tensor) -> Tensor:  # [S, B, C] -> [B, H, S, D]
        return x.contiguous().view(-1, batch * m.num_heads, m.head_dim).transpose(0, 1).reshape(
            batch, m.num_heads, -1, m.head_dim)

    return {("attn_state", "prev_key"): heads(m.k_proj(memory)), ("attn_state", "prev_value"): heads(m.v_proj(memory)),
            ("attn_state", "prev_key_padding_mask"): padding_mask}


def _put(state: State, module: nn.Module, key: str, field: Optional[str], tensor: Tensor) -> None:
    if field is None:
        module.set_incremental_state(state, key, tensor)
    else:
        buffer = module.get_incremental_state(state, key) or {}
        buffer[field] = tensor
        module.set_incremental_state(state, key, buffer)


def _get(state: State, module: nn.Module, key: str, field: Optional[str]) -> Tensor:
    value = module.get_incremental_state(state, key)
    return value if field is None else value[field]


def cross_attentions(decoder: nn.Module) -> List[Tuple[str, MultiheadAttention]]:
    return [(name, m) for name, m in decoder.named_modules()
            if isinstance(m, MultiheadAttention) and m.encoder_decoder_attention]


def _constant(t: Tensor) -> float:
    if t.numel() and not bool((t == t.flatten()[0]).all()):
        raise ValueError("an initial decoder state must be constant-filled to be described by one value")
    return float(t.flatten()[0]) if t.numel() else 0.0


def state_specs(decoder: nn.Module) -> List[StateSpec]:
    """Every self state of the decoder, in module order; axes found by building it at batch 1 and 2
    and by taking one step."""
    like = next(decoder.parameters())
    specs = []
    for name, module in decoder.named_modules():
        one, two = initial_state(module, 1, like), initial_state(module, 2, like)
        if one is None:
            continue
        for (key, field), t in one.items():
            batch_axis = next(i for i, (a, b) in enumerate(zip(t.shape, two[(key, field)].shape)) if a != b)
            specs.append(StateSpec(
                name=f"state.{name}.{key if field is None else field}", module=name, key=key, field=field,
                dtype=str(t.dtype).replace("torch.", ""), shape=tuple(t.shape), batch_axis=batch_axis,
                time_axis=None, fill=_constant(t)))
    return _with_time_axes(decoder, specs)


def _with_time_axes(decoder: nn.Module, specs: List[StateSpec]) -> List[StateSpec]:
    """Mark the axis of each state that grows when a step is taken."""
    state = initial_states(decoder, specs, 1)
    _, after = DecoderStep(decoder, specs)._run(torch.tensor([decoder.dictionary.eos()]), torch.tensor(0),
                                                torch.zeros(1, dtype=torch.long), _dummy_memory(decoder), state)
    marked = []
    for spec, t in zip(specs, after):
        grown = [i for i, (a, b) in enumerate(zip(spec.shape, t.shape)) if a != b]
        marked.append(StateSpec(**{**asdict(spec), "time_axis": grown[0] if grown else None}))
    return marked


def _dummy_memory(decoder: nn.Module, batch: int = 1, length: int = 2) -> Dict[str, Tensor]:
    """Memory inputs of a random encoder output, for probing."""
    like = next(decoder.parameters())
    memory = torch.randn(length, batch, decoder.embed_tokens.embedding_dim, dtype=like.dtype)
    mask = torch.zeros(batch, length, dtype=torch.bool)
    return memory_inputs(decoder, memory, mask)


def initial_states(decoder: nn.Module, specs: List[StateSpec], batch: int) -> List[Tensor]:
    """The state tensors before the first step, for ``batch`` rows (as a runtime builds them from the specs)."""
    out = []
    for spec in specs:
        out.append(torch.full(spec.initial_shape(batch), spec.fill, dtype=getattr(torch, spec.dtype)))
    return out


def memory_names(decoder: nn.Module) -> List[str]:
    return [f"memory.{name}.{field}" for name, _ in cross_attentions(decoder) for field in ("prev_key", "prev_value")]


def memory_inputs(decoder: nn.Module, memory: Tensor, padding_mask: Tensor) -> Dict[str, Tensor]:
    """Cross attention keys/values of every decoder layer: {memory name: [B, H, S, D]} and the padding mask."""
    out = {"encoder_padding_mask": padding_mask}
    for name, m in cross_attentions(decoder):
        cached = memory_state(m, memory, padding_mask)
        for field in ("prev_key", "prev_value"):
            out[f"memory.{name}.{field}"] = cached[("attn_state", field)]
    return out


class Encoder(nn.Module):
    """src_tokens [B, S] -> encoder_padding_mask [B, S], then the memory tensors in ``memory_names`` order."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.encoder, self.decoder = model.encoder, model.decoder

    def forward(self, src_tokens: Tensor) -> Tuple[Tensor, ...]:
        out = self.encoder(src_tokens)
        inputs = memory_inputs(self.decoder, out["encoder_out"][0], out["encoder_padding_mask"][0])
        return tuple(inputs.values())


class DecoderStep(nn.Module):
    """(tokens [N], step [], order [N], encoder_padding_mask [B, S], *memory [B, ...], *state) -> (log_probs [N, V],
    *state); N a multiple of B."""

    def __init__(self, decoder: nn.Module, specs: List[StateSpec]):
        super().__init__()
        self.decoder, self.specs = decoder, specs
        self.vocab = decoder.output_projection.out_features  # a constant in the graph
        self.crosses = cross_attentions(decoder)
        self.owners = dict(decoder.named_modules())

    def _run(self, tokens: Tensor, step: Tensor, order: Tensor, memory: Dict[str, Tensor],
             states: List[Tensor]) -> Tuple[Tensor, List[Tensor]]:
        incremental: State = {}
        for spec, tensor in zip(self.specs, states):
            _put(incremental, self.owners[spec.module], spec.key, spec.field, tensor)
        self.decoder.reorder_incremental_state_scripting(incremental, order)
        mask = memory["encoder_padding_mask"]  # [B, S]
        groups, keep = grouping(mask), mask.eq(0).to(torch.int32)  # once here, not in every cross attention
        for name, m in self.crosses:  # after the reordering: the memory is per sentence, whatever the rows do
            for field in ("prev_key", "prev_value"):
                _put(incremental, m, "attn_state", field, memory[f"memory.{name}.{field}"])
            _put(incremental, m, "attn_state", "prev_key_padding_mask", memory["encoder_padding_mask"])
            _put(incremental, m, "attn_state", "grouping", groups)
            _put(incremental, m, "attn_state", "keep", keep)
        features = self.decoder.decode_step(tokens, step, incremental)  # [N, 1, C]
        logits = self.decoder.output_layer(features).reshape(-1, self.vocab)  # [N, V]: a view, where [:, 0] copies
        log_probs = F.log_softmax(logits.float(), dim=-1)
        return log_probs, [_get(incremental, self.owners[s.module], s.key, s.field) for s in self.specs]

    def forward(self, tokens: Tensor, step: Tensor, order: Tensor, encoder_padding_mask: Tensor,
                *memory_and_states: Tensor) -> Tuple[Tensor, ...]:
        names = memory_names(self.decoder)
        memory = dict(zip(names, memory_and_states[:len(names)]), encoder_padding_mask=encoder_padding_mask)
        log_probs, states = self._run(tokens, step, order, memory, list(memory_and_states[len(names):]))
        return (log_probs, *states)
