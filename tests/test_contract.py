"""The model contract (recpipe.models.base): what the pipeline reads of a model, declared on its class and
checked when the class is defined or registered; one registration style for every model."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch

from recpipe.models import base
from recpipe.models.base import ContractError, Recommender, build_model, model_class, model_names, register


@dataclasses.dataclass
class TinyConfig:
    w: float = 1.0  # a guidance weight, so that sampler_params may name "w"


def _score(self, batch, generator=None, steps=None, w=None):
    return torch.zeros(batch["history"].shape[0], self.n_items + 1)


@pytest.fixture
def registry(monkeypatch):
    """A private copy of the registry: the models a test registers leave no trace."""
    base._import_all()
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    return base._REGISTRY


def test_every_registered_model_keeps_the_contract():
    """The contract each real model declares: what the trainer, evaluate and recommend rely on."""
    names = model_names()
    assert {"idreamrec", "sasrec", "dreamrec", "diffurec", "diffurecsys", "diffrec"} <= set(names)
    for name in names:
        cls = model_class(name)
        base.check_contract(cls)
        params = inspect.signature(cls.score_all).parameters
        assert all(p in params for p in cls.sampler_params), name
    idr = model_class("idreamrec")
    assert idr.uses_text and idr.uses_intent and idr.generative
    assert idr.sampler_params == ("steps", "w", "rho", "dtype")
    assert model_class("dreamrec").sampler_params == ("steps", "w") and model_class("dreamrec").generative
    assert not any(model_class(n).uses_text for n in names if n not in ("idreamrec", "textnn"))
    assert model_class("sasrec").train_mode == "sequence" and model_class("diffrec").train_mode == "user"


def test_idreamrec_layouts_are_two_classes_sharing_one_base():
    from recpipe.models.idreamrec import CausalIDreamRec, FullIDreamRec, IDreamRec, IDreamRecConfig

    vec = torch.cat([torch.zeros(1, 8), torch.randn(12, 8, generator=torch.Generator().manual_seed(0))])
    small = {"width": 16, "depth": 1, "heads": 2, "history_len": 4, "T": 50}
    causal = build_model("idreamrec", {**small, "window": 3}, 12, vec)
    full = build_model("idreamrec", {**small, "layout": "full"}, 12, vec)
    assert type(causal) is CausalIDreamRec and causal.train_mode == "window" and causal.window == 3
    assert type(full) is FullIDreamRec and full.train_mode == "position" and full.window is None
    assert isinstance(causal, IDreamRec) and isinstance(full, IDreamRec)
    # the loss is written once, in the shared base; the layouts supply how the denoiser reads targets
    assert "loss" not in vars(CausalIDreamRec) and "loss" not in vars(FullIDreamRec)
    with pytest.raises(TypeError, match="one class per layout"):
        IDreamRec(IDreamRecConfig(**small), 12, vec)


def test_a_function_cannot_be_registered(registry):
    """The contract is read from the class: a factory function would hide it (a text model registered as a
    function used to be treated as needing no text)."""

    def build_text_model(config, n_items, item_vectors):
        raise AssertionError("never called")

    build_text_model.uses_text = True
    with pytest.raises(ContractError, match="is not a Recommender subclass"):
        register("text-fn", TinyConfig)(build_text_model)
    assert "text-fn" not in registry


def test_a_registered_text_class_is_known_to_need_text_before_it_is_built(registry):
    class TextModel(Recommender):
        uses_text = True

        def __init__(self, config, n_items, item_vectors):
            super().__init__(n_items, 4)
            self.item_vectors = item_vectors

        def generate(self, batch, steps=None, w=None, rho=None, generator=None):
            return torch.zeros(batch["history"].shape[0], self.item_vectors.shape[1])

        def item_table(self):
            return self.item_vectors

        score_all = _score

    register("text-cls", TinyConfig)(TextModel)
    assert model_class("text-cls").uses_text
    from recpipe.pipeline.bundle import needs_text  # what the train stage asks before loading the whitening

    assert needs_text("text-cls") and not needs_text("sasrec")
    vec = torch.ones(6, 3)
    assert build_model("text-cls", {}, n_items=5, item_vectors=vec).item_vectors is vec  # build passes the vectors


@pytest.mark.parametrize("attrs, match", [
    ({"train_mode": "windows"}, "train_mode 'windows' is not one of position, window, sequence, user"),
    ({"uses_intent": True}, "uses_intent needs uses_text"),
    ({"generative": 1}, "generative must be True or False"),
    ({"sampler_params": ("steps", "temperature")}, r"sampler_params \('steps', 'temperature'\) must be a tuple of"),
    ({"sampler_params": ["steps"]}, "must be a tuple of"),
    ({"sampler_params": ("rho",)}, "score_all takes no keyword rho named in sampler_params"),
    ({"uses_text": True}, r"uses_text, but defines no generate\(\)"),
])
def test_a_broken_contract_fails_when_the_class_is_defined(attrs, match):
    with pytest.raises(ContractError, match=match) as e:
        type("Broken", (Recommender,), {"score_all": _score, **attrs})
    assert "Broken" in str(e.value)  # the message names the class


def test_generative_needs_a_generator_keyword():
    def score_all(self, batch, steps=None):
        return None

    with pytest.raises(ContractError, match="generative, but score_all takes no `generator`"):
        type("NoGen", (Recommender,), {"score_all": score_all, "generative": True})


def test_registration_checks_the_config_and_the_name(registry):
    @dataclasses.dataclass
    class NoW:
        steps: int = 1  # a config without w

    guided = type("Guided", (Recommender,), {"score_all": _score, "sampler_params": ("w",)})
    with pytest.raises(ContractError, match="sampler_params has 'w' but NoW has no field w"):
        register("guided", NoW)(guided)
    with pytest.raises(ContractError, match="is not a dataclass"):
        register("guided", dict)(guided)
    with pytest.raises(ContractError, match="'sasrec' registered twice"):
        register("sasrec", TinyConfig)(guided)
    assert "guided" not in registry and registry["sasrec"][1] is model_class("sasrec")


def test_per_instance_contract_is_checked_when_the_model_is_built(registry):
    class Windowed(Recommender):
        train_mode = "window"
        score_all = _score

        def __init__(self, config, n_items, window=None):
            super().__init__(n_items, 4, window=window)

    with pytest.raises(ValueError, match="train_mode 'window' needs window >= 1 targets, not None"):
        Windowed(TinyConfig(), 5)
    assert Windowed(TinyConfig(), 5, window=2).window == 2
    with pytest.raises(ValueError, match="chunked is only read in train_mode 'sequence'"):
        Recommender(5, 4, chunked=True)
    with pytest.raises(ValueError, match="window is only read in train_mode 'window'"):
        Recommender(5, 4, window=3)

    class Impostor(Recommender):
        score_all = _score

        @classmethod
        def build(cls, config, n_items, item_vectors=None):
            return Recommender(n_items, 4)

    register("impostor", TinyConfig)(Impostor)
    with pytest.raises(ContractError, match="Impostor.build returned a Recommender"):
        build_model("impostor", {}, n_items=5)
