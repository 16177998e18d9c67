"""Incremental decoding, what every stateful mixer shares: the state type, the declaration of the state a mixer
starts from (``Stateful``), and beam reordering of batch-first state (GAU, Fastformer).

A mixer that keeps state between decoding steps stores it with fairseq's ``with_incremental_state`` helpers under
keys of its own, and declares what it holds before the first step through ``initial_state``: export makes every
such tensor an explicit graph input/output from that declaration alone (``export/graphs.py``).
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional, Protocol, Tuple, runtime_checkable

from torch import Tensor, nn

IncrementalState = Optional[Dict[str, Dict[str, Optional[Tensor]]]]  # fairseq's: "<module id>.<key>" -> state
StateSlot = Tuple[str, Optional[str]]  # (incremental-state key, field of a dict-valued state or None)


@runtime_checkable
class Stateful(Protocol):
    def initial_state(self, batch: int, like: Tensor) -> Dict[StateSlot, Tensor]:
        """The state decoding starts from for ``batch`` rows (dtype/device of ``like``), each tensor filled with one
        value; empty for a module that keeps none (e.g. a non-causal convolution)."""


def reorder_batch_first(module: nn.Module, incremental_state: Dict[str, Dict[str, Optional[Tensor]]],
                        names: Iterable[str], new_order: Tensor) -> None:
    """Gather every named state tensor [B, ...] of ``module`` by ``new_order`` (beam search's reordering)."""
    for name in names:
        tensor = module.get_incremental_state(incremental_state, name)
        if tensor is not None:
            module.set_incremental_state(incremental_state, name, tensor.index_select(0, new_order))
