"""Run directories, atomic writes, fingerprints and stage manifests.

Layout of a run directory (default `cache/<dataset>/`)::

    <run_dir>/<stage>/manifest.json   the config, input fingerprints, output fingerprints, versions, timings
    <run_dir>/<stage>/...             the stage's artifacts (parquet / npy / npz / safetensors / json)
    <run_dir>/work/<stage>/...        resumable state that must survive a crash (LLM cache, checkpoints)

A stage is written into `<stage>.tmp-<pid>` and renamed into place, so a killed run never leaves a
half-written stage that looks finished. A stage is skipped when its manifest records the same config and
the same input fingerprints as the current call (`force=True` redoes it).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recpipe.errors import ArtifactError

MANIFEST = "manifest.json"
_VERSION_PACKAGES = ("recpipe", "numpy", "pandas", "pyarrow", "torch", "faiss-cpu", "sentence-transformers")


# --------------------------------------------------------------------------------------------- atomic I/O
@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed onto `path` (atomic on POSIX)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n").encode())


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: corrupt JSON ({e}); re-run the stage with --force") from None


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, Path):
        return str(o)
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# ----------------------------------------------------------------------------------------- fingerprints
def fingerprint_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes (hex, first 16 characters are plenty to tell inputs apart)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()[:16]


def fingerprint_obj(obj: Any) -> str:
    """sha256 of an object's canonical JSON."""
    s = json.dumps(obj, sort_keys=True, default=_json_default, separators=(",", ":"))
    return hashlib.sha256(s.encode()).hexdigest()[:16]


def fingerprint_path(path: str | os.PathLike) -> str:
    """Fingerprint of a file, or of every file below a directory (names and contents)."""
    path = Path(path)
    if path.is_dir():
        parts = {str(p.relative_to(path)): _fingerprint_known(p) for p in sorted(path.rglob("*")) if p.is_file()}
        return fingerprint_obj(parts)
    return _fingerprint_known(path)


# Large files hashed in this process, by identity and stat: a command checks the same upstream files several
# times (each loader verifies its stage), and a 100 MB model need not be read each time. Any write (atomic
# writes make a new inode, in-place edits change the size or mtime) makes a new key.
_MEMO_MIN_BYTES = 16 << 20
_fp_memo: dict[str, tuple[tuple[int, int, int, int], str]] = {}


def _fingerprint_known(path: Path) -> str:
    st = path.stat()
    if st.st_size < _MEMO_MIN_BYTES:
        return fingerprint_file(path)
    key = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    hit = _fp_memo.get(str(path))
    if hit is not None and hit[0] == key:
        return hit[1]
    fp = fingerprint_file(path)
    _fp_memo[str(path)] = (key, fp)
    return fp


def package_versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in _VERSION_PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


# ------------------------------------------------------------------------------------------- manifests
@dataclass
class Manifest:
    stage: str
    config: dict[str, Any]
    inputs: dict[str, str]  # name -> fingerprint
    outputs: dict[str, str] = field(default_factory=dict)  # file name -> fingerprint
    info: dict[str, Any] = field(default_factory=dict)  # summary figures the stage wants to keep
    versions: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    created: str = ""

    @property
    def fingerprint(self) -> str:
        """What downstream stages record as this stage's input fingerprint."""
        return fingerprint_obj({"stage": self.stage, "outputs": self.outputs})

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage, "config": self.config, "inputs": self.inputs, "outputs": self.outputs,
            "info": self.info, "versions": self.versions, "timings": self.timings, "created": self.created,
        }


# Each manifest field's JSON type: a hand-edited or foreign manifest is refused in one line, not a TypeError later
_MANIFEST_TYPES = {"stage": str, "config": dict, "inputs": dict, "outputs": dict, "info": dict, "versions": dict,
                   "timings": dict, "created": str}
_JSON_NAMES = {str: "a string", dict: "an object"}


def load_manifest(stage_dir: str | os.PathLike) -> Manifest | None:
    """The manifest of a finished stage, or None if the stage never finished."""
    path = Path(stage_dir) / MANIFEST
    if not path.exists():
        return None
    if not path.is_file():
        raise ArtifactError(f"{path}: not a file; remove it and re-run the stage")
    d = read_json(path)
    if not isinstance(d, dict):
        raise ArtifactError(f"{path}: not a recpipe manifest (a JSON {type(d).__name__}, not an object); "
                            "re-run the stage with --force")
    missing = [k for k in ("stage", "config", "inputs") if k not in d]
    unknown = [k for k in d if k not in _MANIFEST_TYPES]
    if missing or unknown:
        what = (f"missing {', '.join(missing)}" if missing else "") + ("; " if missing and unknown else "") + (
            f"unknown key(s) {', '.join(map(str, unknown))}" if unknown else "")
        raise ArtifactError(f"{path}: not a recpipe manifest ({what}); re-run the stage with --force")
    for k, tp in _MANIFEST_TYPES.items():
        if k in d and not isinstance(d[k], tp):
            raise ArtifactError(f"{path}: not a recpipe manifest ({k!r} is {json.dumps(d[k])[:40]}, expected "
                                f"{_JSON_NAMES[tp]}); re-run the stage with --force")
    for k in ("inputs", "outputs"):
        bad = [n for n, v in d.get(k, {}).items() if not isinstance(v, str)]
        if bad:
            raise ArtifactError(f"{path}: not a recpipe manifest ({k}[{bad[0]!r}] is not a fingerprint string); "
                                "re-run the stage with --force")
    return Manifest(**d)


def stage_command(stage: str) -> str:
    """The command that (re)makes a stage: "train/sasrec" -> "recpipe train --model sasrec"."""
    head, _, sub = stage.partition("/")
    return f"recpipe {head}" + (f" --model {sub}" if sub else "")


def require_stage(run_dir: str | os.PathLike, stage: str, hint: str | None = None, current: bool = False
                  ) -> Manifest:
    """The manifest of an upstream stage whose files still hold what it wrote (content fingerprints), or a
    clear error. A stage reading another's files records this manifest's fingerprint, so the check is what
    makes that fingerprint cover the content: a truncated model or an edited table is refused here instead
    of being read as if it were the recorded one.

    current=True also refuses a stage made from other upstream artifacts than the run directory holds now
    (e.g. `train/x` after `recpipe data` re-ran with another k-core): its results describe data that is gone."""
    stage_dir = Path(run_dir) / stage
    m = load_manifest(stage_dir)
    if m is None:
        raise ArtifactError(
            f"{stage_dir}: stage '{stage}' has not been run" + (f"; run `{hint}` first" if hint else "")
        )
    for name in m.outputs:
        if not (stage_dir / name).exists():
            raise ArtifactError(f"{stage_dir / name}: missing; re-run `{stage_command(stage)} --force`")
    verify_outputs(stage_dir, m, hint=f"{stage_command(stage)} --force")
    if current:
        check_current(run_dir, m)
    return m


def check_current(run_dir: str | os.PathLike, m: Manifest) -> None:
    """ArtifactError when an input `m` recorded under a stage's name (data, embed, whiten, ...) differs from
    that stage's manifest now, or that stage's files no longer hold what it wrote (the reader of `m` reads
    them too); inputs named otherwise (raw files, train/<model>) are checked by their own stage."""
    for name, fp in m.inputs.items():
        up = Path(run_dir) / name
        if "/" in name or not (up / MANIFEST).is_file():
            continue
        now = require_stage(run_dir, name)
        if now.fingerprint != fp:
            raise ArtifactError(f"{Path(run_dir) / m.stage}: made from an earlier '{name}' stage than "
                                f"{up} holds now; re-run `{stage_command(m.stage)}`")


def verify_outputs(stage_dir: str | os.PathLike, m: Manifest, hint: str = "") -> None:
    """Recompute output fingerprints; raises if a file changed since the stage wrote it (corrupt cache)."""
    stage_dir = Path(stage_dir)
    for name, fp in m.outputs.items():
        p = stage_dir / name
        if not p.exists() or fingerprint_path(p) != fp:
            raise ArtifactError(f"{p}: changed or corrupt since stage '{m.stage}' wrote it; "
                                + (f"re-run `{hint}`" if hint else "re-run with --force"))


@dataclass
class StageResult:
    manifest: Manifest
    stage_dir: Path
    skipped: bool


def run_stage(
    run_dir: str | os.PathLike,
    stage: str,
    config: dict[str, Any],
    inputs: dict[str, str],
    build: Callable[[Path], dict[str, Any] | None],
    force: bool = False,
    log: Callable[[str], None] | None = None,
) -> StageResult:
    """Run `build(tmp_dir)` unless the stage already ran with the same config and input fingerprints.

    `build` writes its artifacts into `tmp_dir` and may return a dict of summary info for the manifest.
    Every file it writes is fingerprinted; the directory is then atomically moved to `<run_dir>/<stage>`.
    `stage` may contain one '/' (e.g. "train/idreamrec") for per-model sub-stages.
    """
    stage_dir = Path(run_dir) / stage
    clean_stale_tmp(stage_dir)
    old = None if force else _previous_manifest(stage_dir, stage, log)
    if not force and old is not None and old.config == _normalise(config) and old.inputs == inputs:
        try:
            verify_outputs(stage_dir, old)
        except ArtifactError as e:
            if log:
                log(f"{stage}: {e}; rebuilding")
        else:
            if log:
                log(f"{stage}: up to date (inputs and config unchanged), skipped; --force redoes it")
            return StageResult(old, stage_dir, skipped=True)

    stage_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = stage_dir.parent / f".{stage_dir.name}.tmp-{os.getpid()}"
    if tmp_dir.exists():
        shutil.rmtree(tmp_dir)
    tmp_dir.mkdir()
    t0 = time.perf_counter()
    try:
        info = build(tmp_dir) or {}
        outputs = {
            str(p.relative_to(tmp_dir)): fingerprint_file(p)
            for p in sorted(tmp_dir.rglob("*"))
            if p.is_file() and p.name != MANIFEST
        }
        m = Manifest(
            stage=stage, config=_normalise(config), inputs=dict(inputs), outputs=outputs, info=info,
            versions=package_versions(), timings={"wall_s": round(time.perf_counter() - t0, 3)},
            created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        )
        write_json(tmp_dir / MANIFEST, m.to_dict())
        _swap_in(tmp_dir, stage_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return StageResult(m, stage_dir, skipped=False)


def _previous_manifest(stage_dir: Path, stage: str, log: Callable[[str], None] | None) -> Manifest | None:
    """The stage's manifest from an earlier run; an unreadable one means the stage is rebuilt, not an error."""
    if not stage_dir.exists():
        return None
    try:
        return load_manifest(stage_dir)
    except ArtifactError as e:
        if log:
            log(f"{stage}: {e}; rebuilding")
        return None


def clean_stale_tmp(stage_dir: Path) -> None:
    """Remove the `.<stage>.tmp-<pid>` directories that killed runs left beside a stage: their process is gone,
    so nothing will finish or rename them. A live process's directory is its work in progress and stays."""
    for d in stage_dir.parent.glob(f".{stage_dir.name}.tmp-*"):
        pid = d.name.rsplit("-", 1)[1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's process
        return True
    return pid > 0


def _swap_in(tmp_dir: Path, stage_dir: Path) -> None:
    """Replace stage_dir by tmp_dir; the old directory is removed only after the new one is in place."""
    trash = None
    if stage_dir.exists():
        trash = stage_dir.parent / f".{stage_dir.name}.old-{os.getpid()}"
        if trash.exists():
            shutil.rmtree(trash)
        os.replace(stage_dir, trash)
    os.replace(tmp_dir, stage_dir)
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def _normalise(config: dict[str, Any]) -> dict[str, Any]:
    """Config as it round-trips through JSON (tuples become lists, paths strings) so comparisons hold."""
    return json.loads(json.dumps(config, sort_keys=True, default=_json_default))

