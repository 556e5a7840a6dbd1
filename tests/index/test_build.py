"""Index folders: what is written, what is read back, and what is refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file, save_file

from itrkit.data.records import Caption, Dataset, ImageRecord
from itrkit.errors import DataError, ItrkitError, StoreError
from itrkit.index.build import FORMAT, Encoder, build_index, dataset_from_source, load_index


def test_colour_encoder_implements_the_protocol(colour_encoder) -> None:
    assert isinstance(colour_encoder, Encoder)


def test_build_writes_manifest_embeddings_and_items(colour_index: Path, colour_dataset: Dataset,
                                                    colour_encoder, tmp_path: Path) -> None:
    names = sorted(p.name for p in colour_index.iterdir())
    assert names == ["captions.safetensors", "images.safetensors", "items.json", "manifest.json"]
    manifest = json.loads((colour_index / "manifest.json").read_text())
    assert manifest["format"] == FORMAT
    assert manifest["model_fingerprint"] == colour_encoder.fingerprint()
    assert manifest["run_dir"] == str((tmp_path / "run").resolve())
    assert manifest["backend"] == "exact" and manifest["dim"] == 32 and manifest["uni_dim"] == 27
    assert manifest["counts"] == {"images": 8, "captions": 16}
    assert manifest["dataset"] == "colours" and manifest["created"]

    images = load_file(str(colour_index / "images.safetensors"))
    captions = load_file(str(colour_index / "captions.safetensors"))
    # The stored embeddings are the encoder's outputs for the same inputs, in dataset order.
    np.testing.assert_allclose(images["image_embeds"], colour_encoder.encode_images(colour_dataset.image_paths))
    np.testing.assert_allclose(images["image_uni"], colour_encoder.encode_images_uni(colour_dataset.image_paths))
    np.testing.assert_allclose(captions["text_embeds"], colour_encoder.encode_texts(colour_dataset.texts))

    items = json.loads((colour_index / "items.json").read_text())
    assert items["image_ids"] == colour_dataset.image_ids
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in items["image_paths"])
    assert items["captions"][6] == [{"id": "red-white#0", "text": "red and white stripes"},
                                    {"id": "red-white#1", "text": "a striped flag"}]
    assert items["caption_image"] == [i for i in range(8) for _ in range(2)]


def test_reader_round_trip(colour_index: Path, colour_dataset: Dataset) -> None:
    index = load_index(colour_index)
    assert len(index) == 8 and index.has_uni and index.backend == "exact"
    assert index.image_ids == colour_dataset.image_ids
    assert [c.text for c in index.caption_list] == colour_dataset.texts
    assert index.image_path("blue") == colour_dataset[2].path.resolve()
    with pytest.raises(DataError, match="unknown image id '../etc/passwd'"):
        index.image_path("../etc/passwd")


@pytest.mark.parametrize("backend", ["faiss-flat", "faiss-hnsw"])
def test_faiss_backends_write_their_files_and_answer_like_exact(tmp_path: Path, colour_dataset: Dataset,
                                                                colour_encoder,
                                                                backend: str) -> None:
    exact = load_index(build_index(colour_encoder, colour_dataset, tmp_path / "exact", progress=False))
    out = build_index(colour_encoder, colour_dataset, tmp_path / backend, backend=backend, progress=False,
                      hnsw_m=8, ef_construction=32, ef_search=32)
    assert {p.name for p in out.glob("*.faiss")} == {"image_embeds.faiss", "image_uni.faiss", "text_embeds.faiss"}
    index = load_index(out)
    assert index.backend == backend
    q = colour_encoder.encode_texts(["red", "stripes of blue and black"])
    s_exact, _ = exact.image_index.search(q, 8)
    s_faiss, _ = index.image_index.search(q, 8)
    # 8 images: HNSW visits them all, so the scores equal the exact ones.
    np.testing.assert_allclose(s_faiss, s_exact, atol=1e-6)


def test_no_uni_head_means_no_image_uni(tmp_path: Path, colour_dataset: Dataset, make_encoder) -> None:
    out = build_index(make_encoder(with_uni=False), colour_dataset, tmp_path / "ix", progress=False)
    assert "image_uni" not in load_file(str(out / "images.safetensors"))
    index = load_index(out)
    assert not index.has_uni and index.manifest["uni_dim"] is None


def test_existing_folder_needs_overwrite(colour_index: Path, colour_dataset: Dataset,
                                         colour_encoder) -> None:
    with pytest.raises(StoreError, match="already exists"):
        build_index(colour_encoder, colour_dataset, colour_index, progress=False)
    before = (colour_index / "manifest.json").read_text()
    build_index(colour_encoder, colour_dataset.subset(3), colour_index, overwrite=True, progress=False)
    assert load_index(colour_index).manifest["counts"]["images"] == 3
    assert (colour_index / "manifest.json").read_text() != before


def test_missing_image_file_is_named_and_nothing_is_written(tmp_path: Path, colour_dataset: Dataset,
                                                            colour_encoder) -> None:
    colour_dataset[4].path.unlink()
    with pytest.raises(DataError, match="purple.png"):
        build_index(colour_encoder, colour_dataset, tmp_path / "ix", progress=False)
    assert not (tmp_path / "ix").exists()


def test_encoder_failure_leaves_no_folder(tmp_path: Path, colour_dataset: Dataset, make_encoder) -> None:
    class Broken(make_encoder):
        def encode_texts(self, texts):
            out = super().encode_texts(texts)
            out[1, 0] = np.nan
            return out

    with pytest.raises(DataError, match="non-finite caption embeddings for 'red#1'"):
        build_index(Broken(), colour_dataset, tmp_path / "ix", progress=False)
    assert not any(tmp_path.glob("*ix*"))


def reseal(folder: Path) -> None:
    """Record the files' current sizes and hashes in the manifest, as a build would have."""
    from itrkit.index.build import _manifest_digest
    from itrkit.utils.io import sha256_file

    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"] = {f.name: {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
                         for f in sorted(folder.iterdir()) if f.is_file() and f.name != "manifest.json"}
    manifest["manifest_sha256"] = _manifest_digest(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_damaged_index_is_a_store_error(colour_index: Path) -> None:
    (colour_index / "items.json").write_text("{not json")
    with pytest.raises(StoreError, match="items.json: 9 bytes, the manifest records"):
        load_index(colour_index)
    reseal(colour_index)  # even with matching checksums, the JSON itself is checked
    with pytest.raises(StoreError, match="items.json: not valid JSON"):
        load_index(colour_index)


def test_embeddings_that_do_not_match_items_are_refused(colour_index: Path) -> None:
    images = load_file(str(colour_index / "images.safetensors"))
    save_file({"image_embeds": images["image_embeds"][:5]}, str(colour_index / "images.safetensors"))
    reseal(colour_index)  # past the checksums: the shapes are checked too
    with pytest.raises(StoreError, match="do not match 8 images"):
        load_index(colour_index)


def test_manifest_records_every_file_and_the_data(colour_index: Path, colour_dataset: Dataset) -> None:
    import hashlib

    manifest = json.loads((colour_index / "manifest.json").read_text())
    on_disk = {p.name for p in colour_index.iterdir()} - {"manifest.json"}
    assert set(manifest["files"]) == on_disk
    for name, rec in manifest["files"].items():
        data = (colour_index / name).read_bytes()
        assert rec == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    items = json.loads((colour_index / "items.json").read_text())
    assert items["image_sha256"] == [hashlib.sha256(p.read_bytes()).hexdigest() for p in colour_dataset.image_paths]
    # The data fingerprint changes with the bytes of one image, not with where the images live.
    index = load_index(colour_index)
    assert len(index.data_fingerprint) == 16


def test_data_fingerprint_follows_image_bytes_not_paths(tmp_path: Path, colour_dataset: Dataset,
                                                        colour_encoder) -> None:
    import shutil

    a = load_index(build_index(colour_encoder, colour_dataset, tmp_path / "a", progress=False))
    moved = tmp_path / "moved"
    shutil.copytree(colour_dataset[0].path.parent, moved)
    ds_moved = Dataset([ImageRecord(r.id, moved / r.path.name, r.captions, split=r.split)
                        for r in colour_dataset], name="colours")
    b = load_index(build_index(colour_encoder, ds_moved, tmp_path / "b", progress=False))
    assert a.data_fingerprint == b.data_fingerprint
    Image.new("RGB", (48, 48), (221, 30, 30)).save(moved / "red.png")  # one pixel value off
    c = load_index(build_index(colour_encoder, ds_moved, tmp_path / "c", progress=False))
    assert c.data_fingerprint != a.data_fingerprint


def test_an_index_without_checksums_is_refused_with_a_hint(colour_index: Path) -> None:
    manifest = json.loads((colour_index / "manifest.json").read_text())
    manifest["format"] = "itrkit-index/1"
    (colour_index / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="manifest.json: index format itrkit-index/1 has no checksums; rebuild"):
        load_index(colour_index)


def test_not_an_index(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="manifest.json is missing"):
        load_index(tmp_path)


def test_fingerprint_mismatch(colour_index: Path, make_encoder) -> None:
    index = load_index(colour_index)
    index.check_encoder(make_encoder())
    with pytest.raises(StoreError, match="built with model"):
        index.check_encoder(make_encoder(salt="retrained"))


def test_dataset_from_source(tmp_path: Path, colour_dataset: Dataset) -> None:
    # A prepared dataset folder, with or without a split.
    colour_dataset.save(tmp_path / "prepared")
    assert dataset_from_source(tmp_path / "prepared").image_ids == colour_dataset.image_ids
    assert len(dataset_from_source(tmp_path / "prepared", split="test")) == 8
    # A plain folder of images: ids are relative paths, no captions.
    (tmp_path / "images" / "sub").mkdir()
    (tmp_path / "images" / "notes.txt").write_text("not an image")
    (tmp_path / "images" / "red.png").rename(tmp_path / "images" / "sub" / "red.png")
    ds = dataset_from_source(tmp_path / "images")
    assert "sub/red.png" in ds.image_ids and len(ds) == 8 and ds.captions == []
    with pytest.raises(DataError, match="no splits"):
        dataset_from_source(tmp_path / "images", split="test")
    with pytest.raises(DataError, match="not found"):
        dataset_from_source(tmp_path / "nowhere")


def test_plain_folder_index_has_no_captions(tmp_path: Path, colour_dataset: Dataset,
                                            colour_encoder) -> None:
    ds = dataset_from_source(colour_dataset[0].path.parent)
    index = load_index(build_index(colour_encoder, ds, tmp_path / "ix", progress=False))
    assert index.text_embeds.shape == (0, 32) and index.caption_list == []


def test_empty_dataset_is_refused(tmp_path: Path, colour_encoder) -> None:
    with pytest.raises(ItrkitError, match="no images"):
        build_index(colour_encoder, Dataset([], name="empty"), tmp_path / "ix", progress=False)
    rec = ImageRecord("x", tmp_path / "x.png", [Caption("c", "text")])
    with pytest.raises(DataError, match="image file not found"):
        build_index(colour_encoder, Dataset([rec]), tmp_path / "ix", progress=False)
