"""What each compression stage costs and gains: ``lite compress report``.

    lite compress report fp32=runs/export/lsra pruned=runs/export/lsra-pruned finetuned=runs/export/lsra-ft \\
        int8=runs/export/lsra-ft-int8 --split test2016 --out runs/report/lsra

Every stage is a model dir (``lite export``, ``lite compress quantize``). Per stage:
    macs, decode_macs_beam4   the paper's protocol (30+30 tokens, layers only) and the cost of translating one such
                              sentence with beam 4 (``eval.macs``), measured on the checkpoint the dir was exported
                              from (an int8 dir: on its fp32 source's checkpoint; int8 does not change the MACs)
    params, params_no_embed   of that checkpoint, shared tensors once
    bytes.dir                 every file of the model dir (graphs, spm.model, vocab.txt, model.json)
    bytes.weights             tensors stored in the graphs (initializers and Constants; in the compact layout's
                              weights.bin, each shared tensor once; a sparse tensor of weights.packed as stored:
                              its bitmask and non-zero bytes), split into
                              ``embedding`` (a dimension equal to the vocabulary: token embeddings, the output
                              projection and its scales), ``positions`` (sinusoidal tables, a dimension equal to the
                              position count) and ``other`` = the non-embedding weights
    bleu                      ONNX Runtime translator, beam 4, on ``--split`` of the data model.json names

Storage-only options, reported separately (``storage``), each with the bytes it would take on disk and the BLEU of
the graphs with their tensors round-tripped through that storage (stored, then expanded again at load time):
    shared            identical tensors of the two graphs stored once (the tied embedding, the position table)
                      and the output projection stored as its transpose's twin when it is the embedding transposed
    shared+fp16-embed the above, embedding-class tensors in fp16
    shared+int8-embed the above, embedding-class fp32 tensors in int8, one scale per vocabulary row
    zip               the model dir in a zip archive (deflate), nothing else changed
"""
from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import numpy as np

from eval.bleu import corpus_bleu
from export.model_dir import DESCRIPTION, GRAPHS, ModelDir, write_description
from export.runtime import Translator
from export.search import SearchOptions
from lite.errors import LiteError
from lite.files import write_json, write_text
from lite.text import read_lines

logger = logging.getLogger(__name__)

STORAGE_OPTIONS = (("shared", None), ("shared+fp16-embed", "fp16"), ("shared+int8-embed", "int8"))  # name, embed


class ReportError(LiteError, ValueError):
    """A stage that cannot be reported; the message names it."""


@dataclass
class WeightBytes:
    embedding: int = 0
    positions: int = 0
    other: int = 0

    @property
    def total(self) -> int:
        return self.embedding + self.positions + self.other


@dataclass
class Stage:
    name: str
    model_dir: str
    checkpoint: str
    quantization: str  # "fp32" or the method
    macs: int
    decode_macs_beam4: int
    params: int
    params_no_embed: int
    bytes_dir: int
    weights: WeightBytes
    bleu: float | None
    sparsity: float = 0.0  # zeros among the weights of linear and conv layers (``compress.sparsity``)
    storage: Dict[str, dict] = field(default_factory=dict)  # option -> {"bytes": ..., "bleu": ...}


# ---------------------------------------------------------------------------------------------- tensors

def _tensors(model) -> Iterator[Tuple[str, object]]:
    """(name, TensorProto) of every stored tensor of a graph: initializers and Constant nodes' values."""
    for t in model.graph.initializer:
        yield t.name, t
    for n in model.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    yield n.output[0], a.t


def _kind(dims: Tuple[int, ...], description: dict) -> str:
    positions = {description["max_source_positions"], description["max_target_positions"]}
    if description["vocab_size"] in dims:
        return "embedding"
    if any(d - description["pad"] - 1 in positions for d in dims):  # fairseq's sinusoidal table: max + pad + 1 rows
        return "positions"
    return "other"


def weight_bytes(model_dir: ModelDir) -> WeightBytes:
    """Bytes of the tensors stored in the graphs, by kind (see the module doc)."""
    import onnx
    from onnx import numpy_helper

    found = WeightBytes()
    stored = set()  # (file, offset) of external tensors: in the compact layout both graphs share some
    packed = model_dir.description.get("packed") or {}
    packed_bytes = {(packed["as"], str(s[0])): s[3] for s in packed.get("segments", []) if s[2] == "bitmask"}
    for graph in GRAPHS:
        model = onnx.load(str(model_dir.graph(graph)), load_external_data=False)
        for _, t in _tensors(model):
            where = {e.key: e.value for e in t.external_data}
            if where:
                key = (where["location"], where.get("offset", "0"))
                if key in stored:
                    continue
                stored.add(key)
                size = packed_bytes.get(key, int(where["length"]))
            else:
                size = numpy_helper.to_array(t).nbytes
            kind = _kind(tuple(t.dims), model_dir.description)
            setattr(found, kind, getattr(found, kind) + size)
    return found


def _digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes() + str((array.dtype, array.shape)).encode()).hexdigest()


def _storage_variant(model_dir: ModelDir, embed: str | None, out: Path) -> int:
    """Write graphs whose tensors went through the storage option into ``out`` (fp32 again, for the runtime); return
    the bytes that storage takes: every distinct tensor once (a transposed twin counts as the same), embedding-class
    fp32 tensors in ``embed`` ("fp16" | "int8" with one fp32 scale per vocabulary row | None = as they are)."""
    import onnx
    from onnx import numpy_helper

    description = model_dir.description
    stored: Dict[str, int] = {}
    for graph in GRAPHS:
        with model_dir.readable_graphs() as graphs:
            model = onnx.load(str(graphs[graph]))
        for _, t in _tensors(model):
            array = numpy_helper.to_array(t)
            kind = _kind(tuple(t.dims), description)
            if kind == "embedding" and embed and array.dtype == np.float32 and array.ndim == 2:
                rows = 0 if array.shape[0] == description["vocab_size"] else 1  # the vocabulary axis
                if embed == "fp16":
                    restored, size = array.astype(np.float16).astype(np.float32), array.size * 2
                else:  # symmetric int8, one scale per vocabulary entry
                    scale = np.abs(array).max(axis=1 - rows, keepdims=True) / 127
                    scale[scale == 0] = 1
                    restored = (np.round(array / scale).clip(-127, 127) * scale).astype(np.float32)
                    size = array.size + 4 * array.shape[rows]
                t.CopyFrom(numpy_helper.from_array(restored, t.name))
            else:
                restored, size = array, array.nbytes
            twins = {_digest(restored), _digest(restored.T) if restored.ndim == 2 else _digest(restored)}
            if not twins & stored.keys():
                stored[_digest(restored)] = size
        onnx.save(model, str(out / f"{graph}.onnx"))
    return sum(stored.values())


def _files(model_dir: ModelDir) -> List[Path]:
    """Every file of the model dir: the listed ones and model.json."""
    return [model_dir.file(name) for name in model_dir.description["files"]] + [model_dir.path / DESCRIPTION]


def _zip_bytes(model_dir: ModelDir) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / "model.zip"
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as z:
            for p in sorted(_files(model_dir)):
                z.write(p, p.relative_to(model_dir.path))
        return archive.stat().st_size


# ---------------------------------------------------------------------------------------------- stages

def source_checkpoint(model_dir: Path, description: dict) -> Path:
    """The checkpoint the dir's graphs were exported from (an int8 dir: its fp32 source's)."""
    seen = set()
    while "quantization" in description:
        source = Path(description["quantization"]["source"]["dir"])
        if source in seen or not (source / DESCRIPTION).is_file():
            break
        seen.add(source)
        description = json.loads((source / DESCRIPTION).read_text(encoding="utf-8"))
    if "checkpoint" not in description:
        raise ReportError(f"{model_dir / DESCRIPTION}: no 'checkpoint' (the one it was exported from) in it or its "
                          f"fp32 source's model.json; MACs and params are measured on it: re-export with `lite export`")
    return Path(description["checkpoint"])


def _bleu(model_dir: Path, sources: List[str], references: List[str]) -> float:
    hypotheses = Translator(model_dir, SearchOptions(beam=4)).translate(sources)
    return round(corpus_bleu(hypotheses, references), 2)


def _split(description: dict, split: str) -> Tuple[List[str], List[str]]:
    if not description.get("data"):
        raise ReportError(f"--split {split}: model.json names no data dir ('data') to read the split from")
    raw = Path(description["data"]) / "raw"
    paths = [raw / f"{split}.{description[k]}" for k in ("src", "tgt")]
    for p in paths:
        if not p.is_file():
            raise ReportError(f"--split {split}: {p} (model.json 'data') does not exist")
    sources, references = (read_lines(p) for p in paths)
    return sources, references


def measure_stage(name: str, model_dir: str | Path, split: str | None, storage: bool = True) -> Stage:
    """Every figure of one stage (see the module doc); ``split``: BLEU on it, None: no BLEU."""
    from eval.macs import measure
    from lite.checkpoint import load_model

    md = ModelDir.open(model_dir)
    description = md.description
    sources, references = _split(description, split) if split else (None, None)
    checkpoint = source_checkpoint(md.path, description)
    if not checkpoint.is_file():
        raise ReportError(f"{name}: checkpoint {checkpoint} (from {md.path / DESCRIPTION}) is gone; MACs and params "
                          f"are measured on it")
    model, _ = load_model(checkpoint)
    from compress.sparsity import sparsity_report

    cost = measure(model, description.get("arch", "?"))
    stage = Stage(name, str(md.path), str(checkpoint), description.get("quantization", {}).get("method", "fp32"),
                  cost.macs, cost.decode_macs_beam4, cost.params, cost.params_no_embed,
                  sum(p.stat().st_size for p in _files(md)), weight_bytes(md),
                  _bleu(md.path, sources, references) if split else None,
                  round(sparsity_report(model)["sparsity"], 4))
    if storage:
        for option, embed in STORAGE_OPTIONS:
            with tempfile.TemporaryDirectory() as variant:
                variant = Path(variant)
                md.copy_non_graph_files(variant)
                size = _storage_variant(md, embed, variant)
                write_description(variant, {k: v for k, v in description.items() if k not in ("files", "packed")})
                stage.storage[option] = {"weight_bytes": size,
                                         "bleu": _bleu(variant, sources, references) if split else None}
    stage.storage["zip"] = {"bytes": _zip_bytes(md), "bleu": stage.bleu}  # the dir as it is: always measured
    return stage


# ---------------------------------------------------------------------------------------------- output

def _mb(n: int) -> str:
    return f"{n / 1e6:.2f}"


def markdown(stages: List[Stage], split: str | None) -> str:
    first = stages[0]
    lines = [f"| stage | int8 | MACs (30+30) | decode MACs, beam 4 | params | non-emb. params | zeros | model dir MB | "
             f"non-emb. weights MB | BLEU{f' ({split})' if split else ''} |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for s in stages:
        ratio = f" ({first.bytes_dir / s.bytes_dir:.1f}x)" if s is not first else ""
        weights = f" ({first.weights.other / s.weights.other:.1f}x)" if s is not first else ""
        lines.append(f"| {s.name} | {s.quantization} | {s.macs / 1e6:.1f}M | {s.decode_macs_beam4 / 1e6:.1f}M | "
                     f"{s.params / 1e6:.2f}M | {s.params_no_embed / 1e6:.2f}M | {s.sparsity:.0%} | {_mb(s.bytes_dir)}{ratio} | "
                     f"{_mb(s.weights.other)}{weights} | {s.bleu if s.bleu is not None else '-'} |")
    lines += ["", "Storage only (the graphs' tensors stored this way and expanded at load time; BLEU of the "
                  "round-tripped graphs):", "",
              "| stage | weights as exported MB (emb. / pos. / other) | shared | shared + fp16 emb. | "
              "shared + int8 emb. | zip of the dir |", "|---|---:|---:|---:|---:|---:|"]
    for s in stages:
        cells = []
        for option, _ in STORAGE_OPTIONS:
            o = s.storage.get(option)
            bleu = "" if o is None or o["bleu"] is None else f", BLEU {o['bleu']}"
            cells.append("-" if o is None else f"{_mb(o['weight_bytes'])} MB{bleu}")
        z = s.storage.get("zip")
        cells.append("-" if z is None else f"{_mb(z['bytes'])} MB ({first.bytes_dir / z['bytes']:.1f}x)")
        w = s.weights
        lines.append(f"| {s.name} | {_mb(w.total)} ({_mb(w.embedding)} / {_mb(w.positions)} / {_mb(w.other)}) | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(stages: List[Stage], out: Path, split: str | None, command: str | None = None) -> None:
    """report.json and report.md in ``out``, and with BLEU on two stages or more ``bleu_vs_bytes.png`` and the
    JSON it is drawn from; each written atomically."""
    from eval.plots import bleu_vs_bytes
    from lite.files import write_bytes

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    data = {"split": split, "command": command,
            "stages": [{**asdict(s), "weights": {**asdict(s.weights), "total": s.weights.total}} for s in stages]}
    write_json(out / "report.json", data)
    text = markdown(stages, split)
    points = [{"stage": s.name, "bleu": s.bleu, "weight_bytes": s.weights.other, "dir_bytes": s.bytes_dir,
               "quantization": "fp32" if s.quantization == "fp32" else "int8", "sparsity": s.sparsity}
              for s in stages if s.bleu is not None]
    if len(points) >= 2:
        title = f"BLEU ({split}) vs the size of the non-embedding weights"
        write_json(out / "bleu_vs_bytes.json", {"title": title, "command": command, "data": {"points": points}})
        write_bytes(out / "bleu_vs_bytes.png", bleu_vs_bytes(title, {"points": points}))
        text += "\n![BLEU vs bytes](bleu_vs_bytes.png)\n"
    write_text(out / "report.md", text)
