"""``itrkit runs DIR``: one line per run folder under DIR — method, towers, best dev metric, test
RSUM, status (finished / running / unfinished at step N / failed).

Only JSON and YAML are read (``config.yaml``, ``metrics.json``, the newest checkpoint header,
the last lines of ``train.log``, ``.lock``): listing a folder of runs loads no weights and no torch.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

from itrkit.errors import ConfigError
from itrkit.utils.lock import RunLock, lock_holder

LOSS_TERMS = ("contrastive", "triplet", "csa", "usa", "instance", "itm")
COLUMNS = ("run", "method", "towers", "best dev", "test rsum", "status")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _names_itself(cfg: Path) -> bool:
    """A run's resolved ``config.yaml`` names its own folder as ``out``."""
    try:
        out = (yaml.safe_load(cfg.read_text(encoding="utf-8")) or {}).get("out")
        return isinstance(out, str) and Path(out).resolve() == cfg.parent.resolve()
    except (OSError, yaml.YAMLError, AttributeError):
        return False


def find_runs(root: str | Path) -> list[Path]:
    """Run folders at or under ``root``: a ``config.yaml`` beside a ``train.log``, ``checkpoints/``
    or ``metrics.json``, or one naming its folder as ``out`` (a run that failed before its first
    log line). A bare config file is not a run."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"itrkit runs: {root} is not a folder")
    found = []
    for cfg in sorted(root.rglob("config.yaml")):
        d = cfg.parent
        if any((d / n).exists() for n in ("train.log", "checkpoints", "metrics.json")) or _names_itself(cfg):
            found.append(d)
    return found


def _method(cfg: dict[str, Any]) -> str:
    model = cfg.get("model") or {}
    loss = cfg.get("loss") or {}
    weights: dict[str, float] = {}
    for k in LOSS_TERMS:
        try:
            weights[k] = float(loss.get(k, 1.0 if k == "contrastive" else 0.0))
        except (TypeError, ValueError):
            continue
    # Per-stage weights override the config's: a term any stage switches on is part of the method.
    for stage in cfg.get("stages") or []:
        for k, v in ((stage or {}).get("loss") or {}).items():
            if k in weights and isinstance(v, int | float) and v > 0 and not weights[k]:
                weights[k] = float(v)
    terms = [k if w == 1.0 else f"{k} {w:g}" for k, w in weights.items() if w > 0]
    return f"{model.get('name', 'dual_encoder')}: {' + '.join(terms) or 'no loss'}"


def _towers(cfg: dict[str, Any]) -> str:
    model = cfg.get("model") or {}
    if "image_tower" in model or "text_tower" in model:
        return f"{model.get('image_tower', '?')} / {model.get('text_tower', '?')}"
    return "-"


def _last_event(run: Path) -> dict[str, Any] | None:
    """The last ``train.log`` record that carries an ``event`` (val, failed, interrupted)."""
    try:
        with open(run / "train.log", "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 65536))  # the tail is enough: events are written at the end
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and "event" in rec:
            return rec
    return None


def _checkpoint_meta(run: Path) -> dict[str, Any] | None:
    folder = run / "checkpoints"
    for h in sorted(folder.glob("ckpt-*.json"), reverse=True) if folder.is_dir() else []:
        meta = _read_json(h)
        if isinstance(meta, dict) and "step" in meta:
            return meta
    return None


def _alive_holder(run: Path) -> dict[str, Any] | None:
    holder = lock_holder(run)
    if not holder:
        return None
    return holder if RunLock(run, create=False)._stale_reason(holder) is None else None


def run_summary(run: str | Path) -> dict[str, Any]:
    """What ``itrkit runs`` prints about one run folder, as a dict (``--json``)."""
    run = Path(run)
    try:
        cfg = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        cfg = {}
    if not isinstance(cfg, dict):
        cfg = {}
    metrics = _read_json(run / "metrics.json")
    ckpt = _checkpoint_meta(run)
    best = (metrics or {}).get("best") if isinstance(metrics, dict) else None
    if not best and ckpt:
        best = ckpt.get("best")
    test = (metrics or {}).get("test") if isinstance(metrics, dict) else None
    step = int(metrics.get("steps", 0)) if isinstance(metrics, dict) else int((ckpt or {}).get("step", 0))
    event = _last_event(run)
    if isinstance(metrics, dict):
        status = f"finished ({step} steps)"
    elif _alive_holder(run):
        status = f"running (step {step}, pid {lock_holder(run).get('pid')})"  # type: ignore[union-attr]
    elif event and event.get("event") == "failed":
        status = f"failed (step {event.get('step', step)}): {event.get('error', '?')}"
    elif event and event.get("event") == "interrupted":
        status = f"unfinished (step {step}, interrupted)"
    else:
        status = f"unfinished (step {step})"
    select = cfg.get("select_metric", "rsum")
    return {
        "run": str(run),
        "method": _method(cfg),
        "towers": _towers(cfg),
        "select_metric": select,
        "best": best.get("metric") if isinstance(best, dict) else None,
        "best_epoch": f"{best.get('stage')}:{best.get('epoch')}" if isinstance(best, dict) and best.get("epoch") else None,
        "test_rsum": test.get("rsum") if isinstance(test, dict) else None,
        "status": status,
        "steps": step,
    }


def _cells(s: dict[str, Any], root: Path) -> list[str]:
    try:
        name = Path(s["run"]).relative_to(root).as_posix()
    except ValueError:
        name = s["run"]
    best = f"{s['select_metric']} {s['best']:.2f} @ {s['best_epoch']}" if isinstance(s["best"], int | float) else "-"
    rsum = f"{s['test_rsum']:.2f}" if isinstance(s["test_rsum"], int | float) else "-"
    return [name if name != "." else root.name, s["method"], s["towers"], best, rsum, s["status"]]


def format_runs(summaries: list[dict[str, Any]], root: str | Path) -> str:
    """Aligned columns, one line per run, with a header."""
    rows = [list(COLUMNS)] + [_cells(s, Path(root)) for s in summaries]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r[:-1], widths)) + "  " + r[-1] for r in rows)


def _cmd(a: Any) -> int:
    runs = find_runs(a.dir)
    summaries = [run_summary(r) for r in runs]
    if a.json:
        for s in summaries:
            print(json.dumps(s))
    elif not summaries:
        print(f"no runs under {a.dir} (a run folder holds config.yaml and train.log)", file=sys.stderr)
    else:
        print(format_runs(summaries, a.dir))
    return 0


def add_parsers(sub: Any) -> None:
    r = sub.add_parser("runs", help="list the runs under a folder: method, best dev metric, test RSUM, status")
    r.add_argument("dir", help="a run folder or a folder of runs (searched recursively)")
    r.add_argument("--json", action="store_true", help="one JSON object per run instead of the table")
    r.set_defaults(func=_cmd)
