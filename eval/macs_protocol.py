"""The Lite Transformer paper's measurement protocol (design.md "Protocols"), torch-free: the command line reads
its defaults from here without importing the counter.

    30 source + 30 target tokens, batch 1; decoding cost at beam 1 and 4 with a vocabulary of 10 000.
"""
from __future__ import annotations

SRC_LEN = TGT_LEN = 30
VOCAB_SIZE = 10_000
BEAMS = (1, 4)
