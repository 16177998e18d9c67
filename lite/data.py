"""Parallel text -> validated raw splits -> joint sentencepiece -> fairseq binarized data dir.

Layout of a prepared dir (it is also the fairseq data dir, ``--data``):
    corpus.json                     languages, splits, line counts, vocab size, input fingerprint
    spm.model                       joint sentencepiece model
    dict.<src>.txt, dict.<tgt>.txt  fairseq dictionaries (joined: identical)
    <split>.<src>-<tgt>.<lang>.{bin,idx}   binarized splits, named as in the input (train, valid, test2016, ...)
    raw/<split>.<lang>              cleaned raw text (references for BLEU)
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lite.errors import LiteError
from lite.files import staged_dir, write_json, write_lines
from lite.text import one_line, read_lines

logger = logging.getLogger(__name__)

REQUIRED_SPLITS = ("train", "valid")
CORPUS_FILE = "corpus.json"
SPM_MODEL = "spm.model"
FAIRSEQ_UNK = "<unk>"  # fairseq's Dictionary.unk_word


class DataError(LiteError, ValueError):
    """Input text that cannot be prepared; the message names the file and the fix."""


@dataclass
class Corpus:
    """What ``corpus.json`` records about a prepared dir."""

    src: str
    tgt: str
    vocab_size: int
    fingerprint: str
    lines: dict[str, int] = field(default_factory=dict)  # split -> kept pairs
    dropped_empty: dict[str, int] = field(default_factory=dict)  # split -> dropped pairs

    @property
    def splits(self) -> list[str]:
        return list(self.lines)

    @classmethod
    def load(cls, data_dir: str | Path) -> "Corpus":
        path = Path(data_dir) / CORPUS_FILE
        if not path.is_file():
            raise DataError(f"{path} not found: {data_dir} is not a dir made by `lite data prepare`")
        return cls(**json.loads(path.read_text()))


def find_splits(source_dir: Path, src: str, tgt: str) -> list[str]:
    """train, valid, then every other <name> that has both <name>.<src> and <name>.<tgt>."""
    missing = [str(source_dir / f"{s}.{lang}") for s in REQUIRED_SPLITS for lang in (src, tgt)
               if not (source_dir / f"{s}.{lang}").is_file()]
    if missing:
        raise DataError(f"missing split files: {', '.join(missing)} (need train.{{{src},{tgt}}} and "
                        f"valid.{{{src},{tgt}}} in {source_dir})")
    tests = sorted(p.stem for p in source_dir.glob(f"*.{src}")
                   if p.stem not in REQUIRED_SPLITS and (source_dir / f"{p.stem}.{tgt}").is_file())
    return [*REQUIRED_SPLITS, *tests]


def read_pairs(source_dir: Path, split: str, src: str, tgt: str) -> tuple[list[str], list[str], int]:
    """Aligned source/target lines of one split, stripped (a line ending in \\r could not be written back) and with
    empty pairs dropped; returns (src, tgt, dropped)."""
    src_path, tgt_path = source_dir / f"{split}.{src}", source_dir / f"{split}.{tgt}"
    src_lines, tgt_lines = read_lines(src_path), read_lines(tgt_path)
    if len(src_lines) != len(tgt_lines):
        raise DataError(f"{src_path} has {len(src_lines)} lines but {tgt_path} has {len(tgt_lines)}; "
                        f"line N of one must translate line N of the other")
    kept = [(s, t) for s, t in zip(map(str.strip, src_lines), map(str.strip, tgt_lines)) if s and t]
    return [s for s, _ in kept], [t for _, t in kept], len(src_lines) - len(kept)


def fingerprint(source_dir: Path, splits: list[str], src: str, tgt: str, vocab_size: int) -> str:
    """sha256 over the input files and the options that shape the output."""
    digest = hashlib.sha256(f"{src}-{tgt}-{vocab_size}".encode())
    for split in splits:
        for lang in (src, tgt):
            digest.update(f"{split}.{lang}".encode())
            digest.update(hashlib.sha256((source_dir / f"{split}.{lang}").read_bytes()).digest())
    return digest.hexdigest()


def train_sentencepiece(texts: list[Path], model_prefix: Path, vocab_size: int) -> None:
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        input=",".join(map(str, texts)), model_prefix=str(model_prefix), vocab_size=vocab_size,
        model_type="unigram", character_coverage=1.0, hard_vocab_limit=False,
        # fairseq's dictionary adds its own specials; sentencepiece keeps only <unk>
        bos_id=-1, eos_id=-1, pad_id=-1, unk_id=0, input_sentence_size=2_000_000, shuffle_input_sentence=True,
        num_threads=os.cpu_count() or 1, minloglevel=2)


def tokenized(sp, ids: list[int]) -> str:
    """Sentencepiece ids as the line fairseq-preprocess reads: pieces separated by spaces, a piece sentencepiece does
    not know as ``<unk>`` (its surface text would become a dictionary entry that no encoding can produce, and the
    translator refuses such a model)."""
    return " ".join(FAIRSEQ_UNK if i == sp.unk_id() else sp.id_to_piece(i) for i in ids)


def binarize(work: Path, out: Path, splits: list[str], src: str, tgt: str) -> None:
    """fairseq-preprocess with a joined dictionary; test splits keep their own names."""
    from fairseq import options
    from fairseq_cli import preprocess

    tests = splits[2:]
    argv = ["--source-lang", src, "--target-lang", tgt, "--trainpref", str(work / "train"),
            "--validpref", str(work / "valid"), "--destdir", str(out), "--joined-dictionary",
            "--workers", "1", "--dataset-impl", "mmap"]
    if tests:
        argv += ["--testpref", ",".join(str(work / t) for t in tests)]
    preprocess.main(options.get_preprocessing_parser().parse_args(argv))
    # fairseq names the test splits test, test1, test2, ...; give them back their own names
    # (through a hidden name first, since a user's split may itself be called "test1")
    files = [(f"test{i or ''}.{src}-{tgt}.{lang}.{ext}", f"{name}.{src}-{tgt}.{lang}.{ext}")
             for i, name in enumerate(tests) for lang in (src, tgt) for ext in ("bin", "idx")]
    for fairseq_name, name in files:
        os.replace(out / fairseq_name, out / f".{name}")
    for _, name in files:
        os.replace(out / f".{name}", out / name)


def prepare(source_dir: str | Path, out: str | Path, src: str = "de", tgt: str = "en",
            vocab_size: int = 8000, force: bool = False) -> Corpus:
    """Validate, clean, tokenize and binarize the parallel text in ``source_dir`` into ``out``.

    The whole dir is built under a temporary name and renamed into place, so an interrupted run
    leaves nothing half-written. ``out`` holding a different corpus is refused unless ``force``.
    """
    import sentencepiece as spm

    source_dir, out = Path(source_dir), Path(out)
    if not source_dir.is_dir():
        raise DataError(f"--from {source_dir}: no such directory")
    splits = find_splits(source_dir, src, tgt)
    stamp = fingerprint(source_dir, splits, src, tgt, vocab_size)
    if (out / CORPUS_FILE).is_file():
        existing = Corpus.load(out)
        if existing.fingerprint == stamp:
            logger.info(f"{out} is up to date")
            return existing
        if not force:
            raise DataError(f"{out} already holds a different corpus (other input files or options); "
                            f"choose another --out or pass --force to replace it")
    with staged_dir(out, CORPUS_FILE, force, "prepared corpus") as staging:
        corpus = Corpus(src=src, tgt=tgt, vocab_size=vocab_size, fingerprint=stamp)
        raw, work = staging / "raw", staging / "tok"
        raw.mkdir(), work.mkdir()
        for split in splits:
            src_lines, tgt_lines, dropped = read_pairs(source_dir, split, src, tgt)
            if not src_lines:
                raise DataError(f"{source_dir}/{split}.{{{src},{tgt}}} hold no non-empty sentence pair")
            write_lines(raw / f"{split}.{src}", src_lines)
            write_lines(raw / f"{split}.{tgt}", tgt_lines)
            corpus.lines[split], corpus.dropped_empty[split] = len(src_lines), dropped
            if dropped:
                logger.warning(f"{split}: dropped {dropped} pair(s) with an empty side")
        try:
            train_sentencepiece([raw / f"train.{src}", raw / f"train.{tgt}"], staging / "spm", vocab_size)
        except RuntimeError as e:  # e.g. more distinct characters than pieces
            reason = str(e).split("] ", 1)[-1].splitlines()[0]
            raise DataError(f"{source_dir}/train.{{{src},{tgt}}}: sentencepiece cannot train a {vocab_size}-piece "
                            f"vocabulary on this text ({reason})"
                            + ("; raise --vocab-size" if "vocab" in reason.lower() else "")) from None
        sp = spm.SentencePieceProcessor(model_file=str(staging / SPM_MODEL))
        for split in splits:
            for lang in (src, tgt):
                # a break inside a line becomes a space whatever the spm normalization (fairseq splits lines on \r)
                lines = [one_line(line) for line in read_lines(raw / f"{split}.{lang}")]
                write_lines(work / f"{split}.{lang}", [tokenized(sp, ids) for ids in sp.encode(lines)])
        binarize(work, staging, splits, src, tgt)
        shutil.rmtree(work)
        write_json(staging / CORPUS_FILE, asdict(corpus))
    logger.info(f"prepared {out}: " + ", ".join(f"{s} {n} pairs" for s, n in corpus.lines.items())
           + (f"; dropped empty: {corpus.dropped_empty}" if any(corpus.dropped_empty.values()) else ""))
    return corpus
