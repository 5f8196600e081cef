"""Answering many prompts with one backend: each prompt is looked up in the cache first; the rest are asked
at most `concurrency` at a time (the local backend: one per batch slot), every attempt retried by `retrying`,
every answer passed through its prompt's own check and cached the moment it is accepted, so a run killed at
any moment loses no finished answer and repeats none.

An endpoint that keeps failing stops the whole run with a one-line BackendError (what is cached stays cached);
a prompt whose answers stay unusable after every attempt comes back as {"failed": reason}, for the caller's
fallback.
"""

from __future__ import annotations

import concurrent.futures as cf
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from recpipe.errors import BackendError
from recpipe.llm import cost
from recpipe.llm.cache import cached_answer, refused_note
from recpipe.llm.client import Backend, Transient, Unusable, retrying

if TYPE_CHECKING:
    from recpipe.config import DescribeConfig


@dataclass
class Prompt:
    """One distinct prompt. `check(text, finish_reason) -> (text, trimmed)` cleans an answer or raises
    Unusable; `stale(text)` is true for a cached answer the checks now reject (it is asked again)."""

    key: str  # the cache key
    messages: list[dict[str, str]]
    check: Callable[[str | None, str | None], tuple[str, bool]]
    stale: Callable[[str], bool] | None = None


class Stats:
    """Thread-safe counters, added to the attributes of the same name of `report` (calls, cache_hits, retries,
    retry_reasons, prompt_tokens, completion_tokens, trimmed, rejected_cached, llm_s)."""

    def __init__(self, report: Any):
        self.r = report
        self.lock = threading.Lock()
        self.sent: set[str] = set()  # keys of the prompts sent to the LLM (not answered from the cache)

    def add(self, **kw: int) -> None:
        with self.lock:
            for k, v in kw.items():
                setattr(self.r, k, getattr(self.r, k) + v)

    def retry(self, kind: str) -> None:
        with self.lock:
            self.r.retries += 1
            self.r.retry_reasons[kind] = self.r.retry_reasons.get(kind, 0) + 1


def _seed(key: str) -> int:
    return int(key[-8:], 16) & 0x7FFFFFFF


class Progress:
    """recpipe's one progress bar (recpipe.progress) over the prompts: a bar on a terminal, a plain line every
    PLAIN_EVERY_S seconds off one; retries and cache hits in its info column."""

    def __init__(self, total: int, desc: str, log: Callable[[str], None]):
        from recpipe.progress import progress_bar

        self.bar = None
        if total:
            self.bar = progress_bar(f"{desc}", "prompts {task.fields[info]}")
            self.task = self.bar.add_task(desc, total=total, info="")
            self.bar.start()

    def update(self, n: int = 1, **postfix: Any) -> None:
        if self.bar is not None:
            info = ", ".join(f"{k} {v}" for k, v in postfix.items())
            self.bar.update(self.task, advance=n, info=f"({info})" if info else "")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def answer_all(prompts: list[Prompt], backend: Backend, cache, dcfg: DescribeConfig, stats: Stats,
               log: Callable[[str], None], what: str = "describe") -> dict[str, dict[str, Any]]:
    """Answer every prompt (cache first), at most `concurrency` at a time. Returns key -> cached value, or
    key -> {"failed": reason} for prompts whose output stayed unusable."""
    results: dict[str, dict[str, Any]] = {}
    todo: list[Prompt] = []
    for p in prompts:
        hit = cached_answer(cache, p.key, backend.model)
        if hit is not None and p.stale is not None and p.stale(hit["text"]):
            stats.add(rejected_cached=1)  # cached before the checks that now reject it: asked again
            hit = None
        if hit is not None:
            results[p.key] = hit
        else:
            todo.append(p)
    stats.add(cache_hits=len(prompts) - len(todo))
    note = refused_note(cache, what)
    if note:
        log(note)
    if not todo:
        return results
    if backend.name == "openai":  # a remote endpoint bills by the token: say what this costs, stop if large
        est = cost.estimate([p.messages for p in todo], backend.model, dcfg)
        cost.check(est, dcfg, what, backend.model)  # a stop says the estimate itself
        log(est.line(what, backend.model))
    stats.sent.update(p.key for p in todo)
    t0 = time.perf_counter()
    try:
        return _ask(todo, results, backend, cache, dcfg, stats, log, what)
    finally:
        stats.r.llm_s = round(time.perf_counter() - t0, 3)


def _ask(todo: list[Prompt], results: dict[str, dict[str, Any]], backend: Backend, cache, dcfg: DescribeConfig,
         stats: Stats, log: Callable[[str], None], what: str) -> dict[str, dict[str, Any]]:
    """Ask the LLM every prompt in `todo`, at most `concurrency` at a time; adds to `results`."""
    abort = threading.Event()
    progress = Progress(len(todo), f"{what} ({backend.name})", log)
    # endpoints: describe.concurrency requests in flight; the local model: one per batch slot
    limit = backend.max_concurrency if backend.name == "local" else min(dcfg.concurrency, backend.max_concurrency)
    workers = max(1, min(limit, len(todo)))

    def work(p: Prompt) -> dict[str, Any]:
        if abort.is_set():
            raise cf.CancelledError()
        trimmed = False
        c = None
        try:
            for attempt in retrying(dcfg.max_retries, dcfg.backoff_s, abort, on_retry=lambda e: stats.retry(e.kind)):
                with attempt:
                    if abort.is_set():
                        raise cf.CancelledError()
                    stats.add(calls=1)  # every request sent counts, whether or not it comes back
                    # a new seed per attempt: a retried local generation must not repeat the rejected answer
                    seed = _seed(p.key) + attempt.retry_state.attempt_number - 1
                    c = backend.complete(p.messages, dcfg.max_tokens, dcfg.temperature, seed=seed)
                    stats.add(prompt_tokens=c.prompt_tokens, completion_tokens=c.completion_tokens)
                    text, trimmed = p.check(c.text, c.finish_reason)
        except Unusable as e:
            return {"failed": str(e)}
        value = {"text": text, "model": backend.model, "finish_reason": c.finish_reason,
                 "prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens}
        cache.set(p.key, value)  # persisted before anything else happens: a kill after this loses nothing
        if trimmed:
            stats.add(trimmed=1)
        return value

    fatal: BaseException | None = None
    pool = cf.ThreadPoolExecutor(max_workers=workers, thread_name_prefix=what)
    # a bounded window of submitted prompts, refilled as answers arrive: a million-item catalog never holds a
    # million futures (about 1.2 KB each) while the pool works through a few hundred
    pending: dict[cf.Future, Prompt] = {}
    queue = iter(todo)
    window = 4 * workers

    def fill() -> None:
        while fatal is None and len(pending) < window:
            p = next(queue, None)
            if p is None:
                return
            pending[pool.submit(work, p)] = p

    def stop(e: BaseException) -> None:
        nonlocal fatal
        if fatal is None:
            fatal = e
            abort.set()
            for f in pending:
                f.cancel()

    try:
        fill()
        while pending:
            done, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
            for fut in done:
                p = pending.pop(fut)
                try:
                    results[p.key] = fut.result()
                except cf.CancelledError:
                    continue
                except Transient as e:  # the endpoint kept failing: stop everything, keep what is cached
                    stop(BackendError(
                        f"{backend.endpoint or backend.name}: {e} (after {dcfg.max_retries} attempts); "
                        f"every finished result is cached, a re-run resumes from them"))
                except BackendError as e:
                    stop(e)
                progress.update(1, hits=stats.r.cache_hits, retries=stats.r.retries)
            fill()
    except BaseException:
        abort.set()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        progress.close()
    if fatal is not None:
        raise fatal
    return results
