"""A pruned checkpoint: load -> prune to the budget -> verify -> write ``checkpoint_pruned.pt`` and ``prune.json``.

The checkpoint is the input one with the pruned weights and args carrying the new dims (optimizer state dropped,
training time reset), verified before writing by rebuilding the model from those args and comparing outputs
(``ATOL``); ``prune.json`` beside it holds MACs, params and dims before/after, the steps and the skipped kinds.
Both are written atomically.
"""
from __future__ import annotations

import copy
from dataclasses import asdict
from pathlib import Path

import torch
import torch_pruning as tp
from torch import Tensor, nn

from compress.errors import PruneError
from compress.prune import CHECKPOINT_NAME, REPORT_NAME
from compress.prune.budget import Batches, PruneConfig, PruneResult, missing_args, model_options, prune_to_budget
from lite.checkpoint import load_model, model_args, pruned_dims, read_state
from lite.files import staged_dir, write_json

ATOL = 1e-5  # the rebuilt model must reproduce the pruned one to this
WHAT = "pruned checkpoint dir"


def pruned_state(state: dict, model: nn.Module, result: PruneResult) -> dict:
    """The input checkpoint's dict with the pruned weights and dims; optimizer state dropped (its shapes are the
    old ones), training time and best-so-far reset (they describe the unpruned model)."""
    new = copy.deepcopy({k: v for k, v in state.items() if k not in ("model", "last_optimizer_state")})
    new["model"] = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    for args in (new.get("args"), (new.get("cfg") or {}).get("model")):
        if args is not None:
            for arg, value in result.pruned_dims.items():
                setattr(args, arg, value)
    extra = {k: v for k, v in (new.get("extra_state") or {}).items() if k not in ("best", "val_loss")}
    extra["previous_training_time"] = 0.0
    extra["pruned_dims"] = result.pruned_dims
    new["extra_state"] = extra
    return new


def _example(model: nn.Module, batch: int = 2, src_len: int = 9, tgt_len: int = 7) -> tuple[Tensor, Tensor, Tensor]:
    d = model.decoder.dictionary
    generator = torch.Generator().manual_seed(0)
    src = torch.randint(d.nspecial, len(d), (batch, src_len), generator=generator)  # [B, S]
    src[:, -1] = d.eos()
    prev = torch.randint(d.nspecial, len(d), (batch, tgt_len), generator=generator)  # [B, T]
    prev[:, 0] = d.eos()
    return src, torch.full((batch,), src_len), prev


def verify_state(state: dict, model: nn.Module) -> float:
    """Rebuild the model from the state's args (as fairseq does on loading), load its weights strictly and compare
    logits with ``model``; returns the max difference. PruneError on a shape mismatch or a difference > ATOL."""
    from fairseq.models import ARCH_CONFIG_REGISTRY

    from lite.models.factory import build

    args = copy.deepcopy(model_args(state))
    if getattr(args, "arch", None) in ARCH_CONFIG_REGISTRY:
        ARCH_CONFIG_REGISTRY[args.arch](args)
    rebuilt = build(args, model.encoder.dictionary, model.decoder.dictionary)
    expected = rebuilt.state_dict()
    wrong = [f"{name}: weights {tuple(t.shape)}, args build {tuple(expected[name].shape)}"
             for name, t in state["model"].items() if name in expected and expected[name].shape != t.shape]
    if wrong:
        options = model_options()
        missing = [f"--{arg.replace('_', '-')}" for arg in pruned_dims(state) if arg not in options]
        raise PruneError(f"the pruned checkpoint's args do not describe its weights ({'; '.join(wrong[:3])})"
                         + (f": lite_transformer has no {' / '.join(missing)} arg" if missing else ""))
    rebuilt.load_state_dict(state["model"], strict=True)
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            inputs = _example(model)
            diff = (rebuilt(*inputs)[0] - model(*inputs)[0]).abs().max().item()
    finally:
        model.train(training)
    if not diff <= ATOL:
        raise PruneError(f"the model rebuilt from the pruned checkpoint differs from the pruned model by {diff:.3g} "
                         f"(tolerance {ATOL})")
    return diff


def train_batches(task, model: nn.Module, count: int, max_tokens: int, seed: int = 1) -> Batches:
    """``count`` batches of the task's training split (a seeded shuffle), read once and reused at every step."""
    from fairseq import utils

    task.load_dataset("train")
    iterator = task.get_batch_iterator(
        dataset=task.dataset("train"), max_tokens=max_tokens, seed=seed, ignore_invalid_inputs=True,
        max_positions=utils.resolve_max_positions(task.max_positions(), model.max_positions()),
    ).next_epoch_itr(shuffle=True)
    samples = [sample for _, sample in zip(range(count), iterator)]
    return lambda: iter(samples)


def prune_checkpoint(checkpoint: str | Path, out_dir: str | Path, config: PruneConfig, data: str | Path | None = None,
                     force: bool = False) -> tuple[nn.Module, dict]:
    """Load -> prune to the budget -> verify -> write ``out_dir/checkpoint_pruned.pt`` and ``prune.json`` (the dir
    staged and swapped in whole: a kill never leaves a checkpoint without its report).

    Returns the pruned model and the report (prune.json's content).
    """
    from fairseq import checkpoint_utils

    out_dir = Path(out_dir)
    target = out_dir / CHECKPOINT_NAME
    with staged_dir(out_dir, REPORT_NAME, force, WHAT) as staging:  # locked and checked before the work
        model, task = load_model(checkpoint, data)
        if config.kinds is not None:  # named kinds must be describable too: the checkpoint is rebuilt from its args
            options = model_options()
            missing = {kind: missing_args(kind, options) for kind in config.kinds}
            missing = {kind: args for kind, args in missing.items() if args}
            if missing:
                raise PruneError("; ".join(f"--kinds {kind}: lite_transformer has no {' / '.join(args)} arg, so the "
                                           f"pruned checkpoint could not be rebuilt" for kind, args in missing.items()))
        batches = train_batches(task, model, config.taylor_batches, config.max_tokens) \
            if config.importance == "taylor" else None
        state = read_state(checkpoint, data)
        result = prune_to_budget(model, config, batches)
        new = pruned_state(state, model, result)
        verify_state(new, model)
        report = {"source": str(checkpoint), "checkpoint": str(target), **asdict(result),
                  "finetune_overrides": [f"{k}={v}" for k, v in result.pruned_dims.items()],
                  "torch_pruning": getattr(tp, "__version__", "unknown")}
        checkpoint_utils.torch_persistent_save(new, str(staging / CHECKPOINT_NAME))
        write_json(staging / REPORT_NAME, report)
    return model, report
