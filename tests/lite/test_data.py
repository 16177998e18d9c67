"""lite data prepare: splits, cleaning, sentencepiece + fairseq-preprocess, and every bad-input path."""
import json

import pytest

from lite.data import Corpus, DataError, prepare
from lite.text import TextError

PAIRS = [("Ein Hund läuft.", "A dog runs."), ("Zwei Katzen schlafen.", "Two cats sleep."),
         ("Ein Mann fährt Rad.", "A man rides a bike."), ("Die Frau liest.", "The woman reads.")] * 10


def write_split(directory, name, pairs, src="de", tgt="en"):
    (directory / f"{name}.{src}").write_text("".join(s + "\n" for s, _ in pairs), encoding="utf-8")
    (directory / f"{name}.{tgt}").write_text("".join(t + "\n" for _, t in pairs), encoding="utf-8")


@pytest.fixture
def text_dir(tmp_path):
    d = tmp_path / "text"
    d.mkdir()
    write_split(d, "train", PAIRS)
    write_split(d, "valid", PAIRS[:4])
    write_split(d, "test2016", PAIRS[4:8])
    return d


def test_prepare_writes_a_fairseq_data_dir(text_dir, tmp_path):
    out = tmp_path / "data"
    corpus = prepare(text_dir, out, vocab_size=60)
    assert corpus.splits == ["train", "valid", "test2016"]
    assert corpus.lines == {"train": 40, "valid": 4, "test2016": 4}
    for split in corpus.splits:
        for lang in ("de", "en"):
            assert (out / f"{split}.de-en.{lang}.bin").is_file()
            assert (out / "raw" / f"{split}.{lang}").read_text(encoding="utf-8").count("\n") == corpus.lines[split]
    assert (out / "dict.de.txt").read_text() == (out / "dict.en.txt").read_text()  # joined dictionary
    assert (out / "spm.model").is_file()
    assert Corpus.load(out) == corpus
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging dir left behind


def test_prepare_is_a_no_op_when_up_to_date(text_dir, tmp_path):
    out = tmp_path / "data"
    prepare(text_dir, out, vocab_size=60)
    stamp = (out / "train.de-en.de.bin").stat().st_mtime_ns
    prepare(text_dir, out, vocab_size=60)
    assert (out / "train.de-en.de.bin").stat().st_mtime_ns == stamp


def test_a_different_corpus_is_refused_unless_forced(text_dir, tmp_path):
    out = tmp_path / "data"
    prepare(text_dir, out, vocab_size=60)
    write_split(text_dir, "valid", [("Ein Vogel singt.", "A bird sings.")])
    with pytest.raises(DataError, match="different corpus.*--force"):
        prepare(text_dir, out, vocab_size=60)
    assert Corpus.load(out).lines["valid"] == 4  # nothing lost
    prepare(text_dir, out, vocab_size=60, force=True)
    assert (out / "raw" / "valid.de").read_text(encoding="utf-8") == "Ein Vogel singt.\n"


def test_missing_split_files_are_named(tmp_path):
    d = tmp_path / "text"
    d.mkdir()
    write_split(d, "train", PAIRS)
    with pytest.raises(DataError, match=r"valid\.de.*valid\.en"):
        prepare(d, tmp_path / "out")


def test_line_count_mismatch_names_both_files(text_dir, tmp_path):
    (text_dir / "valid.en").write_text("one\ntwo\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"valid\.de has 4 lines but .*valid\.en has 2"):
        prepare(text_dir, tmp_path / "out")


def test_empty_lines_are_dropped_and_counted(text_dir, tmp_path):
    write_split(text_dir, "valid", [("Ein Hund.", "A dog."), ("", "Nothing."), ("Etwas.", "   ")])
    corpus = prepare(text_dir, tmp_path / "out", vocab_size=60)
    assert corpus.lines["valid"] == 1 and corpus.dropped_empty["valid"] == 2
    assert json.loads((tmp_path / "out" / "corpus.json").read_text())["dropped_empty"]["valid"] == 2


def test_non_utf8_is_reported_with_file_and_line(text_dir, tmp_path):
    (text_dir / "valid.de").write_bytes("Ein Hund.\nZwei\n".encode() + b"Katzen \xff\xfe.\nDrei.\nVier.\n")
    with pytest.raises(TextError, match=r"valid\.de:3: not UTF-8"):
        prepare(text_dir, tmp_path / "out")


def test_a_huge_line_survives(text_dir, tmp_path):
    write_split(text_dir, "test2016", [("Hund " * 5000, "dog " * 5000)])
    corpus = prepare(text_dir, tmp_path / "out", vocab_size=60)
    assert corpus.lines["test2016"] == 1
