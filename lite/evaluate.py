"""``lite eval``: translate a split of the prepared data and score it with sacrebleu (BLEU, chrF)."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from lite.data import DataError, write_text
from lite.translate import GenerationOptions, TorchTranslator


def score(hypotheses: list[str], references: list[str]) -> dict:
    """Corpus BLEU and chrF with their sacrebleu signatures."""
    from sacrebleu.metrics import BLEU, CHRF

    bleu, chrf = BLEU(), CHRF()
    return {
        "bleu": round(bleu.corpus_score(hypotheses, [references]).score, 2),
        "bleu_signature": str(bleu.get_signature()),
        "chrf": round(chrf.corpus_score(hypotheses, [references]).score, 2),
        "chrf_signature": str(chrf.get_signature()),
    }


def open_translator(backend: str, path: str | Path, data: str | Path | None = None,
                    options: GenerationOptions = GenerationOptions(), threads: int = 1):
    """(translator, data dir): ``torch`` reads a checkpoint, ``onnx`` a model dir made by ``lite export``."""
    if backend == "torch":
        translator = TorchTranslator(path, data, options)
        return translator, translator.data_dir
    if backend == "onnx":
        from export.runtime import Translator
        from export.search import SearchOptions

        search = SearchOptions(beam=options.beam, lenpen=options.lenpen, max_len_a=options.max_len_a,
                               max_len_b=options.max_len_b)
        translator = Translator(path, search, threads=threads, batch_size=options.batch_size)
        return translator, Path(data or translator.description["data"])
    raise ValueError(f"backend {backend!r}: use 'torch' or 'onnx'")


def evaluate(checkpoint: str | Path, split: str, data: str | Path | None = None,
             options: GenerationOptions = GenerationOptions(), out_dir: str | Path | None = None,
             backend: str = "torch", threads: int = 1) -> dict:
    """Translate ``<data>/raw/<split>.<src>``, score against ``<split>.<tgt>``, write hypotheses and scores.

    ``checkpoint`` is a fairseq checkpoint (backend ``torch``) or an exported model dir (backend ``onnx``).
    """
    from lite.data import Corpus

    translator, data_dir = open_translator(backend, checkpoint, data, options, threads)
    corpus, raw = Corpus.load(data_dir), data_dir / "raw"
    if split not in corpus.splits:
        raise DataError(f"split {split!r} is not in {data_dir}; its splits: {', '.join(corpus.splits)}")
    sources = (raw / f"{split}.{corpus.src}").read_text(encoding="utf-8").splitlines()
    references = (raw / f"{split}.{corpus.tgt}").read_text(encoding="utf-8").splitlines()

    start = time.perf_counter()
    hypotheses = translator.translate(sources)
    seconds = time.perf_counter() - start

    path = Path(checkpoint).resolve()  # a model dir stays as exported (its files are hashed): results go beside it
    out_dir = Path(out_dir) if out_dir else path.with_name(path.name + ".eval") if backend == "onnx" else \
        path.parent / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    hypotheses_path = out_dir / f"{split}.hyp.{corpus.tgt}"
    write_text(hypotheses_path, hypotheses)
    result = {
        "checkpoint": str(checkpoint), "split": split, "sentences": len(sources),
        **score(hypotheses, references),
        "beam": options.beam, "lenpen": options.lenpen, "backend": backend,
        "seconds": round(seconds, 2), "ms_per_sentence": round(1000 * seconds / max(len(sources), 1), 2),
        "hypotheses": str(hypotheses_path),
    }
    tmp = out_dir / f".{split}.json.tmp"
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out_dir / f"{split}.json")
    return result
