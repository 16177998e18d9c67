"""Every mixer in the registry (``lite.modules.MIXERS``) carries the tests a mechanism owes: its parity tests (fast
path vs reference; stepping vs full causal pass and beam reordering when it has a causal form), an architecture in the
export grid, a tiny model trained to the BLEU floor, and a hand count of its Mult-Adds. Registering a mixer without
them fails here, naming what is missing."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from lite.models.factory import arch_args
from lite.modules import CAUSAL_MIXERS, MIXERS
from lite.train import ConfigError, load_config, train
from tests.conftest import ROOT, TINY_CONFIG, tiny_model
from tests.eval.test_macs import GAU_FASTFORMER_ARCHS, PAPER_MACS, TINY_ARCHS
from tests.export.test_export import EXPORTED
from tests.lite.test_families import TRAINED

# mixer -> the module holding its parity tests; None only where lite has no fast path of its own (said why)
PARITY_TESTS: dict[str, str | None] = {
    "attention": None,  # fairseq's MultiheadAttention, itself the reference; stepping: test_models on whole models
    "lsra": "tests/lite/test_conv.py",  # attention (above) beside the convolution branch, whose fast path is this
    "conv": "tests/lite/test_conv.py",
    "gau": "tests/lite/test_gau.py",
    "fastformer": "tests/lite/test_fastformer.py",
    "linear": "tests/lite/test_linear_attention.py",
    "performer": "tests/lite/test_linear_attention.py",
    "local": "tests/lite/test_local_attention.py",
    "synthesizer_dense": "tests/lite/test_synthesizer.py",
    "synthesizer_random": "tests/lite/test_synthesizer.py",
    "linformer": "tests/lite/test_linformer.py",
    "memory_compressed": "tests/lite/test_memory_compressed.py",
    "strided": "tests/lite/test_strided_attention.py",
    "longformer": "tests/lite/test_longformer_attention.py",
    "bigbird": "tests/lite/test_bigbird_attention.py",
    "isab": "tests/lite/test_isab.py",
    "routing": "tests/lite/test_routing_attention.py",
    "sinkhorn": "tests/lite/test_sinkhorn_attention.py",
    "poolingformer": "tests/lite/test_poolingformer.py",
    "reformer": "tests/lite/test_reformer.py",
}
FAST_VS_REFERENCE = "test_fast_path_matches_reference"
CAUSAL_TESTS = ("test_stepping_matches_full_causal_pass", "test_reorder_incremental_state_follows_beams")
# a mixer with no architecture of its own, covered as a branch of another one's
BRANCH_OF = {"conv": "lsra"}


def _mixers(arch: str, **overrides) -> set[str]:
    args = arch_args(arch, **overrides)
    return {args.encoder_mixer, args.decoder_mixer}


def _tiny_config_mixers(path: Path) -> set[str]:
    config = yaml.safe_load(path.read_text())
    overrides = {k: config[k] for k in ("encoder_mixer", "decoder_mixer") if k in config}
    return _mixers(config["arch"], **overrides)


def _test_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {node.name for node in tree.body if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")}


def missing(mixers, causal=CAUSAL_MIXERS) -> dict[str, list[str]]:
    """What each of ``mixers`` lacks, by kind of test: {kind: [mixer, ...]} (empty lists when none lacks it)."""
    exported = set().union(*(_mixers(a) for a in EXPORTED))
    trained = set().union(_tiny_config_mixers(TINY_CONFIG),
                          *(_tiny_config_mixers(ROOT / "configs" / "models" / f / "tiny.yaml") for f in TRAINED))
    counted = set().union(*(_mixers(a) for a in [*TINY_ARCHS, *PAPER_MACS]),
                          *(_mixers(a, **o) for a, o in GAU_FASTFORMER_ARCHS))
    report: dict[str, list[str]] = {"parity tests": [], "export grid": [], "tiny model trained": [],
                                    "MACs hand count": []}
    for mixer in sorted(mixers):
        as_used = BRANCH_OF.get(mixer, mixer)
        for kind, covered in (("export grid", exported), ("tiny model trained", trained),
                              ("MACs hand count", counted)):
            if as_used not in covered:
                report[kind].append(mixer)
        module = PARITY_TESTS.get(mixer, "")
        if module is None:
            continue
        path = ROOT / module if module else None
        names = _test_names(path) if path is not None and path.is_file() else set()
        needed = {FAST_VS_REFERENCE, *(CAUSAL_TESTS if mixer in causal else ())}
        if not needed <= names:
            report["parity tests"].append(f"{mixer} ({module or 'no module named in PARITY_TESTS'}: lacks "
                                          f"{', '.join(sorted(needed - names))})")
    return report


def test_every_registered_mixer_has_its_tests():
    report = missing(MIXERS)
    assert report == {kind: [] for kind in report}, report


def test_a_mixer_registered_without_tests_is_reported_for_each():
    """The check is not vacuous: a new name, with none of the above, is missing from all four."""
    report = missing([*MIXERS, "new_mixer"], causal=CAUSAL_MIXERS | {"new_mixer"})
    assert report["parity tests"] == ["new_mixer (no module named in PARITY_TESTS: lacks "
                                      f"{', '.join(sorted({FAST_VS_REFERENCE, *CAUSAL_TESTS}))})"]
    for kind in ("export grid", "tiny model trained", "MACs hand count"):
        assert report[kind] == ["new_mixer"], kind


def test_parity_modules_name_their_mechanism():
    """A parity module imports the module that defines the mixer's builder: a mixer cannot borrow an unrelated
    mechanism's tests (the builders of attention, LSRA and conv live in lite.modules itself)."""
    for mixer, module in PARITY_TESTS.items():
        if module is not None:
            assert MIXERS[mixer].__module__ in (ROOT / module).read_text(), (mixer, module, MIXERS[mixer].__module__)


ENCODER_ONLY = sorted(set(MIXERS) - CAUSAL_MIXERS)


def test_the_encoder_only_mixers():
    assert ENCODER_ONLY == ["bigbird", "isab", "linformer", "memory_compressed", "poolingformer"]


@pytest.mark.parametrize("mixer", ENCODER_ONLY)
def test_an_encoder_only_mixer_is_refused_in_the_decoder_at_build(mixer, tmp_path):
    """One line, when the model is built (not a shape error at step 7) and before fairseq-train starts, naming the
    mechanisms that can serve; unless set, a model with that encoder takes the attention decoder."""
    expected = (f"--decoder-mixer {mixer}: {mixer} has no causal form, so it cannot serve in the decoder; "
                f"mechanisms that can: {', '.join(sorted(CAUSAL_MIXERS))}")
    with pytest.raises(ValueError) as error:
        tiny_model(f"{mixer}_100m", decoder_mixer=mixer)
    assert str(error.value) == expected
    config = load_config(ROOT / "configs" / "models" / mixer / "tiny.yaml",
                         [f"data={tmp_path}", f"save_dir={tmp_path / 'ck'}", f"decoder_mixer={mixer}"])
    with pytest.raises(ConfigError) as refused:
        train(config)
    assert str(refused.value) == expected and not (tmp_path / "ck").exists()
    assert tiny_model("transformer_d128", encoder_mixer=mixer).args.decoder_mixer == "attention"
    assert tiny_model("transformer_d128", encoder_mixer="local").args.decoder_mixer == "local"
