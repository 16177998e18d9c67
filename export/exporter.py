"""``lite export CHECKPOINT --out DIR [--slim] [--ort]``: a self-contained model dir for ONNX Runtime.

    DIR/encoder.onnx, DIR/decoder_step.onnx   the graphs (export/graphs.py), opset 17, dynamic batch and lengths
    DIR/*.ort                                 with --ort: the same graphs in ORT format (ONNX Runtime Mobile)
    DIR/spm.model, DIR/vocab.txt              sentencepiece model; the dictionary, one symbol per line by index
    DIR/model.json                            what the runtime needs: special ids, limits, the decoder states,
                                              the validation report and the sha256 of every file; and the
                                              model's MACs (the paper's protocol: a pruned model has fewer)

The TorchScript exporter (``dynamo=False``) traces the modules as written (our convolutions build their
windows with pad + slices), but for fairseq's attention in the decoder step: one ONNX Runtime MultiHeadAttention
kernel each (export/step_attention.py). Every graph is checked with ``onnx.checker`` and then validated against
PyTorch (export/validate.py) before the dir is moved into place.
"""
from __future__ import annotations

import copy
import logging
import shutil
import warnings
from pathlib import Path
from typing import Dict, List

import torch

from export import candidates
from export.graphs import DecoderStep, Encoder, initial_states, memory_names, state_specs
from export.model_dir import FORMAT, GRAPHS, StateSpec, stage, write_description
from export.ort_format import to_ort
from export.step_attention import contrib_attention, step_attention
from export.validate import ExportMismatch, onnx_runner, sources, validate
from lite.errors import LiteError

logger = logging.getLogger(__name__)

OPSET = 17


class ExportError(LiteError, ValueError):
    """A model or model dir that cannot be exported or loaded; the message names the file and the problem."""


def _io_names(decoder, specs: List[StateSpec]) -> Dict[str, Dict[str, List[str]]]:
    memory = memory_names(decoder)
    return {
        "encoder": {"inputs": ["src_tokens"], "outputs": ["encoder_padding_mask", *memory]},
        "decoder_step": {"inputs": ["tokens", "step", "order", "encoder_padding_mask", *memory,
                                    *(s.name for s in specs), *candidates.INPUTS],
                         "outputs": ["log_probs", *(s.name + ".next" for s in specs), *candidates.OUTPUTS]},
    }


def _dynamic_axes(decoder, specs: List[StateSpec]) -> Dict[str, Dict[str, Dict[int, str]]]:
    memory = {name: {0: "sentences", 2: "src_len"} for name in memory_names(decoder)}
    states, next_states = {}, {}
    for s in specs:
        states[s.name] = {s.batch_axis: "batch"}
        next_states[s.name + ".next"] = {s.batch_axis: "batch"}
        if s.time_axis is not None:
            states[s.name][s.time_axis] = "steps"
            next_states[s.name + ".next"][s.time_axis] = "steps_next"
    return {
        "encoder": {"src_tokens": {0: "sentences", 1: "src_len"},
                    "encoder_padding_mask": {0: "sentences", 1: "src_len"}, **memory},
        "decoder_step": {"tokens": {0: "batch"}, "order": {0: "batch"},  # batch: rows, a multiple of sentences
                         "encoder_padding_mask": {0: "sentences", 1: "src_len"}, **memory, **states,
                         "log_probs": {0: "batch"}, **next_states},
    }


@torch.no_grad()
def _trace_examples(model, specs: List[StateSpec]):
    """Inputs to trace with: 2 sentences of source length 5 (one padded), 2 hypotheses each, states after 3 steps."""
    generator = torch.Generator().manual_seed(0)
    src = sources(model.decoder.dictionary, 2, 5, generator)
    encoded = Encoder(model)(src)
    mask, memory = encoded[0], list(encoded[1:])
    step = DecoderStep(model.decoder, specs)
    states = initial_states(model.decoder, specs, 4)
    tokens = torch.full((4,), model.decoder.dictionary.eos())
    for t in range(3):
        states = list(step(tokens, torch.tensor(t), torch.arange(4), mask, *memory, *states)[1:])
    return (src,), (tokens, torch.tensor(3), torch.tensor([1, 0, 3, 3]), mask, *memory, *states)


def export_graphs(model, out: Path) -> Dict:
    """Trace, write and check both graphs into ``out``; returns the runtime description (no hashes yet)."""
    model.eval()
    specs = state_specs(model.decoder)
    model.prepare_for_onnx_export_()
    names, axes = _io_names(model.decoder, specs), _dynamic_axes(model.decoder, specs)
    encoder_args, step_args = _trace_examples(model, specs)
    modules = {"encoder": Encoder(model), "decoder_step": DecoderStep(model.decoder, specs)}
    examples = {"encoder": encoder_args, "decoder_step": step_args}
    for graph in GRAPHS:
        path = out / f"{graph}.onnx"
        traced = {k: [n for n in v if n not in candidates.INPUTS and n not in candidates.OUTPUTS]
                  for k, v in names[graph].items()}
        with warnings.catch_warnings(), step_attention(model.decoder):
            warnings.simplefilter("ignore")  # TracerWarnings on shape arithmetic, expected
            torch.onnx.export(modules[graph], examples[graph], str(path), input_names=traced["inputs"],
                              output_names=traced["outputs"], dynamic_axes=axes[graph], opset_version=OPSET,
                              custom_opsets={"lite": 1}, dynamo=False)
        _finish(path, model.decoder.dictionary if graph == "decoder_step" else None)
        check_graph(path)
    return {"states": [s.to_json() for s in specs], "io": names}


def _finish(path: Path, dictionary) -> None:
    """The traced graph's attention steps as ONNX Runtime kernels, its weight Gemms as MatMuls; the decoder step's
    candidates (``dictionary``)."""
    import onnx

    model = onnx.load(str(path))
    contrib_attention(model)
    gemms_as_matmuls(model)
    if dictionary is not None:
        candidates.add_candidates(model, pad=dictionary.pad(), eos=dictionary.eos(), unk=dictionary.unk())
    onnx.save(model, str(path))


def gemms_as_matmuls(model) -> int:
    """Rewrite each Gemm of a constant weight (a Linear on a 2-D input, e.g. one decoder frame) as the exporter
    writes a Linear on a 3-D input: MatMul by the weight transposed once, then Add of the bias. ONNX Runtime's
    dynamic int8 has no integer Gemm, so a Gemm would stay fp32; it fuses MatMul + Add back into Gemm when it
    loads an fp32 graph. Returns how many were rewritten."""
    from onnx import helper, numpy_helper

    graph = model.graph
    weights = {i.name: i for i in graph.initializer}
    nodes, transposed, rewritten = [], set(), 0
    for node in graph.node:
        options = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        plain = options.get("alpha", 1.0) == 1.0 and options.get("beta", 1.0) == 1.0 and not options.get("transA")
        if node.op_type != "Gemm" or node.input[1] not in weights or not plain:
            nodes.append(node)
            continue
        weight = node.input[1]
        if options.get("transB"):  # [out, in] -> [in, out]
            transposed.add(weight)
            weight = f"{weight}.T"
            if weight not in weights:
                weights[weight] = numpy_helper.from_array(
                    numpy_helper.to_array(weights[node.input[1]]).T.copy(), weight)
                graph.initializer.append(weights[weight])
        biased = len(node.input) > 2 and node.input[2] != ""
        product = f"{node.output[0]}.matmul" if biased else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], weight], [product], name=node.name))
        if biased:
            nodes.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=f"{node.name}.bias"))
        rewritten += 1
    del graph.node[:]
    graph.node.extend(nodes)
    used = _names_read(graph) | {o.name for o in graph.output}
    for orphan in [weights[name] for name in transposed - used]:  # now held transposed only
        graph.initializer.remove(orphan)
    return rewritten


def _names_read(graph) -> set[str]:
    """Every name the graph's nodes read, those of nested graphs (If/Loop/Scan bodies read the outer scope) too."""
    from onnx import AttributeProto

    names = set()
    for node in graph.node:
        names.update(node.input)
        for attribute in node.attribute:
            nested = [attribute.g] if attribute.type == AttributeProto.GRAPH else attribute.graphs
            for body in nested:
                names |= _names_read(body)
    return names


def check_graph(path: Path) -> None:
    """onnx.checker with shape inference; an ``ExportError`` naming the file when it fails."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise ExportError(f"{path.name}: fails onnx.checker: {e}") from None


def slim_graphs(out: Path) -> None:
    import onnxslim

    for graph in GRAPHS:
        path = out / f"{graph}.onnx"
        onnxslim.slim(str(path), str(path))


def export(checkpoint: str | Path, out: str | Path, data: str | Path | None = None, slim: bool = False,
           ort: bool = False, force: bool = False) -> Path:
    """Export, validate and write the model dir atomically (a temp dir beside ``out``, renamed at the end)."""
    from eval.macs import paper_macs
    from lite.checkpoint import load_model
    from lite.data import SPM_MODEL

    with stage(out, force) as staging:
        model, task = load_model(checkpoint, data)
        reference = copy.deepcopy(model)  # tracing switches ``model`` into ONNX-export mode
        description = export_graphs(model, staging)
        if slim:
            slim_graphs(staging)
            for graph in GRAPHS:
                check_graph(staging / f"{graph}.onnx")
        model = reference
        io = description["io"]
        specs = [StateSpec.from_json(s) for s in description["states"]]
        outputs = {g: io[g]["outputs"] for g in GRAPHS}
        reports = {"onnx": validate(model, specs, onnx_runner(staging / "encoder.onnx"),
                                    onnx_runner(staging / "decoder_step.onnx"), outputs).to_json()}
        if ort:
            converted = to_ort(staging)
            by_graph = {g: next(p for p in converted if p.name.startswith(g + ".")) for g in GRAPHS}
            reports["ort"] = validate(model, specs, onnx_runner(by_graph["encoder"]),
                                      onnx_runner(by_graph["decoder_step"]), outputs).to_json()
        dictionary = task.target_dictionary
        data_dir = Path(task.cfg.data)
        shutil.copy(data_dir / SPM_MODEL, staging / "spm.model")
        (staging / "vocab.txt").write_text("".join(s + "\n" for s in dictionary.symbols), encoding="utf-8")
        description = {
            "format": FORMAT, "opset": OPSET, "arch": model.args.arch, "checkpoint": str(Path(checkpoint).resolve()),
            "data": str(data_dir.resolve()), "src": task.cfg.source_lang, "tgt": task.cfg.target_lang,
            "bos": dictionary.bos(), "pad": dictionary.pad(), "eos": dictionary.eos(), "unk": dictionary.unk(),
            "vocab_size": len(dictionary), "max_source_positions": model.encoder.max_positions(),
            "max_target_positions": model.decoder.max_positions(), "macs": paper_macs(model).total, **description,
            "slim": slim, "validation": reports,
        }
        write_description(staging, description)
    logger.info(f"exported {checkpoint} to {out} (max |onnx - torch| = {reports['onnx']['max_abs_diff']:.2e})")
    return out


__all__ = ["export", "export_graphs", "check_graph", "ExportError", "ExportMismatch"]
