"""Two reference points with nothing to learn, for the cold-item protocol and as floors for every table.

- `pop`: every user gets the items ranked by how often they occur in the training sequences. It cannot rank
  an item nobody trained on (count 0: ties are counted against the target, so such a target ranks last).
- `textnn`: the items whose whitened text vectors have the largest inner product with the vector of the
  user's most recent item. It ranks a new item as well as an old one, by its text alone.

The trainer runs every registered model the same way (batches, an optimiser, validation, a checkpoint), so
each has one parameter that its loss touches with weight 0: the optimiser gets a non-empty parameter list
and the parameter never moves. `pop` takes its counts from the trainer's `observe_training` (each item's count
in the training data, once, the same on every process of a distributed run) into an integer buffer, which
the checkpoint keeps; batches teach it nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from recpipe.models.base import Recommender, register


def _unused_parameter() -> nn.Parameter:
    return nn.Parameter(torch.zeros(1))


@dataclass
class PopConfig:
    pass


@register("pop", PopConfig)
class Pop(Recommender):
    """Popularity over the training interactions (see the module docstring)."""

    train_mode = "user"

    def __init__(self, config: PopConfig, n_items: int):
        super().__init__(n_items, history_len=None)  # training batches hold each user's whole training part
        self.config = config
        # integer: the trainer's EMA averages float tensors but copies the others, so the counts stay exact
        self.register_buffer("counts", torch.zeros(n_items + 1, dtype=torch.long))
        self.unused = _unused_parameter()

    def observe_training(self, counts: torch.Tensor, first_seen: torch.Tensor | None = None) -> None:
        self.counts.copy_(counts)

    def loss(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
        return self.unused.sum() * 0.0

    @torch.no_grad()
    def score_all(self, batch: dict[str, torch.Tensor], **_: Any) -> torch.Tensor:
        B = batch["history"].shape[0]
        s = self.counts.float()[None].expand(B, -1).clone()
        s[:, 0] = -torch.inf
        return s


@dataclass
class TextNNConfig:
    pass


@register("textnn", TextNNConfig)
class TextNN(Recommender):
    """The nearest whitened text vectors (inner product) to the most recent item's (see the module docstring)."""

    train_mode = "user"
    uses_text = True

    def __init__(self, config: TextNNConfig, n_items: int, item_vectors: torch.Tensor | None):
        super().__init__(n_items, history_len=1)  # the most recent item is all it reads
        if item_vectors is None or item_vectors.dim() != 2 or item_vectors.shape[0] != n_items + 1:
            got = None if item_vectors is None else tuple(item_vectors.shape)
            raise ValueError(f"textnn needs item_vectors (n_items + 1, d) = ({n_items + 1}, d), got {got}")
        self.config = config
        self.register_buffer("item_vectors", item_vectors.detach().float().clone().contiguous())
        self.unused = _unused_parameter()

    def loss(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
        return self.unused.sum() * 0.0

    def item_table(self) -> torch.Tensor:
        return self.item_vectors

    @torch.no_grad()
    def generate(self, batch: dict[str, torch.Tensor], steps: int | None = None, w: float | None = None,
                 rho: float | None = None, generator: torch.Generator | None = None, **_: Any) -> torch.Tensor:
        """(B, d): the most recent item's vector (zero for an empty history: every item then scores 0)."""
        return self.item_vectors[batch["history"][:, -1]]

    @torch.no_grad()
    def score_all(self, batch: dict[str, torch.Tensor], **_: Any) -> torch.Tensor:
        s = self.generate(batch) @ self.item_vectors.T
        s[:, 0] = -torch.inf
        return s
