"""The `--kd` methods: registry, per-method invariants on tiny fake output dicts, and one run with
real tiny models. Everything is CPU and small (the whole file takes seconds)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from kdas_core.losses import available, build_distillers, parse_kd_spec
from kdas_core.losses.methods.common import attention_map, binary_kl, softmax_kl
from kdas_core.losses.methods.grd import affinity_loss, instance_masks
from kdas_core.losses.methods.mtkd import dice_loss, lovasz_hinge, teacher_weights

METHODS = ["kd", "at", "cwd", "skd", "hlfd", "mtkd", "grd", "kdas"]
# Terms that are supervised (compare with the mask), not distillation: not zero when S == T.
SUPERVISED = {"mtkd/dice", "mtkd/lovasz"}

STUDENT_CH = [8, 12, 20, 24]
TEACHER_CH = [16, 24, 40, 48]


class Stub(nn.Module):
    """Just enough of a model for a distiller's constructor: stage and decoder widths."""

    def __init__(self, stages, dec=8):
        super().__init__()
        self.encoder = SimpleNamespace(channels=list(stages))
        self.decoder = SimpleNamespace(out_cfm=SimpleNamespace(in_channels=dec))


def fake_out(stages, size, batch=2, dec=8, grad=False, seed=0):
    """An output dict shaped like PolypPVT.forward at input `size`."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        t = torch.randn(*shape, generator=g)
        return t.requires_grad_(grad)

    feats = [r(batch, c, size // s, size // s) for c, s in zip(stages, (4, 8, 16, 32))]
    out = {"features": feats, "cim": r(batch, stages[0], size // 4, size // 4),
           "cfm": r(batch, dec, size // 8, size // 8), "sam": r(batch, dec, size // 8, size // 8),
           "p1_low": r(batch, 1, size // 8, size // 8), "p2_low": r(batch, 1, size // 8, size // 8)}
    out["p1"] = F.interpolate(out["p1_low"], size=(size, size), mode="bilinear", align_corners=False)
    out["p2"] = F.interpolate(out["p2_low"], size=(size, size), mode="bilinear", align_corners=False)
    return out


def detached(out):
    return {k: [v.detach().clone() for v in x] if isinstance(x, list) else x.detach().clone() for k, x in out.items()}


def leaves(out):
    return [t for v in out.values() for t in (v if isinstance(v, list) else [v]) if t.is_leaf and t.requires_grad]


def two_blob_mask(batch, size):
    m = torch.zeros(batch, 1, size, size)
    m[:, :, 4:size // 3, 4:size // 3] = 1  # two separate polyps: two instances for grd
    m[:, :, size // 2:size - 6, size // 2:size - 4] = 1
    return m


def run(method, s_out, t_outs, mask, student, teachers, train=True):
    d = build_distillers(method, student, teachers)[0]
    d.train(train)
    return d, d(s_out, t_outs, {"image": torch.zeros(mask.shape[0], 3, *mask.shape[-2:]), "mask": mask})


def test_registry_lists_every_method_with_one_line():
    names = available()
    assert set(METHODS) | {"none"} <= set(names)
    assert all(s and "\n" not in s for s in names.values())
    assert parse_kd_spec("kdas,cwd:0.5,none") == [("kdas", 0.5), ("cwd", 0.5)]


@pytest.mark.parametrize("method", [m for m in METHODS if m != "hlfd"])  # hlfd: test_hlfd_zero_at_its_targets
def test_zero_when_student_equals_teacher(method):
    torch.manual_seed(0)
    model = Stub(TEACHER_CH)
    s_out = fake_out(TEACHER_CH, 64)
    t_out = detached(s_out)
    d, terms = run(method, s_out, [t_out], two_blob_mask(2, 64), model, [model])
    if method == "grd":  # second step: the memory bank is filled, the cross-image edges run too
        terms = d(s_out, [t_out], {"mask": two_blob_mask(2, 64)})
        assert int(d.bank0_count) > 0
    for k, v in terms.items():
        if k not in SUPERVISED:
            assert abs(float(v)) < 1e-5, (k, float(v))


def test_hlfd_zero_at_its_targets():
    """HLFD's targets are other layers: spatially constant features give uniform attention maps
    everywhere, and zeroed adapters reproduce a constant teacher output and channel-uniform maps."""
    model = Stub(TEACHER_CH)
    s_out = {k: [torch.ones_like(t) for t in v] if isinstance(v, list) else torch.ones_like(v)
             for k, v in fake_out(TEACHER_CH, 64).items()}
    t_out = detached(s_out)
    t_out["p1"], t_out["p2"] = torch.zeros_like(t_out["p1"]), torch.zeros_like(t_out["p2"])
    d = build_distillers("hlfd", model, [model])[0]
    with torch.no_grad():
        for p in d.parameters():
            p.zero_()
    terms = d(s_out, [t_out], {"mask": two_blob_mask(2, 64)})
    assert all(abs(float(v.detach())) < 1e-6 for v in terms.values()), terms


@pytest.mark.parametrize("method", METHODS)
def test_gradient_reaches_student_and_adapters(method):
    student, teacher = Stub(STUDENT_CH), Stub(TEACHER_CH)
    s_out = fake_out(STUDENT_CH, 64, grad=True)
    t_out = fake_out(TEACHER_CH, 64, seed=1)
    d, terms = run(method, s_out, [t_out], two_blob_mask(2, 64), student, [teacher])
    sum(terms.values()).backward()
    assert any(t.grad is not None and t.grad.abs().sum() > 0 for t in leaves(s_out))
    for name, p in d.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{method}: adapter {name} gets no gradient"
    assert all(t.grad is None for t in leaves(t_out) if t.requires_grad)


@pytest.mark.parametrize("method", METHODS)
def test_batch_one_and_teacher_at_another_size(method):
    """Teacher at 96 px, student at 64 px (every map differs in size), batch 1, two teachers."""
    student, teachers = Stub(STUDENT_CH), [Stub(TEACHER_CH), Stub(STUDENT_CH)]
    s_out = fake_out(STUDENT_CH, 64, batch=1, grad=True)
    t_outs = [fake_out(TEACHER_CH, 96, batch=1, seed=1), fake_out(STUDENT_CH, 96, batch=1, seed=2)]
    _, terms = run(method, s_out, t_outs, two_blob_mask(1, 64), student, teachers)
    total = sum(terms.values())
    assert torch.isfinite(total) and total.ndim == 0
    total.backward()


def test_spec_weight_scales_terms():
    student, teacher = Stub(STUDENT_CH), Stub(TEACHER_CH)
    s_out, t_out, mask = fake_out(STUDENT_CH, 64), fake_out(TEACHER_CH, 64, seed=1), two_blob_mask(2, 64)
    torch.manual_seed(0)
    one = build_distillers("cwd", student, [teacher])[0]
    torch.manual_seed(0)
    half = build_distillers("cwd:0.5", student, [teacher])[0]
    a, b = one(s_out, [t_out], {"mask": mask}), half(s_out, [t_out], {"mask": mask})
    for k in a:
        assert torch.allclose(0.5 * a[k], b[k])


def test_mtkd_replaces_seg_loss_and_weights_teachers_by_dice():
    student = Stub(STUDENT_CH)
    d = build_distillers("mtkd", student, [Stub(TEACHER_CH), Stub(TEACHER_CH)])[0]
    # the trainer's structure loss is off with mtkd, also beside a method that only down-weights it
    from kdas_core.training.trainer import TrainStep

    both = nn.ModuleList(build_distillers("kdas,mtkd", student, [Stub(TEACHER_CH), Stub(TEACHER_CH)]))
    assert TrainStep(student, both, [], None).seg_weight == 0.0
    assert TrainStep(student, nn.ModuleList(build_distillers("kdas", student, [student])), [], None).seg_weight \
        == pytest.approx(0.7)
    mask = two_blob_mask(2, 32)
    good, bad = (mask * 20 - 10), -(mask * 20 - 10)
    w = teacher_weights([good, bad], mask, "dice", 0.1)
    assert w.shape[:2] == (2, 2) and torch.all(w[0] > 0.99)
    assert torch.allclose(w.sum(0), torch.ones_like(w[0]))
    wc = teacher_weights([good, good * 0.01], mask, "confidence", 0.1)
    assert wc.shape == (2, 2, 1, 32, 32) and torch.all(wc[0] > wc[1])


def test_lovasz_and_dice_on_perfect_and_wrong_predictions():
    mask = two_blob_mask(2, 32)
    perfect = mask * 20 - 10
    assert float(lovasz_hinge(perfect, mask)) == pytest.approx(0.0, abs=1e-6)
    assert float(dice_loss(perfect, mask)) < 1e-3
    assert float(lovasz_hinge(-perfect, mask)) > 1.0
    assert float(dice_loss(-perfect, mask)) > 0.99


def test_binary_kl_matches_two_class_softmax_kl():
    s, t, tau = torch.randn(2, 1, 5, 5), torch.randn(2, 1, 5, 5), 4.0
    mine = binary_kl(s, torch.sigmoid(t / tau), tau)
    two = lambda z: torch.cat([torch.zeros_like(z), z], 1)  # noqa: E731
    ref = softmax_kl(two(s), two(t), tau, "channel")  # mean over pixels of the 2-class KL
    assert torch.allclose(mine, ref, atol=1e-6)


def test_attention_map_is_unit_norm_and_channel_free():
    a = attention_map(torch.randn(2, 7, 6, 6), p=4, size=(12, 12))
    assert a.shape == (2, 144) and torch.allclose(a.norm(dim=1), torch.ones(2))


def test_grd_instances_and_affinities():
    masks = instance_masks(two_blob_mask(1, 32))
    assert masks[0].shape[0] == 3  # background + two polyps
    e = F.normalize(torch.randn(1, 4, 8, 8), dim=1)
    assert float(affinity_loss(e, e)) == 0.0
    assert float(affinity_loss(e, F.normalize(torch.randn(1, 4, 8, 8), dim=1))) > 0


def test_grd_bank_is_not_saved_but_adapters_are():
    d = build_distillers("grd", Stub(STUDENT_CH, dec=6), [Stub(TEACHER_CH, dec=8)])[0]
    keys = set(d.state_dict())
    assert any(k.startswith("adapters.") for k in keys) and not any("bank" in k for k in keys)


def test_real_tiny_models_all_methods_train_step():
    """lite0 student, b0 'teacher' at 64x64, batch 1: every method in one --kd list, one step."""
    from kdas_core.models import create_model

    torch.manual_seed(0)
    student, teacher = create_model("polyppvt-lite0"), create_model("polyppvt-b0").eval()
    distillers = build_distillers(",".join(METHODS), student, [teacher])
    assert sum(p.numel() for p in distillers.parameters()) > 0
    opt = torch.optim.AdamW(list(student.parameters()) + list(distillers.parameters()), lr=1e-3)
    x = torch.randn(1, 3, 64, 64)
    mask = two_blob_mask(1, 64)
    with torch.no_grad():
        t_out = teacher(x)
    s_out, terms = student(x), {}
    for d in distillers:
        terms.update(d(s_out, [t_out], {"image": x, "mask": mask}))
    loss = sum(terms.values())
    assert torch.isfinite(loss)
    before = [p.detach().clone() for p in distillers.parameters()]
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, distillers.parameters()))
    # Adapters are persistent: a state dict round-trip rebuilds the same modules.
    again = build_distillers(",".join(METHODS), student, [teacher])
    again.load_state_dict(distillers.state_dict(), strict=True)


def test_the_torch_free_catalog_is_the_registry_read_from_the_source():
    """`--help` lists the methods without importing torch, from the same class attributes the
    registry uses: adding a method class is the only edit."""
    from kdas_core.losses.base import available
    from kdas_core.losses.catalog import kd_methods

    assert kd_methods() == available()
    assert {"kd", "kdas", "kdas-paper", "at", "cwd"} <= set(kd_methods())


def test_a_distiller_without_its_own_name_and_summary_is_refused():
    from kdas_core.losses.base import Distiller, register

    class Unnamed(Distiller):
        name = "kd"  # taken
        summary = "x"

    class Silent(Distiller):
        name = "silent-test-method"

    for cls in (Unnamed, Silent):
        with pytest.raises(TypeError, match="summary"):
            register(cls)
