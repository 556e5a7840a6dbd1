"""The fused soft-label path (one autograd node per KL term, ``Σ p log p`` shared) equals the
unfused one: values and every gradient, to float rounding, for every teacher mode."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from itrkit.losses import functional as LF
from itrkit.losses.soft_labels import SoftLabelLoss


def _grads(loss: torch.Tensor, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, xs))


@pytest.mark.parametrize("learnable_tau", [True, False])
def test_kl_logits_equals_kl_div_of_log_softmax_in_value_and_gradient(learnable_tau: bool) -> None:
    g = torch.Generator().manual_seed(0)
    s = torch.randn(12, 12, generator=g, dtype=torch.float64, requires_grad=True)
    p = F.softmax(torch.randn(12, 12, generator=g, dtype=torch.float64) * 3, dim=1)
    p[:4, 6:] = 0.0  # zeros as in underflowed soft labels (0·log 0 = 0)
    p = p / p.sum(dim=1, keepdim=True)
    tau: torch.Tensor | float = torch.tensor(0.3, dtype=torch.float64, requires_grad=True) if learnable_tau else 0.3
    xs = [s, tau] if learnable_tau else [s]
    ref = F.kl_div(F.log_softmax(s / tau, dim=1), p, reduction="batchmean")
    got = LF.kl_logits(p, s, tau)
    got_shared = LF.kl_logits(p, s, tau, LF.plogp(p))
    assert got.item() == pytest.approx(ref.item(), rel=1e-12, abs=1e-14)
    assert got_shared.item() == pytest.approx(ref.item(), rel=1e-12, abs=1e-14)
    for a, b in zip(_grads(got, xs), _grads(ref, xs)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def test_plogp_from_logits_equals_xlogy() -> None:
    z = torch.randn(9, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 50
    p, h = LF.soft_labels_with_plogp(z)
    assert torch.equal(p, F.softmax(z, dim=1))
    assert h.item() == pytest.approx(torch.xlogy(p, p).sum().item(), rel=1e-12)


@pytest.mark.parametrize("mode", LF.TEACHER_MODES)
def test_teacher_probs_of_several_modes_equal_one_mode_at_a_time_bit_for_bit(mode: str) -> None:
    g = torch.Generator().manual_seed(2)
    t_i, t_t = torch.randn(10, 7, generator=g), torch.randn(10, 5, generator=g)
    many = LF.teacher_probs_modes(t_i, t_t, 0.2, ("each", mode), center=True)
    for m in {"each", mode}:
        for a, b in zip(many[m], LF.teacher_probs(t_i, t_t, 0.2, m, center=True)):
            assert torch.equal(a, b)


@pytest.mark.parametrize("mode", LF.TEACHER_MODES)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
@pytest.mark.parametrize("with_scores", [False, True])
def test_fused_soft_label_loss_equals_unfused(mode: str, dtype: torch.dtype, tol: float, with_scores: bool) -> None:
    g = torch.Generator().manual_seed(3)
    b = 16
    x = [torch.randn(b, 8, generator=g, dtype=dtype, requires_grad=True) for _ in range(4)]
    scores = torch.randn(b, b, generator=g, dtype=dtype, requires_grad=True)
    t_i, t_t = torch.randn(b, 12, generator=g, dtype=dtype), torch.randn(b, 10, generator=g, dtype=dtype)
    res = []
    for fused in (False, True):
        loss = SoftLabelLoss(alpha=0.7, beta=0.4, tau_teacher=0.1, teacher_mode=mode, center_teacher=mode == "add",
                             fused=fused).to(dtype)
        assert loss.fused is fused
        kw = {"scores": scores} if with_scores else {"image_embeds": x[0], "text_embeds": x[1]}
        out = loss(t_i, t_t, image_uni=x[2], text_uni=x[3], **kw)
        inputs = x + [scores] + list(loss.parameters())
        grads = torch.autograd.grad(sum(out.values()), inputs, allow_unused=True)
        res.append(({k: v.item() for k, v in out.items()}, grads))
    (v0, g0), (v1, g1) = res
    assert v0.keys() == v1.keys() == {"csa_loss", "usa_loss"}
    for k in v0:
        assert v1[k] == pytest.approx(v0[k], rel=tol, abs=tol)
    for a, c in zip(g0, g1):
        assert (a is None) == (c is None)
        if a is not None:
            torch.testing.assert_close(c, a, rtol=tol, atol=tol)
