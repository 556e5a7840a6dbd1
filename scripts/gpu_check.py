#!/usr/bin/env python
"""One command that checks and measures itrkit on a GPU (issue 15); at most ~8 minutes on one GPU.

    python scripts/gpu_check.py                       # --device auto: the GPU when there is one
    python scripts/gpu_check.py --device cpu --quick  # the same code paths, tiny sizes (the test suite runs this)

Writes one JSON file (``--out``, default ``gpu_check.json``) and prints a table:

(a) parity: the same tiny-model training steps (InfoNCE + CSA + USA) on the CPU and on ``--device``
    (fp32, TF32 off): every logged loss agrees to 1e-4 relative, and no tensor entering the model or
    the loss during the device run's steps is elsewhere (forward pre-hooks on every module);
(b) resume: a 1-process ``torchrun`` training run on ``--device``, SIGKILLed mid-epoch and resumed
    with ``--resume``, ends with the same weights, optimizer state and RNG as (a)'s uninterrupted run;
(c) throughput of a model the size of CLIP ViT-B/32 (``transformers.CLIPConfig()`` defaults, random
    weights: nothing is downloaded) at batch 128 and 256, fp32 and bf16: steps/s, pairs/s, peak GPU
    memory, for InfoNCE and for CUSA (InfoNCE + CSA + USA, teacher rows read from a synthetic
    768-d store each step) and the CUSA / InfoNCE step-time ratio;
(d) ``evaluate_retrieval`` at 5K images × 25K captions with the embeddings on the device, against
    one bare matmul of that size on the device;
(e) teacher extraction throughput (``extract_teacher``; EfficientNet-Lite2, the default image
    teacher, on synthetic 224 px photos).

Exit status: 0 when every check passes, 1 when one fails, 2 for a device that is not there (one line).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from itrkit.errors import ItrkitError  # noqa: E402
from itrkit.utils.device import resolve_device  # noqa: E402

KILLER = r"""
import os, signal, sys
from itrkit.cli import main
from itrkit.train import data
n, argv = int(sys.argv[1]), sys.argv[2:]
count = [0]
orig = data.PairData.batch
def batch(self, idx):
    if self.n_pairs > 100:  # training batches only (teacher rows are attached to them too)
        count[0] += 1
        if count[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
    return orig(self, idx)
data.PairData.batch = batch
sys.exit(main(argv))
"""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _tiny_sets(data: Path, out: Path, device: str, cache: Path, epochs: int) -> list[str]:
    return [f"data.path={data}", f"out={out}", f"device={device}", f"cache_dir={cache}",
            "model.image_tower=tiny-image", "model.text_tower=tiny-text", "model.embed_dim=32", "batch_size=16",
            f"stages.0.epochs={epochs}", "stages.0.lr=0.01", "log_every=1", "threads=1"]


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "train.log").read_text().splitlines()) if "loss" in r]


# --- (a) ---------------------------------------------------------------------------------------------------
def _cusa_sets(data: Path, work: Path) -> list[str]:
    """CUSA terms for the tiny runs, so teacher rows and the soft-label temperatures take part
    (teacher stores extracted once; a second call reuses them)."""
    from itrkit.data.records import Dataset
    from itrkit.teachers.extract import teach

    stores = teach(Dataset.load(data), "tiny-image", "tiny-text", work / "tiny-teachers", device="cpu")
    return ["model.usa_heads=true", "loss.csa=1", "loss.usa=1", "loss.tau_teacher=0.1",
            f"teacher.image_store={stores['image']}", f"teacher.text_store={stores['text']}"]


def _tensors(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, dict):
        return [t for v in x.values() for t in _tensors(v)]
    if isinstance(x, list | tuple):
        return [t for v in x for t in _tensors(v)]
    return []


def check_parity(device: torch.device, data: Path, work: Path, quick: bool) -> dict[str, Any]:
    """Also audits the device run: a forward pre-hook on every module of the model and of the loss
    counts the tensor inputs of training steps that are not on the device (must be none)."""
    from itrkit.train.config import load_train_config
    from itrkit.train.trainer import Trainer

    epochs = 2
    runs = {}
    audit = {"inputs": 0, "off_device": 0}

    def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if module.training:
            for t in _tensors((args, kwargs)):
                audit["inputs"] += 1
                audit["off_device"] += t.device.type != device.type

    class Audited(Trainer):
        def _build(self) -> None:
            super()._build()
            if self.device == device and name == "device":
                for mod in (self.task.model, self.task.loss):
                    for m in mod.modules():
                        m.register_forward_pre_hook(hook, with_kwargs=True)

    cusa = _cusa_sets(data, work)
    for name, dev in (("cpu", "cpu"), ("device", str(device))):
        cfg = load_train_config(None, _tiny_sets(data, work / f"parity-{name}", dev, work / f"cache-{name}", epochs)
                                + cusa)
        Audited(cfg, progress=False).fit()
        runs[name] = _losses(work / f"parity-{name}")
    a, b = np.asarray(runs["cpu"]), np.asarray(runs["device"])
    rel = float(np.max(np.abs(a - b) / np.maximum(np.abs(a), 1e-12))) if len(a) == len(b) else float("inf")
    return {"steps": len(a), "max_rel_loss_diff": rel, "first_loss_cpu": float(a[0]), "first_loss_device": float(b[0]),
            "hooked_inputs": audit["inputs"], "off_device_inputs": audit["off_device"],
            "ok": len(a) == len(b) and rel <= 1e-4 and audit["inputs"] > 0 and audit["off_device"] == 0}


# --- (b) ---------------------------------------------------------------------------------------------------
def _torchrun() -> list[str]:
    exe = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    return [exe, "--standalone", "--nproc_per_node=1"]


def _final_state(run: Path) -> dict[str, torch.Tensor]:
    from itrkit.train.checkpoint import load_latest_checkpoint

    ckpt = load_latest_checkpoint(run)
    if ckpt is None:
        raise RuntimeError(f"{run}: no checkpoint")
    return ckpt[0]


def check_resume(device: torch.device, data: Path, work: Path, quick: bool) -> dict[str, Any]:
    """Against (a)'s uninterrupted run on the device (same config; checkpoints do not change training),
    or a fresh one when (a) did not run."""
    epochs = 2
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUBLAS_WORKSPACE_CONFIG": ":4096:8",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    killer = work / "killer.py"
    killer.write_text(KILLER)
    cusa = _cusa_sets(data, work)

    def run(script: list[str], out: Path, resume: bool = False) -> subprocess.CompletedProcess:
        sets = _tiny_sets(data, out, str(device), work / "cache-device", epochs) + cusa + ["checkpoint_every=3"]
        argv = ["train", "--quiet", *[x for s in sets for x in ("--set", s)]] + (["--resume"] if resume else [])
        return subprocess.run([*_torchrun(), *script, *argv], capture_output=True, text=True, env=env)

    ref_dir = work / "parity-device"
    if not (ref_dir / "metrics.json").is_file():
        ref_dir = work / "resume-ref"
        ref = run(["-m", "itrkit"], ref_dir)
        if ref.returncode:
            return {"ok": False, "error": ref.stderr[-800:]}
    steps_per_epoch = len(_losses(ref_dir)) // epochs
    kill_at = steps_per_epoch + 2  # inside epoch 2, after a mid-epoch checkpoint
    dead = run([str(killer), str(kill_at)], work / "resume-cut")
    again = run(["-m", "itrkit"], work / "resume-cut", resume=True)
    if again.returncode:
        return {"ok": False, "killed_rc": dead.returncode, "error": again.stderr[-800:]}
    a, b = _final_state(ref_dir), _final_state(work / "resume-cut")
    diffs = {k: float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0
             for k in a if k in b and a[k].is_floating_point()}
    same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return {"killed_at_batch": kill_at, "killed_rc": dead.returncode, "tensors": len(a), "bitwise": same,
            "max_abs_diff": max(diffs.values()) if diffs else 0.0, "ok": dead.returncode != 0 and same}


# --- (c) ---------------------------------------------------------------------------------------------------
class ClipSized(torch.nn.Module):
    """CLIP (random weights) + USA heads: cross embeddings from CLIP's projections, uni-modal ones
    from two LayerNorm + Linear heads (as the dual encoder's)."""

    def __init__(self, quick: bool) -> None:
        from transformers import CLIPConfig, CLIPModel

        if quick:
            cfg = CLIPConfig(text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                          "num_attention_heads": 2, "max_position_embeddings": 16},
                             vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                            "num_attention_heads": 2, "image_size": 32, "patch_size": 16},
                             projection_dim=16)
        else:
            cfg = CLIPConfig()  # ViT-B/32 image tower, 12-layer 512-wide text tower, 512-d projections
        self.cfg = cfg
        super().__init__()
        self.clip = CLIPModel(cfg)
        d = cfg.projection_dim
        self.image_usa = torch.nn.Sequential(torch.nn.LayerNorm(d), torch.nn.Linear(d, 256))
        self.text_usa = torch.nn.Sequential(torch.nn.LayerNorm(d), torch.nn.Linear(d, 256))

    def forward(self, pixels: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        img = self.clip.get_image_features(pixel_values=pixels)
        txt = self.clip.get_text_features(input_ids=tokens)
        if not isinstance(img, torch.Tensor):  # transformers 5 returns model outputs
            img, txt = img.pooler_output, txt.pooler_output
        return {"image_embeds": img, "text_embeds": txt, "image_uni": self.image_usa(img), "text_uni": self.text_usa(txt)}


def _teacher_stores(work: Path, n: int) -> tuple[Any, Any]:
    from itrkit.teachers.store import FeatureStore

    rng = np.random.default_rng(0)
    out = []
    for kind in ("image", "text"):
        w = FeatureStore.create(work / f"synthetic-{kind}.store", [f"{kind}{i}" for i in range(n)], 768,
                                {"name": "synthetic-768"}, kind)
        w.write(0, rng.standard_normal((n, 768)).astype(np.float32))
        out.append(w.close())
    return out[0], out[1]


def bench_clip(device: torch.device, work: Path, quick: bool) -> dict[str, Any]:
    from itrkit.losses import ContrastiveLoss
    from itrkit.losses.soft_labels import SoftLabelLoss
    from itrkit.utils.device import move_to

    batches = (8,) if quick else (128, 256)
    steps, warmup = (2, 1) if quick else (10, 3)
    n_rows = 64 if quick else 4096
    t_img, t_txt = _teacher_stores(work, n_rows)
    torch.manual_seed(0)
    model = ClipSized(quick).to(device)  # built once (random init of 150 M weights takes seconds), reset per run
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    n_params = sum(p.numel() for p in model.parameters())
    rows: list[dict[str, Any]] = []
    for precision in ("fp32", "bf16"):
        for batch in batches:
            per_loss: dict[str, float] = {}
            for loss_name in ("infonce", "cusa"):
                model.load_state_dict(init)
                itc = ContrastiveLoss(tau=0.05).to(device)
                cusa = SoftLabelLoss(alpha=1.0, beta=1.0, tau_teacher=0.1).to(device) if loss_name == "cusa" else None
                params = [*model.parameters(), *itc.parameters(), *(cusa.parameters() if cusa else [])]
                opt = torch.optim.AdamW(params, lr=1e-5)
                size = model.cfg.vision_config.image_size
                g = torch.Generator().manual_seed(1)
                pixels = torch.randn(batch, 3, size, size, generator=g)
                tokens = torch.randint(0, model.cfg.text_config.vocab_size, (batch, 77 if not quick else 16), generator=g)
                ids = torch.arange(batch)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(device)
                times = []
                for step in range(warmup + steps):
                    _sync(device)
                    t0 = time.perf_counter()
                    idx = np.random.default_rng(step).integers(0, n_rows, batch)
                    b = move_to({"pixels": pixels, "tokens": tokens, "ids": ids, "t_img": t_img.rows(idx),
                                 "t_txt": t_txt.rows(idx)}, device, non_blocking=True)
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                        out = model(b["pixels"], b["tokens"])
                    out = {k: v.float() for k, v in out.items()}  # losses in float32, as the trainer does
                    loss = itc(out["image_embeds"], out["text_embeds"], b["ids"])["contrastive_loss"]
                    if cusa is not None:
                        terms = cusa(b["t_img"], b["t_txt"], image_embeds=out["image_embeds"],
                                     text_embeds=out["text_embeds"], image_uni=out["image_uni"],
                                     text_uni=out["text_uni"])
                        loss = loss + terms["csa_loss"] + terms["usa_loss"]
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    _sync(device)
                    if step >= warmup:
                        times.append(time.perf_counter() - t0)
                step_s = float(np.median(times))
                per_loss[loss_name] = step_s
                rows.append({"precision": precision, "batch": batch, "loss": loss_name, "step_s": round(step_s, 5),
                             "steps_per_s": round(1 / step_s, 3), "pairs_per_s": round(batch / step_s, 1),
                             "peak_gpu_mib": round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
                             if device.type == "cuda" else None,
                             "final_loss": round(float(loss.detach()), 4)})
                del opt
            rows[-1]["cusa_over_infonce"] = round(per_loss["cusa"] / per_loss["infonce"], 3)
    ok = all(np.isfinite(r["final_loss"]) for r in rows)
    return {"model_params": n_params, "rows": rows, "ok": ok}


# --- (d) ---------------------------------------------------------------------------------------------------
def bench_eval(device: torch.device, quick: bool) -> dict[str, Any]:
    from itrkit.eval.retrieval import evaluate_retrieval

    n_img, per = (50, 5) if quick else (5000, 5)
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(n_img, 512, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(img.repeat_interleave(per, 0) + 0.5 * torch.randn(n_img * per, 512, generator=g), dim=-1)
    t2i = np.repeat(np.arange(n_img), per)
    img_d, txt_d = img.to(device), txt.to(device)
    _sync(device)
    t0 = time.perf_counter()
    metrics = evaluate_retrieval(img_d, txt_d, t2i)
    eval_s = time.perf_counter() - t0
    (img_d @ txt_d.T).sum().item()  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    s = img_d @ txt_d.T
    _sync(device)
    mm_s = time.perf_counter() - t0
    del s
    return {"images": n_img, "captions": n_img * per, "evaluate_retrieval_s": round(eval_s, 4),
            "bare_matmul_s": round(mm_s, 6), "ratio": round(eval_s / max(mm_s, 1e-9), 1),
            "rsum": round(metrics["rsum"], 2), "ok": bool(np.isfinite(metrics["rsum"]) and metrics["rsum"] > 0)}


# --- (e) ---------------------------------------------------------------------------------------------------
def bench_teacher(device: torch.device, work: Path, quick: bool) -> dict[str, Any]:
    from PIL import Image

    from itrkit.models.towers import build_tower
    from itrkit.teachers.extract import extract_teacher

    n, size, spec = (16, 32, "tiny-image") if quick else (512, 256, "efficientnet-lite2")
    folder = work / "teacher-images"
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        p = folder / f"{i:05d}.jpg"
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(p, quality=90)
        paths.append(str(p))
    tower = build_tower(spec, "image")
    tower.set_trainable("frozen")
    t0 = time.perf_counter()
    store = extract_teacher(tower, paths, [f"i{i}" for i in range(n)], work / "teacher.store", "image",
                            batch_size=8 if quick else 128, progress=False, device=device)
    secs = time.perf_counter() - t0
    return {"teacher": spec, "items": n, "seconds": round(secs, 3), "items_per_s": round(n / secs, 1),
            "dim": store.dim, "ok": store.count == n}


# --- main ---------------------------------------------------------------------------------------------------
def _table(result: dict[str, Any]) -> str:
    lines = [f"gpu_check on {result['device']} ({result['device_name']}), torch {result['torch']}"
             f"{' [quick]' if result['quick'] else ''}", ""]
    lines.append(f"{'check':<12} {'ok':<5} summary")
    for key, label in (("parity", "(a) parity"), ("resume", "(b) resume"), ("clip", "(c) clip"),
                       ("eval", "(d) eval"), ("teacher", "(e) teacher")):
        if key not in result:
            continue
        r = result[key]
        if key == "parity":
            s = f"{r.get('steps')} steps, max rel loss diff {r.get('max_rel_loss_diff', float('nan')):.2e} (<= 1e-4); " \
                f"{r.get('off_device_inputs')} of {r.get('hooked_inputs')} model/loss inputs off the device"
        elif key == "resume":
            s = f"SIGKILL at batch {r.get('killed_at_batch')}, resumed: bitwise {r.get('bitwise')}, " \
                f"max |diff| {r.get('max_abs_diff')}"
        elif key == "clip":
            s = f"{r.get('model_params', 0) / 1e6:.1f} M parameters"
        elif key == "eval":
            s = f"{r.get('images')}x{r.get('captions')}: evaluate_retrieval {r.get('evaluate_retrieval_s')} s, " \
                f"bare matmul {r.get('bare_matmul_s')} s ({r.get('ratio')}x)"
        else:
            s = f"{r.get('teacher')}: {r.get('items_per_s')} items/s ({r.get('items')} items)"
        if "error" in r:
            s += f"  error: {r['error'].strip().splitlines()[-1] if r['error'].strip() else '?'}"
        lines.append(f"{label:<12} {str(r.get('ok')):<5} {s}")
    rows = result.get("clip", {}).get("rows", [])
    if rows:
        lines += ["", f"{'precision':<9} {'batch':>5} {'loss':<8} {'steps/s':>8} {'pairs/s':>9} {'peak MiB':>9} "
                      f"{'cusa/infonce':>12}"]
        for r in rows:
            peak = "-" if r["peak_gpu_mib"] is None else f"{r['peak_gpu_mib']:.0f}"
            ratio = f"{r['cusa_over_infonce']:.2f}" if "cusa_over_infonce" in r else ""
            lines.append(f"{r['precision']:<9} {r['batch']:>5} {r['loss']:<8} {r['steps_per_s']:>8.2f} "
                         f"{r['pairs_per_s']:>9.1f} {peak:>9} {ratio:>12}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: the code paths only (seconds, for tests)")
    p.add_argument("--out", default="gpu_check.json", help="JSON file to write")
    p.add_argument("--only", default=None, help="comma-separated subset of parity,resume,clip,eval,teacher")
    a = p.parse_args(argv)
    try:
        device = resolve_device(a.device)
    except ItrkitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    wanted = a.only.split(",") if a.only else ["parity", "resume", "clip", "eval", "teacher"]
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    result: dict[str, Any] = {
        "device": str(device), "quick": a.quick, "torch": torch.__version__,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        work = Path(tmp)
        data = work / "synthetic"
        if "parity" in wanted or "resume" in wanted:
            from itrkit.data.synthetic import make_synthetic

            make_synthetic(data, n_images=60, captions_per_image=3, seed=1, size=32, progress=False)
        steps = {"parity": lambda: check_parity(device, data, work, a.quick),
                 "resume": lambda: check_resume(device, data, work, a.quick),
                 "clip": lambda: bench_clip(device, work, a.quick),
                 "eval": lambda: bench_eval(device, a.quick),
                 "teacher": lambda: bench_teacher(device, work, a.quick)}
        for name in wanted:
            t0 = time.perf_counter()
            try:
                result[name] = steps[name]()
            except Exception as e:  # a failed part is reported, the others still run
                result[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            result[name]["seconds"] = round(time.perf_counter() - t0, 1)
            print(f"{name}: done in {result[name]['seconds']} s", file=sys.stderr)
    result["seconds"] = round(time.perf_counter() - t_all, 1)
    result["ok"] = all(result[n].get("ok") for n in wanted)
    out = Path(a.out)
    tmp_out = out.with_name(out.name + ".tmp")
    tmp_out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp_out, out)
    print(_table(result))
    print(f"\n{'all checks passed' if result['ok'] else 'SOME CHECKS FAILED'}; {result['seconds']} s; → {out}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    raise SystemExit(main())
