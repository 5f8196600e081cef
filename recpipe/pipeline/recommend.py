"""Recommend: one-step intention-guided generation, then a FAISS inner-product search excluding seen items.

`RecommendService(cfg, model)` loads a trained run once (`recpipe.pipeline.bundle`: data, model, whitening,
the index stage's saved index when it holds the model's item table, else one built in memory) and checks that
the pieces belong together; `.recommend(user_id, intent, k)` then answers one request in milliseconds, so a
service keeps one instance warm. Generative text models (idreamrec) go through the index; other models
(sasrec, ...) rank by `score_all` with seen items masked.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from recpipe.config import Config
from recpipe.errors import ArtifactError, ConfigError, DataError
from recpipe.pipeline import bundle as bundle_mod
from recpipe.pipeline.embed import torch_threads
from recpipe.pipeline.intents import anchor_intent
from recpipe.pipeline.scoring import resolve_dtype

INTENT_CACHE = 4096  # distinct intents whose vectors a warm service keeps (1.5 KB each at 384-d)


def with_new_item_offset(model, oracle: np.ndarray, scores: np.ndarray, ids: np.ndarray, excludes: list[np.ndarray],
                         k: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Index searches' top k (oracle (B, d), scores / ids (B, k)) with the model's new-item offset
    (IDreamRec.new_item_offset) applied: the index holds item_table() alone, so the new items are scored here,
    once for the batch, and merged into each row (less the row's excluded items). Exact for an exact index: an
    item without the offset that belongs in the top k is beaten by no more items in the index's ranking than
    in the offset one, so the index returned it. Rows come back as lists (their lengths may differ)."""
    offset = getattr(model, "new_item_offset", lambda: None)()
    if offset is None:
        return list(scores), list(ids)
    new_t, bias = offset
    with torch.no_grad():
        table = model.item_vecs(new_t).float().cpu().numpy()  # (N_new, d): those rows alone
    new_ids = new_t.cpu().numpy()
    oracle = oracle.astype(np.float32)
    new_scores = oracle @ table.T + (bias * np.linalg.norm(oracle, axis=1, keepdims=True)).astype(np.float32)
    out_s, out_i = [], []
    for b, excl in enumerate(excludes):
        fresh = ~np.isin(new_ids, excl)
        keep = (ids[b] > 0) & ~np.isin(ids[b], new_ids)
        all_ids = np.concatenate([ids[b][keep], new_ids[fresh]])
        all_scores = np.concatenate([scores[b][keep], new_scores[b][fresh].astype(scores.dtype)])
        top = np.argsort(-all_scores, kind="stable")[:k]
        out_s.append(all_scores[top])
        out_i.append(all_ids[top])
    return out_s, out_i


@dataclass
class Recommendation:
    rank: int
    item: int  # dense id
    item_id: str  # original id
    title: str
    score: float


class RecommendService:
    """Recommendations from one trained run, kept warm: the run is loaded once (`recpipe.pipeline.bundle`,
    with its item index), then each `recommend` call answers one request."""

    def __init__(self, cfg: Config, model_name: str | None = None, log=print):
        t0 = time.perf_counter()
        self.cfg = cfg
        self.bundle = bundle_mod.load(cfg, model_name, "cpu", with_index=True, log=log)
        self.model_name = self.bundle.model_name
        self.ds, self.model, self.conf = self.bundle.ds, self.bundle.model, self.bundle.conf
        # the precision of the intent's TEM forward (the one-step generation stays float32: at batch 1, bf16
        # autocast re-casts the weights on every call and is slower)
        self.dtype = resolve_dtype(cfg.recommend.dtype, "cpu")
        self.titles = self.ds.items["title"].to_numpy()
        self.item_ids = self.ds.items["item_id"].to_numpy()
        self._tem = None
        self._intents: OrderedDict[str, tuple] = OrderedDict()  # LRU: intent text -> (vector, anchoring)
        self._bank: tuple[np.ndarray, np.ndarray] | None = None  # training intentions: unit TEM, whitened
        self._bank_texts: list[str | None] = []  # their texts, where the describe stage's table has them
        self.whitening = self.bundle.whitening
        self.index = self.bundle.index  # None for models that rank by score_all
        self.load_s = time.perf_counter() - t0

    # ------------------------------------------------------------------------------------------------
    def tem(self):
        """The text-embedding model the items were embedded with (loaded on first use, then kept)."""
        if self._tem is None:
            self._tem = self.bundle.tem()
        return self._tem

    def intent_vector(self, intent: str) -> np.ndarray:
        """(d,) whitened intention vector, embedded by the same TEM as the items (the last INTENT_CACHE
        distinct intents are kept: a popular request skips the TEM, most of a request's time)."""
        return self._intent_entry(intent)[0]

    def _intent_entry(self, intent: str) -> tuple[np.ndarray, tuple | None]:
        """The LRU entry of an intent: its (d,) vector and its anchor_intent result (None when not anchored)."""
        entry = self.cached_intent(intent)
        return entry if entry is not None else self.embed_intents([intent])[0]

    def cached_intent(self, intent: str) -> tuple[np.ndarray, tuple | None] | None:
        """The cached entry of an intent (marked recently used), or None when it is not cached."""
        entry = self._intents.get(intent)
        if entry is not None:
            self._intents.move_to_end(intent)
        return entry

    def embed_intents(self, intents: list[str]) -> list[tuple[np.ndarray, tuple | None]]:
        """Entries of intents not yet cached, through the TEM in one call, then anchored and cached. A TEM
        failure raises the TEM's RecpipeError; a TEM of another width than the items' raises ArtifactError."""
        raw = self.tem().encode(list(intents), dtype=str(self.dtype).removeprefix("torch."))
        if raw.shape[1] != self.whitening.dim:
            raise ArtifactError(f"the TEM gives {raw.shape[1]}-d vectors but the items are {self.whitening.dim}-d")
        out = []
        for text, r in zip(intents, raw):
            anchored = self._anchor(r)
            vec = anchored[0] if anchored else self.whitening.transform(r[None])[0].astype(np.float32)
            vec.setflags(write=False)
            self._intents[text] = entry = (vec, anchored)
            if len(self._intents) > INTENT_CACHE:
                self._intents.popitem(last=False)
            out.append(entry)
        return out

    def bank_text(self, j: int) -> str | None:
        """The text of training intention j (an anchor), where the describe stage's table has it."""
        return self._bank_texts[j] if 0 <= j < len(self._bank_texts) else None

    def intent_bank(self) -> tuple[np.ndarray, np.ndarray]:
        """training_intentions of this model: (n, d) unit TEM and whitened vectors."""
        if self._bank is None:
            R, Wt, self._bank_texts = self.bundle.intention_bank(lambda t: self.tem().encode(t))
            self._bank = (R, Wt)
        return self._bank

    def anchored_to(self, intent: str, n: int = 3) -> list[tuple[str | None, float]]:
        """The training intentions a typed intent is anchored to (text or None, weight), heaviest first, at most
        n; [] when anchoring is off or the model trained with none."""
        anchored = self._intent_entry(" ".join(intent.split()))[1]  # what recommend() embedded: no second TEM call
        if anchored is None:
            return []
        _, top, p = anchored
        return [(self.bank_text(int(i)), float(w)) for i, w in zip(top[:n], p[:n])]

    def _anchor(self, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """anchor_intent of a typed intent's TEM vector (d,) over the training intentions, or None when
        anchoring is off or the model trained with none."""
        if self.cfg.recommend.intent_anchor is None:
            return None
        bank_raw, bank_white = self.intent_bank()
        if not len(bank_raw):
            return None
        q = raw.astype(np.float32) / max(float(np.linalg.norm(raw)), 1e-12)
        return anchor_intent(q, bank_raw, bank_white, self.cfg.recommend.intent_anchor,
                             self.cfg.recommend.anchor_temperature)

    def recommend(self, user_id: str, intent: str | None = None, k: int | None = None,
                  w: float | None = None, rho: float | None = None, steps: int | None = None
                  ) -> list[Recommendation]:
        rc = self.cfg.recommend
        k = rc.k if k is None else k  # not `k or`: -k 0 is an error, not the default
        w = rc.w if w is None else w  # None: the model's own
        rho = rc.rho if rho is None else rho
        steps = rc.steps if steps is None else steps
        if k < 1:
            raise ConfigError("k must be >= 1")
        if steps < 1:
            raise ConfigError("steps must be >= 1")
        for name, v in (("w", w), ("rho", rho)):
            if v is not None and not math.isfinite(v):
                raise ConfigError(f"{name} must be a finite number, got {v}")
        u = self.ds.user_index(user_id)
        seq = self.ds.sequence(u)  # the whole history: recommend what comes after the last item
        if intent is not None:
            intent = " ".join(intent.split())
            if not intent:
                raise DataError("empty intent: give a short request like \"cozy mystery novel\", or omit --intent")
            if not self.model.uses_intent:
                raise ConfigError(f"model {self.model_name} takes no intention; omit --intent")
        L = self.model.history_len or len(seq)
        hist = np.zeros((1, L), dtype=np.int64)
        tail = seq[-L:]
        hist[0, L - len(tail):] = tail
        batch = {"history": torch.from_numpy(hist)}
        gen = torch.Generator().manual_seed(self.cfg.run.seed)
        # one request is a handful of tiny matmuls: one thread beats two (no fork/join per op)
        with torch.no_grad(), torch_threads(1):
            if self.index is not None:
                if intent is not None:
                    # a copy: cached vectors are read-only
                    batch["intent"] = torch.tensor(self.intent_vector(intent))[None]
                    batch["intent_mask"] = torch.ones(1, dtype=torch.bool)
                oracle = self.model.generate(batch, steps=steps, w=w, rho=rho, generator=gen).numpy()
                scores, ids = self.index.search(oracle, k, exclude=[seq])
                scores, ids = with_new_item_offset(self.model, oracle, scores, ids, [seq], k)
                scores, ids = scores[0], ids[0]
            else:
                kw = {"generator": gen} if self.model.generative else {}
                s = self.model.score_all(batch, **kw)[0].clone()
                s[0] = -torch.inf
                s[torch.from_numpy(seq)] = -torch.inf
                top = torch.topk(s, min(k, self.ds.n_items))
                scores, ids = top.values.numpy(), top.indices.numpy()
        out = []
        for r, (i, sc) in enumerate(zip(ids, scores), 1):
            if i <= 0 or not np.isfinite(sc):
                continue
            out.append(Recommendation(r, int(i), str(self.item_ids[i - 1]), str(self.titles[i - 1]), float(sc)))
        if not out:
            unseen = self.ds.n_items - len(np.unique(seq))
            if unseen == 0:
                raise DataError(f"user {user_id!r} has already seen all {self.ds.n_items} items of the catalog: "
                                "there is nothing left to recommend")
            raise ArtifactError(f"train/{self.model_name} gave no finite score to any of user {user_id!r}'s "
                                f"{unseen} unseen items; re-train it (`recpipe train --model {self.model_name} "
                                "--force`)")
        return out

    def unseen_count(self, user_id: str) -> int:
        """How many items the user has not interacted with: at most this many can be recommended."""
        return self.ds.n_items - len(np.unique(self.ds.sequence(self.ds.user_index(user_id))))

    def history(self, user_id: str, n: int = 5) -> list[str]:
        seq = self.ds.sequence(self.ds.user_index(user_id))
        return [str(self.titles[i - 1]) for i in seq[-n:]]

