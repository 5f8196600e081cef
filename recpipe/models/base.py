"""The recommender interface every model in recpipe implements, and the name -> factory registry.

Conventions (shared by every model and by the pipeline):
- Item ids are dense: 0 is padding, real items are 1..n_items. Score matrices have n_items + 1 columns;
  column 0 (padding) is never rankable (the evaluator sets it to -inf whatever the model returns).
- A batch is a dict of tensors. Histories are LEFT-padded with 0, so the most recent item is at [:, -1].
    "history":     LongTensor (B, L)   items before the target, oldest first
    "target":      LongTensor (B,)     the next item (training / evaluation)
    "intent":      FloatTensor (B, d)  optional, an intention vector in the model's item-vector space
    "intent_mask": BoolTensor (B,)     optional, True where "intent" is present
  Models with train_mode == "sequence" are trained on "input_seq" / "target_seq" (B, L) instead
  (next-item target at every position, 0 where there is none), and models with train_mode == "user"
  receive the user's whole training history in "history".
- `loss(batch, generator=None)` returns a scalar; `score_all(batch, ...)` returns (B, n_items + 1) scores,
  larger is better. Every random draw takes a torch.Generator so runs are reproducible.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn


class Recommender(nn.Module):
    """Base class: RecBole-style `loss` / `score_all`, plus what the trainer needs to know."""

    #: how the trainer builds batches: "position" (one sample per (history, next item)),
    #: "sequence" (whole sequences, a target at every position) or "user" (a user's whole history).
    train_mode: ClassVar[str] = "position"
    #: True if the model generates a vector that is matched against item vectors (CFG, PreferDiff, ...)
    generative: ClassVar[bool] = False
    #: True if the factory needs `item_vectors` (whitened text vectors of the items)
    uses_text: ClassVar[bool] = False
    #: True if batches may carry "intent" / "intent_mask" (intention guidance)
    uses_intent: ClassVar[bool] = False

    def __init__(self, n_items: int, history_len: int | None):
        super().__init__()
        self.n_items = n_items
        #: how many most recent items the model reads (None: the whole history)
        self.history_len = history_len

    def loss(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def score_all(self, batch: dict[str, torch.Tensor], **kwargs: Any) -> torch.Tensor:
        raise NotImplementedError

    def num_parameters(self, trainable_only: bool = True) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)


# name -> (config dataclass, factory(config, n_items, item_vectors | None) -> Recommender)
_REGISTRY: dict[str, tuple[type, Callable[..., Recommender]]] = {}


def register(name: str, config_cls: type):
    """Class/function decorator: `@register("sasrec", SASRecConfig)` on a factory or Recommender subclass.

    The factory is called as factory(config, n_items=..., item_vectors=...) where item_vectors is a float
    tensor (n_items + 1, d) of (whitened) text vectors with row 0 = padding, or None for ID-only models.
    """

    def deco(factory):
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} registered twice")
        _REGISTRY[name] = (config_cls, factory)
        return factory

    return deco


def model_names() -> list[str]:
    _import_all()
    return sorted(_REGISTRY)


def get_model_config_cls(name: str) -> type:
    _import_all()
    if name not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name][0]


def build_model(name: str, config: Any, n_items: int, item_vectors: torch.Tensor | None = None) -> Recommender:
    _import_all()
    if name not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    cfg_cls, factory = _REGISTRY[name]
    if isinstance(config, dict):
        config = config_from_dict(cfg_cls, config)
    return factory(config, n_items=n_items, item_vectors=item_vectors)


def config_from_dict(cls: type, d: dict[str, Any]):
    """Build a config dataclass from a dict, rejecting unknown keys."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise KeyError(f"unknown {cls.__name__} key(s): {', '.join(unknown)}")
    return cls(**d)


def _import_all() -> None:
    """Import every model module so that its @register runs (lazy, to keep `import recpipe` fast)."""
    import importlib
    import pkgutil

    import recpipe.models as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        if mod.name not in {"base", "metrics", "diffusion", "dit"}:
            importlib.import_module(f"recpipe.models.{mod.name}")
