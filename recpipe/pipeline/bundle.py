"""A trained run, loaded once: what `evaluate`, `recommend` and a service serve from.

`load(cfg, model_name)` reads each piece once, checks that the pieces belong together and keeps them:

- `ds`: the data stage's dataset;
- `model`, `conf`, `manifest`: the train stage's checkpoint (model.safetensors + config.json, verified
  against its manifest), rebuilt in eval mode. A model made from another data or whiten stage than the run
  directory holds now is refused: its item ids and vectors would name other items;
- `text` (text models): the whiten stage — the fitted map, the whitened item table the model was built on,
  the stage's info;
- `index` (text models, `with_index=True`): the index stage's saved FAISS index when it holds exactly the
  item table the model scores against, whatever its kind; otherwise one built in memory from the [index]
  settings, and the log says so and why;
- on first use, then kept: the TEM identity (`tem_info`: the embed stage's manifest info, checked against
  the whitening), the TEM (`tem`) and the intentions the model was trained with (`intention_bank`).

The train stage's checkpoint is written and read here (`save_checkpoint`, `load_model`), so that the two
halves of its format stay in step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recpipe.artifacts import Manifest, atomic_path, check_current, read_json, require_stage, write_json
from recpipe.config import Config
from recpipe.errors import ArtifactError, ConfigError
from recpipe.models.base import Recommender, build_model
from recpipe.pipeline import data as data_stage
from recpipe.pipeline import embed, whiten

TRAIN_STAGE = "train"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
# the whiten stage's hint when a text model needs it: train makes it, so that is the command to run
WHITEN_HINT = "recpipe train (it whitens the embed stage's vectors first)"


def train_stage_name(model_name: str) -> str:
    return f"{TRAIN_STAGE}/{model_name}"


# ------------------------------------------------------------------------------------------------ models
def needs_text(model_name: str) -> bool:
    """Whether a registered model is built on the whitened item text vectors (the whiten stage)."""
    from recpipe.models.base import model_class

    return model_class(model_name).uses_text


def reads_text(model_name: str, model_config: Any) -> bool:
    """Whether building this model (with this config, a dataclass or a checkpoint's dict) reads the whitened
    item text vectors: every text model, and one that derives something from them (DDSR with
    `codes_from=text`)."""
    from recpipe.models.base import config_from_dict, get_model_config_cls, model_class

    if isinstance(model_config, dict):
        model_config = config_from_dict(get_model_config_cls(model_name), model_config)
    return model_class(model_name).reads_text(model_config)


def make_model(model_name: str, model_config: Any, n_items: int, item_vectors: np.ndarray | None) -> Recommender:
    """A registered model from its config (dataclass or dict); a config the model refuses is a ConfigError."""
    iv = torch.from_numpy(np.ascontiguousarray(item_vectors, dtype=np.float32)) if item_vectors is not None else None
    try:
        return build_model(model_name, model_config, n_items=n_items, item_vectors=iv)
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"model {model_name}: {e}") from None


# -------------------------------------------------------------------------------------------- checkpoint
def save_checkpoint(out_dir: Path, model_name: str, mcfg: Any, n_items: int, dim: int | None,
                    state: dict[str, torch.Tensor], inputs: dict[str, str], text_info: dict[str, Any],
                    config: dict[str, Any]) -> None:
    """model.safetensors (the weights) + config.json (everything needed to rebuild the model, and what it was
    made from) into a train stage's directory."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    with atomic_path(out_dir / WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp))
    write_json(out_dir / CONFIG_FILE, {
        "model": model_name, "model_config": dataclasses.asdict(mcfg), "n_items": n_items, "dim": dim,
        "inputs": inputs, "text": text_info, "train": config["train"], "seed": config["seed"],
    })


def load_model(run_dir: str | Path, model_name: str, device: str | torch.device = "cpu",
               text: whiten.Whitened | None = None) -> tuple[Recommender, dict[str, Any], Manifest]:
    """(model in eval mode, its config.json, the train manifest) from `<run_dir>/train/<model>/`. A text model
    is built on the whiten stage's item table (`text`, read here when not given), which must be the one it
    was trained on."""
    return _load_model(Path(run_dir), model_name, device, text)[:3]


def _load_model(run_dir: Path, model_name: str, device: str | torch.device, text: whiten.Whitened | None
                ) -> tuple[Recommender, dict[str, Any], Manifest, whiten.Whitened | None]:
    from safetensors.torch import load_file

    m = require_stage(run_dir, train_stage_name(model_name), hint=f"recpipe train --model {model_name}")
    d = run_dir / train_stage_name(model_name)
    conf = read_json(d / CONFIG_FILE)
    item_vectors = None
    if reads_text(model_name, conf["model_config"]):
        text = text or whiten.load(run_dir, hint=WHITEN_HINT)
        if conf["inputs"].get(whiten.STAGE) != text.fingerprint:
            raise ArtifactError(f"{d}: trained on other text vectors than {run_dir / whiten.STAGE} holds now "
                                f"(another TEM or whitening); re-run `recpipe train --model {model_name}`")
        item_vectors = text.items
        if not needs_text(model_name):  # built from them (DDSR's codes), but no text model: no TEM, no index
            text = None
    try:
        state = load_file(str(d / WEIGHTS_FILE))
    except Exception as e:
        raise ArtifactError(f"{d / WEIGHTS_FILE}: unreadable checkpoint ({type(e).__name__}); "
                            f"re-run `recpipe train --model {model_name} --force`") from None
    model = make_model(model_name, conf["model_config"], conf["n_items"], item_vectors)
    own = model.state_dict()
    missing = sorted(k for k in own if k not in state)
    extra = sorted(k for k in state if k not in own)
    if missing or extra:  # written by another version of the model's code (a new option, a new layer)
        what = "; ".join(f"{label} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
                         for label, keys in (("missing", missing), ("unexpected", extra)) if keys)
        raise ArtifactError(f"{d / WEIGHTS_FILE}: written by another version of {model_name} ({what}); "
                            f"re-run `recpipe train --model {model_name} --force`")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).splitlines()[0]
        raise ArtifactError(f"{d / WEIGHTS_FILE}: does not match its config ({first})") from None
    return model.to(device).eval(), conf, m, text


# ------------------------------------------------------------------------------------------------ bundle
@dataclass
class Bundle:
    cfg: Config
    model_name: str
    ds: data_stage.Dataset
    model: Recommender
    conf: dict[str, Any]  # the checkpoint's config.json
    manifest: Manifest  # the train stage's
    text: whiten.Whitened | None  # text models only
    index: Any = None  # ItemIndex: text models, when asked for
    index_source: str = ""  # "saved" (the index stage's) or "built" (in memory)
    _tem_info: dict[str, Any] | None = field(default=None, repr=False)
    _tem: Any = field(default=None, repr=False)
    _bank: tuple[np.ndarray, np.ndarray, list[str | None]] | None = field(default=None, repr=False)

    @property
    def run_dir(self) -> Path:
        return self.cfg.run_dir

    @property
    def whitening(self) -> whiten.Whitening | None:
        return self.text.whitening if self.text is not None else None

    def tem_info(self) -> dict[str, Any]:
        """The embed stage's manifest info (the TEM that made the item vectors), checked against the whitening
        the model was trained on: a query must be embedded by the TEM its items were."""
        if self._tem_info is None:
            if self.text is None:
                raise ConfigError(f"model {self.model_name} reads no text vectors; it has no TEM")
            emb = require_stage(self.run_dir, embed.STAGE, hint="recpipe embed")
            dim = self.text.whitening.dim
            if emb.info.get("dim") != dim:
                raise ArtifactError(f"the embed stage: TEM dimension {emb.info.get('dim')} differs from "
                                    f"the whitening's {dim}; re-run `recpipe train`")
            whiten.check_tem(self.text.info, emb.info.get("tem"), emb.info.get("model"), emb.info.get("dim"))
            self._tem_info = dict(emb.info)
        return self._tem_info

    def tem(self):
        """The text-embedding model the items were embedded with (loaded on first use, then kept)."""
        if self._tem is None:
            from recpipe.pipeline import embed

            self._tem = embed.load_tem(self.tem_info())
        return self._tem

    def intention_bank(self, encode: Callable[[list[str]], np.ndarray] | None = None
                       ) -> tuple[np.ndarray, np.ndarray, list[str | None]]:
        """The distinct intentions the model was trained with: unit TEM vectors (n, d), whitened vectors (n, d)
        and texts (None where unknown); n = 0 when it trained with none. Built on first use, then kept.
        `encode` (default: this run's TEM) embeds category texts."""
        if self._bank is None:
            from recpipe.pipeline.intents import training_intentions

            enc = encode or (lambda t: self.tem().encode(t))
            self._bank = training_intentions(self.cfg, self.conf, self.ds, enc, self.text.whitening.dim,
                                             whitened=self.text)
        return self._bank


def load(cfg: Config, model_name: str | None = None, device: str | torch.device = "cpu", with_index: bool = False,
         log: Callable[[str], None] = print) -> Bundle:
    """A trained run, each piece read once (see the module's docstring); `with_index`: also the item index
    (text models), the saved one when it matches the model's item table, else built in memory (logged)."""
    run_dir = cfg.run_dir
    model_name = model_name or cfg.train.model
    require_stage(run_dir, data_stage.STAGE, hint="recpipe data")
    ds = data_stage.load_run(run_dir)
    model, conf, m, text = _load_model(run_dir, model_name, device, None)
    # the checkpoint matches its manifest; the model must also come from the data (and vectors) the run
    # directory holds now, or its item ids would name other items
    check_current(run_dir, m)
    if conf["n_items"] != ds.n_items:
        raise ArtifactError(f"train/{model_name} was trained on {conf['n_items']} items but the data stage has "
                            f"{ds.n_items}; re-run `recpipe train --model {model_name}`")
    b = Bundle(cfg, model_name, ds, model, conf, m, text)
    if with_index and text is not None:
        b.index, b.index_source = item_index(cfg, model, log)
    return b


def item_index(cfg: Config, model: Recommender, log: Callable[[str], None] = print):
    """(index, "saved" | "built") over the item table `model` scores against: the index stage's saved index when
    it holds exactly that table, whatever its kind, else one built in memory from the [index] settings."""
    from recpipe.pipeline import index as index_stage

    table = model.item_table().detach().cpu().numpy()
    idx, why = index_stage.load_matching(cfg.run_dir, table, device=cfg.index.device, rerank=cfg.index.rerank)
    if idx is not None:
        log(f"index: serving the index stage's {idx.kind} index ({idx.n:,} items)")
        return idx, "saved"
    idx = index_stage.build_index(table, cfg.index, seed=cfg.run.seed)
    log(f"index: {why}; built a {idx.kind} index of {idx.n:,} items in memory")
    return idx, "built"


__all__ = ["Bundle", "load", "load_model", "save_checkpoint", "make_model", "needs_text", "reads_text", "item_index",
           "WEIGHTS_FILE", "CONFIG_FILE"]
