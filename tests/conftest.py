"""Shared fixtures: seeded RNG, one tolerance helper, tiny models of every registered architecture."""
from __future__ import annotations

import argparse
import random

import pytest
import torch
from fairseq.data import Dictionary
from fairseq.models import ARCH_CONFIG_REGISTRY, ARCH_MODEL_REGISTRY

import lite  # noqa: F401  (registers the models)
from lite.models import LiteTransformerModel

TINY = dict(encoder_embed_dim=16, decoder_embed_dim=16, encoder_ffn_embed_dim=32, decoder_ffn_embed_dim=32,
            encoder_layers=2, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
            mixer_attention_heads=2, conv_heads=2, gau_key_dim=8)
LITE_ARCHS = sorted(a for a, m in ARCH_MODEL_REGISTRY.items() if m is LiteTransformerModel)


@pytest.fixture(autouse=True)
def seed():
    random.seed(0)
    torch.manual_seed(0)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float = 1e-5, rtol: float = 1e-5) -> None:
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


def tiny_dictionary(size: int = 40) -> Dictionary:
    d = Dictionary()
    for i in range(size):
        d.add_symbol(f"w{i}")
    return d


class TinyTask:
    def __init__(self, dictionary: Dictionary):
        self.source_dictionary = self.target_dictionary = dictionary


def tiny_model(arch: str, dictionary: Dictionary | None = None, **overrides) -> LiteTransformerModel:
    """A registered architecture at test size (embed 16, 2+2 layers), in eval mode; FFN-less stays FFN-less."""
    preset = argparse.Namespace()
    ARCH_CONFIG_REGISTRY[arch](preset)
    no_ffn = {} if preset.encoder_ffn_embed_dim else {"encoder_ffn_embed_dim": 0, "decoder_ffn_embed_dim": 0}
    args = argparse.Namespace(**{**TINY, **no_ffn, **overrides})
    ARCH_CONFIG_REGISTRY[arch](args)
    return LiteTransformerModel.build_model(args, TinyTask(dictionary or tiny_dictionary())).eval()
