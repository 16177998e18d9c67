"""The whole beam search in one ONNX Runtime call per batch: a model dir's two graphs under ONNX Runtime's
``BeamSearch`` contrib op (com.microsoft, its T5 encoder-decoder contract), so no Python runs between steps.

``search_graph`` builds the op's model in memory from the dir's graphs (the dir is untouched, its hashes still
hold), renamed to the contract, less what the op does itself:
    encoder   encoder_input_ids int32 [B, S], encoder_attention_mask int32 [B, S]
              -> present_{key,value}_cross_i: the dir's cross-attention memory, one pair per layer
    decoder   input_ids int32 [N, 1], encoder_attention_mask int32 [N, S], past_{key,value}_self_i (the dir's
              states), past_{key,value}_cross_i (its memory) -> logits [N, 1, V] (the step's scores before its
              log-softmax), present_{key,value}_self_i (its next states)
The step index is the length of the first state (a cache that grows by one a step). The op reorders the states
between steps, so the step's ``order`` is the identity (its Gathers over the states are dropped); it takes the
log-softmax and chooses the candidates itself (the step's LogSoftmax and candidates subgraph are left out).

What it keeps of fairseq's search (export/search.py): the target starts with eos; pad is never produced (the
op's vocabulary mask); the top 2·beam candidates a step, an eos among the first beam of them finishes a
hypothesis, a sentence is done with beam of them (``early_stopping``); a hypothesis scores its summed log-prob /
len ** lenpen with len counting the eos; eos is forbidden before ``min_len`` and the length is capped at
``int(max_len_a * S + max_len_b)`` with S the padded source width. Where it departs: at the length cap the op
ends the open beams as they are, where fairseq forces an eos and scores it; finished sentences stay in the batch
until all are done; ``unk_penalty`` has no counterpart (refused). Measured against our search in the README.

Only decoders whose states pair up with the memory are served: as many states as cross-attention tensors, rows
first, the first of them a self-attention cache [N, heads, steps, head dim] (the Transformer family). Others
(LSRA's convolution states, linear attention's running sums) get one line naming why.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from export.model_dir import ModelDir, ModelDirError
from export.search import SearchOptions

DOMAIN = "com.microsoft"


class OrtSearchError(ModelDirError):
    """A model or search option that ONNX Runtime's BeamSearch op cannot serve."""


def check_search_options(options: SearchOptions) -> None:
    if options.unk_penalty:
        raise OrtSearchError("--search ort: ONNX Runtime's BeamSearch has no unk penalty; use --search fairseq")


def refusal(description: dict) -> str | None:
    """Why the BeamSearch op cannot run a model dir's graphs (one line, from its model.json), or None when it can."""
    states = description["states"]
    memory = description["io"]["encoder"]["outputs"][1:]
    first = states[0] if states else {}
    if (states and len(states) == len(memory) and len(states) % 2 == 0 and all(s["batch_axis"] == 0 for s in states)
            and len(first["shape"]) == 4 and first["time_axis"] == 2 and first["shape"][2] == 0):
        return None
    kinds = sorted({s["field"] or s["key"] for s in states})
    return (f"{description['arch']}: ONNX Runtime's BeamSearch takes decoders whose states are self-attention caches "
            f"paired with the cross-attention memory (the Transformer family); this one carries {len(states)} states "
            f"({', '.join(kinds)}) beside {len(memory)} memory tensors: use --search fairseq")


def _layout(description: dict) -> tuple[list[str], list[str], int, int]:
    """(state names, memory names, heads, head dim), or OrtSearchError saying why the contract does not fit."""
    reason = refusal(description)
    if reason:
        raise OrtSearchError(reason)
    states = description["states"]
    shape = states[0]["shape"]
    return [s["name"] for s in states], description["io"]["encoder"]["outputs"][1:], shape[1], shape[3]


def _prune(graph, outputs: list) -> None:
    """Keep only the nodes and initializers that ``outputs`` need; set them as the graph's outputs."""
    needed = {o.name for o in outputs}
    live = []
    for node in reversed(list(graph.node)):
        if any(o in needed for o in node.output):
            live.append(node)
            needed.update(node.input)
    del graph.node[:]
    graph.node.extend(reversed(live))
    kept = [i for i in graph.initializer if i.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    del graph.output[:]
    graph.output.extend(outputs)
    del graph.value_info[:]


def _rename(graph, names: dict[str, str]) -> None:
    for node in graph.node:
        for field in (node.input, node.output):
            renamed = [names.get(x, x) for x in field]
            del field[:]
            field.extend(renamed)


def _contract_names(names: list[str], io: str, kind: str) -> dict[str, str]:
    """The contract's name of each of ``names``, taken as key, value of layer 0, key, value of layer 1, ...:
    ``{io}_{key|value}_{kind}_{layer}``."""
    return {name: f"{io}_{('key', 'value')[i % 2]}_{kind}_{i // 2}" for i, name in enumerate(names)}


def _decoder(model, description: dict, states: list[str], memory: list[str], heads: int, head_dim: int):
    """The decoder step (an ``onnx.ModelProto``, changed in place) as the contract's decoder graph."""
    from onnx import TensorProto, helper

    graph = model.graph
    past, cross = _contract_names(states, "past", "self"), _contract_names(memory, "past", "cross")
    present = {f"{s}.next": p.replace("past_", "present_") for s, p in past.items()}
    reorders = {n.output[0]: n.input[0] for n in graph.node  # Gather(state, order) on rows: the identity here
                if n.op_type == "Gather" and list(n.input)[1:] == ["order"] and n.input[0] in past
                and all(a.name != "axis" or a.i == 0 for a in n.attribute)}
    body = [n for n in graph.node if n.output[0] not in reorders]
    const = lambda name, values: helper.make_node(  # noqa: E731
        "Constant", [], [name], value=helper.make_tensor(name, TensorProto.INT64, [len(values)], values))
    head = [
        helper.make_node("Cast", ["input_ids"], ["input_ids.int64"], to=TensorProto.INT64),
        const("ort_search.flat", [-1]),
        helper.make_node("Reshape", ["input_ids.int64", "ort_search.flat"], ["tokens"]),  # [N]
        helper.make_node("Shape", ["past_key_self_0"], ["ort_search.steps"], start=2, end=3),
        helper.make_node("Squeeze", ["ort_search.steps"], ["step"]),  # the tokens so far: the step's index
        helper.make_node("Shape", ["tokens"], ["ort_search.rows"]),
        helper.make_node("Squeeze", ["ort_search.rows"], ["ort_search.n"]),
        helper.make_node("Range", ["ort_search.zero", "ort_search.n", "ort_search.one"], ["order"]),
        helper.make_node("Cast", ["encoder_attention_mask"], ["ort_search.real"], to=TensorProto.BOOL),
        helper.make_node("Not", ["ort_search.real"], ["encoder_padding_mask"]),  # [N, S] True at pads
    ]
    graph.initializer.extend([helper.make_tensor("ort_search.zero", TensorProto.INT64, [], [0]),
                              helper.make_tensor("ort_search.one", TensorProto.INT64, [], [1])])
    made = {o: n for n in graph.node for o in n.output}
    scores = made["log_probs"].input[0] if made["log_probs"].op_type == "LogSoftmax" else "log_probs"  # the op
    tail = [const("ort_search.axis1", [1]),  # takes the log-softmax itself
            helper.make_node("Unsqueeze", [scores, "ort_search.axis1"], ["logits"])]
    del graph.node[:]
    graph.node.extend(head + body + tail)
    _rename(graph, reorders)
    _rename(graph, {**past, **cross, **present})
    f, vocab = TensorProto.FLOAT, description["vocab_size"]
    cache = lambda name, steps: helper.make_tensor_value_info(name, f, ["N", heads, steps, head_dim])  # noqa: E731
    del graph.input[:]
    graph.input.extend([helper.make_tensor_value_info("input_ids", TensorProto.INT32, ["N", 1]),
                        helper.make_tensor_value_info("encoder_attention_mask", TensorProto.INT32, ["N", "S"]),
                        *(cache(p, "steps") for p in past.values()),
                        *(helper.make_tensor_value_info(c, f, None) for c in cross.values())])
    _prune(graph, [helper.make_tensor_value_info("logits", f, ["N", 1, vocab]),
                   *(cache(p, "steps + 1") for p in present.values())])
    left = {x for n in graph.node for x in n.input} - {i.name for i in graph.input} - \
        {i.name for i in graph.initializer} - {o for n in graph.node for o in n.output} - {""}
    if left:
        raise OrtSearchError(f"{description['arch']}: its decoder step needs {sorted(left)}, which ONNX Runtime's "
                             "BeamSearch does not feed: use --search fairseq")
    graph.name = "decoder"
    return graph


def _encoder(model, memory: list[str], heads: int, head_dim: int):
    """The encoder (an ``onnx.ModelProto``, changed in place) as the contract's encoder graph."""
    from onnx import TensorProto, helper

    graph = model.graph
    present = _contract_names(memory, "present", "cross")
    _rename(graph, present)
    graph.node.insert(0, helper.make_node("Cast", ["encoder_input_ids"], ["src_tokens"], to=TensorProto.INT64))
    del graph.input[:]  # the padding mask comes from the pad tokens, as in the dir's encoder
    graph.input.extend([helper.make_tensor_value_info(n, TensorProto.INT32, ["B", "S"])
                        for n in ("encoder_input_ids", "encoder_attention_mask")])
    _prune(graph, [helper.make_tensor_value_info(p, TensorProto.FLOAT, ["B", heads, "S", head_dim])
                   for p in present.values()])  # the op reads heads and head dim off the first
    graph.name = "encoder"
    return graph


def search_graph(graphs: dict[str, Path], description: dict, no_repeat_ngram_size: int = 0):
    """A model dir's encoder and decoder step (``ModelDir.readable_graphs``) under one ``BeamSearch`` node, an
    ``onnx.ModelProto`` whose weights stay where the graphs keep them (external data beside them: pass that folder to
    ONNX Runtime as ``session.model_external_initializers_file_folder_path``).

    Inputs: input_ids int32 [B, S], max_length, min_length, num_beams, num_return_sequences int32 [1],
    length_penalty, repetition_penalty float32 [1], vocab_mask int32 [V], attention_mask int32 [B, S].
    Outputs: sequences int32 [B, R, L] (the leading eos, the tokens, pad after the end), sequences_scores [B, R]."""
    import onnx
    from onnx import TensorProto, helper

    d = description
    states, memory, heads, head_dim = _layout(d)
    encoder_model, decoder_model = (onnx.load(str(graphs[g]), load_external_data=False)
                                    for g in ("encoder", "decoder_step"))
    cross = next(i for i in decoder_model.graph.input if i.name == memory[0]).type.tensor_type.shape.dim
    encoder = _encoder(encoder_model, memory, cross[1].dim_value, cross[3].dim_value)
    decoder = _decoder(decoder_model, d, states, memory, heads, head_dim)
    node = helper.make_node(
        "BeamSearch", ["input_ids", "max_length", "min_length", "num_beams", "num_return_sequences", "length_penalty",
                       "repetition_penalty", "vocab_mask", "", "attention_mask"],
        ["sequences", "sequences_scores"], domain=DOMAIN, model_type=1, early_stopping=1,
        eos_token_id=d["eos"], pad_token_id=d["pad"], decoder_start_token_id=d["eos"], vocab_size=d["vocab_size"],
        no_repeat_ngram_size=no_repeat_ngram_size, encoder=encoder, decoder=decoder)
    i32, f32 = TensorProto.INT32, TensorProto.FLOAT
    scalar = lambda name, kind: helper.make_tensor_value_info(name, kind, [1])  # noqa: E731
    graph = helper.make_graph(
        [node], "beam_search",
        [helper.make_tensor_value_info("input_ids", i32, ["B", "S"]), scalar("max_length", i32),
         scalar("min_length", i32), scalar("num_beams", i32), scalar("num_return_sequences", i32),
         scalar("length_penalty", f32), scalar("repetition_penalty", f32),
         helper.make_tensor_value_info("vocab_mask", i32, [d["vocab_size"]]),
         helper.make_tensor_value_info("attention_mask", i32, ["B", "S"])],
        [helper.make_tensor_value_info("sequences", i32, ["B", "R", "L"]),
         helper.make_tensor_value_info("sequences_scores", f32, ["B", "R"])])
    opsets = {o.domain: o.version for m in (encoder_model, decoder_model) for o in m.opset_import}
    opsets.setdefault(DOMAIN, 1)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid(k, v) for k, v in opsets.items()],
                             ir_version=decoder_model.ir_version)


class OrtBeamSearch:
    """A model dir's beam search as one ONNX Runtime session (``search_graph``); ``search`` runs a batch."""

    def __init__(self, model_dir: ModelDir, session_options, no_repeat_ngram_size: int = 0):
        import onnxruntime as ort

        self.description = d = model_dir.description
        self.no_repeat_ngram_size = no_repeat_ngram_size
        with model_dir.readable_graphs() as graphs:  # the weights are read by ONNX Runtime alone, once
            model = search_graph(graphs, d, no_repeat_ngram_size).SerializeToString()
            session_options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                                     str(graphs["encoder"].parent))
            self.session = ort.InferenceSession(model, session_options, providers=["CPUExecutionProvider"])
        self.vocab_mask = np.ones(d["vocab_size"], dtype=np.int32)
        self.vocab_mask[d["pad"]] = 0  # pad is never produced

    def search(self, src_tokens: np.ndarray, options: SearchOptions, max_len_cap: int | None) -> list[np.ndarray]:
        """src_tokens int64 [B, S], left-padded, rows ending in eos -> each sentence's best hypothesis, int64 tokens
        ending in eos (unless it reached the length cap: max_len + 1 tokens, no eos)."""
        check_search_options(options)
        if options.no_repeat_ngram_size != self.no_repeat_ngram_size:
            raise OrtSearchError("--search ort: no_repeat_ngram_size is fixed when the search graph is built "
                                 f"({self.no_repeat_ngram_size}), not {options.no_repeat_ngram_size}")
        d = self.description
        max_len = int(options.max_len_a * src_tokens.shape[1] + options.max_len_b)
        if max_len_cap is not None:
            max_len = min(max_len, max_len_cap)
        ints = lambda value: np.array([value], dtype=np.int32)  # noqa: E731
        sequences, _ = self.session.run(None, {
            "input_ids": src_tokens.astype(np.int32),
            "max_length": ints(max_len + 2),  # the leading eos, max_len tokens, the final eos
            "min_length": ints(options.min_len + 1),  # the op counts the leading eos
            "num_beams": ints(options.beam), "num_return_sequences": ints(1),
            "length_penalty": np.array([options.lenpen], dtype=np.float32),
            "repetition_penalty": np.array([1.0], dtype=np.float32), "vocab_mask": self.vocab_mask,
            "attention_mask": (src_tokens != d["pad"]).astype(np.int32)})
        best = []
        for row in sequences[:, 0, 1:].astype(np.int64):  # [max_len + 1] each: the tokens, then pad
            pads = np.flatnonzero(row == d["pad"])
            tokens = row[:pads[0]] if pads.size else row
            # the op leaves out the eos that ended a hypothesis; one that reached the cap has none
            best.append(np.append(tokens, d["eos"]) if len(tokens) <= max_len else tokens)
        return best
