"""Safe loading of fairseq checkpoints under ``torch.load(weights_only=True)`` (torch >= 2.6).

fairseq pickles its config (an ``argparse.Namespace`` and a few builtins) into every checkpoint.
Instead of turning the safe loader off, we allow exactly those globals.
"""
from __future__ import annotations

import argparse

import torch

# Everything a fairseq 0.12 translation checkpoint (as written by fairseq-train) unpickles.
FAIRSEQ_CHECKPOINT_GLOBALS = [argparse.Namespace]


def allow_fairseq_checkpoints() -> None:
    """Register the globals of fairseq checkpoints with torch's weights-only unpickler (idempotent)."""
    torch.serialization.add_safe_globals(FAIRSEQ_CHECKPOINT_GLOBALS)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, corrupt, or not matching the data it is used with."""
