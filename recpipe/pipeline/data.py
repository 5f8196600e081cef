"""Data stage: load a dataset, de-duplicate, k-core filter, order by time, re-index, leave-one-out split.

Supported inputs (a directory, or a name resolved inside the data directory):
- generic: `interactions.csv|parquet` (user_id, item_id, timestamp[, rating]) + optional `items.csv|parquet`
  (item_id, title, any other text columns);
- raw MovieLens ml-100k (`u.data`, `u.item`, Latin-1) and ml-1m (`ratings.dat`, `movies.dat`, `users.dat`);
- RecBole atomic files (`<name>.inter`, optional `<name>.item`).

Outputs (`<run_dir>/data/`):
- `items.parquet`      item (dense id, 1..n), item_id (original id, string), title, other text columns
- `users.parquet`      user (dense id, 0..n-1), user_id (original id, string)
- `sequences.npz`      offsets (n_users + 1), items, timestamps: each user's chronological sequence; the last
                       item is the test target, the one before it the validation target, the rest training
- `cold.npz`           only with data.cold_items > 0: items (the cold item ids) and users (the users whose test
                       target is cold); cold items appear in no sequence but as a test target, and keep
                       their rows in items.parquet, so text models can rank them
- manifest `info`      the summary table (users, items, interactions, density, sequence-length statistics)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from recpipe.artifacts import StageResult, atomic_path, fingerprint_file, fingerprint_obj, run_stage
from recpipe.config import Config, DataConfig, to_dict
from recpipe.errors import DataError
from recpipe.pipeline.download import GROUPLENS, get_dataset

STAGE = "data"
COLD_FILE = "cold.npz"

# ------------------------------------------------------------------------------------------ raw loading
@dataclass
class RawDataset:
    """What a loader returns: interactions with original ids, and item metadata (may be empty)."""

    interactions: pd.DataFrame  # user_id (str), item_id (str), timestamp (int64)[, rating (float)]
    items: pd.DataFrame  # item_id (str), title (str), other text columns (str)
    fmt: str
    files: list[Path]


def detect_format(path: Path) -> str:
    """generic | ml-100k | ml-1m | recbole, from the files a directory holds."""
    if not path.is_dir():
        raise DataError(f"{path}: dataset directory not found")
    names = {p.name for p in path.iterdir()}
    if "interactions.csv" in names or "interactions.parquet" in names:
        return "generic"
    if "u.data" in names:
        return "ml-100k"
    if "ratings.dat" in names:
        return "ml-1m"
    if any(n.endswith(".inter") for n in names):
        return "recbole"
    raise DataError(
        f"{path}: no dataset found (expected interactions.csv|parquet, u.data, ratings.dat or a RecBole .inter file)"
    )


def load_raw(path: Path) -> RawDataset:
    fmt = detect_format(path)
    return {"generic": _load_generic, "ml-100k": _load_ml100k, "ml-1m": _load_ml1m, "recbole": _load_recbole}[fmt](
        path
    )


# Ids are strings end to end: read as numbers, "00242" would become 242 (and no longer match items.csv)
ID_DTYPES = {"user_id": str, "item_id": str}


def _read_table(path: Path, **kw: Any) -> pd.DataFrame:
    """Read csv/parquet/delimited text with errors that name the file."""
    if not path.exists():
        raise DataError(f"{path}: file not found")
    try:
        if path.suffix == ".parquet":
            return pd.read_parquet(path)
        return pd.read_csv(path, **kw)
    except UnicodeDecodeError as e:
        enc = kw.get("encoding", "utf-8")
        raise DataError(f"{path}: cannot decode as {enc} text ({e.reason} at byte {e.start})") from None
    except pd.errors.EmptyDataError:
        raise DataError(f"{path}: file is empty") from None
    except (pd.errors.ParserError, ValueError, OSError) as e:
        raise DataError(f"{path}: cannot parse ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


def _require_columns(df: pd.DataFrame, cols: list[str], path: Path) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)} (found: {', '.join(map(str, df.columns))})")


def _to_timestamp(s: pd.Series, path: Path) -> pd.Series:
    """Timestamps that order each user's interactions: numbers as given (int64; float64 where some are
    fractional, so 0.2 still sorts before 0.5), or ISO-8601 dates as Unix seconds. Anything else, a mix of the
    two forms, a non-finite number or one beyond int64 is a DataError that names the first such row."""
    num = pd.to_numeric(s, errors="coerce")
    if pd.api.types.is_numeric_dtype(s) or num.notna().all():
        return _numeric_timestamps(num.astype("float64") if num.dtype == object else num, s, path)
    dates = _date_timestamps(s, path)
    is_num, is_date = num.notna().to_numpy(), dates.notna().to_numpy()
    if is_num.any() and is_date.any():
        r_num, r_date = int(np.flatnonzero(is_num)[0]), int(np.flatnonzero(is_date)[0])
        raise DataError(f"{path}: timestamps mix numbers ({_shown(s.iloc[r_num])}, data row {r_num + 1}) and dates "
                        f"({_shown(s.iloc[r_date])}, data row {r_date + 1}); write every timestamp in one form")
    bad = ~(is_date | is_num)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataError(f"{path}: non-numeric timestamp {_shown(s.iloc[row])} (data row {row + 1}): "
                        "expected a number or an ISO-8601 date")
    return dates.astype("int64")


def _numeric_timestamps(num: pd.Series, raw: pd.Series, path: Path) -> pd.Series:
    v = num.to_numpy(dtype=np.float64)
    bad = ~np.isfinite(v)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataError(f"{path}: timestamp {_shown(raw.iloc[row])} (data row {row + 1}) is not a finite number")
    if pd.api.types.is_signed_integer_dtype(num):
        return num.astype("int64")
    # int64 holds [-2**63, 2**63); the float bounds are exact powers of two
    out = (v >= 2.0**63) | (v < -(2.0**63))
    if out.any():
        row = int(np.flatnonzero(out)[0])
        raise DataError(f"{path}: timestamp {_shown(raw.iloc[row])} (data row {row + 1}) is out of range "
                        f"(beyond a 64-bit integer)")
    if (v != np.floor(v)).any():
        return pd.Series(v, index=num.index)
    return pd.Series(v.astype(np.int64), index=num.index)


def _date_timestamps(s: pd.Series, path: Path) -> pd.Series:
    """ISO-8601 dates as Unix seconds (float64, NaN where a value is no date). Cast to datetime64[s] first:
    the integer behind a datetime counts the unit pandas parsed into (ns in pandas 2, us in pandas 3)."""
    dt = pd.to_datetime(s, format="ISO8601", utc=True, errors="coerce")
    ok = dt.notna().to_numpy()
    secs = pd.Series(np.nan, index=s.index, dtype="float64")
    if ok.any():
        whole = dt[ok].dt.tz_convert(None).astype("datetime64[s]")  # floor to the second, whatever the unit
        secs[ok] = whole.astype("int64").to_numpy(np.float64)
    failed = secs.isna() & s.notna()
    if failed.any() and not _far_dates_parse():
        for row in np.flatnonzero(failed.to_numpy()):
            v = str(s.iloc[row])
            year = int(v.strip()[:4]) if v.strip()[:4].isdigit() else None
            if year is not None and not 1678 <= year <= 2261:
                raise DataError(f"{path}: date {v!r} (data row {row + 1}) is outside the years pandas "
                                f"{pd.__version__} reads (1678-2261); write it as Unix seconds or use pandas >= 3")
    return secs


@functools.cache
def _far_dates_parse() -> bool:
    """Whether this pandas parses dates beyond 2262 (pandas 3 picks the unit from the text; pandas 2 reads
    every date into nanoseconds, 1677..2262)."""
    dt = pd.to_datetime(pd.Series(["9999-12-31"]), format="ISO8601", utc=True, errors="coerce")
    return bool(dt.notna().iloc[0])


def _shown(v: Any) -> str:
    """A cell as the user wrote it: '1e+20' and 'inf', not np.float64(1e+20)."""
    return repr(str(float(v))) if isinstance(v, (float, np.floating)) else repr(str(v))


def _ids(s: pd.Series) -> pd.Series:
    """Original ids as strings, exactly as the file writes them ("00242" stays "00242"); a numeric column
    (parquet, or a loader that parsed numbers) prints integers without a trailing ".0"."""
    if pd.api.types.is_float_dtype(s) and s.dropna().apply(float.is_integer).all():
        s = s.astype("Int64")
    out = s.astype(str)
    return out.str.strip() if pd.api.types.is_object_dtype(s) or pd.api.types.is_string_dtype(s) else out


def _finish(inter: pd.DataFrame, items: pd.DataFrame, inter_path: Path, items_path: Path | None,
            fmt: str) -> RawDataset:
    inter = inter.copy()
    for col in ("user_id", "item_id", "timestamp"):
        empty = inter[col].isna().to_numpy()
        if empty.any():
            raise DataError(f"{inter_path}: empty {col} in {int(empty.sum())} row(s) "
                            f"(first: data row {int(np.flatnonzero(empty)[0]) + 1})")
    inter["user_id"] = _ids(inter["user_id"])
    inter["item_id"] = _ids(inter["item_id"])
    inter["timestamp"] = _to_timestamp(inter["timestamp"], inter_path)
    keep = ["user_id", "item_id", "timestamp"] + (["rating"] if "rating" in inter.columns else [])
    if "rating" in inter.columns:
        inter["rating"] = pd.to_numeric(inter["rating"], errors="coerce")
    inter = inter[keep].reset_index(drop=True)
    if len(items):
        items = items.copy()
        items["item_id"] = _ids(items["item_id"])
        dup = items["item_id"][items["item_id"].duplicated()]
        if len(dup):
            raise DataError(f"{items_path}: duplicate item_id {dup.iloc[0]!r} ({len(dup)} duplicates)")
        for c in items.columns:
            if c != "item_id":
                items[c] = items[c].fillna("").astype(str).str.strip()
        if "title" not in items.columns:
            raise DataError(f"{items_path}: missing column title (found: {', '.join(map(str, items.columns))})")
        unknown = ~inter["item_id"].isin(items["item_id"])
        if unknown.any():
            raise DataError(
                f"{inter_path}: {int(unknown.sum())} interactions name items missing from {items_path.name}"
                f" (e.g. item_id {inter['item_id'][unknown].iloc[0]!r})"
            )
    else:
        items = pd.DataFrame({"item_id": pd.Series(dtype=str), "title": pd.Series(dtype=str)})
    files = [inter_path] + ([items_path] if items_path is not None else [])
    return RawDataset(inter, items.reset_index(drop=True), fmt, files)


def _load_generic(path: Path) -> RawDataset:
    inter_path = next(path / n for n in ("interactions.parquet", "interactions.csv") if (path / n).exists())
    inter = _read_table(inter_path, dtype=ID_DTYPES)
    _require_columns(inter, ["user_id", "item_id", "timestamp"], inter_path)
    items_path = next((path / n for n in ("items.parquet", "items.csv") if (path / n).exists()), None)
    items = pd.DataFrame()
    if items_path is not None:
        items = _read_table(items_path, dtype=str, keep_default_na=False)
        _require_columns(items, ["item_id", "title"], items_path)
    return _finish(inter, items, inter_path, items_path, "generic")


def _load_ml100k(path: Path) -> RawDataset:
    inter_path = path / "u.data"
    inter = _read_table(inter_path, sep="\t", header=None, names=["user_id", "item_id", "rating", "timestamp"],
                        dtype=ID_DTYPES)
    items_path = path / "u.item"
    items = pd.DataFrame()
    if items_path.exists():
        genre_names = _ml100k_genres(path)
        raw = _read_table(items_path, sep="|", header=None, encoding="latin-1", dtype=str, keep_default_na=False)
        if raw.shape[1] != 5 + len(genre_names):
            raise DataError(f"{items_path}: expected {5 + len(genre_names)} '|'-separated fields, found {raw.shape[1]}")
        flags = raw.iloc[:, 5:].to_numpy() == "1"
        genres = ["|".join(g for g, f in zip(genre_names, row) if f) for row in flags]
        items = pd.DataFrame({"item_id": raw[0], "title": raw[1], "release_date": raw[2], "genres": genres})
    return _finish(inter, items, inter_path, items_path if items_path.exists() else None, "ml-100k")


def _ml100k_genres(path: Path) -> list[str]:
    p = path / "u.genre"
    if p.exists():
        g = _read_table(p, sep="|", header=None, encoding="latin-1", dtype=str, keep_default_na=False)
        return [x for x in g[0].tolist() if x]
    return ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
            "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western"]


def _load_ml1m(path: Path) -> RawDataset:
    inter_path = path / "ratings.dat"
    inter = _read_table(inter_path, sep="::", engine="python", header=None,
                        names=["user_id", "item_id", "rating", "timestamp"], encoding="latin-1", dtype=ID_DTYPES)
    items_path = path / "movies.dat"
    items = pd.DataFrame()
    if items_path.exists():
        items = _read_table(items_path, sep="::", engine="python", header=None, names=["item_id", "title", "genres"],
                            encoding="latin-1", dtype=str, keep_default_na=False)
    return _finish(inter, items, inter_path, items_path if items_path.exists() else None, "ml-1m")


def _recbole_frame(p: Path) -> tuple[pd.DataFrame, dict[str, str]]:
    """The file's table with plain column names, and each column's RecBole type ("token", "token_seq", ...)."""
    df = _read_table(p, sep="\t", dtype=str, keep_default_na=False, quoting=3)
    types = {str(c).split(":")[0]: (str(c).split(":") + [""])[1] for c in df.columns}
    df.columns = list(types)
    return df, types


# RecBole's genre fields (`class` in its ml-100k, `genre` in its ml-1m / ml-20m) are space-separated
# token_seq values ("Animation Children's Comedy"); recpipe's convention for categories is a "|"-separated
# `genres` column, which evaluate's and train's category intentions read by default.
_RECBOLE_GENRE_FIELDS = ("genre", "class")


def _load_recbole(path: Path) -> RawDataset:
    inter_path = sorted(path.glob("*.inter"))[0]
    inter, _ = _recbole_frame(inter_path)
    _require_columns(inter, ["user_id", "item_id", "timestamp"], inter_path)
    items_path = inter_path.with_suffix(".item")
    items = pd.DataFrame()
    if items_path.exists():
        items, types = _recbole_frame(items_path)
        if "title" not in items.columns:
            for alt in ("movie_title", "item_name", "name"):
                if alt in items.columns:
                    items = items.rename(columns={alt: "title"})
                    break
        genre = next((c for c in _RECBOLE_GENRE_FIELDS if types.get(c) == "token_seq"), None)
        if genre is not None and "genres" not in items.columns:
            items["genres"] = ["|".join(str(v).split()) for v in items.pop(genre)]
        _require_columns(items, ["item_id", "title"], items_path)
    return _finish(inter, items, inter_path, items_path if items_path.exists() else None, "recbole")


# Each format's reader version (absent = 1): raised whenever a reader may make something else of the same
# files, so the data stage is rebuilt; stages downstream stay current when the rebuilt files come out identical.
READER_VERSION = {"generic": 2, "ml-100k": 2, "ml-1m": 2, "recbole": 3}


# ----------------------------------------------------------------------------------------- processing
@dataclass
class Processed:
    items: pd.DataFrame  # item (1..n), item_id, title, text columns
    users: pd.DataFrame  # user (0..n-1), user_id
    offsets: np.ndarray  # (n_users + 1,) int64
    seq_items: np.ndarray  # (n_interactions,) int64, dense item ids, chronological within each user
    seq_times: np.ndarray  # (n_interactions,) int64 (float64 where the file has fractional timestamps)
    summary: dict[str, Any]
    cold_items: np.ndarray | None = None  # data.cold_items > 0: the cold item ids, sorted
    cold_users: np.ndarray | None = None  # ... and the users whose test target is one of them, sorted


def kcore_mask(users: np.ndarray, items: np.ndarray, k: int) -> np.ndarray:
    """Iterated k-core over integer codes (0..n-1): the rows whose user and item both keep >= k interactions
    once no user or item with fewer is left. Counting is np.bincount: a pass over 10M rows takes tens of ms."""
    keep = np.ones(len(users), dtype=bool)
    if k <= 1:
        return keep
    while True:
        u, i = users[keep], items[keep]
        ok = (np.bincount(u)[u] >= k) & (np.bincount(i)[i] >= k)
        if ok.all():
            return keep
        keep[np.flatnonzero(keep)[~ok]] = False


def kcore(inter: pd.DataFrame, k: int) -> pd.DataFrame:
    """Iterated k-core of a frame with user_id and item_id columns (see kcore_mask)."""
    users = pd.factorize(inter["user_id"])[0]
    items = pd.factorize(inter["item_id"])[0]
    return inter[kcore_mask(users, items, k)]


def process(raw: RawDataset, cfg: DataConfig, source: str = "") -> Processed:
    inter = raw.interactions
    # the ids become integer codes once; sorting, dedup, k-core and the split run on numpy arrays of them
    ucode, uniq_u = pd.factorize(inter["user_id"])
    icode, uniq_i = pd.factorize(inter["item_id"])
    n_raw = (len(uniq_u), len(uniq_i), len(inter))
    ts = inter["timestamp"].to_numpy()  # int64, or float64 where the file has fractional timestamps
    row = np.arange(len(inter))  # file order, the tie-break of equal timestamps
    if cfg.min_rating > 0:
        if "rating" not in inter.columns:  # a filter that cannot apply must not pass as applied
            raise DataError(f"{source or 'dataset'}: data.min_rating={cfg.min_rating:g} needs ratings, and the "
                            "interactions have no rating column; set data.min_rating=0")
        rated = (inter["rating"] >= cfg.min_rating).to_numpy()
        ucode, icode, ts, row = ucode[rated], icode[rated], ts[rated], row[rated]
    # chronological order within each user with a stable tie-break: equal timestamps keep the file's order
    order = np.lexsort((ts, ucode))  # stable: rows of equal (user, time) stay in file order
    ucode, icode, ts, row = ucode[order], icode[order], ts[order], row[order]
    if cfg.dedup != "none":
        dup = pd.Series(ucode.astype(np.int64) * max(len(uniq_i), 1) + icode).duplicated(keep=cfg.dedup)
        kept = ~dup.to_numpy()
        ucode, icode, ts, row = ucode[kept], icode[kept], ts[kept], row[kept]
    n_dedup = len(ucode)
    kept = kcore_mask(ucode, icode, cfg.kcore)
    ucode, icode, ts, row = ucode[kept], icode[kept], ts[kept], row[kept]
    # leave-one-out needs train, validation and test items: users with fewer than 3 are dropped
    ucount = np.bincount(ucode, minlength=len(uniq_u))
    short = int(((ucount > 0) & (ucount < 3)).sum())
    kept = ucount[ucode] >= 3
    ucode, icode, ts, row = ucode[kept], icode[kept], ts[kept], row[kept]
    if len(ucode) == 0:
        raise DataError(f"{source or 'dataset'}: no interactions left after {cfg.kcore}-core filtering "
                        f"(raw: {n_raw[0]} users, {n_raw[1]} items, {n_raw[2]} interactions)")

    # dense ids: items 1..n (0 = padding) and users 0..n-1, both in sorted original-id order
    item_ids, it = _dense(icode, np.asarray(uniq_i, dtype=object), start=1)
    user_ids, u = _dense(ucode, np.asarray(uniq_u, dtype=object), start=0)
    # rows are in (code, time, file order) order and a user's rows share one code: a stable sort on the dense
    # user id alone gives user, then time, then file order
    order = np.argsort(u, kind="stable")
    u, it, ts = u[order], it[order], ts[order]
    cold = None
    if cfg.cold_items > 0:
        cold = cold_split(u, it, ts, len(item_ids), cfg.cold_items)
        u, it, ts = cold["u"], cold["it"], cold["ts"]
        user_ids = user_ids[cold["kept_users"]]
    counts = np.bincount(u, minlength=len(user_ids))
    offsets = np.zeros(len(user_ids) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])

    meta = raw.items.set_index("item_id") if len(raw.items) else None
    items = pd.DataFrame({"item": np.arange(1, len(item_ids) + 1, dtype=np.int64), "item_id": item_ids.astype(str)})
    if meta is not None:
        items = items.join(meta, on="item_id")
        for c in items.columns[2:]:
            items[c] = items[c].fillna("").astype(str)
    else:
        items["title"] = ""
    users = pd.DataFrame({"user": np.arange(len(user_ids), dtype=np.int64), "user_id": user_ids.astype(str)})

    n_users, n_items, n_inter = len(user_ids), len(item_ids), len(it)
    summary = {
        "source": source,
        "format": raw.fmt,
        "raw_users": int(n_raw[0]), "raw_items": int(n_raw[1]), "raw_interactions": int(n_raw[2]),
        "after_dedup": int(n_dedup),
        "users": n_users, "items": n_items, "interactions": n_inter,
        "density": n_inter / (n_users * n_items),
        "dropped_short_users": short,
        "seq_len_min": int(counts.min()), "seq_len_median": float(np.median(counts)),
        "seq_len_mean": float(counts.mean()), "seq_len_max": int(counts.max()),
        "train_positions": int((counts - 2).sum() - n_users),  # targets with a non-empty history
        "kcore": cfg.kcore,
    }
    if cold is None:
        return Processed(items, users, offsets, it.astype(np.int64), ts, summary)
    summary["cold"] = {k: cold[k] for k in ("fraction", "items", "removed_interactions", "dropped_users",
                                             "cold_test_users", "warm_test_users", "cold_since")}
    return Processed(items, users, offsets, it.astype(np.int64), ts, summary, cold["cold_items"],
                     cold["cold_users"])


def _dense(codes: np.ndarray, uniques: np.ndarray, start: int) -> tuple[np.ndarray, np.ndarray]:
    """(the original ids still present, in natural order; each row's dense id start, start + 1, ...)."""
    present = np.flatnonzero(np.bincount(codes, minlength=len(uniques)))
    ids = uniques[present]
    rank = np.array(sorted(range(len(ids)), key=lambda j: _natural_key(str(ids[j]))), dtype=np.int64)
    dense = np.empty(len(uniques), dtype=np.int64)
    dense[present[rank]] = np.arange(start, start + len(ids))
    return ids[rank], dense[codes]


def cold_split(u: np.ndarray, it: np.ndarray, ts: np.ndarray, n_items: int, fraction: float) -> dict[str, Any]:
    """The cold-item protocol on sequences sorted by user, then time (u: dense users, it: dense items 1..n).

    The round(fraction * n_items) items (at least one) first interacted with last are cold: every interaction
    with one is removed except where it is its user's last item (the test target), so no training or
    validation sequence holds one. Items first seen at the same time are ordered by id, so the split is
    deterministic. Users left with fewer than 3 items (train, validation, test) are dropped and the rest
    renumbered 0..n-1. Returns the new u / it / ts, kept_users (a mask over the old users), cold_items,
    cold_users (new ids) and the figures the summary reports."""
    first = np.full(n_items + 1, np.inf)
    np.minimum.at(first, it, ts.astype(np.float64))
    by_age = np.lexsort((np.arange(1, n_items + 1), first[1:])) + 1  # oldest first; ties by id
    n_cold = min(max(1, int(round(fraction * n_items))), n_items)
    cold_items = np.sort(by_age[n_items - n_cold:])
    is_cold = np.zeros(n_items + 1, dtype=bool)
    is_cold[cold_items] = True
    last = np.r_[u[1:] != u[:-1], True] if len(u) else np.zeros(0, dtype=bool)
    keep = ~is_cold[it] | last
    n_users = int(u.max()) + 1 if len(u) else 0
    lens = np.bincount(u[keep], minlength=n_users)
    kept_users = lens >= 3
    keep &= kept_users[u]
    new_id = np.cumsum(kept_users) - 1
    u2, it2 = new_id[u[keep]], it[keep]
    last2 = np.r_[u2[1:] != u2[:-1], True] if len(u2) else np.zeros(0, dtype=bool)
    cold_users = np.unique(u2[last2 & is_cold[it2]])
    n_kept = int(kept_users.sum())
    return {
        "u": u2, "it": it2, "ts": ts[keep], "kept_users": kept_users, "cold_items": cold_items.astype(np.int64),
        "cold_users": cold_users.astype(np.int64), "fraction": fraction, "items": int(n_cold),
        "removed_interactions": int((~keep & kept_users[u]).sum()), "dropped_users": int(n_users - n_kept),
        "cold_test_users": int(len(cold_users)), "warm_test_users": n_kept - int(len(cold_users)),
        "cold_since": float(first[by_age[n_items - n_cold]]) if n_cold else None,
    }


def _natural_key(s: str) -> tuple:
    """Numeric ids sort numerically, others lexically (numbers first)."""
    try:
        return (0, int(s), s)  # s breaks the tie between "00242" and "242"
    except ValueError:
        return (1, 0, s)


# ------------------------------------------------------------------------------------------- artifacts
@dataclass
class Dataset:
    """The data stage's artifacts, loaded."""

    items: pd.DataFrame
    users: pd.DataFrame
    offsets: np.ndarray
    seq_items: np.ndarray
    seq_times: np.ndarray
    cold_items: np.ndarray | None = None  # the cold-item protocol's cold items (data.cold_items > 0), else None
    cold_users: np.ndarray | None = None  # the users whose test target is a cold item

    @property
    def n_items(self) -> int:
        return len(self.items)

    @property
    def n_users(self) -> int:
        return len(self.users)

    def sequence(self, user: int) -> np.ndarray:
        return self.seq_items[self.offsets[user]: self.offsets[user + 1]]

    def split(self, name: str) -> tuple[list[np.ndarray], np.ndarray]:
        """(histories, targets) for "test" (last item), "valid" (second to last) or "train_last"."""
        cut = {"test": 1, "valid": 2}[name]
        hist, tgt = [], np.empty(self.n_users, dtype=np.int64)
        for u in range(self.n_users):
            s = self.sequence(u)
            hist.append(s[: len(s) - cut])
            tgt[u] = s[len(s) - cut]
        return hist, tgt

    def test_groups(self) -> dict[str, np.ndarray] | None:
        """Under the cold-item protocol, the test users by their target: {"cold": ..., "warm": ...} (user ids,
        sorted); None for an ordinary split."""
        if self.cold_users is None:
            return None
        warm = np.setdiff1d(np.arange(self.n_users), self.cold_users)
        return {"cold": self.cold_users, "warm": warm}

    def item_categories(self, column: str) -> list[list[str]] | None:
        """Each item's categories from a "|" (or ",") separated column, in item order; None without it."""
        if column not in self.items.columns:
            return None
        missing = lambda v: pd.isna(v) or str(v) == "nan"  # noqa: E731
        return [[] if missing(v) else [c.strip() for c in str(v).replace(",", "|").split("|") if c.strip()]
                for v in self.items[column].to_numpy()]

    def user_index(self, user_id: str) -> int:
        hit = np.flatnonzero(self.users["user_id"].to_numpy() == str(user_id))
        if not len(hit):
            raise DataError(f"unknown user {user_id!r} (this dataset has {self.n_users} users, e.g. "
                            f"{', '.join(self.users['user_id'].head(3))})")
        return int(hit[0])


def save(p: Processed, out_dir: Path) -> None:
    with atomic_path(out_dir / "items.parquet") as tmp:
        p.items.to_parquet(tmp, index=False)
    with atomic_path(out_dir / "users.parquet") as tmp:
        p.users.to_parquet(tmp, index=False)
    with atomic_path(out_dir / "sequences.npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, offsets=p.offsets, items=p.seq_items, timestamps=p.seq_times)
    if p.cold_items is not None:  # an ordinary split writes exactly the files it always wrote
        with atomic_path(out_dir / COLD_FILE) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, items=p.cold_items, users=p.cold_users)


def load(stage_dir: Path | str) -> Dataset:
    from recpipe.errors import ArtifactError

    stage_dir = Path(stage_dir)  # a str path is not a corrupt artifact
    try:
        items = pd.read_parquet(stage_dir / "items.parquet")
        users = pd.read_parquet(stage_dir / "users.parquet")
        with np.load(stage_dir / "sequences.npz") as z:
            offsets, seq_items, seq_times = z["offsets"], z["items"], z["timestamps"]
        cold_items = cold_users = None
        if (stage_dir / COLD_FILE).exists():
            with np.load(stage_dir / COLD_FILE) as z:
                cold_items, cold_users = z["items"], z["users"]
    except FileNotFoundError as e:
        raise ArtifactError(f"{e.filename}: missing; run `recpipe data` first") from None
    except Exception as e:  # corrupt parquet / npz
        raise ArtifactError(
            f"{stage_dir}: corrupt data artifacts ({type(e).__name__}); run `recpipe data --force`") from None
    return Dataset(items, users, offsets, seq_items, seq_times, cold_items, cold_users)


def load_run(run_dir: str | Path) -> Dataset:
    """The data stage's dataset of a run directory."""
    return load(Path(run_dir) / STAGE)


def write_recbole(ds: Dataset, out_dir: Path, name: str) -> None:
    """Export a processed dataset as RecBole atomic files (`name.inter`, `name.item`)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    user_of = np.repeat(np.arange(ds.n_users), np.diff(ds.offsets))
    inter = pd.DataFrame({
        "user_id:token": ds.users["user_id"].to_numpy()[user_of],
        "item_id:token": ds.items["item_id"].to_numpy()[ds.seq_items - 1],
        "timestamp:float": ds.seq_times,
    })
    inter.to_csv(out_dir / f"{name}.inter", sep="\t", index=False)
    cols = [c for c in ds.items.columns if c != "item"]
    item = ds.items[cols].copy()
    for c in cols:
        item[c] = item[c].astype(str).str.replace("\t", " ", regex=False)
    item.columns = ["item_id:token"] + [f"{c}:token_seq" for c in cols[1:]]
    item.to_csv(out_dir / f"{name}.item", sep="\t", index=False)


# ------------------------------------------------------------------------------------------- resolving
def resolve_dataset(cfg: Config, log=print, download: bool = True) -> Path:
    """The dataset's directory: a path as given, or a name inside the data directory (downloaded if public)."""
    name = cfg.run.dataset
    as_path = Path(name)
    if as_path.is_dir():
        return as_path
    cand = cfg.data_dir / name
    if cand.is_dir():
        return cand
    if name in GROUPLENS and download:
        log(f"{name}: not in {cfg.data_dir}; downloading it")
        return get_dataset(name, cfg.data_dir, log=log)
    known = sorted(p.name for p in cfg.data_dir.iterdir() if p.is_dir()) if cfg.data_dir.is_dir() else []
    raise DataError(
        f"dataset {name!r} not found in {cfg.data_dir}"
        + (f" (found: {', '.join(known)})" if known else "")
        + "; pass --data-dir, set RECPIPE_DATA, or give a directory path"
    )


# ---------------------------------------------------------------------------------------------- stage
def run(cfg: Config, force: bool = False, log=print) -> StageResult:
    src = resolve_dataset(cfg, log=log)
    fmt = detect_format(src)
    files = _input_files(src, fmt)
    inputs = {str(f.name): fingerprint_file(f) for f in files}
    config = {"data": to_dict(cfg.data), "format": fmt}
    if not cfg.data.cold_items:  # off, the default: data stages made before the option existed stay current
        config["data"].pop("cold_items")
    if fmt in READER_VERSION:  # a reader whose output changed: cached data (and what was made from it) is rebuilt
        config["reader"] = READER_VERSION[fmt]

    def build(out_dir: Path) -> dict[str, Any]:
        raw = load_raw(src)
        p = process(raw, cfg.data, source=str(src))
        save(p, out_dir)
        return {"summary": p.summary, "source": str(src)}

    return run_stage(cfg.run_dir, STAGE, config, inputs, build, force=force, log=log)


def _input_files(src: Path, fmt: str) -> list[Path]:
    names = {
        "generic": ["interactions.csv", "interactions.parquet", "items.csv", "items.parquet"],
        "ml-100k": ["u.data", "u.item", "u.genre"],
        "ml-1m": ["ratings.dat", "movies.dat"],
    }.get(fmt)
    if names is None:  # recbole
        inter = sorted(src.glob("*.inter"))[0]
        return [p for p in (inter, inter.with_suffix(".item")) if p.exists()]
    return [src / n for n in names if (src / n).exists()]


def format_summary(s: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        ("source", f"{s['source']} ({s['format']})"),
        ("raw", f"{s['raw_users']:,} users, {s['raw_items']:,} items, {s['raw_interactions']:,} interactions"),
        ("users", f"{s['users']:,}"),
        ("items", f"{s['items']:,}"),
        ("interactions", f"{s['interactions']:,}"),
        ("density", f"{s['density']:.4%}"),
        ("sequence length", f"min {s['seq_len_min']}, median {s['seq_len_median']:g}, "
                            f"mean {s['seq_len_mean']:.1f}, max {s['seq_len_max']}"),
        ("training positions", f"{s['train_positions']:,}"),
        ("dropped (< 3 interactions)", f"{s['dropped_short_users']:,} users"),
    ] + ([] if "cold" not in s else [
        ("cold items", f"{s['cold']['items']:,} ({s['cold']['fraction']:g} of the items, the newest by first "
                       f"interaction): {s['cold']['removed_interactions']:,} training/validation interactions "
                       "removed"),
        ("test users", f"{s['cold']['cold_test_users']:,} with a cold target, {s['cold']['warm_test_users']:,} "
                       f"with a warm one; {s['cold']['dropped_users']:,} users dropped (< 3 items left)"),
    ])


__all__ = ["Dataset", "RawDataset", "Processed", "load_raw", "process", "kcore", "load", "save", "run",
           "resolve_dataset", "get_dataset", "write_recbole", "detect_format", "format_summary", "fingerprint_obj"]
