"""Shared fixtures: seeded RNG, one tolerance helper, tiny models of every registered architecture."""
from __future__ import annotations

import argparse
import logging
import os
import random
import re
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
import torch
from fairseq.data import Dictionary
from fairseq.models import ARCH_CONFIG_REGISTRY, ARCH_MODEL_REGISTRY
from filelock import FileLock
from hypothesis import settings

import lite.models  # noqa: F401  (registers the models)
from lite.models import LiteTransformerModel

TINY = dict(encoder_embed_dim=16, decoder_embed_dim=16, encoder_ffn_embed_dim=32, decoder_ffn_embed_dim=32,
            encoder_layers=2, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
            mixer_attention_heads=2, conv_heads=2, gau_key_dim=8)
ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = ROOT / "configs" / "models" / "lsra" / "tiny.yaml"
TINY_UPDATES = 600
BLEU_FLOOR = 30.0  # an untrained model scores ~0; the tiny LSRA reaches well above this
LITE = [sys.executable, "-m", "lite.cli"]
LITE_ARCHS = sorted(a for a, m in ARCH_MODEL_REGISTRY.items() if m is LiteTransformerModel)


def fuzz(cases: int = 1000) -> settings:
    """Hypothesis settings of every fuzz test: the same ``cases`` on every run (seeded from the test), no example
    database written, no per-case deadline (a test that bounds time asserts it itself)."""
    return settings(max_examples=cases, derandomize=True, database=None, deadline=None)


if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs 2 processes on 2 cores: one thread each, children too
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


SPREAD = {"tests/lite/test_families.py"}  # test files whose tests (one tiny training each) go to any free worker


@pytest.hookimpl(optionalhook=True)  # pytest -p no:xdist runs without it
def pytest_xdist_make_scheduler(config, log):
    """Under ``pytest -n N`` a test file runs on one worker, so its module fixtures are built once, except the files
    in ``SPREAD``, whose tests are shared out one by one. (xdist's own ``--dist loadgroup`` marks cannot do this
    under pytest 9: they rename the node ids, which pytest 9 no longer lets a plugin do, and silently run as
    ``--dist load``.)"""
    from xdist.scheduler import LoadScopeScheduling

    class FileScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return nodeid if path in SPREAD else path

    return FileScheduling(config, log)


def pytest_terminal_summary(terminalreporter) -> None:
    from tests.figures import FIGURES

    if FIGURES:
        terminalreporter.section("reliability figures")
        for name, count in sorted(FIGURES.items()):
            terminalreporter.write_line(f"{name}: {count:,}")


@pytest.fixture(autouse=True)
def seed():
    random.seed(0)
    torch.manual_seed(0)


@contextmanager
def logged(name: str) -> Iterator[list[logging.LogRecord]]:
    """The records logged to logger ``name`` in the block (caplog is per test, a fuzz test needs them per case)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append
    logger = logging.getLogger(name)
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def left_padding(batch: int, length: int, pads: int) -> torch.Tensor:
    """Padding mask [B, T] whose second sentence has ``pads`` pads on the left (mixer tests)."""
    mask = torch.zeros(batch, length, dtype=torch.bool)
    mask[1, :pads] = True
    return mask


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float = 1e-5, rtol: float = 1e-5) -> None:
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


def tiny_dictionary(size: int = 40) -> Dictionary:
    d = Dictionary()
    for i in range(size):
        d.add_symbol(f"w{i}")
    return d


class TinyTask:
    def __init__(self, dictionary: Dictionary):
        self.source_dictionary = self.target_dictionary = dictionary


def tiny_model(arch: str, dictionary: Dictionary | None = None, **overrides) -> LiteTransformerModel:
    """A registered architecture at test size (embed 16, 2+2 layers), in eval mode; FFN-less stays FFN-less."""
    preset = argparse.Namespace()
    ARCH_CONFIG_REGISTRY[arch](preset)
    no_ffn = {} if preset.encoder_ffn_embed_dim else {"encoder_ffn_embed_dim": 0, "decoder_ffn_embed_dim": 0}
    args = argparse.Namespace(**{**TINY, **no_ffn, **overrides})
    ARCH_CONFIG_REGISTRY[arch](args)
    return LiteTransformerModel.build_model(args, TinyTask(dictionary or tiny_dictionary())).eval()


def run(cmd, **kwargs):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, **kwargs)


@contextmanager
def built_once(tmp_path_factory, name: str) -> Iterator[tuple[Path, bool]]:
    """A dir that the workers of one test run share: the first to get here builds it (the flag is True), the others
    wait for that and reuse it. A build that raised leaves no mark, so the next one tries again."""
    base = tmp_path_factory.getbasetemp()
    path = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / name
    with FileLock(f"{path}.lock"):
        built = path / ".built"
        yield path, not built.exists()
        built.touch()


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
    """The embedded corpus prepared (vocabulary 1000), once per test run; tests write only below their tmp_path."""
    from lite.corpus import write_default_corpus
    from lite.data import prepare

    with built_once(tmp_path_factory, "pipeline") as (root, build):
        if build:
            write_default_corpus(root / "text")
            prepare(root / "text", root / "data", vocab_size=1000)
    return root


@pytest.fixture(scope="session")
def trained(workdir, tmp_path_factory):
    """A tiny LSRA trained for a few minutes, once per test run; returns its checkpoint (copy it to change it)."""
    from lite.train import load_config, train

    with built_once(tmp_path_factory, "pipeline/ck") as (save_dir, build):
        if build:
            config = load_config(TINY_CONFIG, [f"data={workdir / 'data'}", f"save_dir={save_dir}",
                                               f"max_update={TINY_UPDATES}"])
            assert train(config) == 0
    return save_dir / "checkpoint_best.pt"


# the tiny LSRA config as a plain Transformer (mixer heads unset: self and cross attention share 4 heads)
TINY_TRANSFORMER = ["arch=transformer_d128", "mixer_attention_heads=null", "max_update=300", "lr=0.005",
                    "warmup_updates=100", "dropout=0.0"]


@pytest.fixture(scope="session")
def trained_transformer(workdir, tmp_path_factory):
    """A tiny Transformer (embed 32, 2+2 layers, 300 updates) trained on the embedded corpus, once per test run;
    its checkpoint (copy it to change it)."""
    from lite.train import load_config, train

    with built_once(tmp_path_factory, "pipeline/ck_transformer") as (save_dir, build):
        if build:
            config = load_config(TINY_CONFIG, [f"data={workdir / 'data'}", f"save_dir={save_dir}", *TINY_TRANSFORMER])
            assert train(config) == 0
    return save_dir / "checkpoint_best.pt"


@pytest.fixture(scope="session")
def model_dir(trained, tmp_path_factory):
    """``trained`` exported (ONNX graphs, no slim, no ORT format), for tests that only read the model dir."""
    from export.exporter import export

    root = tmp_path_factory.mktemp("model_dir")
    checkpoint = root / "model.pt"
    shutil.copy(trained, checkpoint)
    return export(checkpoint, root / "onnx")


def fairseq_generate(workdir: Path, checkpoint: Path, split: str = "test", beam: int = 4) -> dict:
    """fairseq-generate's detokenized hypotheses {sentence index: text} on a split of the tiny corpus."""
    from lite.train import USER_DIR

    out = run([str(Path(sys.executable).parent / "fairseq-generate"), str(workdir / "data"), "--user-dir", USER_DIR,
               "--path", str(checkpoint), "--gen-subset", split, "--beam", str(beam), "--lenpen", "1",
               "--max-len-a", "1.2", "--max-len-b", "10", "--batch-size", "64", "--post-process", "sentencepiece",
               # fairseq 0.12's batch_by_size drops the remainder that is not a multiple of this (default 8)
               "--required-batch-size-multiple", "1"], cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    return {int(m[1]): m[2] for m in re.finditer(r"^D-(\d+)\t\S+\t(.*)$", out.stdout, re.M)}
