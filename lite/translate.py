"""``open_translator``: either backend behind one interface (``translate(lines) -> lines``) and one set of search
options; ``translate_lines``: one output line per input line, whatever the line. Torch is imported only for the torch
backend."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

from export.search import SearchOptions
from lite.errors import LiteError

BACKENDS = ("torch", "onnx", "ort")

logger = logging.getLogger(__name__)


def open_translator(backend: str, path: str | Path, data: str | Path | None = None,
                    options: SearchOptions = SearchOptions(), threads: int = 1, batch_size: int = 64,
                    shortlist: str | Path | None = None, search: str = "fairseq"):
    """(translator, data dir): ``torch`` reads a checkpoint; ``onnx`` and ``ort`` a model dir made by ``lite export``
    (``ort``: its ORT-format graphs). ``shortlist``: a vocabulary map (``lite data shortlist``), onnx only.
    ``search``: ``fairseq`` (fairseq's search, step for step) or ``ort`` (ONNX Runtime's BeamSearch op, onnx only)."""
    if shortlist is not None and backend != "onnx":
        raise LiteError(f"--shortlist rewrites the ONNX decoder step: it needs --backend onnx, not {backend}")
    if search != "fairseq" and backend != "onnx":
        raise LiteError(f"--search {search} runs the model dir's ONNX graphs: it needs --backend onnx, not {backend}")
    if backend == "torch":
        from lite.torch_translator import TorchTranslator

        translator = TorchTranslator(path, data, options, batch_size)
        return translator, translator.data_dir
    if backend in ("onnx", "ort"):
        from export.runtime import Translator

        translator = Translator(path, options, threads=threads, batch_size=batch_size, format=backend,
                                shortlist=shortlist, search=search)
        return translator, Path(data or translator.description["data"])
    raise ValueError(f"backend {backend!r}: use one of {', '.join(BACKENDS)}")


def translate_lines(translator, lines: Sequence[str], name: str) -> list[str]:
    """``translator.translate(lines)``, except that a line longer than the model takes (more sentencepiece pieces than
    its source positions) is not translated: its output line is empty and a warning names ``name:line``, as
    fairseq-interactive refuses such a line (the backends alone would truncate it). Outputs stay aligned with
    ``lines``: one per line, empty for an empty line."""
    outputs = [""] * len(lines)
    todo = []
    for number, line in enumerate(lines, start=1):
        pieces = len(translator.spm.encode(line.strip()))
        if pieces > translator.max_source_tokens:
            logger.warning(f"{name}:{number}: {pieces} sentencepiece pieces, the model takes at most "
                           f"{translator.max_source_tokens}; its output line is left empty")
        else:
            todo.append(number - 1)
    for i, output in zip(todo, translator.translate([lines[i] for i in todo])):
        outputs[i] = output
    return outputs
