"""The recommender interface every model in recpipe implements: its contract, and the name -> model registry.

Conventions (shared by every model and by the pipeline):
- Item ids are dense: 0 is padding, real items are 1..n_items. Score matrices have n_items + 1 columns;
  column 0 (padding) is never rankable (the evaluator sets it to -inf whatever the model returns).
- A batch is a dict of tensors. Histories are LEFT-padded with 0, so the most recent item is at [:, -1].
    "history":     LongTensor (B, L)   items before the target, oldest first
    "target":      LongTensor (B,)     the next item (training / evaluation)
    "intent":      FloatTensor (B, d)  optional, an intention vector in the model's item-vector space
    "intent_mask": BoolTensor (B,)     optional, True where "intent" is present
  What the trainer feeds `loss` depends on the model's `train_mode` (see TRAIN_MODES); evaluation batches
  are always "history" (+ "intent").
- `loss(batch, generator=None)` returns a scalar; `score_all(batch, ...)` returns (B, n_items + 1) scores,
  larger is better. Every random draw takes a torch.Generator so runs are reproducible.

The contract: the pipeline reads a model only through the attributes `Recommender` declares below (class
attributes for what holds for every instance, `window` / `chunked` / `history_len` per instance, set through
`Recommender.__init__`). A class that declares them wrongly fails when it is defined or registered, with a
message naming the attribute, not later inside the trainer.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, ClassVar, Literal, get_args

import torch
from torch import nn

TrainMode = Literal["position", "window", "sequence", "user"]
#: how the trainer cuts the training data into batches for `loss`:
#: "position": one sample per (history, next item): "history" (B, L), "target" (B,) [+ "intent" (B, d)];
#: "window":   runs of `window` consecutive targets sharing one history: "window" (B, L + window) item ids,
#:             "target" (B, window) (0 = not a target) [+ "intent" (B, window, d)];
#: "sequence": whole sequences, the next item at every position: "input_seq" / "target_seq" (B, L);
#: "user":     the user's whole training history in "history" (B, L), no target.
TRAIN_MODES: tuple[str, ...] = get_args(TrainMode)
#: score_all keyword arguments the pipeline knows how to set: the sampler's step count (evaluate.steps), the
#: history guidance weight (recommend.w, train.guidance_grid), the intention guidance (recommend.rho) and the
#: denoiser's precision (evaluate.dtype)
SAMPLER_PARAMS: tuple[str, ...] = ("steps", "w", "rho", "dtype")


class Recommender(nn.Module):
    """Base class: RecBole-style `loss` / `score_all`, plus the contract the pipeline reads."""

    train_mode: ClassVar[TrainMode] = "position"
    """How the trainer builds batches (see TRAIN_MODES). "window" needs `window`, set per instance."""

    uses_text: ClassVar[bool] = False
    """The model is built on the whitened text vectors of the items: `build` passes `item_vectors`, the train
    stage runs whiten first, and recommend searches the item table with `generate`'s vector (so a text model
    defines `generate(batch, steps=, w=, rho=, generator=)` -> (B, d) and `item_table()` -> (n_items + 1, d))."""

    uses_intent: ClassVar[bool] = False
    """Batches may carry "intent" / "intent_mask": intention vectors, which live in the whitened text space,
    so only a text model can take them."""

    generative: ClassVar[bool] = False
    """score_all draws from a sampler: the evaluator and recommend pass a seeded `generator` to it."""

    sampler_params: ClassVar[tuple[str, ...]] = ()
    """The keyword arguments of score_all, among SAMPLER_PARAMS, that the pipeline may set. "w" also needs a
    `w` field in the model's config: train.guidance_grid writes the chosen weight there."""

    def __init__(self, n_items: int, history_len: int | None, window: int | None = None, chunked: bool = False):
        super().__init__()
        self.n_items = n_items
        #: how many most recent items the model reads (None: the whole history)
        self.history_len = history_len
        #: "window" mode: targets per training window, each seeing its own history_len items (None otherwise)
        self.window = window
        #: "sequence" mode: every chunk of history_len transitions of every user, not only each user's last one
        self.chunked = chunked
        _check_instance(self)

    @classmethod
    def reads_text(cls, config: Any) -> bool:
        """Whether `build` gets the whitened item text vectors for this config: every `uses_text` model, and a
        model that only derives something from them (DDSR's semantic IDs) when its config asks. Only training
        needs them then: what the model derived is part of its weights."""
        return cls.uses_text

    @classmethod
    def build(cls, config: Any, n_items: int, item_vectors: torch.Tensor | None = None) -> Recommender:
        """The registry's factory: a model for `config`. A subclass may return one of its own subclasses."""
        if cls.uses_text:
            return cls(config, n_items, item_vectors)
        return cls(config, n_items)

    def observe_training(self, counts: torch.Tensor, first_seen: torch.Tensor | None = None) -> None:
        """Called by the trainer once, before training, with how often each item occurs in the training data
        ((n_items + 1,) int64 on the model's device, padding 0) and when it first does ((n_items + 1,) float64
        timestamps, +inf where never), the same on every process of a distributed run. Models that read
        statistics of the data rather than batches (popularity, an item's age) take them here; the default
        reads nothing."""

    def loss(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def score_all(self, batch: dict[str, torch.Tensor], **kwargs: Any) -> torch.Tensor:
        raise NotImplementedError

    def num_parameters(self, trainable_only: bool = True) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        check_contract(cls)


class ContractError(TypeError):
    """A model class declares its contract wrongly (a programming error, raised when the class is defined)."""


def check_contract(cls: type) -> None:
    """ContractError naming the class and attribute unless `cls` declares a contract the pipeline can use."""

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ContractError(f"model class {cls.__module__}.{cls.__qualname__}: {msg}")

    need(isinstance(cls, type) and issubclass(cls, Recommender),
         "is not a Recommender subclass (register the model class; its contract is read from the class)")
    need(cls.train_mode in TRAIN_MODES, f"train_mode {cls.train_mode!r} is not one of {', '.join(TRAIN_MODES)}")
    for flag in ("uses_text", "uses_intent", "generative"):
        need(isinstance(getattr(cls, flag), bool), f"{flag} must be True or False, not {getattr(cls, flag)!r}")
    need(not cls.uses_intent or cls.uses_text, "uses_intent needs uses_text (intentions are whitened text vectors)")
    params = inspect.signature(cls.score_all).parameters
    sp = cls.sampler_params
    need(isinstance(sp, tuple) and all(p in SAMPLER_PARAMS for p in sp),
         f"sampler_params {sp!r} must be a tuple of {', '.join(SAMPLER_PARAMS)}")
    missing = [p for p in sp if p not in params]
    need(not missing, f"score_all takes no keyword {', '.join(missing)} named in sampler_params")
    need(not cls.generative or "generator" in params, "generative, but score_all takes no `generator`")
    if cls.uses_text:
        for method in ("generate", "item_table"):
            need(callable(getattr(cls, method, None)), f"uses_text, but defines no {method}() (recommend needs it)")


def _check_instance(model: Recommender) -> None:
    """ValueError unless the per-instance part of the contract fits the class's train_mode."""
    name = type(model).__name__
    if model.train_mode == "window":
        if not isinstance(model.window, int) or model.window < 1:
            raise ValueError(f"{name}: train_mode 'window' needs window >= 1 targets, not {model.window!r}")
    elif model.window is not None:
        raise ValueError(f"{name}: window is only read in train_mode 'window', not {model.train_mode!r}")
    if model.chunked and model.train_mode != "sequence":
        raise ValueError(f"{name}: chunked is only read in train_mode 'sequence', not {model.train_mode!r}")


# name -> (config dataclass, model class); the class's `build` is the factory
_REGISTRY: dict[str, tuple[type, type[Recommender]]] = {}


def register(name: str, config_cls: type):
    """Class decorator: `@register("sasrec", SASRecConfig)` on a Recommender subclass.

    build_model calls `cls.build(config, n_items, item_vectors)`, where item_vectors is a float tensor
    (n_items + 1, d) of (whitened) text vectors with row 0 = padding for a `uses_text` model, else None.
    """

    def deco(cls):
        if name in _REGISTRY:
            raise ContractError(f"model {name!r} registered twice")
        check_contract(cls)
        if not dataclasses.is_dataclass(config_cls):
            raise ContractError(f"model {name!r}: its config {config_cls!r} is not a dataclass")
        fields = {f.name for f in dataclasses.fields(config_cls)}
        if "w" in cls.sampler_params and "w" not in fields:
            raise ContractError(f"model {name!r}: sampler_params has 'w' but {config_cls.__name__} has no field w "
                                "(train.guidance_grid records the chosen weight there)")
        _REGISTRY[name] = (config_cls, cls)
        return cls

    return deco


def model_names() -> list[str]:
    _import_all()
    return sorted(_REGISTRY)


def _entry(name: str) -> tuple[type, type[Recommender]]:
    _import_all()
    if name not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def get_model_config_cls(name: str) -> type:
    return _entry(name)[0]


def model_class(name: str) -> type[Recommender]:
    """The registered class: its contract (uses_text, ...) without building a model."""
    return _entry(name)[1]


def build_model(name: str, config: Any, n_items: int, item_vectors: torch.Tensor | None = None) -> Recommender:
    cfg_cls, cls = _entry(name)
    if isinstance(config, dict):
        config = config_from_dict(cfg_cls, config)
    model = cls.build(config, n_items=n_items, item_vectors=item_vectors)
    if not isinstance(model, cls):
        raise ContractError(f"model {name!r}: {cls.__name__}.build returned a {type(model).__name__}")
    return model


def config_key(config: Any) -> dict[str, Any]:
    """A model config as the train stage fingerprints it: every field, except one declared with
    `field(metadata={"late": True})` while it holds its default. An option added after runs existed is
    declared so, and leaves their fingerprints (and resume states) as they were until someone sets it."""
    out = dataclasses.asdict(config)
    for f in dataclasses.fields(config):
        if f.metadata.get("late") and f.default is not dataclasses.MISSING and out[f.name] == f.default:
            del out[f.name]
    return out


def config_from_dict(cls: type, d: dict[str, Any]):
    """Build a config dataclass from a dict, rejecting unknown keys and values outside a Literal's choices."""
    from recpipe.config import literal_violation

    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise KeyError(f"unknown {cls.__name__} key(s): {', '.join(unknown)}")
    config = cls(**d)
    bad = literal_violation(config)
    if bad:
        raise ValueError(bad)
    return config


def _import_all() -> None:
    """Import every model module so that its @register runs (lazy, to keep `import recpipe` fast)."""
    import importlib
    import pkgutil

    import recpipe.models as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        if mod.name not in {"base", "metrics", "diffusion", "dit"}:
            importlib.import_module(f"recpipe.models.{mod.name}")
