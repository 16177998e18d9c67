"""Fine-grained pruning of a checkpoint through a fine-tune: ``lite compress sparsify``.

    lite compress sparsify CHECKPOINT --sparsity 0.8 --config configs/models/lsra/100m.yaml --out DIR \\
        [--updates 300] [--ramp 0.75] [--interval N] [--embeddings] [--overrides key=value ...]

fairseq-train (``lite train``, ``--finetune-from CHECKPOINT``) runs ``--updates`` updates of the config's recipe
with the task ``sparse_translation`` (``lite/tasks.py``): the weights of every linear and convolution layer go
from dense to ``--sparsity`` zeros over the first ``--ramp`` of the updates (Zhu & Gupta's cubic schedule, masks
changed every ``--interval`` updates and never given back, ``compress/sparsity.py``), the rest fine-tunes with the
masks fixed. The weights' zeros are the masks: every checkpoint keeps them, so ``lite export``, ``lite eval`` and
``lite compress quantize`` take the result as any other checkpoint (the compact int8 dir then stores it sparse).

Output, in DIR: ``train/`` (the fine-tune's save dir: an interrupted run resumes from it), ``checkpoint_sparse.pt``
(the last update's weights: the best-validation checkpoint of a ramp would be a less sparse one) and
``sparsify.json`` (the sparsity reached, overall and per weight, the schedule, the fine-tune's CPU seconds, the
command's options). A pruned checkpoint (``lite compress prune``) sparsifies the same way: structured pruning buys
speed, this buys size.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from compress.errors import SparsityError
from lite.files import locked, write_json

CHECKPOINT_NAME = "checkpoint_sparse.pt"
REPORT_NAME = "sparsify.json"
TRAIN_DIR = "train"


@dataclass(frozen=True)
class SparsifyConfig:
    """``sparsity`` zeros reached after ``ramp`` x ``updates`` updates of a fine-tune of ``updates``."""

    sparsity: float
    updates: int = 300
    ramp: float = 0.75
    interval: int | None = None  # None: the ramp in 20 steps
    embeddings: bool = False

    def schedule(self):
        """The ``compress.sparsity.Schedule`` of these options (bad values refused here)."""
        from compress.sparsity import Schedule

        if not isinstance(self.updates, int) or self.updates < 1:
            raise SparsityError(f"--updates {self.updates!r}: the fine-tune needs at least one update")
        if not 0 < self.ramp <= 1:
            raise SparsityError(f"--ramp {self.ramp!r}: the share of the updates that prune, in (0, 1]")
        end = max(1, round(self.ramp * self.updates))
        return Schedule(self.sparsity, 0, end, self.interval or max(1, end // 20))


def sparsify(checkpoint: str | Path, config_path: str | Path, out: str | Path, config: SparsifyConfig,
             overrides: list[str] = (), data: str | Path | None = None, max_cpu_minutes: float | None = None,
             force: bool = False) -> dict:
    """Fine-tune ``checkpoint`` into a sparse one in ``out`` (see the module doc); returns sparsify.json's content."""
    from lite.checkpoint import data_dir, read_state
    from lite.train import load_config, train

    schedule = config.schedule()  # bad values refused before anything runs
    out = Path(out)
    source = read_state(checkpoint, data)
    with locked(out):
        _claim(out, force)
        train_config = load_config(config_path, [
            *overrides, f"data={data or data_dir(source)}", f"save_dir={out / TRAIN_DIR}", "task=sparse_translation",
            f"sparsity={schedule.sparsity}", f"sparsity_begin={schedule.begin}", f"sparsity_end={schedule.end}",
            f"sparsity_interval={schedule.interval}", f"sparsity_embeddings={config.embeddings}",
            f"max_update={config.updates}"])
        code = train(train_config, finetune_from=str(checkpoint), max_cpu_minutes=max_cpu_minutes)
        if code != 0:
            raise SparsityError(f"fairseq-train exited with code {code} (its log is above); rerun to resume")
        return _finish(out, checkpoint, config, schedule, train_config)


def _claim(out: Path, force: bool) -> None:
    """``out`` is new, an interrupted sparsify's (only ``train/``: resumed), or a finished one's with ``force``."""
    if not out.exists():
        out.mkdir(parents=True)
        return
    if not out.is_dir():
        raise SparsityError(f"{out}: exists and is not a dir")
    if (out / REPORT_NAME).is_file():
        if not force:
            raise SparsityError(f"{out}: already holds a sparsified checkpoint ({REPORT_NAME}); pass --force to "
                                f"redo it")
        for name in (REPORT_NAME, CHECKPOINT_NAME):
            (out / name).unlink(missing_ok=True)
        shutil.rmtree(out / TRAIN_DIR, ignore_errors=True)
    ours = (TRAIN_DIR, CHECKPOINT_NAME)
    foreign = [p.name for p in out.iterdir() if p.name not in ours and not p.name.startswith(".")]
    if foreign:
        raise SparsityError(f"{out}: not a sparsify dir (holds {', '.join(sorted(foreign)[:3])}); choose another --out")


def _finish(out: Path, checkpoint, config: SparsifyConfig, schedule, train_config: dict) -> dict:
    """Check the last checkpoint reached the schedule's end, then write it and the report (checkpoint first: the
    report is the mark of a finished dir)."""
    from compress.sparsity import sparsity_report
    from lite.checkpoint import load_model, read_state
    from lite.train import cpu_seconds_spent

    last = out / TRAIN_DIR / "checkpoint_last.pt"
    state = read_state(last)
    updates = int((state.get("optimizer_history") or [{}])[-1].get("num_updates", 0))
    if updates < schedule.end:
        raise SparsityError(f"{last}: the fine-tune stopped at update {updates}, before the ramp's end "
                            f"({schedule.end}): the sparsity is not reached; give it more time (--max-cpu-minutes) "
                            f"or fewer --updates")
    model, _ = load_model(last)
    report = {"source": str(checkpoint), "checkpoint": str(out / CHECKPOINT_NAME), "updates": updates,
              "cpu_seconds": cpu_seconds_spent(out / TRAIN_DIR),
              "schedule": asdict(schedule), "options": asdict(config), **sparsity_report(model, config.embeddings),
              "config": {k: v for k, v in train_config.items() if not k.startswith("sparsity")}}
    tmp = out / f".{CHECKPOINT_NAME}.tmp{os.getpid()}"
    shutil.copyfile(last, tmp)
    os.replace(tmp, out / CHECKPOINT_NAME)
    write_json(out / REPORT_NAME, report)
    return report
