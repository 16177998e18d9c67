"""ONNX Runtime's BeamSearch op over a model dir's graphs (export/ort_search.py): on a trained tiny Transformer
its fp32 hypotheses equal export/search.py's (fairseq's search) wherever neither search ran into the length cap,
at batch 1 and on left-padded batches; its int8 stays as close to our int8 search as two int8 runs can; the
graph follows the op's contract and drops the per-step reorder; what the op cannot serve is refused in one line."""
import json
import shutil

import numpy as np
import pytest
import sacrebleu

from compress.quantize import quantize
from export.exporter import export
from export.model_dir import ModelDir
from export.ort_search import OrtSearchError, search_graph
from export.runtime import Translator
from export.search import SearchOptions, left_pad, search
from lite.cli import main
from lite.data import Corpus
from lite.text import read_lines


@pytest.fixture(scope="module")
def dirs(trained_transformer, tmp_path_factory):
    root = tmp_path_factory.mktemp("ort_search")
    checkpoint = root / "model.pt"
    shutil.copy(trained_transformer, checkpoint)
    fp32 = export(checkpoint, root / "fp32")
    return {"fp32": fp32, "int8": quantize(fp32, root / "int8")}


@pytest.fixture(scope="module")
def sentences(workdir):
    corpus = Corpus.load(workdir / "data")
    raw = workdir / "data" / "raw"
    return read_lines(raw / f"test.{corpus.src}")[:120], read_lines(raw / f"test.{corpus.tgt}")[:120]


def _both(ours: Translator, theirs: Translator, lines: list[str], batch: int):
    """Per sentence, batched as ``Translator.translate`` batches them (sorted by length, left-padded): (our best
    tokens, the op's best tokens, whether either search reached the length cap)."""
    d, options = ours.description, ours.options
    encoded = sorted((ours.encode(line) for line in lines), key=len)
    out = []
    for first in range(0, len(encoded), batch):
        src = left_pad(encoded[first:first + batch], d["pad"])
        max_len = int(options.max_len_a * src.shape[1] + options.max_len_b)
        mine = [n[0].tokens.tolist() for n in search(ours.model, src, eos=d["eos"], pad=d["pad"], unk=d["unk"],
                                                     options=options)]
        op = [t.tolist() for t in theirs.model.search(src, options, max_len_cap=None)]
        out += [(a, b, len(a) > max_len or b[-1:] != [d["eos"]]) for a, b in zip(mine, op)]
    return out


@pytest.mark.parametrize("batch", [1, 8])
def test_fp32_translates_as_our_search(dirs, sentences, batch):
    """Token for token wherever neither search reached the cap (there fairseq forces an eos and scores it, the op
    ends the beams as they are), on at least 80% of the sentences; at batch 8 the sentences are left-padded."""
    options = SearchOptions(beam=4)
    pairs = _both(Translator(dirs["fp32"], options), Translator(dirs["fp32"], options, search="ort"), sentences[0],
                  batch)
    compared = [(a, b) for a, b, capped in pairs if not capped]
    assert len(compared) >= 0.8 * len(pairs)
    assert sum(a == b for a, b in compared) == len(compared)


def test_int8_stays_close(dirs, sentences):
    sources, references = sentences
    ours = Translator(dirs["int8"]).translate(sources)
    theirs = Translator(dirs["int8"], search="ort").translate(sources)
    assert sum(a == b for a, b in zip(ours, theirs)) >= 0.8 * len(sources)
    bleu = [sacrebleu.corpus_bleu(h, [references]).score for h in (ours, theirs)]
    assert abs(bleu[0] - bleu[1]) < 2.0, bleu


def test_graph_follows_the_contract(dirs):
    model_dir = ModelDir.open(dirs["int8"])
    with model_dir.readable_graphs() as graphs:
        model = search_graph(graphs, model_dir.description)
    (node,) = model.graph.node
    graphs = {a.name: a.g for a in node.attribute if a.name in ("encoder", "decoder")}
    decoder, encoder = graphs["decoder"], graphs["encoder"]
    layers = len(model_dir.description["states"]) // 2
    names = lambda io, kind: [f"{io}_{kv}_{kind}_{i}" for i in range(layers) for kv in ("key", "value")]  # noqa: E731
    assert [i.name for i in encoder.input] == ["encoder_input_ids", "encoder_attention_mask"]
    assert [o.name for o in encoder.output] == names("present", "cross")
    assert [i.name for i in decoder.input] == ["input_ids", "encoder_attention_mask", *names("past", "self"),
                                               *names("past", "cross")]
    assert [o.name for o in decoder.output] == ["logits", *names("present", "self")]
    assert not any("order" in n.input for n in decoder.node)  # the op reorders the states itself
    assert not any(n.op_type == "LogSoftmax" for n in decoder.node)  # and takes the log-softmax itself


def test_what_it_cannot_serve_is_refused(dirs, model_dir, tmp_path):
    """The tiny LSRA (convolution states beside its caches), an unk penalty, a shortlist, the ORT-format graphs."""
    with pytest.raises(OrtSearchError, match="lsra.* --search fairseq") as error:
        Translator(model_dir, search="ort")
    assert "\n" not in str(error.value)
    with pytest.raises(OrtSearchError, match="unk penalty"):
        Translator(dirs["fp32"], SearchOptions(unk_penalty=1.0), search="ort")
    vmap = tmp_path / "vmap.txt"
    vmap.write_text("\t" + " ".join(read_lines(ModelDir.open(dirs["fp32"]).file("vocab.txt"))[4:10]) + "\n")
    with pytest.raises(OrtSearchError, match="shortlist"):
        Translator(dirs["fp32"], shortlist=vmap, search="ort")
    with pytest.raises(OrtSearchError, match="ORT-format"):
        Translator(dirs["fp32"], format="ort", search="ort")
    with pytest.raises(ValueError, match="search 'greedy'"):
        Translator(dirs["fp32"], search="greedy")


def test_no_repeat_ngram_size_is_applied(dirs, sentences):
    """Size 2: no output repeats a token pair (the op's own blocking, set when its graph is built)."""
    translator = Translator(dirs["fp32"], SearchOptions(no_repeat_ngram_size=2), search="ort")
    d = translator.description
    for line in sentences[0][:30]:
        src = left_pad([translator.encode(line)], d["pad"])
        tokens = [d["eos"], *translator.model.search(src, translator.options, None)[0].tolist()]
        pairs = list(zip(tokens, tokens[1:]))
        assert len(pairs) == len(set(pairs)), tokens
    with pytest.raises(OrtSearchError, match="no_repeat_ngram_size"):
        translator.model.search(np.array([[5, d["eos"]]]), SearchOptions(), None)


def test_bench_measures_each_onnx_target_again_with_it(dirs, model_dir, workdir, tmp_path, caplog):
    """``lite bench --ort-search``: a second target per model dir the op serves; the LSRA's is left out, with why."""
    out, source = tmp_path / "bench.json", workdir / "data" / "raw" / "test.de"
    assert main(["bench", "--source", str(source), "--model", str(dirs["fp32"]), "--model", str(model_dir),
                 "--ort-search", "--sentences", "4", "--warmup", "0", "--batch", "2", "--out", str(out)]) == 0
    results = {r["target"]: r for r in json.loads(out.read_text())["results"]}
    assert set(results) == {f"onnx:{dirs['fp32'].name}", f"onnx:{model_dir.name}",
                            f"onnx:{dirs['fp32'].name}+ort-search"}
    searched = results[f"onnx:{dirs['fp32'].name}+ort-search"]
    translator = Translator(dirs["fp32"], search="ort", batch_size=1)
    assert searched["error"] is None
    assert searched["hypotheses"] == [translator.translate([line])[0] for line in read_lines(source)[:4]]
    assert any(f"onnx:{model_dir.name} left out" in r.message and "--search fairseq" in r.message
               for r in caplog.records)


def test_cli_eval(dirs, workdir, capsys):
    assert main(["eval", "--backend", "onnx", "--model", str(dirs["fp32"]), "--split", "test", "--search", "ort",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["search"] == "ort" and result["hypotheses"].endswith("test.ort-search.hyp.en")
    hypotheses = read_lines(result["hypotheses"])
    assert hypotheses == Translator(dirs["fp32"], search="ort").translate(read_lines(workdir / "data/raw/test.de"))
    assert main(["eval", "--backend", "torch", "--checkpoint", "x.pt", "--split", "test", "--search", "ort"]) == 2
    assert "--search ort runs the model dir's ONNX graphs" in capsys.readouterr().err
