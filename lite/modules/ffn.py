"""Position-wise feed-forward block. The Lite Transformer "flattens" it: hidden dim = embed dim."""
from __future__ import annotations

import torch.nn.functional as F
from fairseq import utils
from torch import Tensor, nn


class FeedForward(nn.Module):
    """Linear(C -> F), activation, dropout, Linear(F -> C).

    Shape:
        Input: T x B x C
        Output: T x B x C
    """

    def __init__(self, embed_dim: int, hidden_dim: int, activation: str = "relu", activation_dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(embed_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, embed_dim)
        self.activation = utils.get_activation_fn(activation)
        self.activation_dropout = activation_dropout

    def forward(self, x: Tensor) -> Tensor:
        h = F.dropout(self.activation(self.fc1(x)), p=self.activation_dropout, training=self.training)
        return self.fc2(h)
