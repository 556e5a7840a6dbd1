"""Text and image search over a real (tiny) index, checked against explicit loops."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from itrkit.errors import StoreError
from itrkit.index.build import build_index, load_index
from itrkit.index.search import (
    MAX_QUERY_CHARS,
    ImageTooLargeError,
    NotAnImageError,
    QueryError,
    format_results,
    open_image,
    search_image,
    search_text,
)


def loop_ranking(query: np.ndarray, gallery: np.ndarray) -> list[tuple[int, float]]:
    scored = []
    for j in range(len(gallery)):
        s = 0.0
        for a, b in zip(query.tolist(), gallery[j].tolist()):
            s += a * b
        scored.append((-s, j))
    scored.sort()
    return [(j, -s) for s, j in scored]


def test_text_search_finds_colours(colour_index: Path, colour_encoder) -> None:
    index = load_index(colour_index)
    res = search_text(index, colour_encoder, "a red square", k=3)
    assert [r["id"] for r in res[:2]] == ["red", "red-white"]
    assert res[0]["url"] == "/images/red"
    assert res[0]["captions"] == ["a red square", "a plain red picture"]
    assert Path(res[0]["path"]).name == "red.png"
    assert search_text(index, colour_encoder, "blue", k=1)[0]["id"] == "blue"
    assert search_text(index, colour_encoder, "purple paint", k=1)[0]["id"] == "purple"


def test_text_search_scores_match_loop_reference(colour_index: Path, colour_dataset, colour_encoder) -> None:
    index = load_index(colour_index)
    gallery = colour_encoder.encode_images(colour_dataset.image_paths)
    for text in ("yellow", "stripes of blue and black", "white"):
        query = colour_encoder.encode_texts([text])[0]
        ref = loop_ranking(query, gallery)[:5]
        res = search_text(index, colour_encoder, text, k=5)
        assert [r["id"] for r in res] == [colour_dataset.image_ids[j] for j, _ in ref]
        np.testing.assert_allclose([r["score"] for r in res], [s for _, s in ref], atol=1e-6)


def test_image_search_uses_the_usa_head(colour_index: Path, colour_dataset, colour_encoder) -> None:
    index = load_index(colour_index)
    photo = colour_dataset[7].path  # blue/black stripes
    res = search_image(index, colour_encoder, photo, k=8, mode="image")
    gallery = colour_encoder.encode_images_uni(colour_dataset.image_paths)
    ref = loop_ranking(colour_encoder.encode_images_uni([photo])[0], gallery)
    assert [r["id"] for r in res] == [colour_dataset.image_ids[j] for j, _ in ref]
    assert res[0]["id"] == "blue-black" and res[0]["score"] == pytest.approx(1.0, abs=1e-6)
    # A PIL image and raw PNG bytes give the same answer as the path.
    pil = Image.open(photo)
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    assert [r["id"] for r in search_image(index, colour_encoder, pil, k=8)] == [r["id"] for r in res]
    assert [r["id"] for r in search_image(index, colour_encoder, buf.getvalue(), k=8)] == [r["id"] for r in res]


def test_image_to_caption_search(colour_index: Path, colour_dataset, colour_encoder) -> None:
    index = load_index(colour_index)
    img = Image.new("RGB", (30, 30), (235, 215, 50))  # a yellow photo not in the index
    res = search_image(index, colour_encoder, img, k=4, mode="caption")
    captions = colour_encoder.encode_texts(colour_dataset.texts)
    ref = loop_ranking(colour_encoder.encode_images([img])[0], captions)[:4]
    assert [r["caption_id"] for r in res] == [colour_dataset.caption_ids[j] for j, _ in ref]
    assert res[0]["id"] == "yellow" and "yellow" in res[0]["text"]
    assert res[0]["captions"] == [res[0]["text"]]
    np.testing.assert_allclose([r["score"] for r in res], [s for _, s in ref], atol=1e-6)


def test_image_search_without_usa_head(tmp_path: Path, colour_dataset, make_encoder) -> None:
    enc = make_encoder(with_uni=False)
    index = load_index(build_index(enc, colour_dataset, tmp_path / "ix", progress=False))
    with pytest.raises(QueryError, match="no USA head"):
        search_image(index, enc, colour_dataset[0].path, k=3, mode="image")
    assert search_image(index, enc, colour_dataset[0].path, k=1, mode="caption")[0]["id"] == "red"


@pytest.mark.parametrize("text,match", [("", "empty"), ("   ", "empty"), ("x" * (MAX_QUERY_CHARS + 1), "too long")])
def test_bad_text_queries(colour_index: Path, colour_encoder, text: str, match: str) -> None:
    with pytest.raises(QueryError, match=match):
        search_text(load_index(colour_index), colour_encoder, text, k=3)


def test_bad_k_and_mode(colour_index: Path, colour_encoder, colour_dataset) -> None:
    index = load_index(colour_index)
    with pytest.raises(QueryError, match="k must be between"):
        search_text(index, colour_encoder, "red", k=0)
    with pytest.raises(QueryError, match="unknown image search mode"):
        search_image(index, colour_encoder, colour_dataset[0].path, k=1, mode="sound")
    # k beyond the index size returns every image once.
    assert len(search_text(index, colour_encoder, "red", k=1000)) == 8


def test_wrong_model_is_refused(colour_index: Path, make_encoder) -> None:
    with pytest.raises(StoreError, match="built with model"):
        search_text(load_index(colour_index), make_encoder(salt="other"), "red", k=3)


def test_open_image_refuses_non_images(tmp_path: Path) -> None:
    with pytest.raises(NotAnImageError, match="not a readable image"):
        open_image(b"hello, I am text")
    txt = tmp_path / "fake.png"
    txt.write_text("not really a png")
    with pytest.raises(NotAnImageError, match="fake.png"):
        open_image(txt)
    with pytest.raises(NotAnImageError, match="not found"):
        open_image(tmp_path / "absent.png")
    # A truncated PNG fails instead of decoding to grey.
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, format="PNG")
    with pytest.raises(NotAnImageError):
        open_image(buf.getvalue()[:60])


def test_open_image_refuses_huge_images(monkeypatch: pytest.MonkeyPatch) -> None:
    import itrkit.index.search as search_mod

    buf = io.BytesIO()
    Image.new("L", (100, 100)).save(buf, format="PNG")
    monkeypatch.setattr(search_mod, "MAX_PIXELS", 5000)
    with pytest.raises(ImageTooLargeError, match="100x100"):
        open_image(buf.getvalue())


def test_format_results(colour_index: Path, colour_encoder) -> None:
    res = search_text(load_index(colour_index), colour_encoder, "green", k=2)
    table = format_results(res, "table")
    lines = table.splitlines()
    assert lines[0].split() == ["rank", "score", "id", "caption"]
    assert lines[1].split()[:4] == ["1", f"{res[0]['score']:.4f}", "green", "a"]
    assert len(lines) == 3
    parsed = json.loads(format_results(res, "json"))
    assert parsed == {"results": res}
    assert format_results([], "table") == "no results"
    with pytest.raises(QueryError, match="unknown output format"):
        format_results(res, "xml")
