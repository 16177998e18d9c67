"""Every YAML config in configs/ loads, names a registered architecture and parses with fairseq-train's parser."""
from pathlib import Path

import pytest
import yaml

from lite.train import ConfigError, load_config, parse_fairseq_args, to_argv
from tests.conftest import LITE_ARCHS

ROOT = Path(__file__).resolve().parents[2]
MODEL_CONFIGS = sorted((ROOT / "configs" / "models").rglob("*.yaml"))


def test_there_are_model_configs():
    assert len(MODEL_CONFIGS) >= 9


@pytest.mark.parametrize("path", MODEL_CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_model_config_is_valid(path):
    first_line = path.read_text().splitlines()[0]
    assert first_line.startswith(f"# lite train {path.relative_to(ROOT)}"), "opens with the command that runs it"
    config = load_config(path)
    assert config["arch"] in LITE_ARCHS
    args = parse_fairseq_args(to_argv(config))
    assert args.arch == config["arch"]


def test_overrides_and_bad_configs(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"arch": "transformer_d128", "data": "d", "save_dir": "s", "lr": 0.1}))
    config = load_config(path, ["lr=0.002", "max-update=7", "fp16=false"])
    assert config["lr"] == 0.002 and config["max_update"] == 7
    argv = to_argv(config)
    assert argv[argv.index("--max-update") + 1] == "7" and "--fp16" not in argv
    with pytest.raises(ConfigError, match="not key=value"):
        load_config(path, ["lr"])
    with pytest.raises(ConfigError, match="does not know: --no-such-option"):
        parse_fairseq_args(to_argv({**config, "no_such_option": 1}))
    path.write_text("arch: transformer_d128\n")
    with pytest.raises(ConfigError, match="`data` is missing"):
        load_config(path)


def test_unknown_arch_lists_the_valid_ones(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"arch": "lsra_tiny_9000", "data": "d", "save_dir": "s"}))
    with pytest.raises(ConfigError, match="lsra_iwslt_160.*transformer_d128"):
        parse_fairseq_args(to_argv(load_config(path)))


PIPELINE_CONFIGS = sorted((ROOT / "configs" / "pipelines").glob("*.yaml"))


@pytest.mark.parametrize("path", PIPELINE_CONFIGS, ids=lambda p: p.name)
def test_pipeline_config_is_valid(path):
    """Opens with its command; every model's config with its overrides parses with fairseq-train's parser."""
    from lite.pipeline import _overrides, load_pipeline

    assert path.read_text().splitlines()[0].startswith(f"# lite pipeline {path.relative_to(ROOT)}")
    pipeline = load_pipeline(path)
    assert {"embedded.yaml", "multi30k_100m.yaml", "multi30k_500m.yaml"} <= {p.name for p in PIPELINE_CONFIGS}
    for name, model in pipeline.models.items():
        config = load_config(ROOT / model.config, _overrides(model.overrides))
        assert parse_fairseq_args(to_argv(config)).arch in LITE_ARCHS, name
