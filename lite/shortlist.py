"""A lexical shortlist of target tokens from a prepared corpus, as CTranslate2's vocabulary map (vmap) and Marian's
lexical shortlist: the decoder then scores only the tokens that the batch's source words can translate to.

    lite data shortlist runs/multi30k/data --out runs/multi30k/shortlist.txt
    lite translate --backend onnx --model DIR --shortlist runs/multi30k/shortlist.txt

The table is IBM Model 1's p(target piece | source piece), estimated by EM on the training split's sentencepiece
pieces (with a NULL source word). The file is CTranslate2's vmap format, so both runtimes read the same one:

    <TAB>t1 t2 ... tN          the ``frequent`` most frequent target pieces: always candidates
    s<TAB>t1 t2 ... tK         source piece s: its ``per_source`` most probable translations

IBM Model 1 by hand (sparse EM in numpy, a few seconds on Multi30k): the aligners on PyPI (eflomal, fast_align
wrappers) need a C++ build.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from lite.data import Corpus, DataError
from lite.files import write_lines
from lite.text import read_lines


def ibm1(sources: list[np.ndarray], targets: list[np.ndarray], src_vocab: int, iterations: int = 5
         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """IBM Model 1 by EM. sources, targets: int id arrays per sentence pair (source ids < ``src_vocab``; id
    ``src_vocab`` is NULL, added here). Returns the pairs seen, (f [P], e [P]), and t(e | f) [P]."""
    f_ids, e_ids, position = [], [], []  # one entry per (source word or NULL, target word) of each pair
    first = 0
    for src, tgt in zip(sources, targets):
        f = np.append(src, src_vocab)  # [S + 1]
        f_ids.append(np.tile(f, len(tgt)))
        e_ids.append(np.repeat(tgt, len(f)))
        position.append(np.repeat(np.arange(first, first + len(tgt)), len(f)))  # the target word's global index
        first += len(tgt)
    f_all, e_all, position = np.concatenate(f_ids), np.concatenate(e_ids), np.concatenate(position)
    width = int(e_all.max()) + 1
    keys, pair = np.unique(f_all.astype(np.int64) * width + e_all, return_inverse=True)
    f, e = keys // width, keys % width
    t = np.ones(len(keys))  # uniform start
    for _ in range(iterations):
        p = t[pair]  # [entries]
        posterior = p / np.bincount(position, weights=p)[position]  # normalised over each target word's sources
        counts = np.bincount(pair, weights=posterior, minlength=len(keys))
        t = counts / np.bincount(f, weights=counts)[f]
    return f, e, t


def build_shortlist(data_dir: str | Path, out: str | Path, per_source: int = 20, frequent: int = 100,
                    iterations: int = 5, max_pairs: int = 100_000) -> dict:
    """Write the vmap of ``data_dir``'s training split to ``out`` (atomically); returns counts for the user.

    The EM holds every (source piece, target piece) pair of each sentence pair in memory (about 40 bytes each), so it
    reads the first ``max_pairs`` sentence pairs: 100,000 of 20 pieces a side is about 1.6 GB."""
    import sentencepiece as spm

    if per_source < 1 or frequent < 0 or iterations < 1 or max_pairs < 1:
        raise DataError(f"shortlist: per_source ({per_source}), iterations ({iterations}) and max_pairs ({max_pairs}) "
                        f"must be >= 1, frequent ({frequent}) >= 0")
    data_dir = Path(data_dir)
    corpus = Corpus.load(data_dir)
    processor = spm.SentencePieceProcessor(model_file=str(data_dir / "spm.model"))
    pairs = [(s, t) for s, t in zip(read_lines(data_dir / "raw" / f"train.{corpus.src}"),
                                    read_lines(data_dir / "raw" / f"train.{corpus.tgt}")) if s.strip() and t.strip()]
    pairs = pairs[:max_pairs]
    sources = [np.array(ids) for ids in processor.encode([s for s, _ in pairs])]
    targets = [np.array(ids) for ids in processor.encode([t for _, t in pairs])]
    pieces = [processor.id_to_piece(i) for i in range(processor.get_piece_size())]
    f, e, t = ibm1(sources, targets, len(pieces), iterations)
    counts = Counter(int(i) for ids in targets for i in ids)
    lines = ["\t" + " ".join(pieces[i] for i, _ in counts.most_common(frequent))]
    order = np.lexsort((-t, f))  # by source id, then most probable first
    f, e = f[order], e[order]
    starts = np.flatnonzero(np.r_[True, f[1:] != f[:-1]])
    for start, end in zip(starts, np.r_[starts[1:], len(f)]):
        if f[start] < len(pieces):  # NULL's translations are not a source word's
            lines.append(pieces[f[start]] + "\t" + " ".join(pieces[i] for i in e[start:end][:per_source]))
    write_lines(out, lines)
    return {"pairs": len(pairs), "source_pieces": len(lines) - 1, "frequent": min(frequent, len(counts)),
            "per_source": per_source}
