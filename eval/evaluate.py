"""``lite eval``: translate a split of the prepared data and score it with sacrebleu (BLEU, chrF)."""
from __future__ import annotations

import time
from pathlib import Path

from eval.bleu import score
from export.search import SearchOptions
from lite.data import Corpus, DataError
from lite.files import write_json, write_lines
from lite.text import read_lines
from lite.translate import open_translator, translate_lines


def split_lines(data_dir: Path, split: str) -> tuple[list[str], list[str]]:
    """(sources, references) of a split of a prepared data dir (its ``raw/<split>.{src,tgt}``)."""
    corpus = Corpus.load(data_dir)
    if split not in corpus.splits:
        raise DataError(f"split {split!r} is not in {data_dir}; its splits: {', '.join(corpus.splits)}")
    raw = Path(data_dir) / "raw"
    sources, references = read_lines(raw / f"{split}.{corpus.src}"), read_lines(raw / f"{split}.{corpus.tgt}")
    if len(sources) != len(references):
        raise DataError(f"{raw}: {split}.{corpus.src} has {len(sources)} lines, {split}.{corpus.tgt} "
                        f"{len(references)}")
    return sources, references


def evaluate(model: str | Path, split: str, data: str | Path | None = None, options: SearchOptions = SearchOptions(),
             out_dir: str | Path | None = None, backend: str = "torch", threads: int = 1,
             batch_size: int = 64, shortlist: str | Path | None = None, search: str = "fairseq") -> dict:
    """Translate ``<data>/raw/<split>.<src>``, score against ``<split>.<tgt>``, write hypotheses and scores.

    ``model`` is a fairseq checkpoint (backend ``torch``) or an exported model dir (``onnx``, ``ort``);
    ``shortlist`` a vocabulary map for the onnx backend (the hypotheses then go to ``<split>.shortlist.hyp.*``);
    ``search="ort"`` ONNX Runtime's BeamSearch op (export/ort_search.py; hypotheses in ``<split>.ort-search.hyp.*``).
    """
    translator, data_dir = open_translator(backend, model, data, options, threads, batch_size, shortlist, search)
    sources, references = split_lines(data_dir, split)

    start = time.perf_counter()
    hypotheses = translate_lines(translator, sources, f"{data_dir}/raw/{split}.{Corpus.load(data_dir).src}")
    seconds = time.perf_counter() - start

    path = Path(model).resolve()  # a model dir stays as exported (its files are hashed): results go beside it
    out_dir = Path(out_dir) if out_dir else path.parent / "eval" if backend == "torch" else \
        path.with_name(path.name + ".eval")
    out_dir.mkdir(parents=True, exist_ok=True)
    name = split + (".shortlist" if shortlist else "") + (".ort-search" if search == "ort" else "")
    hypotheses_path = out_dir / f"{name}.hyp.{Corpus.load(data_dir).tgt}"
    write_lines(hypotheses_path, hypotheses)
    result = {
        "checkpoint": str(model), "split": split, "sentences": len(sources),
        **score(hypotheses, references),
        "beam": options.beam, "lenpen": options.lenpen, "backend": backend,
        **({"shortlist": str(shortlist)} if shortlist else {}), "search": search,
        "seconds": round(seconds, 2), "ms_per_sentence": round(1000 * seconds / max(len(sources), 1), 2),
        "hypotheses": str(hypotheses_path),
    }
    write_json(out_dir / f"{name}.json", result)
    return result
