"""The dynamic convolution against its peer, fairseq's ``DynamicConv1dTBC``: the same weights give the same output,
and one layer's training pass (forward + backward) costs what fairseq's does. Both in one process, alternating, CPU
time, median of ``repeat`` after a warm-up, so that the ratio holds on a busy machine.

    python -m eval.conv_peers [--repeat 7] [--threads 1]
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Iterable, List, Tuple

import torch
from fairseq.modules.dynamic_convolution import DynamicConv1dTBC
from torch import nn

from lite.modules.conv import DynamicConv

CHANNELS, HEADS = 104, 4  # lsra_100m's convolutions
SHAPES = ((15, 224, 31, False), (15, 224, 31, True), (15, 224, 3, False), (120, 28, 31, False),
          (120, 28, 31, True), (512, 6, 31, False), (512, 6, 31, True))  # T, B, K, causal: 3,360 tokens a batch


def peer_pair(channels: int, kernel_size: int, heads: int, causal: bool) -> Tuple[DynamicConv, nn.Module]:
    """Ours and fairseq's, the same kernel predictor, both in training mode."""
    ours = DynamicConv(channels, kernel_size, heads, causal=causal).train()
    theirs = DynamicConv1dTBC(channels, kernel_size=kernel_size, padding_l=ours.padding_l, num_heads=heads,
                              weight_softmax=True).train()
    theirs.weight_linear.weight.data.copy_(ours.weight_linear.weight.data)
    return ours, theirs


def _train_pass(module: nn.Module, x: torch.Tensor) -> float:
    start = time.process_time()
    module(x).sum().backward()
    return time.process_time() - start


def time_layers(shapes: Iterable[Tuple[int, int, int, bool]], repeat: int) -> List[dict]:
    """Milliseconds of one training pass per shape, ours and fairseq's."""
    rows = []
    for length, batch, kernel_size, causal in shapes:
        ours, theirs = peer_pair(CHANNELS, kernel_size, HEADS, causal)
        x = torch.randn(length, batch, CHANNELS, requires_grad=True)  # [T, B, C]
        times = {"lite_ms": [], "fairseq_ms": []}
        for r in range(repeat + 1):
            for key, module in (("lite_ms", ours), ("fairseq_ms", theirs)):
                seconds = _train_pass(module, x)
                if r:  # the first round warms up
                    times[key].append(seconds * 1000)
        rows.append({"length": length, "batch": batch, "kernel_size": kernel_size, "causal": causal,
                     **{key: statistics.median(v) for key, v in times.items()}})
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print("| T | B | K | causal | lite ms | fairseq ms | fairseq / lite |\n|---:|---:|---:|---|---:|---:|---:|")
    for row in time_layers(SHAPES, args.repeat):
        print(f"| {row['length']} | {row['batch']} | {row['kernel_size']} | {row['causal']} | {row['lite_ms']:.1f} "
              f"| {row['fairseq_ms']:.1f} | {row['fairseq_ms'] / row['lite_ms']:.2f} |")


if __name__ == "__main__":
    main()
