import math

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
    assert parse_kd_spec("kdas") == [("kdas", 1.0)]
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
    small = kdas_terms({"p1": s, "p2": s}, {"p1": t, "p2": t}, attn_space="std", sgm_space="prob")
    big = kdas_terms({"p1": 20 * s, "p2": 20 * s}, {"p1": 20 * t, "p2": 20 * t}, attn_space="std", sgm_space="prob")
    paper = kdas_terms({"p1": 20 * s, "p2": 20 * s}, {"p1": 20 * t, "p2": 20 * t}, sgm_heads=("p1",))
    # Standardised attention does not see the logit scale at all; probability SGM stays <= 4 per head.
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
