"""Continuous batching for the local backend: several prompts decoded together on one llama.cpp context,
each token computed as the one-at-a-time path computes it. It drives llama_cpp's low-level API and a private
class (`_internals.LlamaContext`), so it is tied to the llama-cpp-python versions the project pins.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import threading

import numpy as np

from recpipe.llm.client import Completion, Transient

REPEAT_PENALTY = 1.1  # over the last 64 generated tokens: keeps small models out of loops
TOP_K, TOP_P, MIN_P = 40, 0.95, 0.05  # llama.cpp's defaults
TOP_K_WINDOW = 12.0  # top-k looks among the logits within this of the maximum first (exact when >= TOP_K there)
KV_UNIFIED = False  # one KV stream per sequence: attention never scans the other sequences' cells
FLASH_ATTN = True  # both paths (Llama() and the batcher): per-stream attention otherwise costs nearly as much as the
# weights on CPU
COPY_MIN = 16  # copy another sequence's KV stream when it shares at least this many more prompt tokens


def _lcp(a: list[int], b: list[int]) -> int:
    """Length of the common prefix of two token lists."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class Batcher:
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
        lg = Batcher._penalized(logits, st["hist"])
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

