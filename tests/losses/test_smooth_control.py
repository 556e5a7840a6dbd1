"""The ``cusa-smooth`` control (issue 16): CSA on label-smoothed teacher rows (the teacher's
diagonal, the rest spread uniformly), USA on the teacher's own rows; fused and unfused paths agree."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from itrkit.errors import ConfigError
from itrkit.losses import functional as LF
from itrkit.losses.soft_labels import SoftLabelLoss, smooth_rows
from itrkit.train.config import load_train_config


def _loop_smooth(p: torch.Tensor) -> torch.Tensor:
    """The slow reference: each row built entry by entry."""
    b = p.shape[0]
    q = torch.empty_like(p)
    for i in range(b):
        rest = (1.0 - float(p[i, i])) / (b - 1)
        for j in range(b):
            q[i, j] = p[i, i] if i == j else rest
    return q


def _batch(b: int = 7, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return {"t_img": r(b, 10), "t_txt": r(b, 12), "img": r(b, 6), "txt": r(b, 6), "u_img": r(b, 5), "u_txt": r(b, 5)}


def test_smoothed_rows_keep_the_teacher_diagonal_and_spread_the_rest_evenly() -> None:
    x = _batch()
    p_i, p_t = LF.teacher_probs(x["t_img"], x["t_txt"], 0.1)
    for p in (p_i, p_t):
        q = smooth_rows(p)
        torch.testing.assert_close(q, _loop_smooth(p), rtol=0, atol=1e-15)
        torch.testing.assert_close(q.sum(dim=1), torch.ones(7, dtype=torch.float64), rtol=0, atol=1e-12)
        assert torch.equal(q.diagonal(), p.diagonal())
        off = q[~torch.eye(7, dtype=torch.bool)].view(7, 6)
        assert torch.equal(off, off[:, :1].expand(7, 6))  # equal within a row
        assert not torch.allclose(off, p[~torch.eye(7, dtype=torch.bool)].view(7, 6))  # the teacher's are not
    one = torch.ones(1, 1, dtype=torch.float64)
    assert torch.equal(smooth_rows(one), one)


@pytest.mark.parametrize("mode", ["each", "add"])
@pytest.mark.parametrize("fused", [True, False])
def test_smooth_csa_uses_the_smoothed_rows_and_usa_the_teacher_rows(mode: str, fused: bool) -> None:
    x = _batch(seed=3)
    loss = SoftLabelLoss(alpha=0.7, beta=0.4, tau_teacher=0.2, teacher_mode=mode, learnable=False, fused=fused,
                         smooth=True)
    got = loss(x["t_img"], x["t_txt"], image_embeds=x["img"], text_embeds=x["txt"], image_uni=x["u_img"],
               text_uni=x["u_txt"])
    p_i, p_t = LF.teacher_probs(x["t_img"], x["t_txt"], 0.2, mode)
    q_i, q_t = _loop_smooth(p_i), _loop_smooth(p_t)
    tau_c, tau_i, tau_t = (float(t) for t in (loss.tau_c, loss.tau_img, loss.tau_txt))  # float32 0.45
    s = F.normalize(x["img"], dim=1) @ F.normalize(x["txt"], dim=1).T / tau_c
    ref_csa = 0.5 * (F.kl_div(F.log_softmax(s, 1), q_i, reduction="batchmean")
                     + F.kl_div(F.log_softmax(s.T, 1), q_t, reduction="batchmean"))
    assert got["csa_loss"].item() == pytest.approx(0.7 * ref_csa.item(), rel=1e-10)
    e_i, e_t = LF.teacher_probs(x["t_img"], x["t_txt"], 0.2, "each")
    ref_usa = LF.usa_from_probs(x["u_img"], x["u_txt"], e_i, e_t, tau_i, tau_t)
    assert got["usa_loss"].item() == pytest.approx(0.4 * ref_usa.item(), rel=1e-10)
    plain = SoftLabelLoss(alpha=0.7, beta=0.4, tau_teacher=0.2, teacher_mode=mode, learnable=False, fused=fused)(
        x["t_img"], x["t_txt"], image_embeds=x["img"], text_embeds=x["txt"], image_uni=x["u_img"], text_uni=x["u_txt"])
    assert got["usa_loss"].item() == pytest.approx(plain["usa_loss"].item(), rel=1e-12)
    assert abs(got["csa_loss"].item() - plain["csa_loss"].item()) > 1e-6


def test_teacher_smooth_is_a_config_knob_exclusive_with_shuffle() -> None:
    assert load_train_config(None, ["teacher.smooth=true"]).teacher.smooth is True
    assert load_train_config(None, []).teacher.smooth is False and load_train_config(None, []).teacher.shuffle is False
    with pytest.raises(ConfigError, match="teacher.shuffle and teacher.smooth"):
        load_train_config(None, ["teacher.smooth=true", "teacher.shuffle=true"])


def test_teacher_smooth_reaches_the_dual_encoder_objective() -> None:
    from itrkit.train.objective import Objective

    for smooth in (False, True):
        cfg = load_train_config(None, ["loss.csa=1", "loss.usa=1", "model.usa_heads=true", f"teacher.smooth={str(smooth).lower()}"])
        obj = Objective(cfg, num_classes=4, embed_dim=8)
        assert obj.cusa is not None and obj.cusa.smooth is smooth
