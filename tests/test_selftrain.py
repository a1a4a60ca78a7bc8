"""selftrain (mean teacher + class-balanced pseudo-labels): the EMA update in amounts, the frozen source model, the
class-balanced mask, the loss terms (source-only step equals a hand-made one, empty mask makes no update, the target
loss is the masked CE on the student's augmented view), identical geometry of image and pseudo-labels, histogram
matched input, AdaBN in prepare/finish, exact resume through the engine and a save/load round trip.

Tiny shapes (32x32, batch 2, width 0.125) and one thread.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from siteadapt.data.shards import SliceSet
from siteadapt.errors import ConfigError
from siteadapt.methods import get_method
from siteadapt.methods import selftrain as st
from siteadapt.methods._common import reestimate_bn, task_loss
from siteadapt.methods.base import Batch, Context, adam
from siteadapt.train.engine import TrainConfig, fit

CTX = Context(n_classes=3, image_size=32, width=0.125)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: torch on one thread


def _slices(n: int = 8, seed: int = 0, labels: bool = True, shift: float = 0.0) -> SliceSet:
    """Squares of classes 1 and 2 on background; four slices per subject."""
    rng = np.random.default_rng(seed)
    y = np.zeros((n, 32, 32), np.uint8)
    for i in range(n):
        c = rng.integers(10, 22, 2)
        y[i, c[0] - 6:c[0] + 6, c[1] - 6:c[1] + 6] = 1
        y[i, c[0] - 3:c[0] + 3, c[1] - 3:c[1] + 3] = 2
    x = (rng.normal(0, 0.1, y.shape) + 0.4 * y - 0.5 + shift).clip(-1, 1).astype(np.float32)
    return SliceSet("s" if labels else "t", "train", x, y if labels else None, np.repeat(np.arange(n // 4), 4),
                    np.tile(np.arange(4), n // 4), [])


SRC, TGT = _slices(8, 1), _slices(8, 2, labels=False, shift=0.3)


def source_model(seed: int = 7):
    torch.manual_seed(seed)
    return get_method("source")(CTX).eval()


def build(opts: dict | None = None, src=None, seed: int = 0):
    cls = get_method("selftrain")
    torch.manual_seed(seed)
    m = cls(CTX, cls.Options(**(opts or {})))
    m.prepare(SRC, TGT, source_model=src if src is not None else source_model())
    m.attach_optimizers()
    m.train()
    return m


def batch(seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 8, (2,), generator=g)
    sx = torch.from_numpy(SRC.images)[idx].unsqueeze(1)
    sy = torch.from_numpy(SRC.labels.astype(np.int64))[idx]
    tx = torch.from_numpy(TGT.images)[torch.randint(0, 8, (2,), generator=g)].unsqueeze(1)
    return Batch(sx, sy, tx)


def state(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def test_registered_options_and_segmentation_only():
    cls = get_method("selftrain")
    assert cls.needs_source_model and cls.needs_target_images and cls.trains
    o = cls.Options()
    assert (o.ema, o.portion, o.min_confidence, o.lambda_target, o.lambda_source, o.lr, o.input, o.adabn,
            o.predict_with) == (0.99, 0.5, 0.9, 1.0, 1.0, 1e-4, "raw", True, "teacher")
    with pytest.raises(ConfigError, match="methods.selftrain.portion"):
        cls.parse_options({"portion": 0}, "methods.selftrain")
    with pytest.raises(ConfigError, match="methods.selftrain.input"):
        cls.parse_options({"input": "cyclegan"}, "methods.selftrain")
    with pytest.raises(ValueError, match="segmentation tasks only"):
        cls(Context(n_classes=2, image_size=32, width=0.125, kind="classification"))
    with pytest.raises(ValueError, match="source model"):
        cls(CTX).prepare(SRC, TGT, source_model=None)


def test_pseudo_labels_keep_a_portion_of_every_class_and_respect_min_confidence():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(2, 3, 16, 16, generator=g) * 2, 1)
    labels, mask = st.pseudo_labels(probs, 0.3, 0.0)
    conf = probs.max(1).values
    assert torch.equal(labels, probs.argmax(1)) and mask.dtype == torch.bool
    for c in range(3):
        of_c = labels == c
        n = int(of_c.sum())
        assert n > 10
        assert int((mask & of_c).sum()) == math.ceil(0.3 * n)  # continuous values: no ties
        assert conf[mask & of_c].min() >= conf[~mask & of_c].max()  # the most confident ones
    floor = float(conf[mask].median())
    high, mask_hi = st.pseudo_labels(probs, 0.3, floor)
    assert torch.equal(high, labels) and torch.equal(mask_hi, mask & (conf >= floor))
    assert 0 < mask_hi.sum() < mask.sum() and conf[mask_hi].min() >= floor
    assert torch.equal(st.pseudo_labels(probs, 1.0, 0.0)[1], torch.ones_like(mask))
    assert not st.pseudo_labels(probs, 1.0, 1.01)[1].any()

    # class balance: a rare, unconfident class keeps its portion where one global threshold would drop all of it
    p = torch.zeros(1, 3, 10, 10)
    conf = torch.linspace(0.9, 1.0, 100).reshape(10, 10)
    p[0, 0], p[0, 1] = conf, 1 - conf  # class 0, confident
    rare = torch.linspace(0.4, 0.5, 10)
    p[0, :, 0, :] = torch.stack([(1 - rare) / 2, (1 - rare) / 2, rare])  # row 0: class 2, confidence 0.4..0.5
    labels, mask = st.pseudo_labels(p, 0.5, 0.0)
    assert (labels[0, 0] == 2).all() and int(mask[0, 0].sum()) == 5 and mask[0, 0, 5:].all()
    assert int(mask[0, 1:].sum()) == 45 and mask[0, 1:].flatten()[45:].all()
    top = torch.topk(p.max(1).values.flatten(), int(mask.sum())).indices  # one global threshold, as many pixels
    assert (top >= 10).all()  # ... would keep no pixel of the rare class


def test_one_step_updates_the_teacher_by_ema_and_leaves_the_source_model_alone():
    src = source_model()
    m = build({"min_confidence": 0.0, "ema": 0.9}, src=src)
    src_before = state(src)
    teacher_before = {k: v.clone() for k, v in m.teacher.named_parameters()}
    teacher_buffers = {k: v.clone() for k, v in m.teacher.named_buffers()}
    student_before = state(m.student)
    losses = m.train_step(batch())
    assert set(losses) == {"seg_s", "pl_t", "kept"} and all(math.isfinite(v) for v in losses.values())
    assert losses["pl_t"] > 0 and 0 < losses["kept"] <= 1
    assert any(not torch.equal(v, student_before[k]) for k, v in m.student.state_dict().items())
    student = dict(m.student.named_parameters())
    moved = 0
    for k, t in m.teacher.named_parameters():
        want = 0.9 * teacher_before[k] + (1 - 0.9) * student[k].detach()
        assert torch.allclose(t, want, atol=1e-7, rtol=0), k
        moved += not torch.equal(t, teacher_before[k])
        assert not t.requires_grad and t.grad is None
    assert moved > 0
    assert all(torch.equal(v, teacher_buffers[k]) for k, v in m.teacher.named_buffers())  # BN stats kept
    assert not m.teacher.training and m.source_model is src and not src.training
    assert all(torch.equal(v, src_before[k]) for k, v in src.state_dict().items())
    assert all(p.grad is None for p in src.parameters())
    assert m.extra_state() == {"iteration": 1}


def test_without_the_target_term_the_student_takes_the_source_step():
    m = build({"lambda_target": 0.0})
    ref = copy.deepcopy(m.student).train()
    opt = adam(ref.parameters(), 1e-4, beta1=0.9, weight_decay=1e-4)
    b = batch()
    losses = m.train_step(b)
    loss = task_loss(CTX, "batch", 1.0)(ref(b.src_x), b.src_y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert losses["pl_t"] == 0 and losses["kept"] == 0 and losses["seg_s"] == pytest.approx(loss.item(), abs=0)
    for k, v in ref.state_dict().items():
        assert torch.equal(m.student.state_dict()[k], v), k


def test_nothing_kept_and_no_source_term_changes_nothing():
    m = build({"lambda_source": 0.0, "min_confidence": 1.01})
    before = state(m)
    for seed in range(2):
        losses = m.train_step(batch(seed))
        assert losses == {"seg_s": 0.0, "pl_t": 0.0, "kept": 0.0}
    after = state(m)
    assert all(torch.equal(after[k], before[k]) for k in before)  # parameters and BN statistics alike
    assert not m.optimizers["student"].state  # no Adam step was taken


def test_target_loss_is_the_masked_cross_entropy_on_the_students_augmented_view(monkeypatch):
    m = build({"lambda_source": 0.0, "min_confidence": 0.0, "portion": 0.4})
    b = batch(3)
    seen = {}
    view = st.student_view

    def spy(x, target, gen=None):
        seen["in"] = target.clone()
        seen["x"], seen["t"] = view(x, target, gen)
        return seen["x"], seen["t"]

    monkeypatch.setattr(st, "student_view", spy)
    teacher = copy.deepcopy(m.teacher).eval()
    student = copy.deepcopy(m.student).train()
    losses = m.train_step(b)
    with torch.no_grad():
        labels, mask = st.pseudo_labels(torch.softmax(teacher(b.tgt_x), 1), 0.4, 0.0)
    assert torch.equal(seen["in"], torch.where(mask, labels, -1))
    assert losses["kept"] == pytest.approx(float(mask.float().mean()))
    assert 0.3 < losses["kept"] < 0.5
    want = F.cross_entropy(student(seen["x"]), seen["t"], ignore_index=-1)
    assert losses["pl_t"] == pytest.approx(want.item(), rel=1e-6)


class _PixelSign(nn.Module):
    """A pixel-wise model: class 0 where the image is positive, 1 where negative (class 2 never)."""

    def forward(self, x):
        return torch.cat([4 * x, -4 * x, torch.full_like(x, -10)], 1)


def test_augmentation_moves_image_labels_and_mask_identically():
    model = _PixelSign()
    g = torch.Generator().manual_seed(0)
    sign = torch.randint(0, 2, (2, 1, 32, 32), generator=g) * 2 - 1
    x = sign * (0.5 + 0.5 * torch.rand(2, 1, 32, 32, generator=g))  # |x| >= 0.5: the intensity change keeps the sign
    labels, mask = st.pseudo_labels(torch.softmax(model(x), 1), 0.5, 0.0)
    target = torch.where(mask, labels, -1)
    assert 0.3 < mask.float().mean() < 0.7
    shifts = set()
    for seed in range(6):
        torch.manual_seed(seed)
        x_aug, t_aug = st.student_view(x, target)
        assert not torch.equal(x_aug, x)
        pred = model(x_aug).argmax(1)
        kept = t_aug >= 0
        assert torch.equal(pred[kept], t_aug[kept])  # the model's labels on the moved image = the moved labels
        found = [(dy, dx) for dy in range(-4, 5) for dx in range(-4, 5)
                 if torch.equal(torch.roll(sign, (dy, dx), (-2, -1)), torch.sign(x_aug).long())]
        assert len(found) == 1
        assert torch.equal(t_aug, torch.roll(target, found[0], (-2, -1)))  # labels and mask: the image's shift
        shifts.add(found[0])
    assert len(shifts - {(0, 0)}) >= 2


def test_histmatch_input_matches_onto_the_source_quantiles():
    src = source_model()
    m = build({"input": "histmatch", "adabn": False, "predict_with": "student"}, src=src)
    q = np.quantile(SRC.images, np.linspace(0, 1, 256)).astype(np.float32)
    assert torch.equal(m.matcher.source_quantiles, torch.from_numpy(q))
    assert "matcher.source_quantiles" in m.state_dict()
    hm = get_method("histmatch")(CTX)
    hm.prepare(SRC, None, source_model=src)
    x = torch.from_numpy(TGT.images[:4]).unsqueeze(1)  # one subject
    m.eval()
    with torch.no_grad():
        assert torch.equal(m.predict_subject(x), hm.predict_subject(x))
        assert torch.equal(m.predict(x[:2]), src.predict(hm.match(x[:2])))
        assert torch.equal(m.predict(x[:2]), m.teacher(hm.match(x[:2])))  # both start as the source network
    # the target images of AdaBN are matched subject by subject
    whole = m.target_images(TGT)
    assert torch.equal(whole[4:], hm.match(torch.from_numpy(TGT.images[4:]).unsqueeze(1)))
    assert not torch.equal(whole[:4], hm.match(torch.from_numpy(TGT.images).unsqueeze(1))[:4])


def test_adabn_in_prepare_and_finish():
    src = source_model()
    m = build({"input": "histmatch", "min_confidence": 0.0}, src=src)
    ref = copy.deepcopy(src.net)
    reestimate_bn(ref, m.target_images(TGT))
    for net in (m.student, m.teacher):
        assert all(torch.equal(v, ref.state_dict()[k]) for k, v in net.state_dict().items())
    m.train_step(batch())
    student = state(m.student)
    ref = copy.deepcopy(m.teacher)
    reestimate_bn(ref, m.target_images(TGT))
    m.finish(SRC, TGT)
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in m.teacher.state_dict().items())
    assert all(torch.equal(v, student[k]) for k, v in m.student.state_dict().items())  # only the predictor


def test_kill_and_resume_equals_uninterrupted_and_the_saved_model_predicts_the_same(tmp_path):
    from siteadapt.methods.build import load_model, save_model

    opts = {"input": "histmatch", "min_confidence": 0.0, "portion": 0.7}
    cfg = TrainConfig(iterations=4, batch_size=2, seed=3, checkpoint_every=2, log_every=100, device="cpu")
    cls = get_method("selftrain")

    def run(folder, stop_after=None, init_seed=0):
        torch.manual_seed(init_seed)
        m = cls(CTX, cls.Options(**opts))
        m.prepare(SRC, TGT, source_model=source_model())
        summary = fit(m, SRC, TGT, cfg, tmp_path / folder, stop_after=stop_after)
        return m, summary

    a, summary = run("a")
    assert summary["losses"]["kept"] > 0 and summary["losses"]["pl_t"] > 0
    run("b", stop_after=2)
    c, _ = run("b", init_seed=123)
    sa, sc = a.state_dict(), c.state_dict()
    assert sa.keys() == sc.keys()
    for k in sa:
        assert torch.equal(sa[k], sc[k]), k
    assert a.extra_state() == c.extra_state() == {"iteration": 4}

    a.finish(SRC, TGT)
    a.eval()
    save_model(a, tmp_path / "model.pt")
    payload = torch.load(tmp_path / "model.pt", weights_only=False)
    assert not any(k.startswith("source_model.") for k in payload["state_dict"])
    assert "matcher.source_quantiles" in payload["state_dict"]
    b, _ = load_model(tmp_path / "model.pt")
    b.source_model = source_model()  # as load_for_prediction re-attaches it
    a.to(memory_format=torch.contiguous_format)  # fit left it channels_last; a loaded model is contiguous
    x = torch.from_numpy(TGT.images[:4]).unsqueeze(1)
    with torch.no_grad():
        assert torch.equal(b.predict_subject(x), a.predict_subject(x))
        assert torch.equal(b.predict(x[:2]), a.predict(x[:2]))
