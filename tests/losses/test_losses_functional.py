"""itrkit.losses.functional against explicit per-element loop references (value and gradient).

The references use only scalar torch ops inside Python loops over i, j, k (no matrix products,
no softmax/log_softmax/kl_div), so autograd gives an independent gradient too. float64 throughout.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from itrkit.errors import DataError, ItrkitError
from itrkit.losses import functional as LF

# Row ids with repeats (3 captions of image 5, 2 of image 1) in a non-contiguous order.
IDS = [5, 1, 5, 2, 5, 7, 1]
B, D, DT_I, DT_T = len(IDS), 5, 6, 3


def _rand(*shape: int, seed: int, grad: bool = True) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(grad)


# --- loop references -----------------------------------------------------------------------------
def r_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    s = a[0] * b[0]
    for k in range(1, a.shape[0]):
        s = s + a[k] * b[k]
    return s


def r_cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return r_dot(a, b) / (torch.sqrt(r_dot(a, a)) * torch.sqrt(r_dot(b, b)))


def r_sim(x: torch.Tensor, y: torch.Tensor) -> list[list[torch.Tensor]]:
    return [[r_cos(x[i], y[j]) for j in range(y.shape[0])] for i in range(x.shape[0])]


def r_lse(vals: list[torch.Tensor]) -> torch.Tensor:
    m = max(float(v.detach()) for v in vals)
    s = torch.exp(vals[0] - m)
    for v in vals[1:]:
        s = s + torch.exp(v - m)
    return torch.log(s) + m


def r_softmax_rows(mat: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
    out = []
    for row in mat:
        lse = r_lse(row)
        out.append([torch.exp(v - lse) for v in row])
    return out


def r_transpose(mat: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
    return [[mat[j][i] for j in range(len(mat))] for i in range(len(mat[0]))]


def r_info_nce(img, txt, ids, tau):
    s = r_sim(img, txt)
    n = len(ids)
    total_i2t, total_t2i = 0.0, 0.0
    for i in range(n):
        npos = sum(1 for k in range(n) if ids[k] == ids[i])
        lse_row = r_lse([s[i][j] / tau for j in range(n)])
        lse_col = r_lse([s[j][i] / tau for j in range(n)])
        for j in range(n):
            if ids[j] == ids[i]:
                total_i2t = total_i2t - (s[i][j] / tau - lse_row) / npos
                total_t2i = total_t2i - (s[j][i] / tau - lse_col) / npos
    return 0.5 * (total_i2t / n + total_t2i / n)


def r_triplet(img, txt, ids, margin):
    s = r_sim(img, txt)
    n = len(ids)
    total = 0.0
    for i in range(n):
        h_i2t = torch.zeros((), dtype=torch.float64)
        h_t2i = torch.zeros((), dtype=torch.float64)
        for j in range(n):
            if ids[j] == ids[i]:
                continue
            c1 = margin - s[i][i] + s[i][j]
            c2 = margin - s[i][i] + s[j][i]
            if float(c1.detach()) > float(h_i2t.detach()):
                h_i2t = c1
            if float(c2.detach()) > float(h_t2i.detach()):
                h_t2i = c2
        total = total + h_i2t + h_t2i
    return total / n


def r_center(t):
    n, d = t.shape
    rows = []
    for i in range(n):
        rows.append(torch.stack([t[i, k] - sum(t[m, k] for m in range(n)) / n for k in range(d)]))
    return torch.stack(rows)


def r_teacher(t_img, t_txt, tau_t, mode, center):
    t_img, t_txt = t_img.detach(), t_txt.detach()
    if center:
        t_img, t_txt = r_center(t_img), r_center(t_txt)
    ti, tt = r_sim(t_img, t_img), r_sim(t_txt, t_txt)
    n = len(ti)
    if mode == "add":
        ti = tt = [[(ti[i][j] + tt[i][j]) / 2 for j in range(n)] for i in range(n)]
    elif mode == "dot":
        ti = tt = [[torch.sqrt(torch.clamp(ti[i][j], min=0) * torch.clamp(tt[i][j], min=0)) for j in range(n)]
                   for i in range(n)]
    scale = lambda m: [[v / tau_t for v in row] for row in m]  # noqa: E731
    return r_softmax_rows(scale(ti)), r_softmax_rows(scale(tt))


def r_kl(p, logits):
    """mean_i Σ_j p_ij (log p_ij − log softmax(logits_i)_j)."""
    n = len(p)
    total = 0.0
    for i in range(n):
        lse = r_lse(logits[i])
        for j in range(len(p[i])):
            total = total + p[i][j] * (torch.log(p[i][j]) - (logits[i][j] - lse))
    return total / n


def r_csa(img, txt, t_img, t_txt, tau, tau_t, mode, center):
    p_i, p_t = r_teacher(t_img, t_txt, tau_t, mode, center)
    s = [[v / tau for v in row] for row in r_sim(img, txt)]
    return 0.5 * (r_kl(p_i, s) + r_kl(p_t, r_transpose(s)))


def r_usa(ui, ut, t_img, t_txt, tau_i, tau_t_, tau_teacher, center):
    p_i, p_t = r_teacher(t_img, t_txt, tau_teacher, "each", center)
    si = [[v / tau_i for v in row] for row in r_sim(ui, ui)]
    st = [[v / tau_t_ for v in row] for row in r_sim(ut, ut)]
    return 0.5 * (r_kl(p_i, si) + r_kl(p_t, st))


def r_instance(img, txt, labels, w):
    def ce(x):
        total = 0.0
        for i in range(x.shape[0]):
            z = [r_dot(x[i], w[c]) for c in range(w.shape[0])]
            total = total + r_lse(z) - z[labels[i]]
        return total / x.shape[0]

    return ce(img) + ce(txt)


def _assert_same(fast: torch.Tensor, ref: torch.Tensor, inputs: list[torch.Tensor]) -> None:
    assert torch.isfinite(fast)
    torch.testing.assert_close(fast, ref.reshape(()).to(fast.dtype), rtol=1e-10, atol=1e-12)
    g_fast = torch.autograd.grad(fast, inputs, allow_unused=True)
    g_ref = torch.autograd.grad(ref, inputs, allow_unused=True)
    for a, b in zip(g_fast, g_ref):
        if b is None:
            assert a is None or torch.count_nonzero(a) == 0
            continue
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


# --- tests ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("learn_tau", [False, True])
def test_info_nce_matches_loop(learn_tau: bool) -> None:
    img, txt = _rand(B, D, seed=1), _rand(B, D, seed=2)
    tau = torch.tensor(0.07, dtype=torch.float64, requires_grad=True) if learn_tau else 0.07
    ids = torch.tensor(IDS)
    inputs = [img, txt] + ([tau] if learn_tau else [])
    _assert_same(LF.info_nce(img, txt, ids, tau), r_info_nce(img, txt, IDS, tau), inputs)


def test_info_nce_unique_ids_is_symmetric_cross_entropy() -> None:
    img, txt = _rand(B, D, seed=3, grad=False), _rand(B, D, seed=4, grad=False)
    s = F.normalize(img, dim=1) @ F.normalize(txt, dim=1).T / 0.1
    target = torch.arange(B)
    expected = 0.5 * (F.cross_entropy(s, target) + F.cross_entropy(s.T, target))
    torch.testing.assert_close(LF.info_nce(img, txt, list(range(B)), 0.1), expected)


def test_info_nce_is_scale_invariant_and_fp32_for_half_inputs() -> None:
    img, txt = _rand(B, D, seed=5, grad=False), _rand(B, D, seed=6, grad=False)
    ids = torch.tensor(IDS)
    torch.testing.assert_close(LF.info_nce(3 * img, 0.5 * txt, ids, 0.05), LF.info_nce(img, txt, ids, 0.05))
    half = LF.info_nce(img.half(), txt.half(), ids, 0.01)
    assert half.dtype == torch.float32 and torch.isfinite(half)


@pytest.mark.parametrize("margin", [0.2, 1.5])
def test_triplet_matches_loop(margin: float) -> None:
    img, txt = _rand(B, D, seed=7), _rand(B, D, seed=8)
    _assert_same(LF.triplet(img, txt, torch.tensor(IDS), margin), r_triplet(img, txt, IDS, margin), [img, txt])


def test_triplet_without_negatives_is_zero() -> None:
    img, txt = _rand(3, D, seed=9), _rand(3, D, seed=10)
    assert float(LF.triplet(img, txt, [4, 4, 4]).detach()) == 0.0


@pytest.mark.parametrize("mode", ["each", "add", "dot"])
@pytest.mark.parametrize("center", [False, True])
def test_teacher_probs_match_loop(mode: str, center: bool) -> None:
    t_img, t_txt = _rand(B, DT_I, seed=11), _rand(B, DT_T, seed=12)
    p_i, p_t = LF.teacher_probs(t_img, t_txt, 0.3, mode, center)
    r_i, r_t = r_teacher(t_img, t_txt, 0.3, mode, center)
    assert not p_i.requires_grad and not p_t.requires_grad
    torch.testing.assert_close(p_i, torch.stack([torch.stack(r) for r in r_i]), rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(p_t, torch.stack([torch.stack(r) for r in r_t]), rtol=1e-10, atol=1e-13)
    if mode != "each":
        assert torch.equal(p_i, p_t)


def test_teacher_centering_changes_near_uniform_labels() -> None:
    # All-positive features with a large shared component: cosines near 1, labels near uniform.
    base = torch.rand(16, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) + 3.0
    def entropy(p: torch.Tensor) -> float:
        return float(-(p * p.log()).sum(1).mean())
    p_raw, _ = LF.teacher_probs(base, base, 0.1)
    p_cen, _ = LF.teacher_probs(base, base, 0.1, center=True)
    assert entropy(p_raw) > math.log(16) - 0.01
    assert entropy(p_cen) < entropy(p_raw) - 0.5


@pytest.mark.parametrize("mode", ["each", "add", "dot"])
@pytest.mark.parametrize("center", [False, True])
def test_csa_matches_loop(mode: str, center: bool) -> None:
    img, txt = _rand(B, D, seed=13), _rand(B, D, seed=14)
    t_img, t_txt = _rand(B, DT_I, seed=15), _rand(B, DT_T, seed=16)
    tau = torch.tensor(0.45, dtype=torch.float64, requires_grad=True)
    fast = LF.csa(img, txt, t_img, t_txt, tau, tau_teacher=0.5, mode=mode, center=center)
    ref = r_csa(img, txt, t_img, t_txt, tau, 0.5, mode, center)
    # Teacher inputs get no gradient (soft labels are constants).
    _assert_same(fast, ref, [img, txt, tau, t_img, t_txt])


def test_csa_from_scores_equals_csa_on_cosines() -> None:
    img, txt = _rand(B, D, seed=13), _rand(B, D, seed=14)
    t_img, t_txt = _rand(B, DT_I, seed=15), _rand(B, DT_T, seed=16)
    p_i, p_t = LF.teacher_probs(t_img, t_txt, 0.5)
    cos = torch.nn.functional.normalize(img, dim=1) @ torch.nn.functional.normalize(txt, dim=1).T
    _assert_same(LF.csa_from_scores(cos, p_i, p_t, 0.2), r_csa(img, txt, t_img, t_txt, 0.2, 0.5, "each", False),
                 [img, txt])
    with pytest.raises(ItrkitError, match="square"):
        LF.csa_from_scores(cos[:, :3], p_i, p_t, 0.2)


@pytest.mark.parametrize("center", [False, True])
def test_usa_matches_loop(center: bool) -> None:
    ui, ut = _rand(B, D, seed=17), _rand(B, D + 2, seed=18)
    t_img, t_txt = _rand(B, DT_I, seed=19), _rand(B, DT_T, seed=20)
    tau_i = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    tau_t = torch.tensor(0.6, dtype=torch.float64, requires_grad=True)
    fast = LF.usa(ui, ut, t_img, t_txt, tau_i, tau_t, tau_teacher=1.0, center=center)
    _assert_same(fast, r_usa(ui, ut, t_img, t_txt, tau_i, tau_t, 1.0, center), [ui, ut, tau_i, tau_t])


def test_csa_is_zero_when_student_equals_teacher_distribution() -> None:
    # Student cosines equal to the teacher's (same features) at the same temperature: KL = 0.
    x = _rand(B, D, seed=21, grad=False)
    assert abs(float(LF.csa(x, x, x, x, 0.5, tau_teacher=0.5))) < 1e-12
    assert abs(float(LF.usa(x, x, x, x, 0.5, 0.5, tau_teacher=0.5))) < 1e-12


def test_instance_matches_loop() -> None:
    img, txt, w = _rand(B, D, seed=22), _rand(B, D, seed=23), _rand(4, D, seed=24)
    labels = [2, 0, 2, 1, 2, 3, 0]
    fast = LF.instance(img, txt, torch.tensor(labels), w)
    _assert_same(fast, r_instance(img, txt, labels, w), [img, txt, w])


def test_bad_inputs_raise_one_line_errors() -> None:
    img, txt = _rand(B, D, seed=25, grad=False), _rand(B, D, seed=26, grad=False)
    with pytest.raises(ItrkitError, match="img_ids has 3 entries"):
        LF.info_nce(img, txt, [1, 2, 3], 0.1)
    with pytest.raises(ItrkitError, match="txt has 2 rows"):
        LF.triplet(img, txt[:2], IDS)
    with pytest.raises(ItrkitError, match="teacher mode 'max'"):
        LF.teacher_probs(img, txt, mode="max")
    with pytest.raises(ItrkitError, match="teacher_image has 3 rows"):
        LF.csa(img, txt, img[:3], txt, 0.5)
    with pytest.raises(DataError, match="instance label 9"):
        LF.instance(img, txt, torch.tensor([0, 1, 2, 3, 0, 1, 9]), torch.zeros(4, D, dtype=torch.float64))
