"""Two gloo ranks holding B/2 rows each reproduce one process on B rows (docs/method.md §1.9).

Every rank gathers its features with gradient (ids, labels and teacher features without) and
computes the loss over the global batch. The loss must equal the one-process loss; a rank's
gradient on its local inputs is ``world_size ×`` the matching slice of the one-process gradient
(each rank differentiates the global loss and DDP averages), and parameter gradients (temperatures,
the instance classifier) equal the one-process ones.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from itrkit.losses import CUSALoss, InstanceLoss, gather_features, is_dist, rank, world_size
from itrkit.losses.functional import info_nce

WORLD = 2
B = 16
# Image 7 has captions on both ranks: positives and soft labels must span the global batch.
IDS = [7, 1, 7, 2, 3, 3, 4, 5, 7, 6, 8, 9, 9, 10, 11, 1]
LABELS = [i % 12 for i in IDS]
UNEVEN = (9, 7)  # rows per rank for the uneven gather check


def _inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    shapes = {"img": (B, 8), "txt": (B, 8), "img_uni": (B, 6), "txt_uni": (B, 6), "t_img": (B, 10),
              "t_txt": (B, 5), "w": (12, 8)}
    out = {k: torch.randn(*s, generator=g, dtype=torch.float64) for k, s in shapes.items()}
    out["ids"], out["labels"] = torch.tensor(IDS), torch.tensor(LABELS)
    return out


def _losses(x: dict[str, torch.Tensor], leaves: dict[str, torch.Tensor], gather: bool) -> dict[str, torch.Tensor]:
    """Loss values and gradients w.r.t. ``leaves`` (local inputs) and the loss parameters."""
    emb = [leaves[k] for k in ("img", "txt", "img_uni", "txt_uni")]
    side = [x[k] for k in ("ids", "labels", "t_img", "t_txt")]
    if gather:
        emb = list(gather_features(*emb))
        side = list(gather_features(*side, gather_with_grad=False))
    img, txt, ui, ut = emb
    ids, labels, t_img, t_txt = side
    out: dict[str, torch.Tensor] = {}

    tau = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    loss = info_nce(img, txt, ids, tau)
    g = torch.autograd.grad(loss, [leaves["img"], leaves["txt"], tau])
    out.update({"nce": loss.detach(), "nce_img": g[0], "nce_txt": g[1], "nce_tau": g[2]})

    cusa = CUSALoss(alpha=2.0, beta=3.0, tau_teacher=0.2, teacher_mode="add", center_teacher=True).double()
    terms = cusa(img, txt, ids, t_img, t_txt, ui, ut)
    total = sum(terms.values())
    params = [cusa.base.tau, cusa.tau_c, cusa.tau_img, cusa.tau_txt]
    g = torch.autograd.grad(total, [leaves[k] for k in ("img", "txt", "img_uni", "txt_uni")] + params)
    out.update({"cusa": total.detach(), **{f"cusa_{k}": t.detach() for k, t in terms.items()}})
    out.update({f"cusa_g{i}": gi for i, gi in enumerate(g)})

    inst = InstanceLoss(12, 8, weight=0.5).double()
    with torch.no_grad():
        inst.classifier.copy_(x["w"])
    loss = inst(img, txt, labels)["instance_loss"]
    g = torch.autograd.grad(loss, [leaves["img"], leaves["txt"], inst.classifier])
    out.update({"inst": loss.detach(), "inst_img": g[0], "inst_txt": g[1], "inst_w": g[2]})
    return out


def _worker(r: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=r, world_size=WORLD)
    try:
        assert is_dist() and rank() == r and world_size() == WORLD
        x = _inputs()
        n = B // WORLD
        local = {k: v[r * n:(r + 1) * n] for k, v in x.items() if k != "w"}
        leaves = {k: local[k].clone().requires_grad_() for k in ("img", "txt", "img_uni", "txt_uni")}
        res = _losses({**local, "w": x["w"]}, leaves, gather=True)
        # Uneven batches (a short last batch): concatenation in rank order, gradient to the local slice.
        start = sum(UNEVEN[:r])
        part = x["img"][start:start + UNEVEN[r]].clone().requires_grad_()
        (full,) = gather_features(part)
        (ids_full,) = gather_features(x["ids"][start:start + UNEVEN[r]], gather_with_grad=False)
        res["uneven_full"], res["uneven_ids"] = full.detach(), ids_full
        res["uneven_grad"] = torch.autograd.grad((full * torch.arange(1.0, B + 1, dtype=full.dtype)[:, None]).sum(),
                                                 part)[0]
        # Non-grad gather: the local slice is the local tensor itself, so gradient reaches it only.
        (ng,) = gather_features(part, gather_with_grad=False)
        res["nograd_grad"] = torch.autograd.grad(ng.sum(), part)[0]
        save_file({k: v.contiguous() for k, v in res.items()}, str(Path(out_dir) / f"rank{r}.safetensors"))
        dist.barrier()  # no rank tears gloo down while the other is still in a collective (SIGABRT)
    finally:
        dist.destroy_process_group()
    # The results are on disk. Leave without the interpreter's teardown, where gloo's leftover
    # threads once aborted a finished rank in CI ("terminate called without an active exception").
    os._exit(0)


def test_two_ranks_reproduce_one_process(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    x = _inputs()
    leaves = {k: x[k].clone().requires_grad_() for k in ("img", "txt", "img_uni", "txt_uni")}
    ref = _losses(x, leaves, gather=False)
    n = B // WORLD
    local_grads = {"nce_img", "nce_txt", "inst_img", "inst_txt", "cusa_g0", "cusa_g1", "cusa_g2", "cusa_g3"}
    for r in range(WORLD):
        got = load_file(str(tmp_path / f"rank{r}.safetensors"))
        for key, want in ref.items():
            if key in local_grads:
                torch.testing.assert_close(got[key], WORLD * want[r * n:(r + 1) * n], rtol=1e-10, atol=1e-12,
                                           msg=f"rank {r}: {key}")
            else:  # loss values and parameter gradients
                torch.testing.assert_close(got[key], want, rtol=1e-10, atol=1e-12, msg=f"rank {r}: {key}")
        assert set(ref) >= {"cusa_contrastive_loss", "cusa_csa_loss", "cusa_usa_loss"}
        torch.testing.assert_close(got["uneven_full"], x["img"])
        assert torch.equal(got["uneven_ids"], x["ids"])
        start = sum(UNEVEN[:r])
        weights = torch.arange(1.0, B + 1, dtype=torch.float64)[start:start + UNEVEN[r], None]
        # The summed objective is the same on both ranks: the gather's backward adds both ranks' grads.
        torch.testing.assert_close(got["uneven_grad"], WORLD * weights.expand(-1, 8))
        torch.testing.assert_close(got["nograd_grad"], torch.ones(UNEVEN[r], 8, dtype=torch.float64))


def test_gather_is_identity_without_a_process_group() -> None:
    a, b = torch.randn(3, 2), torch.arange(3)
    out = gather_features(a, b)
    assert isinstance(out, tuple) and out[0] is a and out[1] is b
    assert not is_dist() and rank() == 0 and world_size() == 1
