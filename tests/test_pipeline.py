"""End to end on the embedded corpus: prepare -> lite train (tiny) -> lite eval / translate / fairseq-generate,
with resume, safe checkpoint loading and bad checkpoints."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lite.checkpoint import CheckpointError
from lite.corpus import write_default_corpus
from lite.data import prepare
from lite.evaluate import evaluate
from lite.train import USER_DIR, load_config, train
from lite.translate import GenerationOptions, TorchTranslator, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = ROOT / "configs" / "models" / "lsra" / "tiny.yaml"
TINY_UPDATES = 600
BLEU_FLOOR = 30.0  # an untrained model scores ~0; the tiny LSRA reaches well above this
LITE = [sys.executable, "-m", "lite.cli"]


def run(cmd, **kwargs):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, **kwargs)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    write_default_corpus(root / "text")
    prepare(root / "text", root / "data", vocab_size=1000)
    return root


@pytest.fixture(scope="module")
def trained(workdir):
    """A tiny LSRA trained for a few minutes; returns its checkpoint."""
    config = load_config(TINY_CONFIG, [f"data={workdir / 'data'}", f"save_dir={workdir / 'ck'}",
                                       f"max_update={TINY_UPDATES}"])
    assert train(config) == 0
    return workdir / "ck" / "checkpoint_best.pt"


def test_trained_model_clears_the_bleu_floor_an_untrained_one_cannot(workdir, trained):
    result = evaluate(trained, "test", out_dir=workdir / "eval")
    assert result["bleu"] > BLEU_FLOOR, result
    assert result["bleu_signature"].startswith("nrefs:1|") and "|nc:6|" in result["chrf_signature"]
    assert Path(result["hypotheses"]).read_text(encoding="utf-8").count("\n") == result["sentences"]

    untrained = load_config(TINY_CONFIG, [f"data={workdir / 'data'}", f"save_dir={workdir / 'untrained'}",
                                          "max_update=1"])
    assert train(untrained) == 0
    assert evaluate(workdir / "untrained" / "checkpoint_last.pt", "test", out_dir=workdir / "eval0")["bleu"] < 5


def test_checkpoints_load_weights_only(trained):
    """After `import lite` torch's safe loader reads a fairseq checkpoint; without the allow-list it refuses."""
    state = torch.load(trained, weights_only=True)
    assert state["args"] is not None or state["cfg"] is not None
    plain = run([sys.executable, "-c", f"import torch; torch.load({str(trained)!r}, weights_only=True)"])
    assert plain.returncode != 0 and "argparse.Namespace" in plain.stderr


def test_training_resumes_from_the_last_checkpoint(workdir, trained):
    log = run([*LITE, "train", str(TINY_CONFIG), f"data={workdir / 'data'}", f"save_dir={workdir / 'ck'}",
               f"max_update={TINY_UPDATES + 20}"])
    assert log.returncode == 0, log.stderr[-2000:]
    assert re.search(rf"Loaded checkpoint .*checkpoint_last\.pt \(epoch \d+ @ {TINY_UPDATES} updates\)",
                     log.stdout + log.stderr)
    assert torch.load(workdir / "ck" / "checkpoint_last.pt", weights_only=True)["optimizer_history"][-1][
        "num_updates"] == TINY_UPDATES + 20


def test_fairseq_generate_with_user_dir_matches_lite_translate(workdir, trained):
    out = run([str(Path(sys.executable).parent / "fairseq-generate"), str(workdir / "data"), "--user-dir", USER_DIR, "--path", str(trained),
               "--gen-subset", "test", "--beam", "4", "--lenpen", "1", "--max-len-a", "1.2", "--max-len-b", "10",
               "--batch-size", "64", "--post-process", "sentencepiece",
               # fairseq 0.12's batch_by_size drops the remainder that is not a multiple of this (default 8)
               "--required-batch-size-multiple", "1"],
              cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    fairseq = {int(m[1]): m[2] for m in re.finditer(r"^D-(\d+)\t\S+\t(.*)$", out.stdout, re.M)}
    sources = (workdir / "data" / "raw" / "test.de").read_text(encoding="utf-8").splitlines()
    ours = TorchTranslator(trained, options=GenerationOptions(beam=4)).translate(sources)
    assert len(fairseq) == len(sources)
    same = sum(fairseq[i] == ours[i] for i in range(len(sources)))
    assert same / len(sources) >= 0.99


def test_translate_cli_handles_empty_lines_and_bad_bytes(trained):
    ok = run([*LITE, "translate", "--checkpoint", str(trained)], input="Ein Hund läuft.\n\n   \nZwei Katzen.\n")
    assert ok.returncode == 0, ok.stderr[-2000:]
    lines = ok.stdout.split("\n")
    assert len(lines) == 5 and lines[1] == "" and lines[2] == "" and lines[0] and lines[3]
    bad = subprocess.run([*LITE, "translate", "--checkpoint", str(trained)], input=b"Hund\n\xff\n",
                         capture_output=True, timeout=300)
    assert bad.returncode == 2 and b"<stdin>:2: not UTF-8" in bad.stderr


def test_corrupt_and_mismatched_checkpoints_are_refused(workdir, trained, tmp_path):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(trained.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="corrupt.pt: not a loadable fairseq checkpoint"):
        load_checkpoint(corrupt)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
    other = tmp_path / "other"
    prepare(workdir / "text", other, vocab_size=400)  # another dictionary
    with pytest.raises(CheckpointError, match="dictionary"):
        load_checkpoint(trained, data=other)
    cli = run([*LITE, "eval", "--checkpoint", str(corrupt), "--split", "test"])
    assert cli.returncode == 2 and "not a loadable fairseq checkpoint" in cli.stderr


def test_eval_names_the_valid_splits(trained):
    cli = run([*LITE, "eval", "--checkpoint", str(trained), "--split", "test2099"])
    assert cli.returncode == 2 and "its splits: train, valid, test" in cli.stderr
