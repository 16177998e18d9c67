"""lite data prepare: splits, cleaning, sentencepiece + fairseq-preprocess, and every bad-input path."""
import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from lite.data import Corpus, DataError, prepare
from lite.errors import LiteError
from lite.text import TextError, read_lines
from tests.conftest import fuzz
from tests.figures import tally

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


def test_more_characters_than_pieces_is_one_error_line(text_dir, tmp_path):
    write_split(text_dir, "train", [*PAIRS, ("".join(map(chr, range(0x4E00, 0x4E40))), "CJK")])  # 64 new characters
    with pytest.raises(DataError, match=r"train\.\{de,en\}: sentencepiece cannot train a 60-piece vocabulary.*"
                                        r"raise --vocab-size"):
        prepare(text_dir, tmp_path / "out", vocab_size=60)


def test_a_huge_line_survives(text_dir, tmp_path):
    write_split(text_dir, "test2016", [("Hund " * 5000, "dog " * 5000)])
    corpus = prepare(text_dir, tmp_path / "out", vocab_size=60)
    assert corpus.lines["test2016"] == 1


# every character but \n that str.splitlines breaks on (\r: Python's universal newlines too, as fairseq reads)
SEPARATORS = ["\r", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]


def binarized(out, split, lang):
    """The detokenized sentences of a binarized split, in order (as fairseq's dataset reads them)."""
    import sentencepiece as spm
    from fairseq.data import Dictionary, data_utils

    dictionary = Dictionary.load(str(out / f"dict.{lang}.txt"))
    dataset = data_utils.load_indexed_dataset(str(out / f"{split}.de-en.{lang}"), dictionary, "mmap")
    sp = spm.SentencePieceProcessor(model_file=str(out / "spm.model"))
    return [sp.decode(dictionary.string(dataset[i]).split()) for i in range(len(dataset))]


def test_line_breaks_inside_a_line_keep_pairs_aligned(text_dir, tmp_path):
    """Each becomes a word break in what fairseq reads (sentencepiece alone would delete \\x0b and \\x1c-\\x1e and
    keep \\x85 as a piece), and the pairs stay in order."""
    pairs = []
    for sep in SEPARATORS:  # on the source side, on the target side, on both
        pairs += [(f"Ein{sep}Hund läuft.", "A dog runs."), ("Zwei Katzen schlafen.", f"Two{sep}cats sleep."),
                  (f"Die{sep}Frau liest.", f"The{sep}woman reads.")]
    write_split(text_dir, "test2016", pairs)
    out = tmp_path / "out"
    assert prepare(text_dir, out, vocab_size=60).lines["test2016"] == 3 * len(SEPARATORS)
    assert read_lines(out / "raw" / "test2016.de") == [s for s, _ in pairs]  # the references keep their text
    assert binarized(out, "test2016", "de") == ["Ein Hund läuft.", "Zwei Katzen schlafen.", "Die Frau liest."] * 9
    assert binarized(out, "test2016", "en") == ["A dog runs.", "Two cats sleep.", "The woman reads."] * 9


HOSTILE_LINE = st.one_of(
    st.sampled_from(["", " ", "\t", "Ein Hund läuft.", "A dog runs.", "🐶", "\u202eHund", "\x00", "\u200b"]),
    st.text(st.sampled_from([*SEPARATORS, *"ab äЖ漢\t", "\x00", "\x1f", "\u200b", "\u202e", "🐶"]), max_size=12),
    st.text(max_size=12),
)
FLAWS = ["none", "none", "none", "no last newline", "crlf", "extra line", "not UTF-8", "random bytes"]


@st.composite
def corpus_files(draw) -> dict[str, bytes]:
    """File name -> content: aligned pairs of hostile lines in train, valid and test, then one file (or none) made
    ragged, longer than its other side, not UTF-8 or random bytes."""
    files = {}
    for split in ("train", "valid", "test"):
        pairs = draw(st.lists(st.tuples(HOSTILE_LINE, HOSTILE_LINE), max_size=5))
        if draw(st.integers(0, 9)):  # mostly one plain pair too, so that most corpora can be prepared
            pairs.insert(draw(st.integers(0, len(pairs))), ("Ein Hund läuft.", "A dog runs."))
        for i, lang in enumerate(("de", "en")):
            files[f"{split}.{lang}"] = "".join(pair[i] + "\n" for pair in pairs).encode()
    flaw, name = draw(st.sampled_from(FLAWS)), draw(st.sampled_from(sorted(files)))
    event(f"flaw: {flaw}")
    if flaw == "no last newline":
        files[name] = files[name].removesuffix(b"\n")
    elif flaw == "crlf":
        files[name] = files[name].replace(b"\n", b"\r\n")
    elif flaw == "extra line":
        files[name] += draw(HOSTILE_LINE).encode() + b"\n"
    elif flaw == "not UTF-8":
        files[name] = b"\xff" + files[name]
    elif flaw == "random bytes":
        files[name] = draw(st.binary(max_size=24))
    return files


@fuzz(50)  # each case may run sentencepiece and fairseq-preprocess: 50, not 1,000 (the reader is fuzzed in test_text)
@given(files=corpus_files())
def test_prepare_hostile_files_gives_an_error_line_or_an_aligned_corpus(files):
    tally("fuzz cases: lite data prepare (hostile corpus files)")
    import sentencepiece as spm

    with tempfile.TemporaryDirectory() as tmp:
        source, out = Path(tmp) / "text", Path(tmp) / "data"
        source.mkdir()
        for name, content in files.items():
            (source / name).write_bytes(content)
        try:
            corpus = prepare(source, out, vocab_size=40)
        except LiteError as e:
            kinds = ("not UTF-8", "lines but", "no non-empty", "sentencepiece")
            event("refused: " + next((k for k in kinds if k in str(e)), str(e)))
            assert "\n" not in str(e) and str(source) in str(e) and not out.exists()
            return
        event("prepared")
        for split in ("train", "valid", "test"):
            pairs = list(zip(*(_lines(files[f"{split}.{lang}"]) for lang in ("de", "en"))))
            kept = [(s.strip(), t.strip()) for s, t in pairs if s.strip() and t.strip()]
            assert corpus.lines[split] == len(kept) and corpus.dropped_empty[split] == len(pairs) - len(kept)
            for side, lang in enumerate(("de", "en")):
                assert read_lines(out / "raw" / f"{split}.{lang}") == [p[side] for p in kept]
                assert len(binarized(out, split, lang)) == len(kept)
        sp = spm.SentencePieceProcessor(model_file=str(out / "spm.model"))  # else the translator refuses the model
        entries = [line.rsplit(" ", 1)[0] for line in read_lines(out / "dict.de.txt")]
        assert all(sp.piece_to_id(e) != sp.unk_id() for e in entries if not e.startswith("madeupword"))


def _lines(content: bytes) -> list[str]:
    """The lines of a file as the reader should see them: split at \\n, one trailing \\r dropped."""
    lines = content.split(b"\n")
    lines = lines[:-1] if lines[-1] == b"" else lines
    return [line.removesuffix(b"\r").decode("utf-8") for line in lines]
