"""TUNA-Net and the classification modes of source/supervised/noadapt/cyclegan: losses, gradient routing, ablation
flags, schedules, exact resume. Tiny shapes (32x32, width 0.125), one thread."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from siteadapt.data.shards import SliceSet
from siteadapt.methods import available, get_method
from siteadapt.methods.base import Batch, Context
from siteadapt.train.engine import TrainConfig, fit

CTX = Context(n_classes=2, image_size=32, width=0.125, kind="classification")
SEG_CTX = Context(n_classes=3, image_size=32, width=0.125)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: torch on one thread


FAST = {"generator_blocks": 1}  # one residual block per generator keeps the file fast; the paper's 9 are a number


def build(name: str, opts: dict | None = None, ctx: Context = CTX, seed: int = 0, source=None):
    cls = get_method(name)
    torch.manual_seed(seed)
    m = cls(ctx, cls.Options(**({**FAST, **(opts or {})} if name in ("tunanet", "cyclegan") else (opts or {}))))
    if m.needs_source_model:
        m.prepare(None, None, source_model=source if source is not None else source_classifier())
    m.attach_optimizers()
    m.train()
    return m


def source_classifier(seed: int = 7):
    torch.manual_seed(seed)
    s = get_method("source")(CTX)
    return s.eval()


def batch(b: int = 2, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    xs = torch.rand(b, 1, 32, 32, generator=g) * 2 - 1
    ys = torch.tensor([0, 1] * (b // 2))
    xt = torch.rand(b, 1, 32, 32, generator=g) * 2 - 1
    return Batch(xs, ys, xt)


def module_params(m) -> dict[str, dict[str, torch.Tensor]]:
    return {n: {k: v.detach().clone() for k, v in c.named_parameters()} for n, c in m.named_children()
            if any(True for _ in c.parameters())}


def changed(before: dict, after: dict) -> set[str]:
    return {n for n in before if any(not torch.equal(before[n][k], after[n][k]) for k in before[n])}


def step(m, b: Batch, seed: int = 1) -> dict[str, float]:
    torch.manual_seed(seed)
    return m.train_step(b)


TUNA_MODULES = {"G_AP", "G_PA", "D_P", "D_A", "F_A", "F_P"}
OPTIMIZER_MODULES = {"G": {"G_AP", "G_PA"}, "F_A": {"F_A"}, "F_P": {"F_P"}, "D_P": {"D_P"}, "D_A": {"D_A"}}


def test_registered_and_needs_classification():
    assert "tunanet" in available()
    with pytest.raises(ValueError, match="kind: classification"):
        get_method("tunanet")(SEG_CTX)


def test_train_step_every_term_finite_and_every_module_learns():
    m = build("tunanet")
    before = module_params(m)
    losses = step(m, batch())
    assert set(losses) == {"adv_P", "adv_A", "cyc", "cls_src", "cls_rec", "cls_syn", "cls_pseudo", "pseudo_pos",
                           "feat", "D_P", "D_A"}
    assert all(math.isfinite(v) for v in losses.values()), losses
    assert changed(before, module_params(m)) == TUNA_MODULES
    assert m.predict(batch().tgt_x).shape == (2, 2)


def test_each_update_changes_only_its_modules_in_order():
    m = build("tunanet")
    seen = []
    for name, opt in m.optimizers.items():
        def wrapped(*a, _orig=opt.step, _name=name, **kw):
            before = module_params(m)
            out = _orig(*a, **kw)
            seen.append((_name, changed(before, module_params(m))))
            return out
        opt.step = wrapped
    step(m, batch())
    assert [n for n, _ in seen] == ["G", "F_A", "F_P", "D_P", "D_A"]
    for name, ch in seen:
        assert ch and ch <= OPTIMIZER_MODULES[name], (name, ch)


# Each term's weight reaches exactly the modules that take part in it (same init, same batch, one step).
@pytest.mark.parametrize("option, value, modules", [
    ("lambda_adv", 0.5, {"G_AP", "G_PA"}),
    ("lambda_cyc", 5.0, {"G_AP", "G_PA"}),
    ("lambda_cls_source", 0.5, {"F_A"}),
    ("lambda_cls_reconstructed", 0.5, {"F_A", "G_AP", "G_PA"}),
    ("lambda_cls_synthetic", 0.5, {"F_P", "G_AP"}),
    ("lambda_cls_pseudo", 0.5, {"F_A", "G_PA"}),
    ("lambda_feat", 0.5, {"F_P", "G_AP"}),
])
def test_each_weight_reaches_exactly_its_modules(option, value, modules):
    b = batch()
    a, c = build("tunanet"), build("tunanet", {option: value})
    step(a, b)
    step(c, b)
    assert changed(module_params(a), module_params(c)) == modules


@pytest.mark.parametrize("flag, gone", [
    ({"feature_loss": False}, {"feat"}),  # ablation a)
    ({"fa_on_reconstruction": False}, {"cls_rec"}),  # ablation b)
    ({"fp_online": False}, {"cls_syn", "cls_pseudo", "pseudo_pos", "feat"}),  # ablation c), joint phase
    ({"lambda_cls_pseudo": 0.0}, {"cls_pseudo", "pseudo_pos"}),
])
def test_ablation_flags_switch_terms_off(flag, gone):
    m = build("tunanet", flag)
    before = module_params(m)
    losses = step(m, batch())
    assert not gone & set(losses) and set(losses) | gone >= {"cls_src", "cyc", "D_P"}
    assert all(math.isfinite(v) for v in losses.values())
    if flag == {"fp_online": False}:
        assert "F_P" not in changed(before, module_params(m))  # F_P stays out of the translation training


def test_offline_fp_phase_trains_only_fp_on_synthetic_targets():
    m = build("tunanet", {"fp_online": False, "offline_fraction": 0.25})
    m.total_iterations = 8
    assert m.translation_iterations == 6
    m.iteration = 6
    before = module_params(m)
    losses = step(m, batch())
    assert set(losses) == {"cls_syn_offline"} and math.isfinite(losses["cls_syn_offline"])
    assert changed(before, module_params(m)) == {"F_P"}
    assert m.optimizers["F_P"].param_groups[0]["lr"] == pytest.approx(m.opts.cls_lr)


def test_lr_constant_then_linear_decay_to_zero():
    m = build("tunanet")
    m.total_iterations = 10
    m.iteration = 4
    m._set_lr()
    assert m.optimizers["G"].param_groups[0]["lr"] == pytest.approx(2e-4)
    m.iteration = 8
    m._set_lr()
    assert m.optimizers["G"].param_groups[0]["lr"] == pytest.approx(2e-4 * 0.4)
    assert m.optimizers["F_P"].param_groups[0]["lr"] == pytest.approx(m.opts.cls_lr * 0.4)


def test_classifiers_start_from_the_source_model():
    src = source_classifier()
    m = build("tunanet", source=src)
    x = batch().tgt_x
    m.eval()
    with torch.no_grad():
        assert torch.equal(m.F_P(x), src.predict(x)) and torch.equal(m.F_A(x), src.predict(x))
    with pytest.raises(ValueError, match="source classifier"):
        get_method("tunanet")(CTX).prepare(None, None)
    assert not get_method("tunanet")(CTX, get_method("tunanet").Options(init_from_source=False)).needs_source_model


def test_feature_pairing_batch_mean():
    m = build("tunanet", {"feature_pairing": "batch_mean"})
    f = [torch.ones(2, 3, 4, 4), torch.zeros(2, 5, 2, 2)]
    g = [torch.stack([torch.zeros(3, 4, 4), 2 * torch.ones(3, 4, 4)]), torch.zeros(2, 5, 2, 2)]
    assert float(m._feature_term(f, g)) == pytest.approx(0.0)  # equal means, different images
    assert float(build("tunanet")._feature_term(f, g)) == pytest.approx(1.0)  # pairs: (1-0)^2 and (1-2)^2


def test_source_supervised_noadapt_cyclegan_in_classification_mode():
    b = batch()
    for name in ("source", "supervised"):
        m = build(name)
        losses = step(m, b)
        assert set(losses) == {"cls"} and math.isfinite(losses["cls"])
        assert m.predict(b.tgt_x).shape == (2, 2)
    src = source_classifier()
    na = build("noadapt", source=src)
    assert torch.equal(na.predict(b.tgt_x), src.predict(b.tgt_x))
    cg = build("cyclegan", source=src)
    assert cg.seg is None and set(cg.optimizers) == {"G", "D_t", "D_s"}
    before = module_params(cg)
    losses = step(cg, b)
    assert set(losses) == {"adv_t", "adv_s", "cyc", "D_t", "D_s"}
    assert changed(before, module_params(cg)) == {"G_st", "G_ts", "D_t", "D_s"}  # the source classifier is frozen
    cg.eval()
    with torch.no_grad():  # the paper's row: the source classifier on target images translated to the source look
        assert torch.equal(cg.predict(b.tgt_x), src.predict(cg.G_ts(b.tgt_x)))
    with pytest.raises(ValueError, match="source classifier"):
        get_method("cyclegan")(CTX).prepare(None, None)


def _slices(n: int, seed: int, labels: bool) -> SliceSet:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n).astype(np.uint8)
    x = rng.normal(0, 0.3, (n, 32, 32)).astype(np.float32)
    x[y == 1, 8:16, 8:16] += 0.8
    return SliceSet("s", "train", x.clip(-1, 1), y if labels else None, np.arange(n), np.zeros(n, int), [])


@pytest.mark.parametrize("opts", [{}, {"fp_online": False, "offline_fraction": 0.5}])
def test_kill_and_resume_equals_uninterrupted(tmp_path, opts):
    src, tgt = _slices(8, 1, True), _slices(8, 2, False)
    cfg = TrainConfig(iterations=4, batch_size=2, seed=3, checkpoint_every=2, log_every=100, device="cpu")
    source = source_classifier()

    def run(folder, stop_after=None, init_seed=0):
        torch.manual_seed(init_seed)
        m = get_method("tunanet")(CTX, get_method("tunanet").Options(**FAST, **opts))
        m.total_iterations = cfg.iterations
        m.prepare(src, tgt, source_model=source)
        fit(m, src, tgt, cfg, tmp_path / folder, stop_after=stop_after)
        return m

    a = run("a")
    run("b", stop_after=2)
    c = run("b", init_seed=123)
    sa, sc = a.state_dict(), c.state_dict()
    assert sa.keys() == sc.keys()
    for k in sa:
        assert torch.equal(sa[k], sc[k]), k
    assert a.extra_state()["iteration"] == c.extra_state()["iteration"] == 4
