"""CTranslate2 export: the spec's log-probs equal PyTorch's over a grid of Transformer layouts; a trained tiny
Transformer translates as fairseq does (beam 4) and its int8 model stays close in BLEU; other families, options
CTranslate2 cannot express and existing dirs are refused with one clear line."""
import argparse
import json
import os
import subprocess
import sys

import ctranslate2
import pytest
import sacrebleu
import torch

from export.ctranslate2 import CT2Error, CT2Translator, convert_to_ctranslate2, model_spec
from export.search import SearchOptions
from lite.checkpoint import load_model
from lite.data import Corpus
from lite.files import OutputError
from lite.text import read_lines
from lite.translate import open_translator
from tests.conftest import ROOT, assert_close, tiny_dictionary, tiny_model

LAYOUTS = {
    "post-norm": {},
    "pre-norm gelu": dict(normalize_before=True, activation_fn="gelu"),
    "unshared, decoder wider": dict(share_all_embeddings=False, decoder_embed_dim=24, decoder_ffn_embed_dim=48,
                                    decoder_attention_heads=3, mixer_attention_heads=None),
    "pruned head dims": dict(encoder_attention_head_dim=5, decoder_attention_heads=3, decoder_attention_head_dim=6,
                             mixer_attention_heads=None),
}


def teacher_forced(model, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """fairseq's log-probs of ``tgt`` (ids, </s> last) given ``src`` (ids, </s> last): [len(tgt)]."""
    eos = model.decoder.dictionary.eos()
    prev = torch.cat([tgt.new_tensor([eos]), tgt[:-1]])
    with torch.no_grad():
        logits, _ = model(src[None], torch.tensor([len(src)]), prev[None])  # [1, T, V]
    return torch.log_softmax(logits.float(), -1)[0].gather(1, tgt[:, None])[:, 0]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_spec_log_probs_match_pytorch(layout, tmp_path):
    """Sources of 1, 7 and 33 tokens; random weights (norms and biases too) so that every tensor's place counts."""
    dictionary = tiny_dictionary()
    model = tiny_model("transformer_d128", dictionary, **LAYOUTS[layout])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    spec = model_spec(model)
    spec.validate()
    spec.optimize()
    spec.save(str(tmp_path))
    translator = ctranslate2.Translator(str(tmp_path))
    eos = torch.tensor([dictionary.eos()])
    pairs = [(torch.randint(4, len(dictionary), (s,)), torch.randint(4, len(dictionary), (t,)))
             for s, t in ((1, 5), (7, 1), (33, 12))]
    results = translator.score_batch([[dictionary[i] for i in s] for s, _ in pairs],
                                     [[dictionary[i] for i in t] for _, t in pairs])
    for (src, tgt), result in zip(pairs, results):
        expected = teacher_forced(model, torch.cat([src, eos]), torch.cat([tgt, eos]))
        assert_close(torch.tensor(result.log_probs), expected, atol=1e-4, rtol=0)


def _checkpoint(tmp_path, **args) -> str:
    """A checkpoint holding only args (no weights): enough for what is refused before loading."""
    path = tmp_path / "checkpoint.pt"
    torch.save({"args": argparse.Namespace(**args), "model": {}}, path)
    return str(path)


@pytest.mark.parametrize("arch", ["lsra_iwslt_160", "flash_100m", "fastformer_100m"])
def test_other_families_are_refused(arch, tmp_path):
    with pytest.raises(CT2Error) as refused:
        convert_to_ctranslate2(_checkpoint(tmp_path, arch=arch), tmp_path / "ct2")
    message = str(refused.value)
    assert "\n" not in message and f"arch {arch} " in message and "transformer_d128" in message
    assert not (tmp_path / "ct2").exists()


def test_every_problem_is_reported_at_once(tmp_path):
    checkpoint = _checkpoint(tmp_path, arch="transformer_d128", activation_fn="tanh", mixer_attention_heads=2)
    with pytest.raises(CT2Error, match=r"activation-fn tanh.*decoder self-attention has 2 heads"):
        convert_to_ctranslate2(checkpoint, tmp_path / "ct2")


def test_translating_imports_no_torch():
    """What the translator needs loads without torch (a benchmark worker measures CTranslate2's memory alone)."""
    code = "import sys, export.ctranslate2; print(sorted({'torch', 'fairseq'} & set(sys.modules)))"
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert child.stdout.strip() == "[]", child.stderr[-2000:]


def test_bad_options_and_dirs_are_refused(tmp_path):
    with pytest.raises(CT2Error, match="quantization 'int3'"):
        convert_to_ctranslate2(_checkpoint(tmp_path, arch="transformer_d128"), tmp_path / "ct2", quantization="int3")
    with pytest.raises(CT2Error, match="'transformer' is not a lite_transformer architecture"):
        convert_to_ctranslate2(_checkpoint(tmp_path, arch="transformer"), tmp_path / "ct2")
    with pytest.raises(CT2Error, match="not a model dir written by convert_to_ctranslate2"):
        CT2Translator(tmp_path, tmp_path)


@pytest.fixture(scope="module")
def transformer(trained_transformer):
    return trained_transformer


@pytest.fixture(scope="module")
def sentences(workdir):
    """(sources, references) of the tiny corpus's test split."""
    corpus = Corpus.load(workdir / "data")
    raw = workdir / "data" / "raw"
    return read_lines(raw / f"test.{corpus.src}"), read_lines(raw / f"test.{corpus.tgt}")


@pytest.fixture(scope="module")
def fp32_dir(transformer, tmp_path_factory):
    return convert_to_ctranslate2(transformer, tmp_path_factory.mktemp("ct2") / "fp32")


@pytest.fixture(scope="module")
def torch_hypotheses(transformer, sentences):
    return open_translator("torch", transformer, options=SearchOptions(beam=4))[0].translate(sentences[0])


def test_translations_match_fairseq(fp32_dir, workdir, sentences, torch_hypotheses):
    """Beam 4 on the 300 test sentences; they may differ only where a search runs into the length limit (fairseq
    then appends a forced </s> and scores it, CTranslate2 stops without it)."""
    hypotheses = CT2Translator(fp32_dir, workdir / "data", beam=4).translate([*sentences[0], ""])
    assert hypotheses[-1] == ""
    same = sum(a == b for a, b in zip(hypotheses, torch_hypotheses))
    assert same >= 0.99 * len(torch_hypotheses), f"{same} of {len(torch_hypotheses)} translations equal fairseq's"


def test_scores_match_fairseq(transformer, fp32_dir, workdir, sentences, torch_hypotheses):
    """CTranslate2's log-probs of fairseq's hypotheses (</s> included) equal fairseq's teacher-forced ones."""
    model, task = load_model(transformer)
    translator = CT2Translator(fp32_dir, workdir / "data")
    sources = [translator.encode(line) for line in sentences[0][:8]]
    targets = [translator.spm.encode(line, out_type=str) for line in torch_hypotheses[:8]]
    results = translator.translator.score_batch(sources, targets)
    for src, tgt, result in zip(sources, targets, results):
        src_ids, tgt_ids = (d.encode_line(" ".join(p), add_if_not_exist=False).long()
                            for d, p in ((task.source_dictionary, src), (task.target_dictionary, tgt)))
        assert_close(torch.tensor(result.log_probs), teacher_forced(model, src_ids, tgt_ids), atol=1e-4, rtol=0)


TRANSLATE = """import json, sys
from export.ctranslate2 import CT2Translator
model_dir, data, lines = json.load(sys.stdin)
print(json.dumps(CT2Translator(model_dir, data, beam=4).translate(lines)))
"""


def translate_on_mkl(model_dir, data, lines: list[str]) -> list[str]:
    """CT2Translator in a child process on CTranslate2's MKL GEMMs. Its default on AMD CPUs, oneDNN's u8s8 GEMM on
    AVX2 without VNNI, costs the tiny model ~12 BLEU in int8 (MKL: ~0.1); CT2_USE_MKL is read when ctranslate2 loads."""
    child = subprocess.run([sys.executable, "-c", TRANSLATE], input=json.dumps([str(model_dir), str(data), lines]),
                           capture_output=True, text=True, cwd=ROOT, env={**os.environ, "CT2_USE_MKL": "1"})
    assert child.returncode == 0, child.stderr[-2000:]
    return json.loads(child.stdout.splitlines()[-1])


def test_int8_stays_close_in_bleu(transformer, fp32_dir, workdir, sentences, tmp_path):
    sources, references = sentences
    int8_dir = convert_to_ctranslate2(transformer, tmp_path / "int8", "int8")
    assert ctranslate2.Translator(str(int8_dir)).compute_type.startswith("int8")  # int8 weights, loaded as such
    bleu = {name: sacrebleu.corpus_bleu(translate_on_mkl(d, workdir / "data", sources), [references]).score
            for name, d in (("float32", fp32_dir), ("int8", int8_dir))}
    assert abs(bleu["int8"] - bleu["float32"]) <= 2.0, bleu


def test_existing_dir_needs_force(transformer, fp32_dir, tmp_path):
    """force replaces a model dir, never a dir holding anything else."""
    with pytest.raises(OutputError, match="already holds a CTranslate2 model dir; pass --force"):
        convert_to_ctranslate2(transformer, fp32_dir)
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(OutputError, match="is not a CTranslate2 model dir"):
        convert_to_ctranslate2(transformer, tmp_path, force=True)
    assert convert_to_ctranslate2(transformer, fp32_dir, force=True) == fp32_dir
    assert ctranslate2.contains_model(str(fp32_dir))


def test_vocabulary_map_of_every_token_translates_as_without(transformer, fp32_dir, workdir, sentences, tmp_path):
    """The vmap goes into the dir as CTranslate2's vmap.txt; with every target token in it, use_vmap changes nothing
    (export/shortlist.py reads the same file for ours)."""
    symbols = read_lines(workdir / "data" / "dict.en.txt")
    vmap = tmp_path / "every.txt"
    vmap.write_text("\t" + " ".join(line.split()[0] for line in symbols) + "\n", encoding="utf-8")
    with_map = convert_to_ctranslate2(transformer, tmp_path / "vmap", vmap=vmap)
    assert (with_map / "vmap.txt").read_bytes() == vmap.read_bytes()
    sources = sentences[0][:60]
    expected = CT2Translator(fp32_dir, workdir / "data", beam=4).translate(sources)
    assert CT2Translator(with_map, workdir / "data", beam=4, use_vmap=True).translate(sources) == expected
    with pytest.raises(CT2Error, match="no vmap.txt"):
        CT2Translator(fp32_dir, workdir / "data", use_vmap=True)


def test_shortlist_translates_as_ctranslate2_with_the_same_map(transformer, fp32_dir, workdir, sentences, tmp_path):
    """Ours (export/shortlist.py) and CTranslate2's use_vmap read one vocabulary map and normalise over the same
    candidates: the fp32 translations agree as without a map (≥ 99%), and the map changes some of them."""
    from export.exporter import export
    from export.runtime import Translator
    from lite.shortlist import build_shortlist

    vmap = tmp_path / "vmap.txt"
    build_shortlist(workdir / "data", vmap, per_source=3, frequent=10)
    ours = Translator(export(transformer, tmp_path / "onnx"), SearchOptions(beam=4), shortlist=vmap, batch_size=1)
    theirs = CT2Translator(convert_to_ctranslate2(transformer, tmp_path / "ct2", vmap=vmap), workdir / "data", beam=4,
                           batch_size=1, use_vmap=True)
    sources = sentences[0][:100]
    mine, expected = ours.translate(sources), theirs.translate(sources)
    same = sum(a == b for a, b in zip(mine, expected))
    assert same >= 0.99 * len(sources), f"{same} of {len(sources)} translations equal CTranslate2's with the map"
    plain = CT2Translator(fp32_dir, workdir / "data", beam=4, batch_size=1).translate(sources)
    assert mine != plain
