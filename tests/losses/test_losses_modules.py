"""Loss modules: dict keys and weighting, temperature clamping, CUSA wiring, chunked instance loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from itrkit.errors import ConfigError, DataError, ItrkitError
from itrkit.losses import (
    ContrastiveLoss,
    CUSALoss,
    InstanceLoss,
    TripletLoss,
    USAProjector,
)
from itrkit.losses.functional import csa, info_nce, instance, triplet, usa

IDS = torch.tensor([3, 0, 3, 1, 3, 2, 0, 4])
B = len(IDS)


def _rand(*shape: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# --- ContrastiveLoss -----------------------------------------------------------------------------
def test_contrastive_value_weight_and_key() -> None:
    img, txt = _rand(B, 6, seed=0), _rand(B, 6, seed=1)
    out = ContrastiveLoss(tau=0.05, weight=2.5).double()(img, txt, IDS)
    assert list(out) == ["contrastive_loss"]
    torch.testing.assert_close(out["contrastive_loss"], 2.5 * info_nce(img, txt, IDS, 0.05))


def test_contrastive_tau_is_clamped_in_place_before_use() -> None:
    loss = ContrastiveLoss(tau=0.05, tau_min=0.01, tau_max=0.1).double()
    img, txt = _rand(B, 6, seed=2), _rand(B, 6, seed=3)
    with torch.no_grad():
        loss.tau.fill_(0.5)
    assert loss.temperature == pytest.approx(0.1)
    got = loss(img, txt, IDS)["contrastive_loss"]
    assert float(loss.tau.detach()) == pytest.approx(0.1)
    torch.testing.assert_close(got, info_nce(img, txt, IDS, 0.1))
    with torch.no_grad():
        loss.tau.fill_(-1.0)
    loss(img, txt, IDS)
    assert float(loss.tau.detach()) == pytest.approx(0.01)


@pytest.mark.parametrize("push", [-1.0, 1.0])
def test_temperatures_never_leave_bounds_across_optimizer_steps(push: float) -> None:
    cusa = CUSALoss(alpha=1.0, beta=1.0).double()
    params = [p for p in cusa.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=10.0)
    img, txt, ui, ut = (_rand(B, 6, seed=s) for s in range(4))
    ti, tt = _rand(B, 5, seed=4), _rand(B, 7, seed=5)
    for _ in range(5):
        out = cusa(img, txt, IDS, ti, tt, ui, ut)
        for name, t in cusa.temperatures().items():
            lo, hi = (0.01, 0.1) if name == "tau" else (0.1, 1.0)
            assert lo <= t <= hi
        opt.zero_grad()
        # Drive every temperature hard in one direction with a large gradient.
        (sum(out.values()) + push * 1e6 * sum(params)).backward()
        opt.step()
        assert not 0.01 <= float(cusa.base.tau.detach()) <= 0.1  # the step did push it out
        cusa.clamp_temperatures_()
        assert 0.01 <= float(cusa.base.tau.detach()) <= 0.1
        for name in ("tau_c", "tau_img", "tau_txt"):
            assert 0.1 <= float(getattr(cusa, name).detach()) <= 1.0
    # push > 0 lowers the temperatures (SGD descends the gradient) to their lower bounds.
    assert float(cusa.base.tau.detach()) == (0.01 if push > 0 else 0.1)
    assert float(cusa.tau_c.detach()) == (0.1 if push > 0 else 1.0)


def test_two_forwards_then_one_backward_gradient_accumulation() -> None:
    # The in-place clamp must not invalidate the graph of an earlier forward when tau is in range.
    cusa = CUSALoss(alpha=1.0, beta=1.0).double()
    img, txt, ui, ut, ti, tt = _cusa_inputs()
    first = sum(cusa(img, txt, IDS, ti, tt, ui, ut).values())
    second = sum(cusa(txt, img, IDS, ti, tt, ut, ui).values())
    (first + second).backward()
    assert cusa.base.tau.grad is not None and cusa.tau_img.grad is not None


def test_fixed_temperature_is_not_a_trainable_parameter() -> None:
    loss = ContrastiveLoss(tau=0.2, learnable=False)  # outside the default clamp range: used as given
    assert not loss.tau.requires_grad and loss.temperature == pytest.approx(0.2)
    assert "tau" in dict(loss.named_parameters())
    with pytest.raises(ConfigError, match="outside its clamp range"):
        ContrastiveLoss(tau=0.2, learnable=True)
    with pytest.raises(ConfigError, match="clamp range"):
        ContrastiveLoss(tau_min=0.0)


def test_triplet_module() -> None:
    img, txt = _rand(B, 6, seed=6), _rand(B, 6, seed=7)
    out = TripletLoss(margin=0.3, weight=0.5)(img, txt, IDS)
    assert list(out) == ["triplet_loss"]
    torch.testing.assert_close(out["triplet_loss"], 0.5 * triplet(img, txt, IDS, 0.3))


# --- CUSALoss ------------------------------------------------------------------------------------
def _cusa_inputs(seed: int = 10):
    g = [_rand(B, d, seed=seed + k) for k, d in enumerate((6, 6, 4, 4, 9, 5))]
    return g  # img, txt, img_uni, txt_uni, teacher_image, teacher_text


@pytest.mark.parametrize("mode", ["each", "add", "dot"])
def test_cusa_keys_weights_and_values(mode: str) -> None:
    img, txt, ui, ut, ti, tt = _cusa_inputs()
    loss = CUSALoss(alpha=0.3, beta=0.7, tau_c=0.4, tau_img=0.5, tau_txt=0.6, tau_teacher=0.2,
                    teacher_mode=mode, center_teacher=True).double()
    out = loss(img, txt, IDS, ti, tt, ui, ut)
    assert list(out) == ["contrastive_loss", "csa_loss", "usa_loss"]
    torch.testing.assert_close(out["contrastive_loss"], info_nce(img, txt, IDS, 0.05))
    torch.testing.assert_close(out["csa_loss"], 0.3 * csa(img, txt, ti, tt, 0.4, 0.2, mode, center=True))
    torch.testing.assert_close(out["usa_loss"], 0.7 * usa(ui, ut, ti, tt, 0.5, 0.6, 0.2, center=True))
    sum(out.values()).backward()
    for p in (loss.base.tau, loss.tau_c, loss.tau_img, loss.tau_txt):
        assert p.grad is not None and torch.isfinite(p.grad) and p.grad != 0
    assert set(loss.temperatures()) == {"tau", "tau_c", "tau_img", "tau_txt"}


def test_cusa_disabled_terms_are_omitted() -> None:
    img, txt, ui, ut, ti, tt = _cusa_inputs()
    assert list(CUSALoss(alpha=0.0, beta=0.5)(img, txt, IDS, ti, tt, ui, ut)) == ["contrastive_loss", "usa_loss"]
    assert list(CUSALoss(alpha=0.1, beta=0.0)(img, txt, IDS, ti, tt)) == ["contrastive_loss", "csa_loss"]
    # Nothing but the base: teachers are not needed.
    assert list(CUSALoss(alpha=0.0, beta=0.0)(img, txt, IDS, None, None)) == ["contrastive_loss"]


def test_cusa_missing_inputs_are_named() -> None:
    img, txt, ui, ut, ti, tt = _cusa_inputs()
    with pytest.raises(ItrkitError, match="needs image_uni"):
        CUSALoss(beta=0.5)(img, txt, IDS, ti, tt)
    with pytest.raises(ItrkitError, match="needs text_uni"):
        CUSALoss(beta=0.5)(img, txt, IDS, ti, tt, image_uni=ui)
    with pytest.raises(ItrkitError, match="teacher_text is None"):
        CUSALoss(alpha=0.1, beta=0.0)(img, txt, IDS, ti, None)
    with pytest.raises(ItrkitError, match="teacher_image has shape"):
        CUSALoss(alpha=0.1, beta=0.0)(img, txt, IDS, ti[:3], tt)
    with pytest.raises(ConfigError, match="teacher_mode"):
        CUSALoss(teacher_mode="mean")


class _SumBase(nn.Module):
    """A stand-in for a wrapped model's own loss with its own key name."""

    def forward(self, img: torch.Tensor, txt: torch.Tensor, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"itm_loss": (img * txt).sum()}


def test_cusa_custom_base_and_csa_tau_from_base() -> None:
    img, txt, ui, ut, ti, tt = _cusa_inputs()
    out = CUSALoss(base=_SumBase(), alpha=1.0, beta=0.0)(img, txt, IDS, ti, tt)
    assert list(out) == ["itm_loss", "csa_loss"]
    shared = CUSALoss(base=ContrastiveLoss(tau=0.07), alpha=1.0, beta=0.0, csa_tau_from_base=True).double()
    assert shared.tau_c is None and "tau_c" not in dict(shared.named_parameters())
    got = shared(img, txt, IDS, ti, tt)["csa_loss"]
    torch.testing.assert_close(got, csa(img, txt, ti, tt, 0.07))
    with pytest.raises(ConfigError, match="csa_tau_from_base"):
        CUSALoss(base=_SumBase(), csa_tau_from_base=True)


def test_usa_projector_definition() -> None:
    torch.manual_seed(0)
    proj = USAProjector(300, 200)
    assert isinstance(proj[0], nn.LayerNorm) and isinstance(proj[1], nn.Linear)
    assert list(proj.state_dict()) == ["0.weight", "0.bias", "1.weight", "1.bias"]
    assert float(proj[1].weight.detach().std()) == pytest.approx(0.02, rel=0.05)
    assert float(proj[1].bias.detach().abs().max()) == 0.0
    assert proj(torch.randn(3, 300)).shape == (3, 200)


# --- InstanceLoss --------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [1, 7, 16, 49])
def test_instance_chunked_equals_plain(chunk: int) -> None:
    c, d = 50, 6
    plain = InstanceLoss(c, d, weight=1.5).double()
    chunked = InstanceLoss(c, d, weight=1.5, chunk_classes=chunk).double()
    chunked.load_state_dict(plain.state_dict())
    labels = torch.tensor([3, 49, 3, 0, 17, 3, 0, 48])
    img0, txt0 = _rand(B, d, seed=30), _rand(B, d, seed=31)
    results = []
    for mod in (plain, chunked):
        img, txt = img0.clone().requires_grad_(), txt0.clone().requires_grad_()
        loss = mod(img, txt, labels)["instance_loss"]
        grads = torch.autograd.grad(loss, [img, txt, mod.classifier])
        results.append((loss, grads))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-12, atol=1e-12)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    ref = 1.5 * (F.cross_entropy(img0 @ plain.classifier.T, labels) + F.cross_entropy(txt0 @ plain.classifier.T, labels))
    torch.testing.assert_close(results[1][0], ref)


def test_instance_chunked_gradcheck() -> None:
    w = _rand(9, 4, seed=40).requires_grad_()
    img, txt = _rand(5, 4, seed=41).requires_grad_(), _rand(5, 4, seed=42).requires_grad_()
    labels = torch.tensor([0, 8, 3, 3, 5])
    assert torch.autograd.gradcheck(lambda a, b, c: instance(a, b, labels, c, chunk_classes=4), (img, txt, w))


def test_instance_module_init_and_errors() -> None:
    torch.manual_seed(0)
    mod = InstanceLoss(1000, 32, init_std=0.02)
    assert mod.classifier.shape == (1000, 32) and list(dict(mod.named_parameters())) == ["classifier"]
    assert float(mod.classifier.detach().std()) == pytest.approx(0.02, rel=0.05)
    with pytest.raises(DataError, match="instance label 1000"):
        mod(torch.randn(2, 32), torch.randn(2, 32), torch.tensor([1, 1000]))
    with pytest.raises(ItrkitError, match="dim 32"):
        mod(torch.randn(2, 16), torch.randn(2, 16), torch.tensor([1, 2]))
    with pytest.raises(ConfigError, match="chunk_classes"):
        InstanceLoss(10, 4, chunk_classes=0)
