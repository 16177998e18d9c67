"""``open_translator``: either backend behind one interface (``translate(lines) -> lines``) and one set of search
options. Torch is imported only for the torch backend."""
from __future__ import annotations

from pathlib import Path

from export.search import SearchOptions

BACKENDS = ("torch", "onnx", "ort")


def open_translator(backend: str, path: str | Path, data: str | Path | None = None,
                    options: SearchOptions = SearchOptions(), threads: int = 1, batch_size: int = 64):
    """(translator, data dir): ``torch`` reads a checkpoint; ``onnx`` and ``ort`` a model dir made by ``lite export``
    (``ort``: its ORT-format graphs)."""
    if backend == "torch":
        from lite.torch_translator import TorchTranslator

        translator = TorchTranslator(path, data, options, batch_size)
        return translator, translator.data_dir
    if backend in ("onnx", "ort"):
        from export.runtime import Translator

        translator = Translator(path, options, threads=threads, batch_size=batch_size, format=backend)
        return translator, Path(data or translator.description["data"])
    raise ValueError(f"backend {backend!r}: use one of {', '.join(BACKENDS)}")
