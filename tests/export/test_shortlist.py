"""The vocabulary shortlist: IBM Model 1 finds the translations a toy corpus was built with; the vmap written from
a prepared corpus lists what an independent count gives; the shortlisted decoder step (fp32, int8 compact and not)
gives the plain step's log-probs renormalised over the shortlist, every token as the shortlist translates as
without one, and a real shortlist's outputs stay inside it; what cannot be combined with it is refused."""
from collections import Counter

import numpy as np
import pytest

from compress.quantize import quantize
from export.candidates import INPUTS
from export.runtime import Translator
from export.search import SearchOptions, left_pad
from export.shortlist import Shortlist, ShortlistError
from lite.data import Corpus, DataError
from lite.shortlist import build_shortlist, ibm1
from lite.text import read_lines
from lite.translate import open_translator
from lite.errors import LiteError


def test_ibm1_finds_the_word_translations_of_a_toy_corpus():
    """Six source words, each always translated by one target word; every sentence pairs them in another order and
    mix, so only co-occurrence across sentences tells them apart."""
    rng = np.random.default_rng(0)
    translation = rng.permutation(6) + 10  # source word i <-> target word translation[i]
    sources = [rng.choice(6, size=rng.integers(2, 5), replace=False) for _ in range(200)]
    targets = [rng.permutation(translation[s]) for s in sources]
    f, e, t = ibm1(sources, targets, src_vocab=6, iterations=10)
    for word in range(6):
        mine = f == word
        assert e[mine][np.argmax(t[mine])] == translation[word]
        assert t[mine].sum() == pytest.approx(1.0)  # a distribution over the targets seen with it
    assert set(f) <= set(range(7))  # 6: NULL


def test_vmap_lists_the_frequent_targets_and_each_source_piece(workdir, tmp_path):
    import sentencepiece as spm

    data = workdir / "data"
    counts = build_shortlist(data, tmp_path / "vmap.txt", per_source=3, frequent=7)
    lines = read_lines(tmp_path / "vmap.txt")
    corpus = Corpus.load(data)
    processor = spm.SentencePieceProcessor(model_file=str(data / "spm.model"))
    targets = Counter(p for line in read_lines(data / "raw" / f"train.{corpus.tgt}") if line.strip()
                      for p in processor.encode(line, out_type=str))
    always = lines[0].split("\t")
    assert always[0] == "" and always[1].split() == [p for p, _ in targets.most_common(7)]
    sources = {p for line in read_lines(data / "raw" / f"train.{corpus.src}") if line.strip()
               for p in processor.encode(line, out_type=str)}
    keys = [line.split("\t")[0] for line in lines[1:]]
    assert set(keys) == sources and len(keys) == counts["source_pieces"]
    assert all(1 <= len(line.split("\t")[1].split()) <= 3 for line in lines[1:])
    assert build_shortlist(data, tmp_path / "few.txt", max_pairs=50)["pairs"] == 50
    for bad in ({"per_source": 0}, {"frequent": -1}, {"iterations": 0}, {"max_pairs": 0}):
        with pytest.raises(DataError, match="shortlist"):
            build_shortlist(data, tmp_path / "bad.txt", **bad)
    assert not (tmp_path / "bad.txt").exists()


def test_shortlist_reads_ngrams_and_refuses_what_is_not_a_map(tmp_path):
    symbols = ["<s>", "<pad>", "</s>", "<unk>", "a", "b", "c", "d", "e"]
    path = tmp_path / "vmap.txt"
    path.write_text("\ta\nx\tb zz\nx y\tc\ny\t\n", encoding="utf-8")  # zz: not the model's, dropped
    shortlist = Shortlist(path, symbols, always=[2, 3])
    assert shortlist.candidates([["x"]]).tolist() == [2, 3, 4, 5]
    assert shortlist.candidates([["q", "x", "y"]]).tolist() == [2, 3, 4, 5, 6]  # the bigram "x y" too
    assert shortlist.candidates([["q"]], at_least=6).tolist() == [0, 1, 2, 3, 4, 5]  # topped up, lowest ids first
    path.write_text("x b\n", encoding="utf-8")
    with pytest.raises(ShortlistError, match="vmap.txt:1: not a vocabulary map line"):
        Shortlist(path, symbols, always=[2])
    path.write_text("x\tzz\n", encoding="utf-8")
    with pytest.raises(ShortlistError, match="no vocabulary map entry names a token"):
        Shortlist(path, symbols, always=[2])


@pytest.fixture(scope="module")
def dirs(model_dir, tmp_path_factory):
    """{layout: model dir}: the fp32 export and its dynamic int8, compact and not."""
    root = tmp_path_factory.mktemp("shortlist")
    return {"fp32": model_dir, "int8": quantize(model_dir, root / "int8"),
            "int8 no-compact": quantize(model_dir, root / "plain", compact=False)}


def _every_token(model_dir, path):
    symbols = (model_dir / "vocab.txt").read_text(encoding="utf-8").split("\n")[:-1]
    path.write_text("\t" + " ".join(symbols) + "\n", encoding="utf-8")
    return path


def _log_probs(translator: Translator, src: np.ndarray, steps: list[tuple[np.ndarray, np.ndarray]]) -> list:
    """The log-probs of each of ``steps`` (tokens, order) after the encoder ran on ``src``."""
    model = translator.model
    model.start(src, beam=2)
    return [model._run(tokens, order, ["log_probs"], INPUTS)[0].numpy() for tokens, order in steps]


@pytest.mark.parametrize("layout", ["fp32", "int8", "int8 no-compact"])
def test_shortlisted_step_renormalises_the_plain_step_over_the_shortlist(dirs, layout, tmp_path):
    model_dir = dirs[layout]
    plain = Translator(model_dir)
    shortlisted = Translator(model_dir, shortlist=_every_token(model_dir, tmp_path / "all.txt"))
    src = left_pad([plain.encode("ein kleiner hund"), plain.encode("eine katze")], plain.description["pad"])  # [2, S]
    steps = [(np.array([2, 2, 2, 2]), np.arange(4)), (np.array([7, 9, 11, 13]), np.array([1, 0, 3, 3]))]
    expected = _log_probs(plain, src, steps)
    vocabulary = np.sort(np.random.default_rng(3).choice(plain.description["vocab_size"], 40, replace=False))
    shortlisted.model.vocabulary = vocabulary
    for lp, full in zip(_log_probs(shortlisted, src, steps), expected):  # [N, C], [N, V]
        kept = full[:, vocabulary]
        renormalised = kept - np.log(np.exp(kept - kept.max(1, keepdims=True)).sum(1, keepdims=True)) - kept.max(1, keepdims=True)
        np.testing.assert_allclose(lp, renormalised, atol=1e-5, rtol=0)


@pytest.mark.parametrize("layout", ["fp32", "int8"])
def test_every_token_as_the_shortlist_translates_as_without_one(dirs, layout, workdir, tmp_path):
    model_dir = dirs[layout]
    sources = read_lines(workdir / "data" / "raw" / "test.de")[:40]
    expected = Translator(model_dir, batch_size=8).translate(sources)
    every = Translator(model_dir, batch_size=8, shortlist=_every_token(model_dir, tmp_path / "all.txt"))
    assert every.translate(sources) == expected


def _token_ids(translator: Translator, sources: list[str]) -> list[list[int]]:
    """The best hypothesis's token ids of each source, one sentence at a time."""
    found: list[list[int]] = []
    translator.decode = lambda tokens: found.append(list(tokens)) or ""
    for source in sources:
        translator.translate([source])
    return found


def test_outputs_stay_inside_a_real_shortlist(dirs, workdir, tmp_path):
    build_shortlist(workdir / "data", tmp_path / "vmap.txt", per_source=2, frequent=5)
    sources = read_lines(workdir / "data" / "raw" / "test.de")[:40]
    translator = Translator(dirs["int8"], shortlist=tmp_path / "vmap.txt")
    produced = _token_ids(translator, sources)
    for source, tokens in zip(sources, produced):
        allowed = translator.shortlist.candidates([[translator.symbols[t] for t in translator.encode(source)[:-1]]])
        assert set(tokens) <= set(allowed.tolist()), source
    unrestricted = _token_ids(Translator(dirs["int8"]), sources)
    assert produced != unrestricted  # 2 translations a word and 5 frequent pieces do change some outputs


def test_what_cannot_take_a_shortlist_is_refused(dirs, tmp_path):
    vmap = _every_token(dirs["fp32"], tmp_path / "all.txt")
    with pytest.raises(ShortlistError, match="no_repeat_ngram_size"):
        Translator(dirs["fp32"], SearchOptions(no_repeat_ngram_size=2), shortlist=vmap)
    with pytest.raises(LiteError, match="--shortlist rewrites the ONNX decoder step: it needs --backend onnx"):
        open_translator("ort", dirs["fp32"], shortlist=vmap)
    with pytest.raises(LiteError, match="missing.txt: no such file"):
        Translator(dirs["fp32"], shortlist=tmp_path / "missing.txt")
