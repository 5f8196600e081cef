"""The data, describe and embed stages' files, read by run directory for the stages downstream of them.

Each reader goes through its stage's own loader (`data.load`, `describe.load`) where one exists, so the
file names and formats stay the writing stage's business. `embed_vectors` mirrors `embed.load_embeddings`
with what its callers need beyond it (a memory map, an optional table, the shape check); it and the others
belong in their stages' modules (`data.load_run`, `describe.load_intents`, `embed.load_vectors`) and move
there when those modules take them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np

from recpipe.errors import ArtifactError
from recpipe.pipeline import data

EMBED_STAGE = "embed"
# the embed stage's tables (embed.py writes them): float32 (n_items + 1, d), row 0 = padding zeros
EMBED_FILES = {"items": "item_embeddings.npy", "intents": "intent_embeddings.npy"}


def dataset(run_dir: str | Path) -> data.Dataset:
    """The data stage's dataset."""
    return data.load(Path(run_dir) / data.STAGE)


def intent_texts(run_dir: str | Path, n_items: int) -> list[str] | None:
    """The describe stage's intention text of every item (index i - 1 for item i), or None when its table is
    missing, unreadable or does not line up with the items 1..n_items."""
    from recpipe.pipeline import describe

    try:
        df = describe.load(Path(run_dir) / describe.STAGE, "intent")
    except ArtifactError:
        return None
    if "item" not in df or "text" not in df:
        return None
    if len(df) != n_items or not (df["item"].to_numpy() == np.arange(1, n_items + 1)).all():
        return None
    return [str(t) for t in df["text"].to_numpy()]


def embed_vectors(run_dir: str | Path, which: Literal["items", "intents"] = "items", mmap: bool = False
                  ) -> np.ndarray | None:
    """The embed stage's item or intention table (float (n_items + 1, d), n_items >= 2); None when it wrote no
    intentions. `mmap`: a read-only memory map (a caller that reads a few rows of a large catalog's table)."""
    path = Path(run_dir) / EMBED_STAGE / EMBED_FILES[which]
    if which == "intents" and not path.exists():
        return None
    try:
        E = np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
    except FileNotFoundError:
        raise ArtifactError(f"{path}: missing; re-run `recpipe embed --force`") from None
    except (OSError, ValueError, EOFError) as e:
        raise ArtifactError(f"{path}: corrupt ({type(e).__name__}); re-run `recpipe embed --force`") from None
    if E.ndim != 2 or E.shape[0] < 3 or not np.issubdtype(E.dtype, np.floating):
        what = "item" if which == "items" else "intent"
        raise ArtifactError(f"{path}: expected a float (n_items + 1, dim) {what} embedding table with n_items >= 2, "
                            f"got {E.dtype} {E.shape}")
    return E


__all__ = ["dataset", "intent_texts", "embed_vectors", "EMBED_FILES"]
