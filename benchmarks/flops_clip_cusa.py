"""What a GPU epoch of COCO costs for CLIP ViT-B/32 fine-tuning with InfoNCE and with CUSA.

An estimate from shapes, not a measurement (no GPU here). FLOPs count a multiply-add as 2.
One transformer layer over n tokens of width d with an MLP of 4d:
    QKV + output projections 8·n·d², MLP 16·n·d², attention scores and weighted sum 4·n²·d
    → 24·n·d² + 4·n²·d
ViT-B/32 at 224 px: n = 7·7 + 1 = 50, d = 768, 12 layers, + patch embedding 49·(3·32·32)·768·2.
Text transformer: n = 77 (CLIP pads to its context), d = 512, 12 layers.
Training ≈ 3 × forward (backward ≈ 2 × forward). A COCO epoch (Karpathy train) = 113,287 images
× 5 captions = 566,435 pairs, each pair running both towers (the usual CLIP fine-tuning loop).

CUSA adds, per step of B pairs (global batch if gathered): teacher similarity matrices
B²·D_t·2 for images (Unicom ViT-B/32 patch tokens, D_t = 49·768 = 37,632) and texts (mpnet, 768),
student similarities for CSA (the InfoNCE matrix is reused) and USA (2 × B²·d·2), the USA heads
(2 × B·d·d·2 ×3), and softmax/KL over four B×B matrices (negligible). And I/O: teacher rows read
from the store, float16: 75,264 bytes per image, 1,536 per caption.

    .venv/bin/python benchmarks/flops_clip_cusa.py [--tflops 312] [--mfu 0.4] [--batch 1024] [--gpus 8] [--disk-gbs 2]
"""

from __future__ import annotations

import argparse

COCO_IMAGES = 113_287
CAPTIONS_PER_IMAGE = 5


def layer_flops(n: int, d: int) -> float:
    return 24 * n * d * d + 4 * n * n * d


def vit_b32_forward() -> float:
    n, d, layers = 50, 768, 12
    patch = 49 * (3 * 32 * 32) * d * 2
    return layers * layer_flops(n, d) + patch + 2 * d * 512  # + visual projection 768→512


def clip_text_forward(ctx: int = 77) -> float:
    return 12 * layer_flops(ctx, 512) + 2 * 512 * 512  # + text projection


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tflops", type=float, default=312.0, help="GPU dense bf16 peak (A100: 312)")
    ap.add_argument("--mfu", type=float, default=0.4, help="fraction of peak actually reached")
    ap.add_argument("--batch", type=int, default=1024, help="global batch (soft labels span it)")
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--disk-gbs", type=float, default=2.0, help="teacher-store read bandwidth per node, GB/s")
    ap.add_argument("--teacher-dim", type=int, default=49 * 768, help="image-teacher feature size")
    ap.add_argument("--json", default="", help="also write the figures here")
    a = ap.parse_args()

    pairs = COCO_IMAGES * CAPTIONS_PER_IMAGE
    steps = pairs / a.batch
    f_img, f_txt = vit_b32_forward(), clip_text_forward()
    per_pair_train = 3 * (f_img + f_txt)
    base = pairs * per_pair_train
    b, d = a.batch, 512
    cusa_step = (2 * b * b * a.teacher_dim + 2 * b * b * 768  # teacher similarity matrices (no grad)
                 + 3 * 2 * (2 * b * b * d)  # USA student similarities, fwd + bwd
                 + 3 * 2 * (2 * b * d * d))  # USA heads, fwd + bwd
    cusa = steps * cusa_step
    rate = a.tflops * 1e12 * a.mfu
    io_bytes = pairs * (2 * a.teacher_dim + 2 * 768)

    print(f"forward per pair: image ViT-B/32 {f_img / 1e9:.2f} GFLOP, text (ctx 77) {f_txt / 1e9:.2f} GFLOP")
    print(f"train per pair (3× forward): {per_pair_train / 1e9:.1f} GFLOP; COCO epoch = {pairs:,} pairs, "
          f"{steps:,.0f} steps of {b}")
    print(f"{'':34s} {'PFLOP':>8s} {'GPU-hours':>10s} {f'{a.gpus}-GPU min':>12s}")
    for name, flops in (("InfoNCE epoch", base), ("CUSA extra compute", cusa), ("CUSA epoch", base + cusa)):
        sec = flops / rate
        print(f"{name:34s} {flops / 1e15:8.2f} {sec / 3600:10.3f} {sec / a.gpus / 60:12.2f}")
    print(f"CUSA compute overhead: {100 * cusa / base:.3f} % (at global batch {b}; it grows linearly with B)")
    io_sec = io_bytes / (a.disk_gbs * 1e9)
    epoch_sec = (base + cusa) / rate / a.gpus
    print(f"teacher reads: {io_bytes / 1e9:.1f} GB per epoch (float16, {2 * a.teacher_dim:,} B per image row "
          f"read once per pair) = {io_sec:.0f} s at {a.disk_gbs} GB/s vs {epoch_sec:.0f} s of compute on "
          f"{a.gpus} GPUs: {'I/O-bound unless rows are cached in RAM or reduced (itrkit teach --image-reduction mean+pca:256)' if io_sec > 0.5 * epoch_sec else 'hidden behind compute with prefetching'}")
    print(f"assumptions: {a.tflops:.0f} TFLOPS peak × {a.mfu:.0%} utilisation, towers fully trained, "
          "data loading not the bottleneck")
    if a.json:
        import json
        from pathlib import Path

        fig = {"infonce_pflop": base / 1e15, "cusa_extra_pflop": cusa / 1e15, "cusa_overhead_pct": 100 * cusa / base,
               "gpu_hours": (base + cusa) / rate / 3600, "teacher_read_gb": io_bytes / 1e9, "io_s": io_sec,
               "epoch_compute_s": epoch_sec, "batch": b, "gpus": a.gpus, "tflops": a.tflops, "mfu": a.mfu}
        tmp = Path(a.json).with_name(Path(a.json).name + ".tmp")
        tmp.write_text(json.dumps(fig, indent=1) + "\n")
        tmp.replace(a.json)


if __name__ == "__main__":
    main()
