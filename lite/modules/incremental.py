"""What the mixers that keep batch-first decoding state (GAU, Fastformer) share."""
from __future__ import annotations

from typing import Dict, Iterable, Optional

from torch import Tensor, nn


def reorder_batch_first(module: nn.Module, incremental_state: Dict[str, Dict[str, Optional[Tensor]]],
                        names: Iterable[str], new_order: Tensor) -> None:
    """Gather every named state tensor [B, ...] of ``module`` by ``new_order`` (beam search's reordering)."""
    for name in names:
        tensor = module.get_incremental_state(incremental_state, name)
        if tensor is not None:
            module.set_incremental_state(incremental_state, name, tensor.index_select(0, new_order))
