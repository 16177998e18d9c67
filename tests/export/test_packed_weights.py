"""export/packed_weights.py: the bitmask coding of sparse tensors, exact round trips, sizes by formula, and every
malformed file refused."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest

from export.packed_weights import PackedWeightsError, pack, unpack


def _weights(seed: int = 0) -> tuple[bytes, list[tuple[int, int]], np.ndarray]:
    """A weights file: a 90%-sparse int8 tensor, 64 alignment bytes, a dense fp32 tensor, a 50%-sparse int8 tensor."""
    rng = np.random.default_rng(seed)
    sparse = rng.integers(-127, 128, 1000).astype(np.int8) * (rng.random(1000) < 0.1)
    dense = rng.standard_normal(100).astype(np.float32)
    half = rng.integers(1, 128, 203).astype(np.int8) * (rng.random(203) < 0.5)
    parts = [sparse.astype(np.int8).tobytes(), b"\0" * 24, dense.tobytes(), half.astype(np.int8).tobytes()]
    offsets = np.cumsum([0] + [len(p) for p in parts])
    tensors = [(int(offsets[0]), 1000), (int(offsets[2]), 400), (int(offsets[3]), 203)]
    return b"".join(parts), tensors, np.concatenate([sparse != 0, (np.asarray(half) != 0)])


def test_round_trip_is_exact_and_sizes_are_mask_plus_non_zero_bytes():
    dense, tensors, nonzero = _weights()
    packed, segments = pack(dense, tensors)
    assert unpack(packed, segments, hashlib.sha256(dense).hexdigest()).tobytes() == dense
    bitmask = [s for s in segments if s[2] == "bitmask"]
    assert [(s[0], s[1]) for s in bitmask] == [tensors[0], tensors[2]]  # the fp32 tensor is not sparse: raw
    assert [s[3] for s in bitmask] == [125 + int(nonzero[:1000].sum()), 26 + int(nonzero[1000:].sum())]
    assert len(packed) == sum(s[3] for s in segments) < len(dense)
    assert sum(s[1] for s in segments) == len(dense) and [s[0] for s in segments] == sorted(s[0] for s in segments)


def test_nothing_sparse_packs_to_the_same_bytes():
    dense = np.arange(1, 200, dtype=np.uint8).tobytes()
    packed, segments = pack(dense, [(0, 100), (100, 99)])
    assert packed == dense and segments == [[0, 199, "raw", 199]]


@pytest.mark.parametrize("damage", ["truncated", "extra", "value", "encoding", "sha"])
def test_a_damaged_packed_file_is_refused(damage):
    dense, tensors, _ = _weights()
    packed, segments = pack(dense, tensors)
    digest = hashlib.sha256(dense).hexdigest()
    if damage == "truncated":
        packed = packed[:-10]
    elif damage == "extra":
        packed = packed + b"\1"
    elif damage == "value":  # a flipped mask bit: mask and values no longer agree
        packed = bytes([packed[0] ^ 1]) + packed[1:]
    elif damage == "encoding":
        segments = [[*s[:2], "zstd", s[3]] for s in segments]
    else:
        digest = "0" * 64
    with pytest.raises(PackedWeightsError):
        unpack(packed, segments, digest)
