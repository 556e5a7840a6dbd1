"""Reports on a tiny dataset of real PNG files: table, t-SNE PNG, retrieval page consistent with R@5;
items people judged relevant framed amber (Flickr8k human judgments)."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
from PIL import Image

from itrkit.data.records import Caption, Dataset, ImageRecord
from itrkit.errors import DataError
from itrkit.eval.flickr8k_human import CROWDFLOWER_FILE, EXPERT_FILE
from itrkit.eval.report import ReportRun, write_report, write_retrievals_html
from itrkit.eval.report_cli import human_judged
from itrkit.eval.retrieval import evaluate_retrieval

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "cyan", "black"]


class _Page(HTMLParser):
    """Collects query sections (direction, [hit/miss of each result]) and image sources."""

    def __init__(self) -> None:
        super().__init__()
        self.sections: list[tuple[str, list[str]]] = []
        self.srcs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        cls = (a.get("class") or "").split()
        if tag == "section" and "query" in cls:
            self.sections.append(("t2i" if "t2i" in cls else "i2t", []))
        elif tag == "div" and "item" in cls:
            self.sections[-1][1].append(next((c for c in ("hit", "judged", "miss") if c in cls), "?"))
        elif tag == "img":
            self.srcs.append(a["src"])


def _dataset(tmp_path: Path, n: int = 8, caps: int = 2) -> Dataset:
    img_dir = tmp_path / "data" / "images"
    img_dir.mkdir(parents=True)
    recs = []
    for i in range(n):
        p = img_dir / f"img {i}.png"  # a space: the page must URL-quote paths
        Image.new("RGB", (48, 40), COLOURS[i % len(COLOURS)]).save(p)
        recs.append(ImageRecord(f"im{i}", p, [Caption(f"c{i}_{k}", f"a {COLOURS[i % 8]} square, take {k} <b>")
                                                for k in range(caps)], split="test"))
    return Dataset(recs, name="squares")


def _embeddings(ds: Dataset, seed: int, noise: float) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    img = rng.normal(size=(len(ds), 12))
    txt = img[ds.txt2img] + noise * rng.normal(size=(len(ds.captions), 12))
    return img, txt


def test_report_files_and_page_agree_with_r_at_5(tmp_path: Path) -> None:
    ds = _dataset(tmp_path)
    runs = []
    for name, seed, noise in (("InfoNCE (seed 0)", 0, 1.6), ("CUSA/seed 0", 1, 0.9)):
        img, txt = _embeddings(ds, seed, noise)
        runs.append(ReportRun(name, evaluate_retrieval(img, txt, ds.txt2img), img, txt, ds))
    out = tmp_path / "reports" / "r1"
    files = write_report(runs, out)
    assert set(files) == {"report", "metrics", "tsne_InfoNCE_seed_0", "retrievals_InfoNCE_seed_0",
                          "tsne_CUSA_seed_0", "retrievals_CUSA_seed_0"}
    assert json.loads(files["metrics"].read_text()) == {r.name: r.metrics for r in runs}
    md = files["report"].read_text()
    assert "| run" in md and "rsum" in md and "(retrievals_CUSA_seed_0.html)" in md and "![t-SNE" in md
    assert f"{runs[1].metrics['rsum']:.1f}" in md
    for r, key in zip(runs, ("InfoNCE_seed_0", "CUSA_seed_0")):
        with Image.open(files[f"tsne_{key}"]) as im:
            im.load()
            assert im.format == "PNG" and im.size[0] > 400
        page = _Page()
        page.feed(files[f"retrievals_{key}"].read_text())
        t2i = [hits for d, hits in page.sections if d == "t2i"]
        i2t = [hits for d, hits in page.sections if d == "i2t"]
        assert len(t2i) == 16 and len(i2t) == 8 and all(len(h) == 5 for h in t2i + i2t)
        # every query is shown, so the share of queries with a green item is R@5
        assert 100 * np.mean(["hit" in h for h in t2i]) == pytest.approx(r.metrics["t2i_R@5"])
        assert 100 * np.mean(["hit" in h for h in i2t]) == pytest.approx(r.metrics["i2t_R@5"])
        assert sum(h.count("hit") for h in t2i) == sum("hit" in h for h in t2i)  # one true image per caption
        assert 0 < sum(h.count("miss") for h in t2i + i2t)
        # images are linked relative to the page and resolve to the PNG files
        assert page.srcs and all((out / unquote(s)).resolve().is_file() for s in page.srcs)
    assert "&lt;b&gt;" in files["retrievals_CUSA_seed_0"].read_text()  # captions escaped


def test_embedded_thumbnails_and_missing_images(tmp_path: Path) -> None:
    ds = _dataset(tmp_path, n=5, caps=1)
    ds.records[2].path.unlink()
    img, txt = _embeddings(ds, 2, 0.5)
    files = write_report([ReportRun("run", {}, img, txt, ds)], tmp_path / "rep", embed_images=True)
    text = files["retrievals_run"].read_text()
    page = _Page()
    page.feed(text)
    assert page.srcs and all(s.startswith("data:image/jpeg;base64,") for s in page.srcs)
    assert "image not found" in text
    assert "rsum" in json.loads(files["metrics"].read_text())["run"]  # metrics computed when not given


def test_bad_runs(tmp_path: Path) -> None:
    ds = _dataset(tmp_path, n=4, caps=1)
    img, txt = _embeddings(ds, 0, 0.5)
    with pytest.raises(DataError, match="3 image / 4 text embeddings for 4 images"):
        write_report([ReportRun("a", {}, img[:3], txt, ds)], tmp_path / "x")
    with pytest.raises(DataError, match="share the file name 'a_b'"):
        write_report([ReportRun("a b", {}, img, txt, ds), ReportRun("a/b", {}, img, txt, ds)], tmp_path / "x")


def _expected_frames(img: np.ndarray, txt: np.ndarray, t2i: np.ndarray, judged: set) -> list[tuple[str, list[str]]]:
    """Every query's top-5 frames, by (cosine desc, index asc), written out (all queries are shown)."""
    img = img / np.linalg.norm(img, axis=1, keepdims=True)
    txt = txt / np.linalg.norm(txt, axis=1, keepdims=True)
    out = []
    for q in range(len(txt)):
        s = (img @ txt[q]).astype(np.float32)
        top = sorted(range(len(img)), key=lambda i: (-s[i], i))[:5]
        out.append(("t2i", ["hit" if i == t2i[q] else "judged" if (i, q) in judged else "miss" for i in top]))
    for q in range(len(img)):
        s = (txt @ img[q]).astype(np.float32)
        top = sorted(range(len(txt)), key=lambda c: (-s[c], c))[:5]
        out.append(("i2t", ["hit" if t2i[c] == q else "judged" if (q, c) in judged else "miss" for c in top]))
    return out


def test_items_people_judged_relevant_are_framed_amber_with_a_legend(tmp_path: Path) -> None:
    ds = _dataset(tmp_path)
    img, txt = _embeddings(ds, 3, 1.2)
    # judged relevant: every caption of the next image (and one pair of an image with its own caption,
    # which must stay green)
    judged = {(i, int(c)) for i in range(len(ds)) for c in np.flatnonzero(ds.txt2img == (i + 1) % len(ds))}
    judged.add((0, 0))
    path = write_retrievals_html(ReportRun("r", {}, img, txt, ds, judged=judged), tmp_path / "p.html")
    page = _Page()
    text = path.read_text()
    page.feed(text)
    want = _expected_frames(img, txt, ds.txt2img, judged)
    assert page.sections == want
    assert any("judged" in h for _, h in want) and any("miss" in h for _, h in want)  # all three frames occur
    assert 'class="key judged"' in text and f"judged relevant by people ({len(judged)} such pairs)" in text
    plain = write_retrievals_html(ReportRun("r", {}, img, txt, ds), tmp_path / "q.html").read_text()
    page = _Page()
    page.feed(plain)
    assert page.sections == _expected_frames(img, txt, ds.txt2img, set())  # without judgments: green / red
    assert 'class="key judged"' not in plain and 'class="key miss"' in plain


def test_human_judged_reads_the_flickr8k_files_beside_the_images(tmp_path: Path) -> None:
    ds = Dataset([ImageRecord(s, tmp_path / "images" / f"{s}.jpg", [Caption(f"{s}.jpg#{k}", "x") for k in range(2)],
                              split="test") for s in ("a", "b")], name="f8k", validate=False)
    assert human_judged(ds, "auto") is None  # no annotation files: nothing to frame
    assert human_judged(ds, "none") is None
    with pytest.raises(DataError, match=f"{EXPERT_FILE}: Flickr8k expert annotation file not found"):
        human_judged(ds, tmp_path)
    (tmp_path / EXPERT_FILE).write_text("a.jpg\tb.jpg#1\t3\t3\t3\nb.jpg\ta.jpg#0\t1\t1\t3\na.jpg\ta.jpg#0\t4\t4\t4\n")
    (tmp_path / CROWDFLOWER_FILE).write_text("b.jpg\ta.jpg#1\t0.5\t1\t1\n")
    # expert mean 3 and CrowdFlower half yes are relevant; the own pair is a hit, not a judged item
    assert human_judged(ds, "auto") == human_judged(ds, tmp_path) == {(0, 3), (1, 1)}


def test_human_judged_on_the_real_test_split(shared_data: Path) -> None:
    from itrkit.data.formats import load_flickr8k

    root = shared_data / "flickr8k"
    ds = load_flickr8k(root).split("test")
    got = human_judged(ds, "auto")
    row = {Path(p).name: i for i, p in enumerate(ds.image_paths)}
    col = {c: m for m, c in enumerate(ds.caption_ids)}
    want = set()
    for line in (root / EXPERT_FILE).read_text().splitlines():
        im, cap, *sc = line.split("\t")
        if cap.split("#")[0] != im and sum(map(int, sc)) / 3 >= 3:
            want.add((row[im], col[cap]))
    for line in (root / CROWDFLOWER_FILE).read_text().splitlines():
        im, cap, pct, _, _ = line.split("\t")
        if cap.split("#")[0] != im and float(pct) >= 0.5:
            want.add((row[im], col[cap]))
    assert got == want and len(want) > 1000
