"""Describe stage: item metadata -> an LLM description (and a user intention) per item.

Which LLM (`describe.llm`, see recpipe.llm): `openai` (any OpenAI-compatible endpoint, key from $OPENAI_API_KEY
only), `local` (a GGUF run in process by llama-cpp-python: the bundled SmolLM2-135M-Instruct or
`describe.model`; `describe.local_batch` prompts decoded together), `metadata` (no LLM: the text is composed from
the metadata fields, fast and deterministic) or `auto` (openai when OPENAI_API_KEY is set, else local when
llama-cpp-python and a GGUF are installed, else metadata; the choice is logged).

Which prompts: the versioned templates in recpipe/prompts (`TEMPLATES`), filled with the item's metadata as
'Field: value' lines; items with the same metadata share one call. Every answer is cached the moment it
arrives (recpipe.llm.cache: keyed by backend, model, prompt template hash, item text, max_tokens and
temperature; stored as JSON, never pickled; a run holds `<cache>/describe.lock` while it answers prompts, so a
second run on the same cache waits and then reuses the answers): a re-run makes zero calls, and a run killed at
any moment (SIGKILL included) resumes without losing or repeating a finished call.

Which answers are used (`check_output`): retried (`describe.max_retries` attempts in all, exponential backoff
with jitter) are rate limits, timeouts, connection errors, 5xx, garbled responses and unusable output (empty,
cut off before a complete sentence, looping repetition, echoing the instructions, an intention that names its
item or reads like a description rather than a request: `intent_problem`, also applied to cached intentions).
After the last attempt:
- a transport failure (the endpoint is unreachable, times out or keeps failing) stops the run with a one-line
  BackendError naming the endpoint; every finished result is already cached, so a re-run resumes;
- unusable output for one item gives that item its metadata text (`backend` = "metadata" in its row), listed
  under `fallback_items` and counted by reason under `fallback_reasons` in the report (or a BackendError when
  `describe.fallback` is false).

Bad input: text is repaired (mojibake such as "Ã©" -> "é", invalid UTF-8 / lone surrogates dropped, control
characters removed); metadata longer than `describe.max_input_chars` is cut at a word boundary (and, for the
local model, further until prompt + answer fit its window); an item with an empty title is described from its
other fields, and an item with no metadata at all is described as "Item <item_id>" (documented placeholder).
`describe.limit` N describes the first N items with the LLM and gives the rest their metadata text.

Outputs (`<run_dir>/describe/`): `descriptions.parquet` and, if `describe.intents`, `intents.parquet`, each
with one row per item 1..n: item, item_id, text, backend, model, prompt_hash. The manifest's info holds the
closing report (calls, cache hits, retries, failures, tokens, ...).
"""

from __future__ import annotations

import dataclasses
import functools
import re
import time
import unicodedata
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from recpipe.artifacts import StageResult, atomic_path, fingerprint_obj, require_stage, run_stage
from recpipe.config import Config, DescribeConfig, to_dict
from recpipe.errors import ArtifactError, BackendError
from recpipe.llm import (
    METADATA_VERSION,
    Backend,
    Template,
    Unusable,
    cache_dir,
    cache_key,
    cache_lock,
    clean_text,
    cut_text,
    get_backend,
    gguf_dir,
    load_template,
    open_cache,
    shingles,
)
from recpipe.llm.runner import Prompt, Stats, answer_all

STAGE = "describe"
TEMPLATES = {"description": "description_v1", "intent": "intent_v1"}
MIN_SENTENCE_CHARS = 20  # a cut-off answer is kept up to its last full sentence if that is at least this long
COLUMNS = ["item", "item_id", "text", "backend", "model", "prompt_hash"]


# ======================================================================================== item metadata
def _field_label(col: str) -> str:
    return str(col).replace("_", " ").strip().capitalize()


def _field_value(col: str, value: str) -> str:
    # list-valued fields are stored '|'-separated (MovieLens genres): show them as a list
    return ", ".join(p.strip() for p in value.split("|") if p.strip()) if "|" in value else value


def item_fields(row: pd.Series | dict, max_chars: int = 2000) -> list[tuple[str, str]]:
    """(label, value) pairs of an item's metadata: title first, then every other non-empty text column.
    Each value is cleaned; the whole is cut to about `max_chars` characters."""
    row = dict(row)
    item_id = clean_text(row.get("item_id", "")) or "?"
    title = clean_text(row.get("title", ""))
    fields = [("Title", title)] if title else []
    for col, v in row.items():
        if col in ("item", "item_id", "title"):
            continue
        v = clean_text(v)
        if v:
            fields.append((_field_label(col), _field_value(str(col), v)))
    if not fields:  # the documented placeholder: an item with no metadata at all
        fields = [("Title", f"Item {item_id}")]
    out, used = [], 0
    for label, v in fields:
        room = max_chars - used - len(label) - 3
        if room < 20:
            break
        v = cut_text(v, room)
        out.append((label, v))
        used += len(label) + 3 + len(v)
    return out


def metadata_text(row: pd.Series | dict, max_chars: int = 2000) -> str:
    """The item's metadata as 'Field: value' lines: what the prompts receive (and the cache keys hash)."""
    return "\n".join(f"{k}: {v}" for k, v in item_fields(row, max_chars))


def metadata_description(row: pd.Series | dict, max_chars: int = 2000) -> str:
    """The `metadata` backend's description: the fields as one sentence-like line."""
    fields = item_fields(row, max_chars)
    parts = [v if k == "Title" else f"{k}: {v}" for k, v in fields]
    return ". ".join(p.rstrip(".") for p in parts) + "."


_INTENT_FIELDS = re.compile(r"genre|categor|tag|keyword|type|brand|style|topic|subject", re.I)


def metadata_intent(row: pd.Series | dict, max_chars: int = 2000) -> str:
    """The `metadata` backend's user intention: a request built from the category-like fields (never the
    title, so the intention does not name the item)."""
    fields = [(k, v) for k, v in item_fields(row, max_chars) if k != "Title"]
    cats = [(k, v) for k, v in fields if _INTENT_FIELDS.search(k)]
    if cats:
        return "I am looking for something in " + "; ".join(f"{k.lower()} {v}" for k, v in cats) + "."
    return "I am looking for something I have not seen yet, similar to what I liked before."


def metadata_texts(items: pd.DataFrame, max_chars: int = 2000) -> list[str]:
    """The metadata backend's description of every item, in row order (also `embed --source metadata`)."""
    return [metadata_description(r, max_chars) for r in items.to_dict("records")]


# ========================================================================================= output checks
_LABEL = re.compile(r"^(?:description|request|answer|intention|user request|output)\s*:\s*", re.I)
_SENTENCE_END = re.compile(r"[.!?…][\"'”’)\]]*(?=\s|$)")


def is_looping(text: str) -> bool:
    """Looping repetition: a chunk repeated 4+ times in a row, or mostly repeated word trigrams."""
    if re.search(r"(.{4,}?)\1{3,}", text):
        return True
    words = re.findall(r"\w+", text.lower())
    if len(words) >= 15:
        grams = [tuple(words[i: i + 3]) for i in range(len(words) - 2)]
        if len(set(grams)) / len(grams) < 0.5:
            return True
    return False


def title_core(title: Any) -> str:
    """The distinctive part of a title ("The Matrix (1999)" -> "matrix", "Ref, The (1994)" -> "ref")."""
    return " ".join(title_forms(title)[1])


# articles a catalog moves to the end of a title ("Ref, The", "Cité des enfants perdus, La")
_ARTICLES = frozenset("the a an la le les l il el lo los las das der die den het de".split())
# how a request opens when it has no first-person word ("Looking for ...", "Show me ..." has one)
_REQUEST_OPENERS = frozenset("looking show find recommend suggest give need want something anything any please "
                             "can could would what is are".split())
_FIRST_PERSON = frozenset("i me my mine myself we us our im id ive ill".split())
INTENT_NAMES_ITEM = "the intention names its item"
INTENT_NOT_A_REQUEST = "the intention reads like a description, not a request"


def _words(text: str) -> list[str]:
    """Lower-case words without accents or punctuation ("Cité's" -> ["cites"]): how titles are compared."""
    t = unicodedata.normalize("NFKD", clean_text(text).lower())
    t = "".join(c for c in t if not unicodedata.combining(c)).replace("'", "").replace("’", "")
    return re.findall(r"\w+", t)


def title_forms(title: Any) -> tuple[list[list[str]], list[str]]:
    """(full, core) word forms of a title: `full` the title as written and with a moved article put back in
    front ("Ref, The (1994)" -> [ref the], [the ref]); `core` the title without its article, its year or any
    other parenthesis ([ref])."""
    t = re.sub(r"\s*\([^)]*\)", " ", clean_text(title)).strip()
    words = _words(t)
    if not words:
        return [], []
    m = re.fullmatch(r"(.*?),\s*([^\s,]+)", t)
    moved = _words(m.group(2)) if m else []
    if len(moved) == 1 and moved[0] in _ARTICLES:  # "Ref, The"
        core = _words(m.group(1))
        return [words, moved + core], core
    core = words[1:] if len(words) > 1 and words[0] in _ARTICLES else words
    return [words], core


def _contains(words: list[str], part: list[str]) -> bool:
    n = len(part)
    return n > 0 and any(words[i: i + n] == part for i in range(len(words) - n + 1))


def names_item(text: str, title: Any) -> bool:
    """Whether `text` names the item titled `title`: it holds the title as written or with its moved article
    back in front ("Ref, The" / "The Ref"), or the title's core when that is distinctive (2+ words or 4+
    letters: "matrix", not "ref"), or it starts with the core ("Ref: a comedy-drama."), or it cites the
    title's year in parentheses as titles do ("The (1995) is a murder mystery")."""
    years = re.findall(r"\((\d{4})\)", clean_text(title))
    if any(f"({y})" in text for y in years):
        return True
    words = _words(text)
    full, core = title_forms(title)
    if any(_contains(words, f) for f in full) or (core and words[: len(core)] == core):
        return True
    return (len(core) >= 2 or len("".join(core)) >= 4) and _contains(words, core)


def intent_problem(text: str, title: Any = "") -> str | None:
    """Why an LLM-written intention cannot be used, or None. An intention is the request a user types before
    finding the item: it must not name the item (`names_item`) and its opening sentence must read as a request
    (a first-person word, or a request's opening word such as "Looking" or "Something"), not as a
    description ("The user wants ...", "A tense thriller about ...")."""
    if names_item(text, title):
        return INTENT_NAMES_ITEM
    first = _words(_SENTENCE_END.split(text, maxsplit=1)[0])  # the opening sentence decides
    if not (_FIRST_PERSON & set(first) or (first and first[0] in _REQUEST_OPENERS)):
        return INTENT_NOT_A_REQUEST
    return None


def check_output(text: str | None, finish_reason: str | None, forbid: str = "",
                 echo: frozenset[str] = frozenset(), intent: bool = False) -> tuple[str, bool]:
    """Clean an LLM answer; raise Unusable if nothing usable is left. Returns (text, trimmed): an answer cut
    off by the token limit is kept up to its last complete sentence (trimmed=True). `forbid`: the item's title,
    which an intention must not name; `intent`: the answer is an intention, so it must also read as a request
    (`intent_problem`); `echo`: the instructions' shingles."""
    s = clean_text(text or "")
    s = _LABEL.sub("", s).strip()
    if len(s) >= 2 and s[0] == s[-1] and s[0] in "\"'“”":
        s = s[1:-1].strip()
    if not s:
        raise Unusable("empty answer")
    if is_looping(s):
        raise Unusable("looping repetition")
    trimmed = False
    if finish_reason == "length":
        ends = list(_SENTENCE_END.finditer(s))
        if not ends or ends[-1].end() < MIN_SENTENCE_CHARS:
            raise Unusable("answer cut off by the token limit before a complete sentence")
        if ends[-1].end() < len(s):
            s, trimmed = s[: ends[-1].end()], True
    if sum(c.isalpha() for c in s) < 3:
        raise Unusable("answer has no words")
    if echo and shingles(s) & echo:
        raise Unusable("answer repeats the prompt's instructions")
    if intent:
        problem = intent_problem(s, forbid)
        if problem:
            raise Unusable(problem)
    elif forbid and names_item(s, forbid):
        raise Unusable(INTENT_NAMES_ITEM)
    return s, trimmed


# ================================================================================================ report
@dataclass
class Report:
    """The closing report: what the run cost and what (if anything) went wrong."""

    backend: str = ""
    model: str = ""
    endpoint: str = ""
    items: int = 0
    llm_items: int = 0  # items described by the LLM (the rest: limit or no-LLM backend)
    unique_prompts: int = 0
    calls: int = 0  # requests sent to the LLM (attempts, retries included)
    cache_hits: int = 0
    retries: int = 0
    failures: int = 0  # prompts that ended unusable after every attempt (fallback to metadata)
    fallback_items: dict[str, list[int]] = field(default_factory=dict)  # task -> dense item ids (first 50)
    fallback_reasons: dict[str, dict[str, int]] = field(default_factory=dict)  # task -> why -> items
    rejected_cached: int = 0  # cached intentions the current checks reject (they name the item, ...): asked again
    trimmed: int = 0  # answers cut off by the token limit and kept up to their last sentence
    retry_reasons: dict[str, int] = field(default_factory=dict)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    elapsed_s: float = 0.0  # the whole stage
    items_per_s: float = 0.0  # every item over elapsed_s, metadata texts and cache hits included
    # the LLM's own pace: what the calls cost, apart from the items that needed none (metadata, cache hits)
    llm_s: float = 0.0  # time spent answering the prompts that were not cached
    called_items: int = 0  # items with at least one prompt sent to the LLM in this run
    llm_calls_per_s: float = 0.0  # calls / llm_s
    llm_items_per_s: float = 0.0  # called_items / llm_s

    def line(self) -> str:
        fails = f", {self.failures} failed -> metadata fallback" if self.failures else ""
        if self.rejected_cached:
            fails += f", {self.rejected_cached} cached intention(s) rejected by the current checks"
        why = f" ({', '.join(f'{k} {v}' for k, v in sorted(self.retry_reasons.items()))})" if self.retries else ""
        meta = self.items - self.llm_items
        llm = (f"; LLM: {self.called_items} items in {self.llm_s:.1f} s = {self.llm_items_per_s:.2f} items/s, "
               f"{self.llm_calls_per_s:.2f} calls/s" if self.called_items else "")
        return (f"describe: {self.items} items with {self.backend}"
                + (f" ({self.model})" if self.backend != "metadata" else "")
                + f": {self.calls} calls, {self.cache_hits} cache hits, {self.retries} retries{why}{fails}, "
                f"{self.prompt_tokens + self.completion_tokens} tokens "
                f"({self.completion_tokens} generated); {self.elapsed_s:.1f} s in all = {self.items_per_s:.2f} items/s"
                + (f" ({meta} from metadata)" if meta and self.backend != "metadata" else "") + llm)


# ================================================================================================ items
def describe_items(items: pd.DataFrame, cfg: Config, backend: Backend | None = None,
                   log: Callable[[str], None] = print) -> tuple[pd.DataFrame, pd.DataFrame | None, Report]:
    """Describe every item (and write its intention if cfg.describe.intents). Returns
    (descriptions, intents or None, report); each frame has COLUMNS and one row per item, in order."""
    dcfg = cfg.describe
    own_backend = backend is None
    backend = backend or get_backend(dcfg, log, gguf_dir(cfg))
    t0 = time.perf_counter()
    tasks = {task: load_template(name) for task, name in TEMPLATES.items() if task == "description" or dcfg.intents}
    records = items.to_dict("records")
    n = len(records)
    n_llm = 0 if backend.name == "metadata" else (min(n, dcfg.limit) if dcfg.limit else n)
    report = Report(backend=backend.name, model=backend.model, endpoint=backend.endpoint, items=n, llm_items=n_llm)
    stats = Stats(report)
    if n_llm < n and backend.name != "metadata":
        log(f"describe: describe.limit={dcfg.limit}: items {n_llm + 1}..{n} get their metadata text")
    try:
        prompts, item_keys = _prompts(records[:n_llm], n, tasks, backend, dcfg)
        report.unique_prompts = len(prompts)
        results = _answer(prompts, cfg, backend, stats, log) if n_llm else {}
        frames = {task: _table(task, tmpl, records, item_keys[task], results, backend, dcfg, report, log)
                  for task, tmpl in tasks.items()}
    finally:
        if own_backend:
            backend.close()
    report.elapsed_s = round(time.perf_counter() - t0, 3)
    report.items_per_s = round(n / report.elapsed_s, 2) if report.elapsed_s > 0 else 0.0
    report.called_items = sum(any(item_keys[t][i] in stats.sent for t in tasks) for i in range(n))
    if report.llm_s > 0:
        report.llm_calls_per_s = round(report.calls / report.llm_s, 3)
        report.llm_items_per_s = round(report.called_items / report.llm_s, 3)
    return frames["description"], frames.get("intent"), report


def _prompts(records: list[dict], n: int, tasks: dict[str, Template], backend: Backend,
             dcfg: DescribeConfig) -> tuple[list[Prompt], dict[str, list[str | None]]]:
    """One Prompt per distinct prompt of `records` (items with the same metadata share a call), and each task's
    cache key per item of the n (None: the item gets its metadata text)."""
    prompts: dict[str, Prompt] = {}
    item_keys: dict[str, list[str | None]] = {t: [None] * n for t in tasks}
    echoes = {task: tmpl.echo for task, tmpl in tasks.items()}
    for i, row in enumerate(records):
        meta = metadata_text(row, dcfg.max_input_chars)
        for task, tmpl in tasks.items():
            fitted = backend.fit(tmpl, meta, dcfg.max_tokens)
            key = cache_key(backend.name, backend.model, tmpl.hash, fitted, dcfg.max_tokens, dcfg.temperature)
            item_keys[task][i] = key
            if key not in prompts:
                forbid = clean_text(row.get("title", "")) if task == "intent" else ""
                prompts[key] = _prompt(key, task == "intent", tmpl.messages(fitted), forbid, echoes[task])
    return list(prompts.values()), item_keys


def _prompt(key: str, intent: bool, messages: list[dict[str, str]], forbid: str, echo: frozenset[str]) -> Prompt:
    """A prompt whose answers pass `check_output`; for an intention, a cached answer the checks now reject
    (`intent_problem`) is asked again. `forbid`: the item's title, which an intention must not name."""
    check = functools.partial(check_output, forbid=forbid, echo=echo, intent=intent)
    stale = (lambda text: intent_problem(text, forbid) is not None) if intent else None
    return Prompt(key, messages, check, stale)


def _answer(prompts: list[Prompt], cfg: Config, backend: Backend, stats: Stats,
            log: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """Every prompt answered from the describe cache or by the LLM, holding the cache's lock meanwhile."""
    path = cache_dir(cfg, "describe")
    cache = open_cache(path)
    try:
        with cache_lock(path, log):
            return answer_all(prompts, backend, cache, cfg.describe, stats, log)
    finally:
        cache.close()


def _table(task: str, tmpl: Template, records: list[dict], keys: list[str | None], results: dict[str, dict],
           backend: Backend, dcfg: DescribeConfig, report: Report, log: Callable[[str], None]) -> pd.DataFrame:
    """One task's table (COLUMNS, a row per item): the LLM's answer, else the item's metadata text."""
    compose = metadata_description if task == "description" else metadata_intent
    meta_hash = fingerprint_obj(METADATA_VERSION)
    rows = []
    failed: list[int] = []
    for row, key in zip(records, keys):
        res = results.get(key) if key is not None else None
        if res is not None and "text" in res:
            rows.append((res["text"], backend.name, backend.model, tmpl.hash))
            continue
        if res is not None:  # failed: unusable output after every attempt
            failed.append(int(row["item"]))
        rows.append((compose(row, dcfg.max_input_chars), "metadata", METADATA_VERSION, meta_hash))
    if failed:
        _fall_back(task, failed, keys, results, dcfg, report, log)
    df = pd.DataFrame(rows, columns=["text", "backend", "model", "prompt_hash"])
    df.insert(0, "item_id", [str(r["item_id"]) for r in records])
    df.insert(0, "item", np.asarray([r["item"] for r in records], dtype=np.int64))
    return df


def _fall_back(task: str, failed: list[int], keys: list[str | None], results: dict[str, dict],
               dcfg: DescribeConfig, report: Report, log: Callable[[str], None]) -> None:
    """Report the items whose answers stayed unusable (they keep their metadata text), or stop the stage when
    describe.fallback is false."""
    report.failures += len(failed)
    report.fallback_items[task] = failed[:50]
    reasons = Counter(results[k]["failed"] for k in keys if k and "failed" in results.get(k, {}))
    report.fallback_reasons[task] = dict(reasons.most_common())
    why = ", ".join(f"{r}: {c}" for r, c in reasons.most_common())
    msg = (f"describe: {len(failed)} {task}(s) stayed unusable after {dcfg.max_retries} attempts "
           f"({why}); items {failed[:10]}{' ...' if len(failed) > 10 else ''}")
    if not dcfg.fallback:
        raise BackendError(msg + "; describe.fallback=false, so the stage stops (finished ones are cached)")
    log(msg + " use their metadata text (backend 'metadata'); `--force` retries only them")


# ================================================================================================= stage
def stage_config(cfg: Config, backend: Backend) -> dict[str, Any]:
    """What makes this stage's output what it is (concurrency, timeouts and retries do not)."""
    d = cfg.describe
    prompts = {t: load_template(name).hash for t, name in TEMPLATES.items() if t == "description" or d.intents}
    return {
        "describe": {"llm": backend.name, "model": backend.model, "max_tokens": d.max_tokens,
                     "temperature": d.temperature, "intents": d.intents, "limit": to_dict(d)["limit"],
                     "max_input_chars": d.max_input_chars, "fallback": d.fallback,
                     "local_ctx": d.local_ctx if backend.name == "local" else None},
        "prompts": prompts,
        "metadata_version": METADATA_VERSION,
    }


def run(cfg: Config, force: bool = False, log: Callable[[str], None] = print) -> StageResult:
    """The describe stage: `<run_dir>/describe/{descriptions,intents}.parquet` (skipped when up to date)."""
    from recpipe.pipeline import data as D

    data_m = require_stage(cfg.run_dir, "data", hint="recpipe data")
    backend = get_backend(cfg.describe, log, gguf_dir(cfg))
    try:
        config = stage_config(cfg, backend)
        inputs = {"data": data_m.fingerprint}

        def build(out_dir: Path) -> dict[str, Any]:
            ds = D.load(Path(cfg.run_dir) / "data")
            desc, intents, report = describe_items(ds.items, cfg, backend, log)
            with atomic_path(out_dir / "descriptions.parquet") as tmp:
                desc.to_parquet(tmp, index=False)
            if intents is not None:
                with atomic_path(out_dir / "intents.parquet") as tmp:
                    intents.to_parquet(tmp, index=False)
            log(report.line())
            return {"report": dataclasses.asdict(report)}

        return run_stage(cfg.run_dir, STAGE, config, inputs, build, force=force, log=log)
    finally:
        backend.close()


def load(stage_dir: Path, task: str = "description") -> pd.DataFrame:
    """descriptions.parquet (task="description") or intents.parquet (task="intent") of a finished stage."""
    name = {"description": "descriptions.parquet", "intent": "intents.parquet"}[task]
    p = Path(stage_dir) / name
    try:
        return pd.read_parquet(p)
    except FileNotFoundError:
        raise ArtifactError(f"{p}: missing; run `recpipe describe` first") from None
    except Exception as e:  # noqa: BLE001 - a corrupt parquet file
        raise ArtifactError(f"{p}: corrupt ({type(e).__name__}); run `recpipe describe --force`") from None


def load_intents(run_dir: str | Path, n_items: int) -> list[str] | None:
    """The intention text of every item (index i - 1 for item i), or None when the table is missing,
    unreadable or does not line up with the items 1..n_items."""
    try:
        df = load(Path(run_dir) / STAGE, "intent")
    except ArtifactError:
        return None
    if "item" not in df or "text" not in df:
        return None
    if len(df) != n_items or not (df["item"].to_numpy() == np.arange(1, n_items + 1)).all():
        return None
    return [str(t) for t in df["text"].to_numpy()]


__all__ = ["run", "load", "describe_items", "stage_config", "Report", "COLUMNS", "TEMPLATES", "metadata_text",
           "metadata_texts", "metadata_description", "metadata_intent", "check_output", "intent_problem",
           "names_item", "title_forms", "title_core", "is_looping"]
