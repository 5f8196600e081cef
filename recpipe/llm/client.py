"""What every LLM backend shares, and the OpenAI-compatible one.

- `Backend.complete(messages, max_tokens, temperature, seed) -> Completion`: one chat completion.
- Failures worth retrying raise `Transient` (rate limits, timeouts, connection errors, 5xx, garbled responses;
  `Unusable` for an answer that came back but cannot be used); anything else that stops a run is a
  `BackendError`. `retrying` is the one retry layer (tenacity: exponential backoff with jitter, honouring an
  endpoint's Retry-After); the official client's own retries are off.
- `OpenAIBackend`: the official client against any OpenAI-compatible endpoint (`base_url`, else
  $OPENAI_BASE_URL, else the official API). The key is read from $OPENAI_API_KEY only and never written to disk
  or logs; URLs are shown without their secrets (`display_url`) and every message is `redact`ed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from recpipe.errors import BackendError

if TYPE_CHECKING:
    from recpipe.config import DescribeConfig
    from recpipe.llm.prompts import Template

DEFAULT_OPENAI_MODEL = "gpt-4o-mini"
METADATA_VERSION = "metadata_v1"  # the rules describe composes metadata texts by (bump when they change)
MAX_WAIT_S = 60.0  # the longest single backoff wait (also caps an endpoint's Retry-After)


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
    """No LLM: the caller composes its texts from metadata itself; `complete` is never called."""


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

