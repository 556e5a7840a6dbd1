from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

import itrkit.teachers.store as store_mod
from itrkit.data.records import Caption, Dataset, ImageRecord
from itrkit.errors import StoreError
from itrkit.teachers.store import FEATURES, FeatureStore


def _ids(n: int) -> list[str]:
    return [f"img{i:03d}" for i in range(n)]


def _write(path: Path, x: np.ndarray, ids: list[str] | None = None, kind: str = "image", **kw) -> FeatureStore:
    ids = ids or _ids(len(x))
    with FeatureStore.create(path, ids, x.shape[1], "unit-teacher", kind, source="unit", **kw) as w:
        w.write(0, x[: len(x) // 2])
        rest = np.arange(len(x) // 2, len(x))[::-1]  # out of order on purpose
        w.write_rows(rest, x[rest])
    assert w.store is not None
    return w.store


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_round_trip_equals_fp16_rounding(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((37, 12)).astype(np.float32) * 3
    ids = _ids(37)
    _write(tmp_path / "a.store", x, ids)
    s = FeatureStore.open(tmp_path / "a.store", expect_kind="image", expect_dim=12, expect_ids=ids,
                          check_finite=True, verify=True)
    assert (len(s), s.dim, s.teacher, s.kind, s.dtype, s.ids) == (37, 12, "unit-teacher", "image", "float16", ids)
    query = [ids[i] for i in rng.permutation(37)[:20]] + [ids[3], ids[3]]
    got = s.lookup(query).numpy()
    assert got.dtype == np.float32 and got.shape == (22, 12)
    for k, i in enumerate(query):  # slow reference: one row at a time, by position in the id list
        want = np.float32(np.float16(x[ids.index(i)]))
        assert np.array_equal(got[k], want)
    rows = np.array([5, 0, 36])
    assert np.array_equal(s.rows(rows).numpy(), x[rows].astype(np.float16).astype(np.float32))
    assert np.array_equal(s.index_for([ids[7], ids[2]]), [7, 2])
    h = json.loads((tmp_path / "a.store" / "header.json").read_text())
    assert h["format"] == "itrkit-store/1" and h["count"] == 37 and h["dim"] == 12 and h["dtype"] == "float16"
    assert h["source"] == "unit" and len(h["sha256"]) == 64 and h["teacher"]["name"] == "unit-teacher"
    assert (tmp_path / "a.store" / FEATURES).stat().st_size < 37 * 12 * 2 + 256  # float16 on disk
    assert h["checksums"] == {"algo": "sha256", "chunk_bytes": store_mod.CHECK_CHUNK, "chunks": [h["sha256"]]}


def test_chunk_checksums_name_the_damaged_range(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import hashlib

    monkeypatch.setattr(store_mod, "CHECK_CHUNK", 256)
    _write(tmp_path / "a.store", np.ones((37, 12), dtype=np.float32))
    fp = tmp_path / "a.store" / FEATURES
    raw = bytearray(fp.read_bytes())
    h = json.loads((tmp_path / "a.store" / "header.json").read_text())
    want = [hashlib.sha256(raw[a:a + 256]).hexdigest() for a in range(0, len(raw), 256)]  # slow reference
    assert h["checksums"]["chunk_bytes"] == 256 and h["checksums"]["chunks"] == want and len(want) == 4
    assert h["sha256"] == hashlib.sha256(raw).hexdigest()
    raw[600] ^= 0x01
    fp.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match="fails its checksum in bytes 512…768") as e:
        FeatureStore.open(tmp_path / "a.store")
    _one_line(e)


def test_float32_store_is_exact(tmp_path: Path) -> None:
    x = np.random.default_rng(1).standard_normal((5, 3)).astype(np.float32)
    s = _write(tmp_path / "f.store", x, dtype="float32")
    assert s.dtype == "float32" and np.array_equal(s.rows(np.arange(5)).numpy(), x)


def test_exception_inside_writer_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        with FeatureStore.create(tmp_path / "a.store", _ids(4), 3, "t", "text") as w:
            w.write(0, np.ones((2, 3)))
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(StoreError) as e:  # rows never written: refused, never zero-filled
        with FeatureStore.create(tmp_path / "b.store", _ids(4), 3, "t", "text") as w:
            w.write(0, np.ones((3, 3)))
    assert "1 of 4 rows were never written" in _one_line(e) and "img003" in str(e.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bad, what", [(np.nan, "non-finite"), (np.inf, "non-finite"), (1e6, "exceeds the float16")])
def test_writer_refuses_bad_values_naming_the_id(tmp_path: Path, bad: float, what: str) -> None:
    x = np.zeros((4, 3), dtype=np.float32)
    x[2, 1] = bad
    with pytest.raises(StoreError) as e:
        with FeatureStore.create(tmp_path / "a.store", _ids(4), 3, "t", "image") as w:
            w.write(0, x)
    assert what in _one_line(e) and "'img002'" in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_writer_input_checks(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="duplicate id 'a'"):
        FeatureStore.create(tmp_path / "a.store", ["a", "b", "a"], 3, "t", "image")
    with pytest.raises(StoreError, match="kind"):
        FeatureStore.create(tmp_path / "a.store", ["a"], 3, "t", "audio")
    with FeatureStore.create(tmp_path / "a.store", ["a", "b"], 3, "t", "image") as w:
        with pytest.raises(StoreError, match="do not match the store dimension 3"):
            w.write(0, np.zeros((2, 4)))
        w.write(0, np.zeros((2, 3)))
    with pytest.raises(StoreError, match="already exists"):
        FeatureStore.create(tmp_path / "a.store", ["a"], 3, "t", "image")
    with FeatureStore.create(tmp_path / "a.store", ["c"], 2, "t2", "image", overwrite=True) as w:
        w.write(0, np.ones((1, 2)))
    assert FeatureStore.open(tmp_path / "a.store").ids == ["c"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.store"]


def test_ids_kind_dim_mismatch(tmp_path: Path) -> None:
    x = np.ones((6, 4), dtype=np.float32)
    _write(tmp_path / "a.store", x)
    with pytest.raises(StoreError) as e:
        FeatureStore.open(tmp_path / "a.store", expect_ids=["img001", "zz9", "img002", "zz8"])
    msg = _one_line(e)
    assert "2 of 4 ids" in msg and "first missing: 'zz9'" in msg and "a.store" in msg
    with pytest.raises(StoreError, match="dimension 4.*but 8 is configured"):
        FeatureStore.open(tmp_path / "a.store", expect_dim=8)
    with pytest.raises(StoreError, match="holds image features, expected text"):
        FeatureStore.open(tmp_path / "a.store", expect_kind="text")
    with pytest.raises(StoreError, match="no feature store at"):
        FeatureStore.open(tmp_path / "missing.store")


def test_superset_store_and_dataset_ids(tmp_path: Path) -> None:
    x = np.arange(10 * 2, dtype=np.float32).reshape(10, 2)
    caps = [f"c{i}" for i in range(10)]
    _write(tmp_path / "t.store", x, caps, kind="text")
    recs = [ImageRecord("i1", tmp_path / "1.jpg", [Caption("c7", "a"), Caption("c2", "b")]),
            ImageRecord("i2", tmp_path / "2.jpg", [Caption("c5", "c")])]
    ds = Dataset(recs, name="small")
    s = FeatureStore.open(tmp_path / "t.store", dataset=ds, expect_kind="text")
    assert np.array_equal(s.lookup(ds.caption_ids).numpy(), x[[7, 2, 5]])
    recs.append(ImageRecord("i3", tmp_path / "3.jpg", [Caption("new", "d")]))
    with pytest.raises(StoreError, match="'new'.*re-run 'itrkit teach'"):
        FeatureStore.open(tmp_path / "t.store", dataset=Dataset(recs, name="bigger"))


def test_unknown_id_and_row(tmp_path: Path) -> None:
    s = _write(tmp_path / "a.store", np.ones((3, 2), dtype=np.float32), ["x", "ü-id", "y"])
    assert np.array_equal(s.index_for(["ü-id"]), [1])
    with pytest.raises(StoreError) as e:
        s.lookup(["x", "nope"])
    assert "'nope'" in _one_line(e)
    with pytest.raises(StoreError, match="'a-much-longer-id-than-any-stored'"):
        s.index_for(["a-much-longer-id-than-any-stored"])
    with pytest.raises(StoreError, match="row 3 out of range"):
        s.rows([0, 3])


def test_truncated_or_padded_features(tmp_path: Path) -> None:
    _write(tmp_path / "a.store", np.ones((8, 4), dtype=np.float32))
    fp = tmp_path / "a.store" / FEATURES
    data = fp.read_bytes()
    fp.write_bytes(data[:-10])
    with pytest.raises(StoreError) as e:
        FeatureStore.open(tmp_path / "a.store")
    assert "truncated" in _one_line(e) and str(fp) in str(e.value)
    fp.write_bytes(data + b"\0" * 8)
    with pytest.raises(StoreError, match="trailing bytes"):
        FeatureStore.open(tmp_path / "a.store")
    fp.write_bytes(b"garbage")
    with pytest.raises(StoreError, match="not a readable .npy"):
        FeatureStore.open(tmp_path / "a.store")


def test_nan_inside_the_file_is_caught(tmp_path: Path) -> None:
    x = np.ones((5, 4), dtype=np.float32)
    _write(tmp_path / "a.store", x)
    fp = tmp_path / "a.store" / FEATURES
    raw = bytearray(fp.read_bytes())
    offset = len(raw) - 5 * 4 * 2
    raw[offset + (3 * 4 + 2) * 2: offset + (3 * 4 + 2) * 2 + 2] = np.float16(np.nan).tobytes()
    fp.write_bytes(bytes(raw))
    with pytest.raises(StoreError) as e:  # the default open verifies the payload checksum...
        FeatureStore.open(tmp_path / "a.store")
    assert "fails its checksum in bytes 0…" in _one_line(e) and str(fp) in str(e.value)
    s = FeatureStore.open(tmp_path / "a.store", verify=False)  # ...an open without it does not scan...
    assert s.rows([0, 1]).shape == (2, 4)
    with pytest.raises(StoreError) as e:  # ...but no read can return the damaged row
        s.lookup(["img000", "img003"])
    assert "non-finite" in _one_line(e) and "'img003'" in str(e.value)
    with pytest.raises(StoreError, match="'img003' \\(row 3\\)"):
        FeatureStore.open(tmp_path / "a.store", check_finite=True, verify=False)
    with pytest.raises(StoreError, match="fails its checksum"):
        s.verify()


@pytest.mark.parametrize("damage, match", [
    (lambda d: (d / "header.json").write_text("{not json"), "damaged header"),
    (lambda d: (d / "header.json").write_text(json.dumps({"format": "other/9"})), "unknown store format"),
    (lambda d: _edit_header(d, dim="12"), "invalid key 'dim'"),
    (lambda d: _edit_header(d, dim=5), "holds float16"),
    (lambda d: (d / "header.json").unlink(), "header.json is missing"),
    (lambda d: (d / "ids.json").write_text(json.dumps(["a", "b", "c"])), "does not match the ids fingerprint"),
    (lambda d: (d / "ids.json").write_text(json.dumps(["a"])), "lists 1 ids but the header says 3"),
    (lambda d: (d / FEATURES).unlink(), "features.npy is missing"),
])
def test_damaged_store_parts(tmp_path: Path, damage, match: str) -> None:
    _write(tmp_path / "a.store", np.ones((3, 4), dtype=np.float32))
    damage(tmp_path / "a.store")
    with pytest.raises(StoreError, match=match) as e:
        FeatureStore.open(tmp_path / "a.store")
    _one_line(e)


def _edit_header(d: Path, **kv) -> None:
    h = json.loads((d / "header.json").read_text())
    h.update(kv)
    (d / "header.json").write_text(json.dumps(h))


def test_reads_are_o_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    n, dim = 2000, 64
    x = np.random.default_rng(2).standard_normal((n, dim)).astype(np.float32)
    ids = _ids(n)
    _write(tmp_path / "a.store", x, ids)
    calls: list[int] = []
    real = store_mod.os.preadv

    def counting(fd, buffers, offset):
        got = real(fd, buffers, offset)
        calls.append(got)
        return got

    monkeypatch.setattr(store_mod.os, "preadv", counting)
    s = FeatureStore.open(tmp_path / "a.store", expect_ids=ids[:10])
    assert calls == []  # opening reads no rows
    out = s.lookup([ids[1500], ids[3], ids[4], ids[5], ids[1500]])
    assert sum(calls) == 4 * dim * 2  # exactly the distinct rows asked for, nothing else
    assert len(calls) == 2  # rows 3-5 are one run, row 1500 another
    assert np.array_equal(out.numpy(), x[[1500, 3, 4, 5, 1500]].astype(np.float16).astype(np.float32))
    assert isinstance(s.features, np.memmap) and s.features.shape == (n, dim)  # array view stays lazy
    blob = pickle.dumps(s)  # data-loader workers get the path and id index, not the rows
    assert len(blob) < n * dim * 2 / 4
    s2 = pickle.loads(blob)
    assert np.array_equal(s2.lookup([ids[9]]).numpy(), s.lookup([ids[9]]).numpy())
