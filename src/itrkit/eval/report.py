"""Evaluation reports: metrics JSON, a Markdown table, t-SNE plots and top-k retrieval pages.

``write_report(runs, out_dir)`` writes, atomically:

- ``metrics.json``: ``{run name: metrics}``;
- ``report.md``: the runs' R@K / RSUM / MedR / MnR side by side, with links to the files below;
- ``tsne_<run>.png``: t-SNE of the images and captions of up to 30 image groups (an image and its
  captions share a colour; circles = images, crosses = captions), as the CUSA paper's Figure 4;
- ``retrievals_<run>.html``: for up to 20 caption queries their top-5 images and for up to 20
  image queries their top-5 captions, with scores; hits (the query's own image / caption) framed
  green, items people judged relevant (``ReportRun.judged``, e.g. the Flickr8k human judgments)
  amber, other misses red, with a legend. Images are
  linked by their path relative to the page (it opens from disk next to the data), or embedded
  as base64 thumbnails with ``embed_images=True`` or when no relative path exists.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import re
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from itrkit.data.records import Dataset
from itrkit.errors import DataError
from itrkit.eval.retrieval import evaluate_retrieval, l2_normalize, ranks, topk
from itrkit.eval.table import DEFAULT_KEYS, format_table
from itrkit.utils.io import atomic_path, atomic_write_json, atomic_write_text
from itrkit.utils.optional import require

TOP = 5


@dataclass
class ReportRun:
    """One evaluated model: ``img_emb[i]`` ↔ ``dataset.records[i]``, ``txt_emb[m]`` ↔ ``dataset.captions[m]``.

    ``metrics`` may be empty: :func:`evaluate_retrieval` is then run on the embeddings.
    ``judged``: (image index, caption index) pairs that people judged relevant although the
    caption is another image's (:func:`itrkit.eval.flickr8k_human.judged_pairs`); the retrieval
    page frames them amber instead of red. None: no human judgments.
    """

    name: str
    metrics: dict[str, float]
    img_emb: Any
    txt_emb: Any
    dataset: Dataset
    judged: Collection[tuple[int, int]] | None = None


def slug(name: str) -> str:
    """A file-name-safe form of a run name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "run"


def _spread(n: int, k: int) -> np.ndarray:
    """Up to ``k`` indices spread evenly over ``range(n)`` (deterministic)."""
    return np.unique(np.linspace(0, n - 1, num=min(k, n)).round().astype(int)) if n else np.zeros(0, int)


# --------------------------------------------------------------------------------------------
# t-SNE
# --------------------------------------------------------------------------------------------
def plot_tsne(img_emb: Any, txt_emb: Any, txt2img: np.ndarray, path: Path, title: str,
              max_groups: int = 30, seed: int = 0) -> Path:
    """t-SNE (scikit-learn, fixed seed) of up to ``max_groups`` images and all their captions."""
    require("matplotlib", "eval", "the report's t-SNE figures")
    require("sklearn", "eval", "the report's t-SNE figures")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from sklearn.manifold import TSNE

    img, txt = l2_normalize(img_emb).numpy(), l2_normalize(txt_emb).numpy()
    groups = _spread(len(img), max_groups)
    caps = np.flatnonzero(np.isin(txt2img, groups))
    points = np.concatenate([img[groups], txt[caps]]).astype(np.float64)
    colour_of = {g: i for i, g in enumerate(groups)}
    perplexity = float(max(1.0, min(30.0, (len(points) - 1) / 3)))
    xy = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(points)
    from matplotlib import colormaps

    palette = [colormaps["tab20"](i) for i in range(20)] + [colormaps["tab20b"](i) for i in range(20)]
    fig = Figure(figsize=(7.5, 6.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ci = [palette[colour_of[g] % len(palette)] for g in groups]
    ct = [palette[colour_of[int(txt2img[c])] % len(palette)] for c in caps]
    ax.scatter(xy[len(groups):, 0], xy[len(groups):, 1], c=ct, marker="x", s=28, linewidths=1.2, label="caption")
    ax.scatter(xy[:len(groups), 0], xy[:len(groups), 1], c=ci, marker="o", s=70, edgecolors="black",
               linewidths=0.8, label="image")
    ax.set_title(f"{title}\nt-SNE of {len(groups)} images (circles) and their {len(caps)} captions (crosses)",
                 fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    leg = ax.legend(loc="best", fontsize=8)
    for h in leg.legend_handles:
        h.set_color("grey")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


# --------------------------------------------------------------------------------------------
# HTML page of retrievals
# --------------------------------------------------------------------------------------------
_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.4em} h2{font-size:1.15em;margin-top:1.6em}
.query{border-top:1px solid #ccc;padding:.6em 0}
.q{margin-bottom:.4em} .q img{height:110px;vertical-align:middle;margin-right:.6em}
.results{display:flex;gap:.6em;flex-wrap:wrap}
.item{width:168px;padding:4px;border-radius:4px;font-size:.85em}
.item img{width:160px;height:160px;object-fit:cover;display:block}
.item.hit{border:4px solid #1a9c3a;background:#eef9f0}
.item.miss{border:4px solid #d0302b;background:#fdf0ef}
.item.judged{border:4px solid #e69500;background:#fff6e3}
.legend .key{display:inline-block;padding:0 .5em;margin-right:.6em;border-radius:3px}
.key.hit{border:3px solid #1a9c3a;background:#eef9f0} .key.miss{border:3px solid #d0302b;background:#fdf0ef}
.key.judged{border:3px solid #e69500;background:#fff6e3}
.item.text{width:200px}
.score{font-family:monospace;color:#555}
.missing{width:160px;height:160px;background:#eee;color:#a00;font-size:.75em;overflow:hidden;word-break:break-all}
"""


def _image_tag(path: Path, page_dir: Path, embed: bool) -> str:
    p = Path(path)
    if not p.is_file():
        return f'<div class="missing">image not found: {html.escape(str(p))}</div>'
    if not embed:
        try:
            rel = os.path.relpath(p.resolve(), page_dir.resolve())
        except ValueError:  # e.g. another drive on Windows: no relative path exists
            rel = None
        if rel is not None:
            return f'<img src="{quote(Path(rel).as_posix())}" alt="{html.escape(p.name)}" loading="lazy">'
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(p) as im:
            im = im.convert("RGB")
            im.thumbnail((256, 256))
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=85)
    except (OSError, UnidentifiedImageError):
        return f'<div class="missing">unreadable image: {html.escape(str(p))}</div>'
    return f'<img src="data:image/jpeg;base64,{base64.b64encode(buf.getvalue()).decode()}" alt="{html.escape(p.name)}">'


def _legend(judged: Collection[tuple[int, int]] | None) -> str:
    keys = ['<span class="key hit">the query\'s own image / caption</span>']
    if judged is not None:
        keys.append(f'<span class="key judged">another image\'s, judged relevant by people '
                    f'({len(judged)} such pairs)</span>')
    keys.append('<span class="key miss">' + ("neither" if judged is not None else "another image's") + "</span>")
    return f'<p class="legend">Frames: {"".join(keys)}</p>'


def write_retrievals_html(run: ReportRun, path: Path, n_queries: int = 20, top: int = TOP,
                          embed_images: bool = False) -> Path:
    """Top-``top`` images per caption query and captions per image query; hits green, items
    people judged relevant (``run.judged``) amber, other misses red."""
    ds = run.dataset
    judged = set() if run.judged is None else {(int(i), int(c)) for i, c in run.judged}

    def frame(i: int, c: int, own: bool) -> str:
        if own:
            return "hit"
        return "judged" if (i, c) in judged else "miss"

    texts, t2i = ds.texts, ds.txt2img
    img_paths = ds.image_paths
    i2t_rank, t2i_rank = ranks(run.img_emb, run.txt_emb, t2i)
    page_dir = Path(path).parent
    page_dir.mkdir(parents=True, exist_ok=True)
    thumbs: dict[int, str] = {}

    def thumb(i: int) -> str:
        if i not in thumbs:
            thumbs[i] = _image_tag(img_paths[i], page_dir, embed_images)
        return thumbs[i]

    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(run.name)}: retrievals</title>",
             f"<style>{_CSS}</style></head><body>",
             f"<h1>{html.escape(run.name)}: top-{top} retrievals</h1>",
             f"<p>{len(ds)} images, {len(texts)} captions ({html.escape(ds.name)}). "
             + ", ".join(f"{k} {run.metrics[k]:.1f}" for k in DEFAULT_KEYS[:7] if k in run.metrics) + "</p>",
             _legend(run.judged)]
    qs = _spread(len(texts), n_queries)
    img, txt = l2_normalize(run.img_emb), l2_normalize(run.txt_emb)
    scores, idx = topk(txt[qs], img, top, normalized=True)
    parts.append(f"<h2>Text → image ({len(qs)} caption queries)</h2>")
    for q, sc, ix in zip(qs, scores, idx):
        parts.append(f'<section class="query t2i"><div class="q">“{html.escape(texts[q])}” '
                     f'<span class="score">(its image ranks {int(t2i_rank[q]) + 1})</span></div><div class="results">')
        for s, i in zip(sc, ix):
            cls = frame(int(i), int(q), i == t2i[q])
            parts.append(f'<div class="item {cls}">{thumb(int(i))}<span class="score">{s:.3f}</span> '
                         f'{html.escape(ds.records[i].id)}</div>')
        parts.append("</div></section>")
    qs = _spread(len(ds), n_queries)
    scores, idx = topk(img[qs], txt, top, normalized=True)
    parts.append(f"<h2>Image → text ({len(qs)} image queries)</h2>")
    for q, sc, ix in zip(qs, scores, idx):
        parts.append(f'<section class="query i2t"><div class="q">{thumb(int(q))}{html.escape(ds.records[q].id)} '
                     f'<span class="score">(best own caption ranks {int(i2t_rank[q]) + 1})</span></div>'
                     f'<div class="results">')
        for s, c in zip(sc, ix):
            cls = frame(int(q), int(c), t2i[c] == q)
            parts.append(f'<div class="item text {cls}"><span class="score">{s:.3f}</span> {html.escape(texts[c])}</div>')
        parts.append("</div></section>")
    parts.append("</body></html>\n")
    atomic_write_text(path, "\n".join(parts))
    return Path(path)


# --------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------
def write_report(runs: list[ReportRun], out_dir: str | Path, max_groups: int = 30, n_queries: int = 20,
                 embed_images: bool = False, title: str = "itrkit evaluation report") -> dict[str, Path]:
    """Write the report files for ``runs`` into ``out_dir``; returns {file key: path}.

    Keys: ``report``, ``metrics``, ``tsne_<run>``, ``retrievals_<run>`` (``<run>`` = :func:`slug` of the name).
    """
    if not runs:
        raise DataError("no runs to report")
    out = Path(out_dir)
    slugs = [slug(r.name) for r in runs]
    if len(set(slugs)) != len(slugs):
        dup = next(s for s in slugs if slugs.count(s) > 1)
        raise DataError(f"two runs share the file name '{dup}'; give them distinct names")
    for r in runs:
        n, m = len(r.dataset), len(r.dataset.captions)
        if len(r.img_emb) != n or len(r.txt_emb) != m:
            raise DataError(f"run '{r.name}': {len(r.img_emb)} image / {len(r.txt_emb)} text embeddings for "
                            f"{n} images / {m} captions of dataset '{r.dataset.name}'")
        if not r.metrics:
            r.metrics = evaluate_retrieval(r.img_emb, r.txt_emb, r.dataset.txt2img)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    for r, s in zip(runs, slugs):
        files[f"tsne_{s}"] = plot_tsne(r.img_emb, r.txt_emb, r.dataset.txt2img, out / f"tsne_{s}.png", r.name,
                                       max_groups)
        files[f"retrievals_{s}"] = write_retrievals_html(r, out / f"retrievals_{s}.html", n_queries,
                                                         embed_images=embed_images)
    files["metrics"] = out / "metrics.json"
    atomic_write_json(files["metrics"], {r.name: r.metrics for r in runs})
    md = [f"# {title}", "", format_table({r.name: r.metrics for r in runs}, keys=[
        k for k in DEFAULT_KEYS if any(k in r.metrics for r in runs)], first="run"), ""]
    for r, s in zip(runs, slugs):
        md += [f"## {r.name}", "",
               f"{len(r.dataset)} images, {len(r.dataset.captions)} captions (`{r.dataset.name}`). "
               f"Top-{TOP} retrievals: [retrievals_{s}.html](retrievals_{s}.html).", "",
               f"![t-SNE of {r.name}](tsne_{s}.png)", ""]
    files["report"] = out / "report.md"
    atomic_write_text(files["report"], "\n".join(md))
    return files


def load_metrics(path: str | Path) -> dict[str, dict[str, float]]:
    """Read a report's ``metrics.json``."""
    p = Path(path)
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{p}: unreadable metrics file ({e.__class__.__name__})") from None
