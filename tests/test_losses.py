import math

import numpy as np
import pytest
import torch

from kdas_core.losses import attention_kl, kdas_terms, sgm_loss, structure_loss
from kdas_core.losses.base import build_distillers, parse_kd_spec
from kdas_core.models import create_model


def test_structure_loss_uses_boundary_weights_in_bce():
    # Errors on the boundary must cost more than the same errors far from it.
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 16:48, 16:48] = 1
    base = torch.where(mask > 0, 4.0, -4.0)
    near, far = base.clone(), base.clone()
    near[..., 16, 16:48] = -4.0  # flip one row on the edge
    far[..., 0, 0:32] = 4.0  # flip 32 background pixels far away
    assert structure_loss(near, mask) > structure_loss(far, mask)


def test_structure_loss_perfect_is_small_and_finite():
    mask = (torch.rand(2, 1, 32, 32) > 0.5).float()
    assert structure_loss(torch.where(mask > 0, 20.0, -20.0), mask) < 1e-3


@pytest.mark.parametrize("shape", [(1, 1, 32, 32), (3, 1, 24, 40)])
def test_attention_supervision_gives_the_student_a_gradient(shape):
    student = torch.randn(*shape, requires_grad=True)
    teacher = torch.randn(*shape)
    loss = attention_kl(student, teacher, tau=2.0)
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_attention_supervision_alone_trains_model_parameters():
    student = create_model("polyppvt-lite0")
    x = torch.randn(1, 3, 64, 64)
    out = student(x)
    teacher_map = torch.randn(1, 1, 64, 64)
    attention_kl(out["p1"], teacher_map).backward()
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and sum(g.abs().sum() for g in grads) > 0


def test_sgm_batch1_non_square_and_zero_for_equal_maps():
    s = torch.randn(1, 1, 30, 50, requires_grad=True)
    t = torch.randn(1, 1, 30, 50)
    loss = sgm_loss(s, t)
    loss.backward()
    assert loss > 0 and s.grad.abs().sum() > 0
    assert sgm_loss(t, t) == 0
    assert attention_kl(t, t).abs() < 1e-6


def test_sgm_ignores_the_antisymmetric_part():
    t = torch.randn(1, 1, 16, 16)
    anti = torch.randn(1, 1, 16, 16)
    anti = anti - anti.transpose(-1, -2)
    assert sgm_loss(t + anti, t) < 1e-10


def test_student_and_teacher_sizes_may_differ():
    s = torch.randn(2, 1, 32, 32, requires_grad=True)
    t = torch.randn(2, 1, 64, 64)
    terms = kdas_terms({"p1": s, "p2": s}, {"p1": t, "p2": t}, attn_space="std", sgm_space="prob")
    sum(terms.values()).backward()
    assert s.grad.abs().sum() > 0


def test_kd_spec_parsing_and_errors():
    assert parse_kd_spec("kd") == [("kd", 1.0)]
    # a bare name takes the method's default weight (kdas: 0.5, chosen on validation), ':W' overrides it
    assert parse_kd_spec("kdas") == [("kdas", 0.5)]
    assert parse_kd_spec("kdas:1,kdas-paper") == [("kdas", 1.0), ("kdas-paper", 1.0)]
    assert parse_kd_spec("none") == []
    with pytest.raises(ValueError, match="unknown --kd method"):
        parse_kd_spec("kdas,nonsense")
    with pytest.raises(ValueError, match="number"):
        parse_kd_spec("kdas:x")


def test_kdas_distiller_weights_seg_loss_by_one_minus_alpha():
    student = create_model("polyppvt-lite0")
    (d,) = build_distillers("kdas", student, [student])
    assert d.seg_weight == pytest.approx(0.7)


def test_sgm_and_attention_match_values_worked_by_hand():
    # S = [[1, 2], [0, 1]] -> S + S^T = [[2, 2], [2, 2]]; T = [[1, 0], [0, 1]] -> [[2, 0], [0, 2]].
    s = torch.tensor([[1.0, 2.0], [0.0, 1.0]]).view(1, 1, 2, 2)
    t = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(1, 1, 2, 2)
    assert sgm_loss(s, t).item() == pytest.approx((0 + 4 + 4 + 0) / 4)
    # A(T) for T = I (W = 2): softmax(I / sqrt 2) row-wise, times I.
    from kdas_core.losses import self_attention_map

    e = math.exp(1 / math.sqrt(2))
    a = self_attention_map(t)[0]
    assert torch.allclose(a, torch.tensor([[e / (e + 1), 1 / (e + 1)], [1 / (e + 1), e / (e + 1)]]), atol=1e-6)


def test_scale_free_kdas_is_bounded_where_the_paper_form_explodes():
    torch.manual_seed(0)
    s = torch.randn(2, 1, 16, 16)
    t = torch.randn(2, 1, 16, 16)
    small = kdas_terms({"p1": 3 * s, "p2": 3 * s}, {"p1": 3 * t, "p2": 3 * t}, attn_space="std", sgm_space="prob")
    big = kdas_terms({"p1": 20 * s, "p2": 20 * s}, {"p1": 20 * t, "p2": 20 * t}, attn_space="std", sgm_space="prob")
    paper = kdas_terms({"p1": 20 * s, "p2": 20 * s}, {"p1": 20 * t, "p2": 20 * t}, sgm_heads=("p1",))
    # Standardised attention does not see the logit scale (of maps spread wider than its floor, one
    # logit); probability SGM stays <= 4 per head.
    assert big["attn_kl"].item() == pytest.approx(small["attn_kl"].item(), rel=1e-4)
    assert big["sgm"] <= 8 and paper["sgm"] > 100 * big["sgm"]


def test_kdas_paper_guides_p1_only_and_kdas_both_heads():
    student = create_model("polyppvt-lite0")
    s = {"p1": torch.zeros(1, 1, 8, 8), "p2": torch.zeros(1, 1, 8, 8)}
    t = {"p1": torch.zeros(1, 1, 8, 8), "p2": torch.randn(1, 1, 8, 8) * 5}
    (paper,) = build_distillers("kdas-paper", student, [student])
    (ours,) = build_distillers("kdas", student, [student])
    assert paper(s, [t], {})["kdas-paper/sgm"] == 0
    assert ours(s, [t], {})["kdas/sgm"] > 0


# --- KDAS reference values written out from the formulas (plain numpy and loops, none of the
# module's helpers), so a change to the math of either form fails here ----------------------------

def _np_attention(x):
    """A(X) = softmax(X X^T / sqrt(W)) X for one H x W map, by loops."""
    h, w = x.shape
    scores = np.array([[sum(x[i, k] * x[j, k] for k in range(w)) / math.sqrt(w) for j in range(h)] for i in range(h)])
    weights = np.exp(scores) / np.exp(scores).sum(axis=1, keepdims=True)
    return np.array([[sum(weights[i, j] * x[j, c] for j in range(h)) for c in range(w)] for i in range(h)])


def _np_kl(s, t, tau):
    """KL(teacher || student) of softmax(A / tau) over the H*W positions of one map."""
    p_s, p_t = (np.exp(_np_attention(m).ravel() / tau) for m in (s, t))
    p_s, p_t = p_s / p_s.sum(), p_t / p_t.sum()
    return sum(pt * (math.log(pt) - math.log(ps)) for ps, pt in zip(p_s, p_t))


def _np_sgm(s, t):
    """mean over (i, j) of ((S_s + S_s^T) - (S_t + S_t^T))^2 for square maps."""
    k = s.shape[0]
    return sum(((s[i, j] + s[j, i]) - (t[i, j] + t[j, i])) ** 2 for i in range(k) for j in range(k)) / (k * k)


def _np_std(x):
    return (x - x.mean()) / math.sqrt(x.var() + 1e-5)  # population variance, eps 1e-5


def _np_sigmoid(x):
    return 1 / (1 + np.exp(-x))


def _t(x):
    return torch.tensor(x, dtype=torch.float32).view(1, 1, *np.shape(x))


def test_attention_kl_on_a_2x2_map_worked_by_hand():
    # Student S = 0: A(S) = 0, so the student distribution is uniform, 1/4 at each position.
    # Teacher T = I (W = 2): X X^T = I, softmax rows of I / sqrt 2: e = exp(1/sqrt 2) = 2.028115,
    #   a = e / (e + 1) = 0.669762, b = 1 / (e + 1) = 0.330238; A(T) = [[a, b], [b, a]].
    # tau = 2: p_t = (q, r, r, q), q = exp(a/2) / (2 (exp(a/2) + exp(b/2))) = 0.271169, r = 0.228831.
    # KL(p_t || uniform) = 2 q ln(4 q) + 2 r ln(4 r) = 0.0035894373.
    s, t = np.zeros((2, 2)), np.eye(2)
    assert attention_kl(_t(s), _t(t), tau=2.0).item() == pytest.approx(0.0035894373, rel=1e-5)
    assert _np_kl(s, t, 2.0) == pytest.approx(0.0035894373, rel=1e-8)  # the oracle below agrees
    # The direction matters: KL(uniform || p) = -(ln(4 q) + ln(4 r)) / 2 = 0.0035980555 when the roles swap.
    assert attention_kl(_t(t), _t(s), tau=2.0).item() == pytest.approx(0.0035980555, rel=1e-5)


def test_attention_kl_matches_the_formula_on_maps_of_other_sizes():
    rng = np.random.default_rng(3)
    for shape, tau in (((2, 2), 2.0), ((2, 3), 1.0), ((3, 2), 4.0)):
        s, t = rng.normal(size=shape), rng.normal(size=shape)
        assert attention_kl(_t(s), _t(t), tau).item() == pytest.approx(_np_kl(s, t, tau), rel=1e-5, abs=1e-7), shape
    # batchmean: the mean over images of each image's KL
    s, t = rng.normal(size=(2, 2, 2)), rng.normal(size=(2, 2, 2))
    batch = attention_kl(torch.tensor(s, dtype=torch.float32)[:, None], torch.tensor(t, dtype=torch.float32)[:, None])
    assert batch.item() == pytest.approx((_np_kl(s[0], t[0], 2.0) + _np_kl(s[1], t[1], 2.0)) / 2, rel=1e-5)


def test_sgm_resizes_a_non_square_teacher_to_its_short_side():
    # Teacher 2 x 3 -> k = 2: bilinear (align_corners=False) samples source columns 0.25 and 1.75,
    # i.e. col0' = 0.75 c0 + 0.25 c1, col1' = 0.25 c1 + 0.75 c2 (rows stay). T = [[0, 4, 8], [2, 2, 2]]
    # -> [[1, 7], [2, 2]]; T' + T'^T = [[2, 9], [9, 4]]. Student 0 -> SGM = (4 + 81 + 81 + 16) / 4 = 45.5.
    t = np.array([[0.0, 4.0, 8.0], [2.0, 2.0, 2.0]])
    assert sgm_loss(_t(np.zeros((2, 3))), _t(t)).item() == pytest.approx(45.5, rel=1e-6)


def _heads(rng, shape=(2, 2)):
    return {h: rng.normal(size=shape) * 3 for h in ("p1", "p2")}


@pytest.mark.parametrize("method", ["kdas-paper", "kdas"])
def test_kdas_distillers_match_the_objective_written_out(method):
    # alpha * [tau^2 * (KL(P1) + KL(P2)) + SGM], alpha = 0.3, tau = 2, averaged over teachers.
    # kdas-paper: raw logits, SGM on P1 only; kdas: standardised logits for the KL, sigmoid
    # probabilities for the SGM, on both heads.
    rng = np.random.default_rng(7)
    s, teachers = _heads(rng), [_heads(rng), _heads(rng)]
    if method == "kdas-paper":
        attn, sgm_map, sgm_heads = (lambda x: x), (lambda x: x), ("p1",)
    else:
        attn, sgm_map, sgm_heads = _np_std, _np_sigmoid, ("p1", "p2")
    kl = np.mean([4.0 * sum(_np_kl(attn(s[h]), attn(t[h]), 2.0) for h in ("p1", "p2")) for t in teachers])
    sgm = np.mean([sum(_np_sgm(sgm_map(s[h]), sgm_map(t[h])) for h in sgm_heads) for t in teachers])
    student = create_model("polyppvt-lite0")
    (d,) = build_distillers(f"{method}:1", student, [student, student])
    terms = d({h: _t(v) for h, v in s.items()}, [{h: _t(v) for h, v in t.items()} for t in teachers], {})
    assert set(terms) == {f"{method}/attn_kl", f"{method}/sgm"}
    assert terms[f"{method}/attn_kl"].item() == pytest.approx(0.3 * kl, rel=1e-4)
    assert terms[f"{method}/sgm"].item() == pytest.approx(0.3 * sgm, rel=1e-5)
    assert d.seg_weight == pytest.approx(0.7)  # (1 - alpha) on the segmentation loss
    (heavier,) = build_distillers(f"{method}:2", student, [student, student])
    doubled = heavier({h: _t(v) for h, v in s.items()}, [{h: _t(v) for h, v in t.items()} for t in teachers], {})
    assert doubled[f"{method}/sgm"].item() == pytest.approx(0.6 * sgm, rel=1e-5)
    # the bare name: kdas-paper keeps the paper's weights, kdas the weight chosen on validation (0.5)
    (default,) = build_distillers(method, student, [student, student])
    plain = default({h: _t(v) for h, v in s.items()}, [{h: _t(v) for h, v in t.items()} for t in teachers], {})
    w = 1.0 if method == "kdas-paper" else 0.5
    assert plain[f"{method}/sgm"].item() == pytest.approx(0.3 * w * sgm, rel=1e-5)


def test_kdas_standardised_maps_do_not_blow_a_near_constant_teacher_map_up_into_noise():
    from kdas_core.losses.methods.kdas import MAPS

    g = torch.Generator().manual_seed(0)
    empty = -8.0 + 0.01 * torch.randn(1, 1, 32, 32, generator=g)  # no polyp: a flat, confident "background"
    polyp = torch.full((1, 1, 32, 32), -6.0)
    polyp[..., 8:20, 10:24] = 4.0
    std = MAPS["std"]
    assert std(empty).std() < 0.05  # centred, left about as flat as it was: not unit-variance noise to match
    assert abs(std(empty).mean()) < 1e-4
    assert std(polyp).std().item() == pytest.approx(1.0, abs=1e-3)  # a map with structure is standardised as before
    # the ablation (kdas-nofloor) is what came before the floor: the flat map becomes unit-variance noise
    assert MAPS["std-nofloor"](empty).std().item() > 0.9  # (just under 1: the eps beside a variance of 1e-4)
    assert torch.allclose(MAPS["std-nofloor"](polyp), std(polyp), atol=1e-4)
    # a flat student and a flat teacher agree: the SGM term on them is near zero, not the distance of two noises
    other = -7.0 + 0.01 * torch.randn(1, 1, 32, 32, generator=g)
    assert kdas_terms({"p1": other, "p2": other}, {"p1": empty, "p2": empty}, sgm_space="std")["sgm"] < 1e-3
