"""Checks that every token mixer's parity module runs on its own small unit (``unit(x: T x B x C, padding_mask:
B x T | None, incremental_state) -> T x B x C``): stepping one frame at a time equals the full causal pass, the
decoding state follows the beams, and pads neither leak into real frames nor give anything but zeros."""
from __future__ import annotations

import torch
from torch import nn

from tests.conftest import assert_close, left_padding


def stepped(unit: nn.Module, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``unit`` run one frame at a time from an empty state: T x B x C."""
    state = {}
    return torch.cat([unit(x[t:t + 1], None if mask is None else mask[:, t:t + 1], state) for t in range(len(x))])


def assert_stepping_matches_full_pass(unit: nn.Module, length: int, embed_dim: int = 16, pads: int = 0) -> None:
    """3 sentences of ``length`` frames; with ``pads``, 2 sentences, the second with that many left pads."""
    if pads:
        x, mask = torch.randn(length, 2, embed_dim), left_padding(2, length, pads=pads)
    else:
        x, mask = torch.randn(length, 3, embed_dim), None
    assert_close(stepped(unit, x, mask), unit(x, mask))


def assert_reorder_follows_beams(unit: nn.Module, embed_dim: int = 16, length: int = 14, reorder_at: int = 6) -> None:
    """After ``reorder_at`` steps on 3 beams, beams (2, 2, 0) carry on as a full pass over the reordered input."""
    x, order = torch.randn(length, 3, embed_dim), torch.tensor([2, 2, 0])
    state = {}
    for t in range(reorder_at):
        unit(x[t:t + 1], incremental_state=state)
    unit.reorder_incremental_state(state, order)
    reordered = torch.cat([unit(x[t:t + 1, order], incremental_state=state) for t in range(reorder_at, length)])
    assert_close(reordered, unit(x[:, order])[reorder_at:])


def assert_padded_frames_do_not_leak(unit: nn.Module, embed_dim: int = 16):
    """Changing what sits at padded positions (3 left pads in one sentence, 2 right pads in the other) changes
    nothing at real positions, and pads give zero. Returns (x, mask, output), for a module's further checks."""
    x = torch.randn(13, 2, embed_dim)
    mask = left_padding(2, 13, pads=3)
    mask[0, -2:] = True  # the first sentence is right-padded
    y = unit(x, mask)
    x_other = x.clone()
    x_other[:3, 1] = 1e3 * torch.randn(3, embed_dim)
    x_other[-2:, 0] = 1e3 * torch.randn(2, embed_dim)
    assert_close(unit(x_other, mask), y)
    assert_close(y[:3, 1], torch.zeros(3, embed_dim))
    assert_close(y[-2:, 0], torch.zeros(2, embed_dim))
    return x, mask, y
