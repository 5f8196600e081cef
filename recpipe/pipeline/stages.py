"""The pipeline's stages in order: the one list that `recpipe run`, `recpipe benchmark` and the CLI walk.

    data -> describe -> embed -> whiten -> train -> evaluate        (index and recommend on demand)

describe, embed and whiten are needed only by text models (`bundle.needs_text`). Each stage asks for its own
prerequisites: it refuses to run, naming the command, when a stage it reads has not run, and whiten, which
nothing but training needs and which takes no decision of its own, is run by the train stage itself
(`prerequisite_of`), so a walk leaves it to train. index is optional (recommend builds an index in memory
without it) and recommend answers requests; neither is a stage a run walks through.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from recpipe.artifacts import StageResult
from recpipe.config import Config
from recpipe.pipeline.bundle import needs_text, reads_text


@dataclass(frozen=True)
class Stage:
    name: str  # also its module, recpipe.pipeline.<name>, and its directory in the run directory
    text_only: bool = False  # only text models need it
    per_model: bool = False  # one stage directory per model: <name>/<model>
    prerequisite_of: str = ""  # the stage that runs this one itself when it needs it

    def module(self):
        return importlib.import_module(f"recpipe.pipeline.{self.name}")

    def run(self, cfg: Config, model_name: str | None = None, force: bool = False,
            log: Callable[[str], None] = print) -> StageResult:
        if self.per_model:
            return self.module().run(cfg, model_name, force=force, log=log)
        return self.module().run(cfg, force=force, log=log)


STAGES: tuple[Stage, ...] = (
    Stage("data"),
    Stage("describe", text_only=True),
    Stage("embed", text_only=True),
    Stage("whiten", text_only=True, prerequisite_of="train"),
    Stage("train", per_model=True),
    Stage("evaluate", per_model=True),
)


def walk(models: Iterable[str], cfg: Config | None = None) -> list[Stage]:
    """The stages a run of `models` walks through, in order: the text stages only when a model needs text
    (with `cfg`: or its configured training reads the text vectors), and not the ones another stage runs
    itself."""
    text = any(needs_text(m) or cfg is not None and reads_text(m, cfg.model_config(m)) for m in models)
    return [s for s in STAGES if (text or not s.text_only) and not s.prerequisite_of]


def shared(models: Iterable[str], cfg: Config | None = None) -> list[Stage]:
    """The stages of `walk` that every model shares (run once), before the per-model ones."""
    return [s for s in walk(models, cfg) if not s.per_model]


def per_model() -> list[Stage]:
    """The stages run once for each model, in order."""
    return [s for s in STAGES if s.per_model]


__all__ = ["Stage", "STAGES", "walk", "shared", "per_model"]
