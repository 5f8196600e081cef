"""Intentions: the texts and vectors a text model is trained with, and how a typed request is matched to them.

- Category intentions: `evaluate.category_template` filled with one of an item's categories ("a comedy
  movie"), embedded by the items' TEM and whitened like the items (`category_intents`); training draws
  them per target (`IntentSampler`, with the describe stage's LLM intentions for train.intent_source llm /
  mixed), and evaluate scores with them.
- The intention bank of a trained model (`training_intentions`): the distinct intentions it was trained
  with, in TEM space and whitened; `anchor_intent` maps a typed request onto the nearest of them, since
  the denoiser only knows those.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import torch

from recpipe.artifacts import require_stage
from recpipe.config import Config
from recpipe.errors import ArtifactError, ConfigError
from recpipe.pipeline import data as data_stage


@dataclasses.dataclass
class CategoryIntents:
    """Category-level training intentions: one text per category, each item's categories."""

    texts: list[str]  # the template filled with each category (lower-cased, as evaluate does)
    vectors: np.ndarray  # (C, d) whitened TEM vectors of the texts
    items: np.ndarray  # (n_items + 1, M) int64 category index per item, -1 = none; row 0 = padding
    raw: np.ndarray | None = None  # (C, d) the texts' TEM vectors, before whitening


def category_text(template: str, category: str) -> str:
    """evaluate.category_template filled with one category: "a {category} movie" + "action" -> "an action
    movie" (the article before the category agrees with it; a text the TEM embeds should read as a person
    would type it). A template that does not format is a one-line ConfigError."""
    text = template
    if category[:1].lower() in tuple("aeiou"):
        text = re.sub(r"\b([Aa]) (?=\{category\})", r"\1n ", template)
    try:
        return text.format(category=category)
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(f"evaluate.category_template {template!r}: {e}") from None


def category_intents(cfg: Config, ds: data_stage.Dataset, whitening=None, encode=None) -> CategoryIntents:
    """Embed "a <category> movie" (evaluate.category_template) for every category of evaluate.category_column
    with the items' TEM (`encode`, default: the embed stage's), whitened like the items (`whitening`, default:
    the whiten stage's)."""
    from recpipe.pipeline import whiten
    from recpipe.pipeline.embed import load_tem

    col, template = cfg.evaluate.category_column, cfg.evaluate.category_template
    cats = ds.item_categories(col)
    if cats is None or not any(cats):
        raise ConfigError(f"train.intent_source={cfg.train.intent_source} needs the item column "
                          f"evaluate.category_column={col!r} (absent or empty in this dataset)")
    names = sorted({c.lower() for cs in cats for c in cs})
    index = {c: i for i, c in enumerate(names)}
    width = max(len(cs) for cs in cats)
    items = np.full((ds.n_items + 1, width), -1, dtype=np.int64)
    for i, cs in enumerate(cats, start=1):
        ids = list(dict.fromkeys(index[c.lower()] for c in cs))
        items[i, : len(ids)] = ids
    texts = [category_text(template, c) for c in names]
    if encode is None:
        encode = load_tem(require_stage(cfg.run_dir, "embed", hint="recpipe embed").info).encode
    w = whitening if whitening is not None else whiten.load(cfg.run_dir).whitening
    raw = encode(texts)
    return CategoryIntents(texts, w.transform(raw).astype(np.float32), items, raw)


class IntentSampler:
    """Per-sample training intentions for targets (any shape), drawn with the trainer's generator.

    llm: the describe stage's intention of the target; category: one of the target's categories, uniformly;
    mixed: a fair coin between the two (category falls back to llm for an item without categories).
    Returns (intention vectors (..., d), available (...) bool)."""

    def __init__(self, source: str, llm: np.ndarray | None, cats: CategoryIntents | None, device: torch.device):
        as_t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)
        self.source = source
        self.llm = as_t(llm.astype(np.float32)) if llm is not None else None
        if cats is not None:
            self.cat_vec, self.cat_items = as_t(cats.vectors), as_t(cats.items)
            self.cat_n = (self.cat_items >= 0).sum(1)  # (n_items + 1,)

    def __call__(self, tgt: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        real = tgt != 0
        if self.source == "llm":
            return self.llm[tgt], real
        u = torch.rand(tuple(tgt.shape), generator=gen, device=tgt.device)
        k = (u * self.cat_n[tgt]).long().clamp_max(self.cat_items.shape[1] - 1)
        c = self.cat_items[tgt, k]  # -1 where the item has no category
        vec = self.cat_vec[c.clamp_min(0)]
        if self.source == "category":
            return vec, real & (c >= 0)
        use_cat = (torch.rand(tuple(tgt.shape), generator=gen, device=tgt.device) < 0.5) & (c >= 0)
        return torch.where(use_cat[..., None], vec, self.llm[tgt]), real


def anchor_intent(query: np.ndarray, bank_raw: np.ndarray, bank_white: np.ndarray, k: int, temperature: float
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A typed intention as the denoiser knows intentions: the softmax(cosine / temperature)-weighted mean of
    the whitened vectors (bank_white, (n, d)) of the k training intentions whose unit TEM vectors (bank_raw)
    are nearest to the query's unit TEM vector (d,). Returns the (d,) vector, the k bank rows used (nearest
    first) and their weights."""
    k = min(k, len(bank_raw))
    if k < 1:
        raise ValueError("an empty intention bank")
    cos = bank_raw @ query  # (n,)
    top = np.argpartition(-cos, k - 1)[:k]
    top = top[np.argsort(-cos[top], kind="stable")]
    z = (cos[top] - cos[top[0]]) / temperature
    p = np.exp(z.astype(np.float64))
    p /= p.sum()
    return (p @ bank_white[top].astype(np.float64)).astype(np.float32), top, p


def training_intentions(cfg: Config, conf: dict, ds, encode, dim: int, whitened=None
                        ) -> tuple[np.ndarray, np.ndarray, list[str | None]]:
    """The distinct intentions a model (its checkpoint config `conf`) was trained with (train.intent_source:
    the describe stage's, the category texts, or both): unit TEM vectors (n, d), whitened vectors (n, d) and
    texts (None where unknown); n = 0 when it trained with none. `encode(texts)` is the items' TEM;
    `whitened`: the whiten stage already read (`whiten.load`), else it is read here."""
    from recpipe.pipeline import describe, embed, whiten

    src = conf.get("train", {}).get("intent_source", "llm")
    raws, whites, texts = [], [], []
    if src in ("llm", "mixed"):
        whitened = whitened or whiten.load(cfg.run_dir)
        white = whitened.intent_vectors(mmap=True)  # only the distinct rows are read in
        raw = embed.load_vectors(cfg.run_dir, "intents", mmap=True) if white is not None else None
        if raw is not None:
            if raw.shape != white.shape:
                raise ArtifactError(f"the embed stage's intent embeddings {raw.shape} differ in shape from the "
                                    f"whitened intentions' {white.shape}; re-run `recpipe train`")
            step = 1 << 16  # zero rows (items without an intention) left out, a block of rows at a time
            keep = np.concatenate([np.flatnonzero(np.asarray(raw[i:i + step]).any(axis=1)) + i
                                   for i in range(1, len(raw), step)] or [np.zeros(0, np.int64)])
            all_texts = describe.load_intents(cfg.run_dir, len(raw) - 1)
            kept_texts = [None] * len(keep) if all_texts is None else [all_texts[i - 1] for i in keep]
            first = _distinct(kept_texts, raw, keep)
            raws.append(np.asarray(raw[keep[first]], dtype=np.float32))
            whites.append(np.asarray(white[keep[first]], dtype=np.float32))
            texts += [kept_texts[i] for i in first]
    if src in ("category", "mixed"):
        whitened = whitened or whiten.load(cfg.run_dir)
        cats = category_intents(cfg, ds, whitened.whitening, encode)
        raws.append(np.asarray(cats.raw, dtype=np.float32))
        whites.append(cats.vectors.astype(np.float32))
        texts += cats.texts
    R = np.concatenate(raws) if raws else np.zeros((0, dim), np.float32)
    Wt = np.concatenate(whites) if whites else np.zeros((0, dim), np.float32)
    R /= np.maximum(np.linalg.norm(R, axis=1, keepdims=True), 1e-12)
    first = _distinct(texts, R, np.arange(len(R)))
    return R[first], Wt[first], [texts[i] for i in first]


def _distinct(texts: list[str | None], vectors: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Positions (into `rows`, ascending) of the first row of each distinct intention: by text where every
    text is known, else by vector rounded to 1e-4 (one text's rows differ in the last bits across batches)."""
    if texts and all(t is not None for t in texts):
        seen: dict[str, int] = {}
        for i, t in enumerate(texts):
            seen.setdefault(t, i)
        return np.array(sorted(seen.values()), dtype=np.int64)
    if not len(rows):
        return np.zeros(0, dtype=np.int64)
    _, first = np.unique(np.round(np.asarray(vectors[rows], dtype=np.float32), 4), axis=0, return_index=True)
    return np.sort(first)


__all__ = ["CategoryIntents", "category_text", "category_intents", "IntentSampler", "training_intentions",
           "anchor_intent"]
