"""The LLM cache: one diskcache directory per use (describe's answers, embed's vectors), every value stored
as JSON or a raw numeric array through `SafeDisk`, never pickled.

An answer is written the moment it arrives, under a key that hashes every input that shapes it
(`cache_key`), so a re-run makes no call twice and a run killed at any moment resumes. A cached answer also
records its model and is ignored when that differs (`cached_answer`). `cache_lock` lets one run at a time
answer prompts with a cache; a second one waits, then reuses the first one's answers.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import diskcache
import numpy as np

from recpipe.errors import ArtifactError

if TYPE_CHECKING:
    from recpipe.config import Config


def cache_dir(cfg: Config, which: str = "describe") -> Path:
    """The cache of `which` (describe | embed): its `cache` setting, else `<cache_dir>/llm-cache/<which>`."""
    custom = cfg.describe.cache if which == "describe" else cfg.embed.cache
    return Path(custom) if custom else cfg.cache_dir / "llm-cache" / which


def gguf_dir(cfg: Config) -> Path:
    """Where requantised GGUF copies live (one per source identity and quantisation)."""
    return cfg.cache_dir / "llm-cache" / "gguf"


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


def cached_answer(cache, key: str, model: str) -> dict[str, Any] | None:
    """The answer cached under `key` when `model` made it; None when absent or made for another model (never
    used). An unreadable cache is an ArtifactError."""
    try:
        v = cache.get(key)
    except (sqlite3.DatabaseError, OSError) as e:
        raise ArtifactError(f"{cache.directory}: LLM cache unreadable ({e}); delete it to start afresh") from None
    if isinstance(v, dict) and v.get("model") == model and isinstance(v.get("text"), str) and v["text"]:
        return v
    return None  # absent, or made for another model: never used

