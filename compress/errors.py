"""The errors compression raises on purpose: each a ``LiteError`` (``lite`` prints its one line and exits 2 or 3)."""
from __future__ import annotations

from lite.errors import CriterionNotMet as LiteCriterionNotMet
from lite.errors import LiteError


class PruneError(LiteError, ValueError):
    """A model, budget or option that cannot be pruned as asked; the message names the option and the fix."""


class SparsityError(LiteError, ValueError):
    """A sparsity, schedule or checkpoint that cannot be sparsified as asked; the message names it and the fix."""


class QuantizeError(LiteError, ValueError):
    """A model dir, option or calibration set that cannot be quantized as asked; the message names it and the fix."""


class CriterionNotMet(LiteCriterionNotMet, QuantizeError):
    """inc-tune found no config within ``--max-bleu-drop``; the best one was written all the same (exit code 3)."""
