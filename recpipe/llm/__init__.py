"""LLM access for the pipeline: describe's item texts and embed's OpenAI-compatible TEM.

- `client`   the `Backend` interface (`complete` -> `Completion`), `Transient` / `Unusable` failures, the
             one retry policy (`retrying`), the OpenAI-compatible backend and URL redaction.
- `llama`    the local backend (a GGUF run in process by llama-cpp-python), its requantised copies and load
             parameters; `batcher` decodes several prompts together for it. Imported only when chosen, so
             importing recpipe.llm never loads llama_cpp.
- `cpu`      the CPU features llama.cpp uses here (native BF16, AMX).
- `cache`    the answer / vector cache (diskcache through `SafeDisk`: JSON or raw arrays, never pickle), its
             keys and its lock; `runner` answers many prompts through a backend and that cache.
- `prompts`  versioned prompt templates (recpipe/prompts/*.txt); `text` repairs and cuts text.

`get_backend(dcfg)` picks the backend a DescribeConfig names.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from recpipe.errors import ConfigError
from recpipe.llm.cache import (
    SafeDisk,
    cache_dir,
    cache_key,
    cache_lock,
    cached_answer,
    gguf_dir,
    open_cache,
    refused_note,
)
from recpipe.llm.client import (
    DEFAULT_OPENAI_MODEL,
    METADATA_VERSION,
    Backend,
    Completion,
    MetadataBackend,
    OpenAIBackend,
    Transient,
    Unusable,
    classify_openai_error,
    display_url,
    make_openai_client,
    openai_base_url,
    openai_key,
    redact,
    retrying,
)
from recpipe.llm.prompts import Template, load_template
from recpipe.llm.text import clean_text, cut_text, shingles

if TYPE_CHECKING:
    from recpipe.config import DescribeConfig


def get_backend(dcfg: DescribeConfig, log: Callable[[str], None] = print, model_dir: Path | None = None) -> Backend:
    """The configured backend; `auto` picks openai (key set), else local (installed), else metadata.
    `model_dir`: where the local backend keeps requantised GGUF copies (`gguf_dir(cfg)`; default ./cache/...)."""
    choice = dcfg.llm
    if choice == "auto":
        from recpipe.llm.llama import bundled_gguf, llama_available  # finds, never imports, llama_cpp

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
        from recpipe.llm.llama import LocalBackend

        return LocalBackend(dcfg, model_dir)
    if choice == "metadata":
        return MetadataBackend()
    raise ConfigError(f"describe.llm must be auto|openai|local|metadata, not {choice!r}")


__all__ = ["get_backend", "Backend", "Completion", "MetadataBackend", "OpenAIBackend", "Transient", "Unusable",
           "retrying", "classify_openai_error", "make_openai_client", "openai_base_url", "openai_key", "display_url",
           "redact", "DEFAULT_OPENAI_MODEL", "METADATA_VERSION", "SafeDisk", "open_cache", "cache_key", "cache_dir",
           "cache_lock", "cached_answer", "gguf_dir", "refused_note", "Template", "load_template", "clean_text",
           "cut_text", "shingles"]
