"""The cheaper training step changes no number: the fused AdamW the trainer builds updates like
torch's per-parameter loop, and the objective's shared cosine matrix (InfoNCE and CSA read one
matrix) gives the losses and gradients of each term computed on its own (functional forms)."""

from __future__ import annotations

import pytest
import torch

from itrkit.config import load_config
from itrkit.losses import functional as Fn
from itrkit.train.config import TrainConfig
from itrkit.train.objective import Objective
from itrkit.train.trainer import make_adamw


def _params(seed: int) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(7, 5, generator=g)), torch.nn.Parameter(torch.randn(5, generator=g)),
            torch.nn.Parameter(torch.tensor(0.07))]


def test_make_adamw_updates_like_the_per_parameter_loop() -> None:
    ours, ref = _params(0), _params(0)
    def groups(ps: list[torch.nn.Parameter]) -> list[dict]:
        return [{"params": ps[:1], "weight_decay": 0.01}, {"params": ps[1:], "weight_decay": 0.0}]
    opt = make_adamw(groups(ours), lr=1e-2)
    loop = torch.optim.AdamW(groups(ref), lr=1e-2, foreach=False)
    assert opt.defaults.get("fused") or opt.defaults.get("foreach")
    g = torch.Generator().manual_seed(1)
    for step in range(6):
        grads = [torch.randn(p.shape, generator=g) for p in ours]
        for p, q, gr in zip(ours, ref, grads):
            p.grad, q.grad = gr.clone(), gr.clone()
        for grp in (*opt.param_groups, *loop.param_groups):
            grp["lr"] = 1e-2 * (0.5 + step / 10)  # the trainer's schedule writes each group's lr
        opt.step()
        loop.step()
    for p, q in zip(ours, ref):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("mode", ["each", "add"])
def test_objective_with_shared_scores_equals_each_term_on_its_own(tmp_path, mode: str) -> None:
    cfg = load_config(TrainConfig, None, overrides=[
        "loss.contrastive=1", "loss.csa=0.7", "loss.usa=0.3", "loss.tau=0.05", "loss.tau_teacher=0.2",
        f"loss.teacher_mode={mode}", f"data.path={tmp_path}"])
    obj = Objective(cfg, num_classes=4, embed_dim=6).double()
    obj.set_weights(cfg.weights(cfg.stages[0]))
    g = torch.Generator().manual_seed(3)
    b = 9
    leaves = {k: torch.randn(b, 6, generator=g, dtype=torch.float64, requires_grad=True)
              for k in ("image_embeds", "text_embeds", "image_uni", "text_uni")}
    batch = {"img_ids": torch.tensor([0, 0, 1, 2, 2, 2, 3, 1, 3]),
             "teacher_image": torch.randn(b, 11, generator=g, dtype=torch.float64),
             "teacher_text": torch.randn(b, 8, generator=g, dtype=torch.float64)}
    got = obj(dict(leaves), batch)
    total = sum(got.values())
    grads = torch.autograd.grad(total, [*leaves.values(), obj.contrastive.tau, obj.cusa.tau_c])

    img, txt, ui, ut = leaves.values()
    ref = {"contrastive_loss": Fn.info_nce(img, txt, batch["img_ids"], obj.contrastive.tau),
           "csa_loss": 0.7 * Fn.csa(img, txt, batch["teacher_image"], batch["teacher_text"], obj.cusa.tau_c, 0.2, mode),
           "usa_loss": 0.3 * Fn.usa(ui, ut, batch["teacher_image"], batch["teacher_text"], obj.cusa.tau_img,
                                    obj.cusa.tau_txt, 0.2)}
    assert set(got) == set(ref)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-12, atol=1e-12)
    ref_grads = torch.autograd.grad(sum(ref.values()), [*leaves.values(), obj.contrastive.tau, obj.cusa.tau_c])
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)
