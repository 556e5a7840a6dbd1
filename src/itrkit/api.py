"""The top-level Python API: ``itrkit.load_model``, ``itrkit.train``, ``itrkit.evaluate``.

>>> import itrkit
>>> metrics = itrkit.train("infonce", data="data/f8k", out="runs/infonce")  # doctest: +SKIP
>>> model = itrkit.load_model("runs/infonce")                                # doctest: +SKIP
>>> img = model.encode_images(["photo.jpg"])           # (1, D) float32, L2-normalised  # doctest: +SKIP
>>> txt = model.encode_texts(["a dog runs on grass"])  # (1, D)                          # doctest: +SKIP
>>> itrkit.evaluate("runs/infonce", "data/f8k", split="test")["rsum"]        # doctest: +SKIP

``itrkit.train`` is the :mod:`itrkit.train` package, which is callable (:func:`itrkit.train.api.train`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from itrkit.errors import ConfigError


def load_model(path: str | Path, device: str = "cpu") -> Any:
    """The model a run selected on validation (a run folder, or its ``model/`` folder), in eval mode.

    A dual encoder (:class:`~itrkit.models.dual_encoder.DualEncoder`: ``encode_images``,
    ``encode_texts``) or a fusion matcher (SGR, SAF, the re-ranker: ``score_all``), whichever
    the folder holds. ``device``: ``cpu``, ``cuda``, ``cuda:N``, ``mps`` or ``auto``.
    """
    from itrkit.models.io import is_fusion_run, load_fusion_model
    from itrkit.models.io import load_model as load_dual_encoder
    from itrkit.utils.device import resolve_device

    dev = resolve_device(device)
    if is_fusion_run(path):
        model, _ = load_fusion_model(path)
        return model.to(dev)
    return load_dual_encoder(path).to(dev)


def evaluate(run_or_model: str | Path | Any, data: str | Path | None = None, split: str = "test",
             protocol: str = "full", *, max_images: int = 0, cache_dir: str | None = None,
             grid_store: str | None = None, device: str = "auto") -> dict[str, float]:
    """Retrieval metrics (R@1/5/10 both ways, rsum, median / mean rank) on ``split`` of ``data``.

    ``run_or_model``: a run folder (``data`` defaults to the run's own data set) or a model from
    :func:`load_model` (then ``data`` is needed). ``protocol``: ``full``, ``coco5k``, ``coco1k``,
    ``flickr30k-1k`` or ``flickr8k-human`` (fusion matchers: ``full`` or ``flickr8k-human``).
    ``grid_store``: a fusion model object's region features (a run folder knows its own).
    """
    if isinstance(run_or_model, str | Path):
        from itrkit.models.io import is_fusion_run

        run = Path(run_or_model)
        if is_fusion_run(run):
            from itrkit.eval.fusion import evaluate_fusion_runs

            _fusion_protocol(protocol)
            return evaluate_fusion_runs([run], data=data, split=split, grid_store=grid_store, max_images=max_images,
                                        progress=False, device=device, cache_dir=cache_dir, protocol=protocol)
        from itrkit.eval.run import evaluate_run

        return evaluate_run(run, data=None if data is None else str(data), split=split, protocol=protocol,
                            cache_dir=cache_dir, max_images=max_images, device=device)
    if data is None:
        raise ConfigError("itrkit.evaluate(model, data): a model object needs the dataset folder (data=)")
    from itrkit.data.records import Dataset

    whole = Dataset.load(data)
    ds = whole.split(split).subset(max_images or None)
    model = run_or_model
    if callable(getattr(model, "encode_images", None)) and callable(getattr(model, "encode_texts", None)) \
            and hasattr(model, "image_tower"):
        from itrkit.eval.protocols import evaluate_dataset_protocol
        from itrkit.models.embed import embed_dataset

        emb = embed_dataset(model, ds, cache_dir)
        return dict(evaluate_dataset_protocol(emb["image_embeds"], emb["text_embeds"], ds, protocol))
    if callable(getattr(model, "score_all", None)) or callable(getattr(model, "encode_split", None)):
        from itrkit.eval.fusion import open_split, split_human_metrics, split_metrics

        _fusion_protocol(protocol)
        if not grid_store:
            raise ConfigError("itrkit.evaluate(fusion model, data): pass grid_store= (region features of the "
                              "data set, itrkit grid), or evaluate the run folder")
        fsplit = open_split(model, ds, grid_store, cache_dir, dataset=whole)
        if protocol == "flickr8k-human":
            return split_human_metrics(model, fsplit, progress=False)
        return split_metrics(model, fsplit, progress=False)[0]
    raise ConfigError(f"itrkit.evaluate: {type(model).__name__} is neither a run folder nor an itrkit model")


def _fusion_protocol(protocol: str) -> None:
    from itrkit.eval.fusion import FUSION_PROTOCOLS

    if protocol not in FUSION_PROTOCOLS:
        raise ConfigError(f"fusion matchers are evaluated with the full or flickr8k-human protocol only, not '{protocol}'")
