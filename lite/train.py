"""``lite train CONFIG [key=value ...]``: a YAML config of fairseq-train options, run with ``--user-dir lite``.

A config maps fairseq-train option names (``max_tokens`` or ``max-tokens``) to values; ``data`` is the
prepared data dir and ``save_dir`` the checkpoint dir. ``true`` switches a flag on, ``false``/``null`` leave it
off, a list becomes several arguments. fairseq picks the GPU when there is one and resumes from
``<save_dir>/checkpoint_last.pt``.
"""
from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from lite.errors import LiteError
from lite.files import locked, write_json

USER_DIR = str(Path(__file__).resolve().parent)
PR_SET_PDEATHSIG = 1  # prctl option: the signal a child gets when its parent dies (Linux)

logger = logging.getLogger(__name__)


class ConfigError(LiteError, ValueError):
    """A config file or override that cannot be turned into fairseq-train options."""


def load_config(path: str | Path, overrides: list[str] = ()) -> dict[str, Any]:
    """YAML mapping, then ``key=value`` overrides (values parsed as YAML: ``lr=1e-3``, ``fp16=true``)."""
    path = Path(path)
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read config: {e}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: a config is a mapping of fairseq-train options, got {type(config).__name__}")
    config = load_overrides(config, overrides)
    for key in ("arch", "data", "save_dir"):
        if not config.get(key):
            raise ConfigError(f"{path}: `{key}` is missing (set it in the file or as {key}=...)")
    return config


def load_overrides(config: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """A copy of ``config`` with ``key=value`` overrides applied (values parsed as YAML), keys in snake_case."""
    config = dict(config)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not key=value (e.g. max_update=100)")
        config[key.strip()] = yaml.safe_load(value)
    return {k.replace("-", "_"): v for k, v in config.items()}


def to_argv(config: dict[str, Any]) -> list[str]:
    """fairseq-train command-line arguments for a config (data dir first, as positional)."""
    argv = [str(config["data"]), "--user-dir", USER_DIR]
    for key, value in config.items():
        if key == "data" or value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif isinstance(value, list):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return argv


def parse_fairseq_args(argv: list[str]):
    """Parse with fairseq-train's own parser (and the chosen arch's options); unknown options fail."""
    from fairseq import options
    from fairseq.models import ARCH_MODEL_REGISTRY

    from lite.models import LiteTransformerModel

    arch = argv[argv.index("--arch") + 1] if "--arch" in argv else None
    if arch not in ARCH_MODEL_REGISTRY:
        ours = sorted(a for a, m in ARCH_MODEL_REGISTRY.items() if m is LiteTransformerModel)
        raise ConfigError(f"unknown --arch {arch!r}; lite's architectures: {', '.join(ours)} "
                          f"(any other fairseq architecture works too)")
    parser = options.get_training_parser()
    args, unknown = options.parse_args_and_arch(parser, argv, parse_known=True)
    if unknown:
        raise ConfigError(f"options fairseq-train does not know: {' '.join(unknown)}")
    if ARCH_MODEL_REGISTRY[arch] is LiteTransformerModel:  # the arch's defaults are filled in: check the mixers
        from lite.models.seq2seq import check_decoder_mixer

        try:
            check_decoder_mixer(args)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    return args


def train(config: dict[str, Any], max_minutes: float | None = None, finetune_from: str | None = None,
          max_cpu_minutes: float | None = None) -> int:
    """Run fairseq-train in a child process; returns its exit code.

    ``max_minutes``: wall time, fairseq's own ``--stop-time-hours`` (cumulative across resumes). ``max_cpu_minutes``:
    CPU time of the training process tree (user + system), cumulative across resumes (``CPU_LOG`` in the save
    dir); when it is spent, fairseq-train is stopped and keeps its last saved checkpoint (set
    ``save_interval_updates`` to lose little). The CPU time is logged in ``CPU_LOG`` either way."""
    if finetune_from:  # the checkpoint's widths (a pruned one's, or one fine-tuned from it) win over the config's
        from lite.checkpoint import checkpoint_dims, read_state

        dims = checkpoint_dims(read_state(finetune_from))
        config = load_overrides(config, [f"{k}={v}" for k, v in dims.items()])
    argv = to_argv(config)
    if max_minutes is not None:
        argv += ["--stop-time-hours", f"{max_minutes / 60:.6f}"]  # cumulative across resumes
    if finetune_from:
        argv += ["--finetune-from-model", str(finetune_from)]
    if "log_format" not in config:
        argv += ["--log-format", "tqdm" if sys.stderr.isatty() else "simple"]
    parse_fairseq_args(argv)  # fail here, with a clear message, rather than deep inside fairseq
    save_dir = Path(config["save_dir"])
    save_dir.mkdir(parents=True, exist_ok=True)
    with locked(save_dir):  # a second `lite train` on this save dir would interleave checkpoints
        argv += _resume_args(save_dir, config)
        print("fairseq-train " + " ".join(argv), file=sys.stderr, flush=True)
        child = subprocess.Popen([sys.executable, "-m", "fairseq_cli.train", *argv], env=os.environ.copy(),
                                 preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        try:
            budget_s = float("inf") if max_cpu_minutes is None else 60 * max_cpu_minutes
            return _wait_within_cpu(child, save_dir, budget_s)
        finally:  # interrupted or terminated: stop fairseq-train too (it resumes from its last checkpoint)
            if child.poll() is None:
                child.terminate()
                child.wait()


CPU_LOG = "lite_cpu.json"  # CPU seconds spent by earlier runs of this save dir


def cpu_seconds_spent(save_dir: Path) -> float:
    """CPU seconds the training runs of ``save_dir`` have used so far (0 before the first)."""
    path = Path(save_dir) / CPU_LOG
    return float(json.loads(path.read_text())["cpu_seconds"]) if path.is_file() else 0.0


def _tree_cpu(process) -> float:
    """User + system CPU seconds of a psutil process and its children."""
    import psutil

    total = 0.0
    for p in [process, *process.children(recursive=True)]:
        try:
            times = p.cpu_times()
            total += times.user + times.system
        except psutil.NoSuchProcess:
            pass
    return total


def _wait_within_cpu(child: subprocess.Popen, save_dir: Path, budget_s: float, poll_s: float = 2.0) -> int:
    """Wait for fairseq-train; stop it when the save dir's CPU budget is spent. Exit code 0 when stopped by the
    budget (training ended as asked). The CPU spent is logged at every poll, so a killed run's time still counts."""
    import psutil

    process, before, used = psutil.Process(child.pid), cpu_seconds_spent(save_dir), 0.0
    try:
        while child.poll() is None:
            used = max(used, _tree_cpu(process))
            write_json(save_dir / CPU_LOG, {"cpu_seconds": round(before + used, 1)})
            if before + used >= budget_s:
                logger.info(f"CPU budget of {budget_s / 60:.1f} min spent: stopping fairseq-train")
                child.terminate()
                child.wait()
                return 0
            time.sleep(poll_s)
        return child.returncode
    finally:
        write_json(save_dir / CPU_LOG, {"cpu_seconds": round(before + used, 1)})


def _resume_args(save_dir: Path, config: dict[str, Any]) -> list[str]:
    """fairseq resumes from checkpoint_last.pt; when that one is unreadable (a kill while fairseq copied it),
    resume from checkpoint_best.pt instead, with a warning, and keep the broken file aside."""
    from lite.checkpoint import CheckpointError, read_state

    last, best = save_dir / "checkpoint_last.pt", save_dir / "checkpoint_best.pt"
    if config.get("restore_file") or not last.is_file():
        return []
    try:
        read_state(last)
        return []
    except CheckpointError as e:
        os.replace(last, last.with_suffix(".pt.unreadable"))
        if not best.is_file():
            logger.warning(f"{e}; no checkpoint_best.pt either: training starts afresh")
            return []
        logger.warning(f"{e}; resuming from {best} (the unreadable file is kept as {last.name}.unreadable)")
        return ["--restore-file", str(best)]


def _die_with_parent() -> None:
    """In the child: receive SIGTERM when the parent dies, even by SIGKILL, so fairseq-train never outlives it."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
