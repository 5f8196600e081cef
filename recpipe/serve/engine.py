"""The computation behind `recpipe serve`: one loaded run (`RecommendService`), many requests at a time.

`Engine.parse` turns a request into a `Query` (item ids resolved, limits checked: a bad request is a
RequestError with a one-line reason and an HTTP status); `Engine.run_batch` answers many queries together:
the intents not yet cached go through the TEM in one call, the queries that share guidance settings through
the denoiser in one forward, and all of them through one FAISS search. Each answer carries the numbers
`recpipe recommend` gives for the same request: every row starts from the noise its request would draw
alone (the run's seed), and the intent vectors and anchoring are the service's own (`RecommendService`).
"""

from __future__ import annotations

import math
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from recpipe.config import Config
from recpipe.errors import ArtifactError, RecpipeError
from recpipe.pipeline.embed import torch_threads
from recpipe.pipeline.recommend import RecommendService, with_new_item_offset

ANCHOR_CHARS = 200  # an anchoring intention's text in an answer: enough to read, bounded whatever the LLM wrote


class RequestError(Exception):
    """A request the service refuses: HTTP `status` and a one-line reason."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Limits:
    """Caps on one request (each keeps one request's cost bounded whatever a client sends)."""

    max_k: int = 1000  # a page of results; FAISS search cost grows with k + excluded items
    max_history: int = 2000  # a visitor's history: beyond the model's window only exclusion reads it
    max_intent_chars: int = 500  # a request, not a document: the TEM truncates long inputs anyway
    max_exclude: int = 5000  # explicit exclusions widen the FAISS search by as many candidates


@dataclass
class Query:
    """One validated request."""

    seq: np.ndarray  # dense item ids, oldest first: what the model reads (its last history_len)
    exclude: np.ndarray  # dense item ids never to return
    intent: str | None  # whitespace-normalised, as `recommend` embeds it
    k: int
    w: float | None
    rho: float | None
    user: str | None = None
    cache_hit: bool = field(default=False)


@dataclass
class Answer:
    items: list[dict[str, Any]]
    anchored: list[dict[str, Any]]
    intent: str | None


class Engine:
    """A RecommendService plus what a service needs around it: id lookups, title search, batched answers."""

    def __init__(self, cfg: Config, model_name: str | None = None, limits: Limits | None = None, log=print):
        self.cfg = cfg
        self.limits = limits or Limits()
        self.svc = RecommendService(cfg, model_name, log=log)
        self.model = self.svc.model
        self.ds = self.svc.ds
        self.model_name = self.svc.model_name
        self.item_ids = [str(x) for x in self.svc.item_ids]
        self.titles = [str(x) for x in self.svc.titles]
        self.dense = {iid: i + 1 for i, iid in enumerate(self.item_ids)}
        self._lower_titles = [t.lower() for t in self.titles]
        self.user_ids = [str(u) for u in self.ds.users["user_id"]]
        self._users = {u: n for n, u in enumerate(self.user_ids)}
        self._lock = threading.Lock()  # one batch at a time: torch and the intent cache are not shared safely
        self.loaded_at = time.time()

    # ---------------------------------------------------------------------------------------- describe
    def summary(self) -> dict[str, Any]:
        b = self.svc.bundle
        info: dict[str, Any] = {"model": self.model_name, "run_dir": str(self.cfg.run_dir), "items": self.ds.n_items,
                                "users": len(self.user_ids),
                                "index": None, "device": "cpu", "tem": None,
                                "intent_anchor": self.cfg.recommend.intent_anchor,
                                "takes_intent": bool(self.model.uses_intent and self.svc.index is not None)}
        if self.svc.index is not None:
            info["index"] = f"{self.svc.index.kind} ({b.index_source})"
            info["device"] = self.svc.index.device
        if b.text is not None:
            try:
                t = b.tem_info()
                info["tem"] = f"{t.get('tem')} {t.get('model')} ({t.get('dim')}-d)"
            except RecpipeError as e:
                info["tem"] = f"unavailable: {e}"
        return info

    def item(self, item_id: str) -> dict[str, Any]:
        i = self.dense.get(item_id)
        if i is None:
            raise RequestError(404, f"unknown item {item_id!r}")
        return self._item_row(i)

    def _item_row(self, i: int) -> dict[str, Any]:
        row = {"id": self.item_ids[i - 1], "title": self.titles[i - 1]}
        if "genres" in self.ds.items.columns:
            g = self.ds.items["genres"].iloc[i - 1]
            row["genres"] = None if g is None or (isinstance(g, float) and math.isnan(g)) else str(g)
        return row

    def search(self, q: str, limit: int) -> list[dict[str, Any]]:
        """Items whose title contains every word of q (case-insensitive), shortest titles first."""
        words = q.lower().split()
        if not words:
            return []
        hits = [i for i, t in enumerate(self._lower_titles) if all(w in t for w in words)]
        hits.sort(key=lambda i: (len(self._lower_titles[i]), i))
        return [self._item_row(i + 1) for i in hits[:limit]]

    def users(self, limit: int) -> list[str]:
        return self.user_ids[:limit]

    # ------------------------------------------------------------------------------------------- parse
    def parse(self, user: str | None, history: list[str] | None, intent: str | None, k: int | None,
              w: float | None, rho: float | None, exclude: list[str] | None, exclude_seen: bool) -> Query:
        lim = self.limits
        if (user is None) == (history is None):
            raise RequestError(422, "give either `user` (a known user id) or `history` (a list of item ids)")
        k = self.cfg.recommend.k if k is None else k
        if not 1 <= k <= lim.max_k:
            raise RequestError(422, f"k must be between 1 and {lim.max_k}, got {k}")
        for name, v in (("w", w), ("rho", rho)):
            if v is not None and not math.isfinite(v):
                raise RequestError(422, f"{name} must be a finite number")
        if user is not None:
            u = self._users.get(user)
            if u is None:
                raise RequestError(404, f"unknown user {user[:80]!r}")
            seq = self.ds.sequence(u)
        else:
            if not history:
                raise RequestError(422, "history is empty: give at least one item id")
            if len(history) > lim.max_history:
                raise RequestError(422, f"history has {len(history)} items; at most {lim.max_history}")
            seq = np.array([self._dense(i) for i in history], dtype=np.int64)
        if intent is not None:
            if len(intent) > lim.max_intent_chars:
                raise RequestError(422, f"intent is {len(intent)} characters long; at most {lim.max_intent_chars}")
            intent = " ".join(intent.split())
            if not intent:
                raise RequestError(422, "intent is empty: give a short request like \"a funny comedy\", or omit it")
            if not (self.model.uses_intent and self.svc.index is not None):
                raise RequestError(422, f"model {self.model_name} takes no intention; omit `intent`")
        extra = exclude or []
        if len(extra) > lim.max_exclude:
            raise RequestError(422, f"exclude has {len(extra)} items; at most {lim.max_exclude}")
        ex = [self._dense(i) for i in extra]
        excl = np.unique(np.concatenate([seq if exclude_seen else np.zeros(0, np.int64),
                                         np.array(ex, dtype=np.int64)])).astype(np.int64)
        return Query(seq=seq, exclude=excl, intent=intent, k=k, w=w, rho=rho, user=user)

    def _dense(self, item_id: Any) -> int:
        i = self.dense.get(str(item_id))
        if i is None:
            raise RequestError(404, f"unknown item {str(item_id)[:80]!r}")
        return i

    # ------------------------------------------------------------------------------------------- batch
    def run_batch(self, queries: list[Query], threads: int = 1) -> list[Answer | RequestError]:
        """Answers for many queries at once (same order); one query's failure does not fail the others."""
        with self._lock, torch.no_grad(), torch_threads(threads):
            out: list[Answer | RequestError | None] = [None] * len(queries)
            intents = self._intents(queries, out)
            groups: dict[tuple, list[int]] = defaultdict(list)
            for i, q in enumerate(queries):
                if out[i] is None:
                    groups[(q.w, q.rho)].append(i)
            for rows in groups.values():
                try:
                    self._answer_group([queries[i] for i in rows], [intents.get(queries[i].intent) for i in rows],
                                       rows, out)
                except RecpipeError as e:
                    for i in rows:
                        out[i] = RequestError(500 if not isinstance(e, RequestError) else e.status,
                                              str(e).splitlines()[0])
            return out  # type: ignore[return-value]

    def _intents(self, queries: list[Query], out: list) -> dict[str, tuple]:
        """Cache entries (vector, anchoring) of the batch's intents; the uncached ones through the TEM in one
        call (`RecommendService.embed_intents`)."""
        svc = self.svc
        entries: dict[str, tuple] = {}
        missing: list[str] = []
        for q in queries:
            if q.intent is None or q.intent in entries:
                continue
            e = svc.cached_intent(q.intent)
            if e is not None:
                entries[q.intent] = e
            elif q.intent not in missing:
                missing.append(q.intent)
        for q in queries:
            q.cache_hit = q.intent is not None and q.intent in entries
        if not missing:
            return entries
        try:
            entries.update(zip(missing, svc.embed_intents(missing)))
        except ArtifactError as e:  # the run's TEM does not fit its items: every request fails alike
            raise RequestError(500, str(e).splitlines()[0]) from None
        except RecpipeError as e:
            err = RequestError(503, f"the TEM failed: {str(e).splitlines()[0]}")
            for i, q in enumerate(queries):
                if q.intent in missing:
                    out[i] = err
        return entries

    def _answer_group(self, qs: list[Query], ents: list[tuple | None], rows: list[int], out: list) -> None:
        """Queries sharing (w, rho): one denoiser forward, one search (or one score_all)."""
        svc, model = self.svc, self.model
        rc = self.cfg.recommend
        w = rc.w if qs[0].w is None else qs[0].w
        rho = rc.rho if qs[0].rho is None else qs[0].rho
        L = model.history_len or max(len(q.seq) for q in qs)
        hist = np.zeros((len(qs), L), dtype=np.int64)
        for b, q in enumerate(qs):
            tail = q.seq[-L:]
            hist[b, L - len(tail):] = tail
        batch: dict[str, torch.Tensor] = {"history": torch.from_numpy(hist)}
        k_max = max(q.k for q in qs)
        if svc.index is not None:
            if any(e is not None for e in ents):
                d = svc.whitening.dim
                iv = np.zeros((len(qs), d), dtype=np.float32)
                for b, e in enumerate(ents):
                    if e is not None:
                        iv[b] = e[0]
                batch["intent"] = torch.from_numpy(iv)
                batch["intent_mask"] = torch.tensor([e is not None for e in ents], dtype=torch.bool)
            oracle = self._generate(batch, w, rho).numpy()
            scores, ids = svc.index.search(oracle, k_max, exclude=[q.exclude for q in qs])
            # the new-item offset, beside the index (rows as they are for a model without one)
            scores, ids = with_new_item_offset(model, oracle, scores, ids, [q.exclude for q in qs], k_max)
        else:
            scores, ids = self._score_all(batch, qs, k_max)
        for b, (q, e, i) in enumerate(zip(qs, ents, rows)):
            out[i] = self._answer(q, e, scores[b][:q.k], ids[b][:q.k])

    def _generate(self, batch: dict[str, torch.Tensor], w, rho) -> torch.Tensor:
        """The oracle vectors of a batch; every row from the noise one request alone draws (the run's seed):
        with a deterministic sampler (eta = 0, or one step) that noise is all the randomness there is."""
        model, steps = self.model, self.cfg.recommend.steps
        B = batch["history"].shape[0]
        gen = torch.Generator().manual_seed(self.cfg.run.seed)
        eta = getattr(model.config, "eta", 0.0)
        if steps == 1 or eta == 0:
            x1 = torch.randn((1, model.dim), generator=gen)
            return model.generate(batch, steps=steps, w=w, rho=rho, generator=gen, x_T=x1.expand(B, -1).contiguous())
        rows = []  # a stochastic multi-step sampler draws fresh noise per step: one request at a time
        for b in range(B):
            one = {k: v[b:b + 1] for k, v in batch.items()}
            rows.append(model.generate(one, steps=steps, w=w, rho=rho,
                                       generator=torch.Generator().manual_seed(self.cfg.run.seed)))
        return torch.cat(rows)

    def _score_all(self, batch, qs: list[Query], k_max: int) -> tuple[np.ndarray, np.ndarray]:
        """Models without an index (sasrec, ...): full scores with excluded items masked, top k."""
        model = self.model
        if model.generative:  # sampled noise: one request at a time, each from the run's seed
            s = torch.cat([model.score_all({k: v[b:b + 1] for k, v in batch.items()},
                                           generator=torch.Generator().manual_seed(self.cfg.run.seed))
                           for b in range(len(qs))])
        else:
            s = model.score_all(batch)
        s = s.clone()
        s[:, 0] = -torch.inf
        for b, q in enumerate(qs):
            s[b, torch.from_numpy(q.exclude)] = -torch.inf
        top = torch.topk(s, min(k_max, self.ds.n_items), dim=1)
        return top.values.numpy(), top.indices.numpy()

    def _answer(self, q: Query, entry: tuple | None, scores: np.ndarray, ids: np.ndarray) -> Answer | RequestError:
        items = []
        for r, (i, sc) in enumerate(zip(ids, scores), 1):
            if i <= 0 or not np.isfinite(sc):
                continue
            items.append({"rank": r, "id": self.item_ids[i - 1], "title": self.titles[i - 1], "score": float(sc)})
        if not items and len(q.exclude) >= self.ds.n_items:
            return RequestError(422, f"every one of the {self.ds.n_items} items is excluded (seen or in `exclude`): "
                                     "there is nothing left to recommend")
        anchored = []
        if entry is not None and entry[1] is not None:
            _, top, p = entry[1]
            anchored = [{"intention": (self.svc.bank_text(int(j)) or "")[:ANCHOR_CHARS] or None, "weight": float(wt)}
                        for j, wt in zip(top[:3], p[:3])]
        return Answer(items=items, anchored=anchored, intent=q.intent)
