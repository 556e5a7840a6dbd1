"""``itrkit report RUN_DIR... --out DIR``: compare trained runs in a Markdown table, t-SNE figures
and top-5 retrieval pages (see :mod:`itrkit.eval.report`).

With Flickr8k data the retrieval pages frame the items people judged relevant (the released
expert / CrowdFlower judgments, :mod:`itrkit.eval.flickr8k_human`) amber: ``--human-judgments``
``auto`` (default) looks for the annotation files beside the images, a folder names them, ``none``
turns it off."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from itrkit.errors import ConfigError, DataError
from itrkit.utils.optional import require


def _names(runs: list[Path], given: str | None) -> list[str]:
    if given:
        names = [n.strip() for n in given.split(",")]
        if len(names) != len(runs):
            raise ConfigError(f"--names has {len(names)} names for {len(runs)} runs")
        return names
    names = [r.name for r in runs]
    if len(set(names)) < len(names):  # runs/a/seed0 and runs/b/seed0: keep the parent too
        names = [f"{r.parent.name}/{r.name}" for r in runs]
    return names


def human_judged(ds: Any, judgments: str | Path | None = "auto") -> set[tuple[int, int]] | None:
    """(image index, caption index) pairs of ``ds`` people judged relevant although the caption is
    another image's, or None without judgments.

    ``judgments``: ``"auto"`` (the Flickr8k annotation files beside the images, when present and
    the captions carry official ``x.jpg#k`` ids; otherwise None), a folder holding them (errors
    are one line naming the file), or None / ``"none"``.
    """
    if judgments is None or str(judgments) == "none":
        return None
    from itrkit.eval.flickr8k_human import find_annotations_dir, judged_pairs
    from itrkit.eval.protocols import flickr8k_names

    if str(judgments) == "auto":
        folder = find_annotations_dir(ds.image_paths)
        if folder is None:
            return None
        try:
            names, caps = flickr8k_names(ds)
        except DataError:  # not official Flickr8k caption ids: nothing the judgments can name
            return None
    else:
        folder = Path(judgments)
        names, caps = flickr8k_names(ds)
    return judged_pairs(names, caps, folder)


def report_runs(runs: list[str | Path], out: str | Path, data: str | None = None, split: str = "test",
                names: str | None = None, max_images: int = 0, cache_dir: str | None = None,
                embed_images: bool = False, human_judgments: str | None = "auto",
                device: str = "auto") -> dict[str, Path]:
    """Embed ``split`` with each run's selected model and write the report files into ``out``."""
    from itrkit.data.records import Dataset
    from itrkit.eval.report import ReportRun, write_report
    from itrkit.eval.run import embed_dataset, run_dataset_path
    from itrkit.models.io import load_model

    for module in ("matplotlib", "sklearn"):  # before embedding anything
        require(module, "eval", "itrkit report")
    from itrkit.utils.device import resolve_device

    dev = resolve_device(device)  # a missing device is one line before anything is embedded
    paths = [Path(r) for r in runs]
    items = []
    for path, name in zip(paths, _names(paths, names)):
        model = load_model(path).to(dev)
        ds = Dataset.load(data or run_dataset_path(path)).split(split).subset(max_images or None)
        emb = embed_dataset(model, ds, cache_dir)
        items.append(ReportRun(name, {}, emb["image_embeds"], emb["text_embeds"], ds,
                               judged=human_judged(ds, human_judgments)))
    return write_report(items, out, embed_images=embed_images)


