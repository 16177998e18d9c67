"""Loading fairseq checkpoints, in one place: weights-only unpickling, their args, their pruned dims.

fairseq pickles its config (an ``argparse.Namespace`` and builtins) into every checkpoint. torch's weights-only
unpickler refuses anything else, so a checkpoint carrying code (a malicious pickle) is refused, not run; the
Namespace is allowed explicitly (``allow_fairseq_checkpoints``, called when ``lite`` is imported).
"""
from __future__ import annotations

import argparse
import pickle
import re
import zipfile
from pathlib import Path

import torch

from lite.errors import LiteError

# Everything a fairseq 0.12 translation checkpoint (as written by fairseq-train) unpickles.
FAIRSEQ_CHECKPOINT_GLOBALS = [argparse.Namespace]


class CheckpointError(LiteError, ValueError):
    """A checkpoint that cannot be used: missing, corrupt, unsafe, or not matching the data it is used with."""


def allow_fairseq_checkpoints() -> None:
    """Register the globals of fairseq checkpoints with torch's weights-only unpickler (idempotent)."""
    torch.serialization.add_safe_globals(FAIRSEQ_CHECKPOINT_GLOBALS)


def read_state(path: str | Path, data: str | Path | None = None) -> dict:
    """The checkpoint's dict as stored (plain containers and an argparse.Namespace, as fairseq's save_state writes
    it), with ``data`` as its data dir if given. CheckpointError when missing, corrupt or unsafe."""
    allow_fairseq_checkpoints()
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # weights-only refusal: a global outside the allowed list
        raise CheckpointError(f"{path}: refused by the weights-only loader, it holds more than weights and fairseq "
                              f"args ({_refused(e)}); do not load it unless you trust who made it") from None
    except (RuntimeError, OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{path}: not a loadable fairseq checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path}: not a fairseq checkpoint (no 'model' weights)")
    if data:
        for args in (state.get("args"), (state.get("cfg") or {}).get("model")):
            if args is not None:
                args.data = str(data)
        if (state.get("cfg") or {}).get("task") is not None:
            state["cfg"]["task"]["data"] = str(data)
    return state


def _refused(e: pickle.UnpicklingError) -> str:
    """What torch's weights-only refusal names: the global, else its line on what is unsupported (its first line
    only advises loading unsafely)."""
    text = str(e)
    if match := re.search(r"GLOBAL ([\w.]+)", text):
        return f"global {match[1]}"
    return next((line.strip() for line in text.splitlines() if "Unsupported" in line), type(e).__name__)


def model_args(state: dict) -> argparse.Namespace:
    """The model's args in a checkpoint dict (fairseq keeps them in ``args`` or in ``cfg["model"]``)."""
    args = state["args"] if state.get("args") is not None else (state.get("cfg") or {}).get("model")
    if args is None:
        raise CheckpointError("the checkpoint holds no model args (neither 'args' nor cfg['model'])")
    return args


def data_dir(state: dict) -> Path:
    """The prepared data dir the checkpoint was trained on (fairseq's task ``data``)."""
    task = (state.get("cfg") or {}).get("task")
    return Path(task["data"] if task is not None else model_args(state).data)


def pruned_dims(state: dict) -> dict[str, int]:
    """The dims ``lite compress prune`` changed (empty for a checkpoint that was not pruned)."""
    return dict((state.get("extra_state") or {}).get("pruned_dims") or {})


# the widths structured pruning can change (``compress.prune``): a checkpoint's weights fit only its own
WIDTH_ARGS = tuple(f"{side}_{arg}" for side in ("encoder", "decoder", "mixer")
                   for arg in ("ffn_embed_dim", "attention_heads", "attention_head_dim")) + \
    ("gau_hidden_dim", "conv_heads", "conv_head_dim")


def checkpoint_dims(state: dict) -> dict[str, int]:
    """The widths a model must have to take this checkpoint's weights: the pruned dims, and for a checkpoint
    fine-tuned from a pruned one (whose ``extra_state`` no longer says so) the widths its args give."""
    args = model_args(state)
    found = {k: getattr(args, k) for k in WIDTH_ARGS if getattr(args, k, None) is not None}
    return {**found, **pruned_dims(state)}


def load_model(path: str | Path, data: str | Path | None = None):
    """(model in eval mode, task) from a fairseq checkpoint; ``data`` overrides the data dir it was trained on."""
    from fairseq import checkpoint_utils
    from fairseq.data import Dictionary

    import lite.models  # noqa: F401  (registers the architectures the checkpoint names)
    from lite.data import CORPUS_FILE, Corpus

    read_state(path)  # refuses unsafe or corrupt files with a clear error before fairseq touches them
    overrides = {"data": str(data)} if data else {}
    try:
        state = checkpoint_utils.load_checkpoint_to_cpu(str(path), arg_overrides=overrides)
    except (RuntimeError, OSError, EOFError, KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: not a loadable fairseq checkpoint ({type(e).__name__}: {e})") from None
    data_dir = Path(state["cfg"]["task"].data)
    if not (data_dir / CORPUS_FILE).is_file():
        raise CheckpointError(f"{path}: {data_dir} is not a prepared data dir; pass --data DIR (the dir made by "
                              f"`lite data prepare` that the checkpoint was trained on)")
    dict_path = data_dir / f"dict.{Corpus.load(data_dir).src}.txt"
    trained_vocab = state["model"]["encoder.embed_tokens.weight"].size(0)
    dictionary_size = len(Dictionary.load(str(dict_path)))
    if trained_vocab != dictionary_size:
        raise CheckpointError(f"{path} was trained with a {trained_vocab}-entry dictionary but {dict_path} has "
                              f"{dictionary_size}: pass the --data dir it was trained on")
    models, _, task = checkpoint_utils.load_model_ensemble_and_task([str(path)], arg_overrides=overrides, state=state)
    return models[0].eval(), task
