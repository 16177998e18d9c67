"""Sparse weights kept out of a model dir's external-data file, expanded in memory at load. Torch-free.

The compact int8 dir's graphs read their weights from ``weights.bin`` (ONNX external data). When tensors there
are mostly zeros (a fine-grained pruned model: ``lite compress sparsify``), ``pack`` stores the file as
``weights.packed``: the bytes of each such tensor as a bitmask of its non-zero bytes (one bit a byte: for int8 one
bit a weight) followed by those bytes; every other byte range as it is. model.json's ``packed`` entry lists the
segments and the sha256 of the file they expand to, and the graphs keep naming ``weights.bin``: at load, ONNX
Runtime gets the expanded bytes from memory (``add_external_initializers_from_files_in_memory``) and never sees a
difference. A packed file that does not expand to exactly that sha256 is refused.

    segment = [offset, length, encoding, stored]   a byte range of the expanded file; encoding "raw" (stored as is)
                                                   or "bitmask" (ceil(length / 8) mask bytes, then the non-zero
                                                   bytes); ``stored`` = its bytes in weights.packed, in order
"""
from __future__ import annotations

import hashlib
from typing import Iterable

import numpy as np

from export.model_dir import ModelDirError

PACKED = "weights.packed"


class PackedWeightsError(ModelDirError):
    """A packed weights file that does not expand to the weights model.json names."""


def _mask_bytes(length: int) -> int:
    return (length + 7) // 8


def pack(dense: bytes | np.ndarray, tensors: Iterable[tuple[int, int]]) -> tuple[bytes, list[list]]:
    """(packed bytes, segments) of ``dense``; each tensor's (offset, length) range is bitmask-coded where that is
    smaller, every other byte is stored raw."""
    data = np.frombuffer(dense, dtype=np.uint8)
    chunks, segments, at = [], [], 0

    def raw(end: int) -> None:
        if end > at:
            chunks.append(data[at:end])
            segments.append([at, end - at, "raw", end - at])

    for offset, length in sorted(tensors):
        region = data[offset:offset + length]
        nonzero = region != 0
        stored = _mask_bytes(length) + int(nonzero.sum())
        if offset < at or stored >= length:
            continue
        raw(offset)
        chunks += [np.packbits(nonzero), region[nonzero]]
        segments.append([offset, length, "bitmask", stored])
        at = offset + length
    raw(len(data))
    return b"".join(c.tobytes() for c in chunks), segments


def unpack(packed: bytes | np.ndarray, segments: list[list], sha256: str | None = None) -> np.ndarray:
    """The expanded bytes (uint8 [N]) of ``packed``; PackedWeightsError when it does not fit ``segments`` or the
    result does not match ``sha256``."""
    source = np.frombuffer(packed, dtype=np.uint8)
    size = sum(s[1] for s in segments)
    out = np.zeros(size, dtype=np.uint8)
    at = expected_offset = 0
    for offset, length, encoding, stored in segments:
        chunk = source[at:at + stored]
        if offset != expected_offset or len(chunk) != stored:
            raise PackedWeightsError(f"{PACKED}: segment at byte {offset} does not fit the file (truncated?)")
        if encoding == "raw" and stored == length:
            out[offset:offset + length] = chunk
        elif encoding == "bitmask":
            mask = np.unpackbits(chunk[:_mask_bytes(length)], count=length).astype(bool)
            values = chunk[_mask_bytes(length):]
            if int(mask.sum()) != len(values):
                raise PackedWeightsError(f"{PACKED}: segment at byte {offset}: its mask and values disagree")
            out[offset:offset + length][mask] = values
        else:
            raise PackedWeightsError(f"{PACKED}: segment at byte {offset}: unknown encoding {encoding!r}")
        at, expected_offset = at + stored, offset + length
    if at != len(source):
        raise PackedWeightsError(f"{PACKED}: {len(source) - at} bytes after the last segment")
    if sha256 is not None and hashlib.sha256(out.tobytes()).hexdigest() != sha256:
        raise PackedWeightsError(f"{PACKED}: does not expand to the weights model.json names (sha256 differs)")
    return out
