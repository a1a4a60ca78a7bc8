"""AdaBN and Tent (test-time adaptation of the source model's batch norm): the statistics AdaBN writes equal the
target's per-channel mean and unbiased variance of each layer's input (one batch) or the mean of the batch statistics
(two batches); nothing else of the network or of the frozen source model changes; Tent's step changes only the BN
affine parameters, reports the entropy of the prediction it started from, lowers it over steps, and ends with AdaBN
statistics; option validation; a save/load round trip and a short engine run.

Tiny shapes (32x32, width 0.125) and one thread keep the file fast.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from siteadapt.data.shards import SliceSet
from siteadapt.errors import ConfigError
from siteadapt.methods import available, get_method
from siteadapt.methods._common import reestimate_bn
from siteadapt.methods.base import Batch, Context, Method
from siteadapt.methods.build import load_model, save_model
from siteadapt.train.engine import TrainConfig, fit

CTX = Context(n_classes=3, image_size=32, width=0.125)
CLS_CTX = Context(n_classes=2, image_size=32, width=0.125, kind="classification")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: torch on one thread


def source_model(ctx: Context = CTX, seed: int = 7) -> Method:
    torch.manual_seed(seed)
    return get_method("source")(ctx).eval()


def _slices(n: int, seed: int, labels: bool, scale: float = 1.0, shift: float = 0.0) -> SliceSet:
    """As tests/test_methods_uda.py; ``scale``/``shift`` change the intensities (a site with another scanner)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, (n, 32, 32)).astype(np.uint8)
    x = (0.5 * y - 0.5 + rng.normal(0, 0.1, y.shape)).clip(-1, 1)
    x = (scale * x + shift).clip(-1, 1).astype(np.float32)
    return SliceSet("s", "train", x, y if labels else None, np.arange(n), np.zeros(n, int), [])


def target(n: int = 6, seed: int = 2) -> SliceSet:
    return _slices(n, seed, False, scale=0.5, shift=0.3)


def bns(net: nn.Module) -> list[nn.BatchNorm2d]:
    return [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]


def bn_inputs(net: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The input of every BN layer in a train-mode forward of ``x`` through a copy of ``net``."""
    net = copy.deepcopy(net).train()
    seen: dict[int, torch.Tensor] = {}
    layers = bns(net)
    hooks = [m.register_forward_hook(lambda mod, inp, out, i=i: seen.__setitem__(i, inp[0].detach()))
             for i, m in enumerate(layers)]
    with torch.no_grad():
        net(x)
    for h in hooks:
        h.remove()
    return [seen[i] for i in range(len(layers))]


def channel_stats(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = a.transpose(0, 1).reshape(a.shape[1], -1)
    return flat.mean(1), flat.var(1, unbiased=True)


def images(s: SliceSet) -> torch.Tensor:
    return torch.from_numpy(s.images).unsqueeze(1)


def snapshot(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def test_registered():
    assert {"adabn", "tent"} <= set(available())
    for name, trains in (("adabn", False), ("tent", True)):
        cls = get_method(name)
        assert cls.needs_source_model and cls.needs_target_images and cls.trains is trains
        assert not cls.trains_on_target_labels


# ---- AdaBN -----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("ctx", [CTX, CLS_CTX], ids=["segmentation", "classification"])
def test_adabn_one_batch_statistics_are_the_targets(ctx):
    src, tgt = source_model(ctx), target()
    before_src = snapshot(src)
    m = get_method("adabn")(ctx, get_method("adabn").Options(batch_size=32))
    m.prepare(None, tgt, source_model=src)

    # one batch: every BN layer's statistics are the per-channel mean and unbiased variance of its input over the
    # target images (each layer's input as the target images reach it through the already re-estimated layers)
    ins = bn_inputs(src.net, images(tgt))
    layers = bns(m.net)
    assert layers and len(ins) == len(layers)
    for layer, a in zip(layers, ins):
        mean, var = channel_stats(a)
        assert torch.allclose(layer.running_mean, mean, atol=1e-5)
        assert torch.allclose(layer.running_var, var, atol=1e-5, rtol=1e-4)
    # the first layer is not at its initial statistics (0, 1): it really moved
    assert not torch.allclose(layers[0].running_mean, torch.zeros_like(layers[0].running_mean), atol=1e-3)

    # every weight and every affine parameter is the source's, bit for bit; the source model is untouched
    src_params = dict(src.net.named_parameters())
    for k, p in m.net.named_parameters():
        assert torch.equal(p, src_params[k]), k
        assert not p.requires_grad
    after_src = snapshot(src)
    assert all(torch.equal(before_src[k], after_src[k]) for k in before_src)

    # predictions in eval mode differ from the source model's on the shifted target, and change no statistic
    m.eval()
    stats = snapshot(m.net)
    with torch.no_grad():
        x = images(tgt)
        out, ref = m.predict(x), src.predict(x)
    shape = (6, ctx.n_classes) if ctx.kind == "classification" else (6, ctx.n_classes, 32, 32)
    assert out.shape == ref.shape == shape
    assert (out - ref).abs().max() > 1e-3
    assert all(torch.equal(stats[k], v) for k, v in m.net.state_dict().items())


def test_adabn_two_batches_average_the_batch_statistics():
    src, tgt = source_model(), target(n=6)
    m = get_method("adabn")(CTX, get_method("adabn").Options(batch_size=3))
    m.prepare(None, tgt, source_model=src)
    x = images(tgt)
    m1, v1 = channel_stats(bn_inputs(src.net, x[:3])[0])
    m2, v2 = channel_stats(bn_inputs(src.net, x[3:])[0])
    first = bns(m.net)[0]
    assert torch.allclose(first.running_mean, (m1 + m2) / 2, atol=1e-5)
    assert torch.allclose(first.running_var, (v1 + v2) / 2, atol=1e-5, rtol=1e-4)


def test_adabn_needs_the_source_model_and_target_images():
    m = get_method("adabn")(CTX)
    with pytest.raises(ValueError):
        m.prepare(None, target(), source_model=None)
    with pytest.raises(ValueError):
        m.prepare(None, None, source_model=source_model())
    with pytest.raises(ValueError):  # a classification source model for a segmentation task
        m.prepare(None, target(), source_model=source_model(CLS_CTX))


def test_adabn_save_load_round_trip(tmp_path):
    src, tgt = source_model(), target()
    m = get_method("adabn")(CTX, get_method("adabn").Options(batch_size=4))
    m.prepare(None, tgt, source_model=src)
    m.finish(None, tgt)
    m.eval()
    save_model(m, tmp_path / "model.pt", source_site="a", target_site="b")
    payload = torch.load(tmp_path / "model.pt", weights_only=False)
    assert payload["method"] == "adabn" and payload["options"]["batch_size"] == 4
    assert payload["state_dict"] and not any(k.startswith("source_model.") for k in payload["state_dict"])

    torch.manual_seed(123)  # another initialisation: everything must come from the file
    loaded, _ = load_model(tmp_path / "model.pt")
    loaded.source_model = src  # as steps.train.load_for_prediction does
    x = images(target(n=4, seed=9))
    with torch.no_grad():
        assert torch.equal(loaded.predict(x), m.predict(x))
    assert loaded.opts.batch_size == 4


# ---- Tent ------------------------------------------------------------------------------------------------------------

def build_tent(ctx: Context = CTX, tgt: SliceSet | None = None, **opts) -> Method:
    cls = get_method("tent")
    m = cls(ctx, cls.Options(**opts))
    m.prepare(None, tgt if tgt is not None else target(), source_model=source_model(ctx))
    m.attach_optimizers()
    m.train()
    return m


def tent_batch(b: int = 4, seed: int = 5) -> Batch:
    t = images(target(n=b, seed=seed))
    return Batch(src_x=torch.rand(b, 1, 32, 32) * 2 - 1, src_y=None, tgt_x=t)


def affine_names(net: nn.Module, prefix: str = "net.") -> set[str]:
    return {f"{prefix}{n}.{p}" for n, mod in net.named_modules() if isinstance(mod, nn.BatchNorm2d)
            for p in ("weight", "bias")}


def test_tent_prepare_starts_from_adabn_statistics_and_trains_only_bn_affine():
    src, tgt = source_model(), target()
    m = get_method("tent")(CTX)
    m.prepare(None, tgt, source_model=src)
    ref = copy.deepcopy(src.net)
    reestimate_bn(ref, tgt.images, batch_size=m.opts.reestimate_batch_size)
    for k, v in ref.state_dict().items():
        assert torch.equal(m.net.state_dict()[k], v), k
    trainable = {f"net.{n}" for n, p in m.net.named_parameters() if p.requires_grad}
    assert trainable == affine_names(m.net) and trainable
    opt = m.attach_optimizers()["bn"]
    assert isinstance(opt, torch.optim.Adam)
    g = opt.param_groups[0]
    assert g["lr"] == 1e-3 and g["betas"] == (0.9, 0.999)
    assert {id(p) for p in g["params"]} == {id(p) for n, p in m.net.named_parameters() if p.requires_grad}


def test_tent_step_changes_only_bn_affine_parameters():
    m = build_tent()
    params = {k: p.detach().clone() for k, p in m.named_parameters()}
    src_before = snapshot(m.source_model)
    b = tent_batch()
    losses = m.train_step(b)
    assert set(losses) == {"ent"} and math.isfinite(losses["ent"])
    changed = {k for k, p in m.named_parameters() if not torch.equal(p, params[k])}
    assert changed == affine_names(m.net)
    assert all(torch.equal(v, src_before[k]) for k, v in m.source_model.state_dict().items())
    assert not any(p.grad is not None for p in m.source_model.parameters())
    assert not m.source_model.training


def test_tent_step_never_reads_labels_or_the_source_batch():
    a, c = build_tent(), build_tent()
    b1 = tent_batch()
    b2 = Batch(src_x=torch.full_like(b1.src_x, 0.7), src_y=torch.zeros(4, 32, 32, dtype=torch.long), tgt_x=b1.tgt_x,
               tgt_y=torch.ones(4, 32, 32, dtype=torch.long))
    assert a.train_step(b1) == c.train_step(b2)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))


def _entropy(logits: torch.Tensor) -> float:
    """Shannon entropy in nats of softmax over dim 1, averaged over pixels (segmentation) or images."""
    p = torch.softmax(logits.double(), dim=1)
    return float(-(p * torch.log(p)).sum(1).mean())


@pytest.mark.parametrize("ctx", [CTX, CLS_CTX], ids=["segmentation", "classification"])
def test_tent_loss_is_the_entropy_of_the_prediction_before_the_step(ctx):
    m = build_tent(ctx)
    b = tent_batch()
    with torch.no_grad():
        logits = copy.deepcopy(m.net).train()(b.tgt_x)  # train mode: the batch's own statistics
    assert logits.shape[:2] == (4, ctx.n_classes)
    expected = _entropy(logits)
    assert 0 < expected <= math.log(ctx.n_classes) + 1e-9
    assert m.train_step(b)["ent"] == pytest.approx(expected, abs=1e-5)


def test_tent_entropy_decreases_over_steps():
    """On a fixed target batch every step lowers the entropy (the untrained source model starts near the maximum,
    log 3, so a larger lr than the default makes the drop visible within a few steps)."""
    m = build_tent(lr=0.1)
    b = tent_batch()
    ents = [m.train_step(b)["ent"] for _ in range(8)]
    with torch.no_grad():
        final = _entropy(copy.deepcopy(m.net).train()(b.tgt_x))
    assert all(e1 < e0 for e0, e1 in zip(ents, ents[1:])), ents
    assert final < ents[-1] and final < ents[0] - 0.02, (ents, final)


def test_tent_finish_reestimates_the_statistics_with_the_final_affine_parameters():
    tgt = target(n=6)
    m = build_tent(tgt=tgt, lr=1e-2, reestimate_batch_size=4)
    for i in range(3):
        m.train_step(tent_batch(seed=10 + i))
    ref = copy.deepcopy(m.net)
    trained = snapshot(m.net)
    reestimate_bn(ref, tgt.images, batch_size=4)
    m.finish(None, tgt)
    for k, v in ref.state_dict().items():
        assert torch.allclose(m.net.state_dict()[k].float(), v.float(), atol=1e-6), k
    # the affine parameters are the trained ones; the statistics are not the training-time running averages
    for n, p in m.net.named_parameters():
        assert torch.equal(p, trained[n])
    first = next(n for n, mod in m.net.named_modules() if isinstance(mod, nn.BatchNorm2d))
    assert not torch.allclose(trained[f"{first}.running_mean"], m.net.state_dict()[f"{first}.running_mean"])


def test_tent_options():
    cls = get_method("tent")
    with pytest.raises(ConfigError, match=r"methods\.tent\.nope: unknown key"):
        cls.parse_options({"nope": 1}, "methods.tent")
    with pytest.raises(ConfigError, match=r"methods\.tent\.lr"):
        cls.parse_options({"lr": 0}, "methods.tent")
    with pytest.raises(ConfigError, match=r"methods\.adabn\.batch_size"):
        get_method("adabn").parse_options({"batch_size": 0}, "methods.adabn")
    o = cls.parse_options({"lr": 0.01, "reestimate_batch_size": 8}, "methods.tent")
    assert o.lr == 0.01 and o.reestimate_batch_size == 8


def test_tent_engine_run_then_save_and_load(tmp_path):
    """prepare -> fit (the engine) -> finish -> save_model, as steps.train.adapt; the file predicts the same."""
    src_set, tgt = _slices(6, 1, True), target(n=6)
    src = source_model()
    m = get_method("tent")(CTX, get_method("tent").Options(lr=1e-2))
    m.prepare(src_set, tgt, source_model=src)
    start = {k: p.detach().clone() for k, p in m.net.named_parameters()}
    summary = fit(m, src_set, tgt, TrainConfig(iterations=2, batch_size=2, seed=3, checkpoint_every=100,
                                               log_every=100, device="cpu"), tmp_path / "run")
    assert summary["iterations"] == 2
    changed = {f"net.{k}" for k, p in m.net.named_parameters() if not torch.equal(p, start[k])}
    assert changed == affine_names(m.net)
    m.finish(src_set, tgt)
    m.eval()
    save_model(m, tmp_path / "model.pt")
    loaded, _ = load_model(tmp_path / "model.pt")
    loaded.source_model = src
    x = images(target(n=3, seed=11))
    with torch.no_grad():  # the engine turned the trained copy channels_last: equal up to the convolution's rounding
        assert torch.allclose(loaded.predict(x), m.predict(x), atol=1e-5)


def test_for_site_reestimates_a_copy_and_leaves_the_model_alone():
    """``for_site`` (what the source-regression check measures on the source site): AdaBN's copy carries the other
    site's statistics, exactly a re-estimation of the adapted network on those images, with the same weights; the
    adapted model itself keeps the target's; a method without site statistics (noadapt) is returned as is."""
    src, tgt = source_model(), target()
    m = get_method("adabn")(CTX, get_method("adabn").Options(batch_size=32))
    m.prepare(None, tgt, source_model=src)
    kept = snapshot(m.net)
    other = _slices(5, 9, False, scale=0.5, shift=0.3)
    x = images(other)
    site = m.for_site(x)
    assert site is not m and all(torch.equal(kept[k], v) for k, v in m.net.state_dict().items())
    ref = copy.deepcopy(m.net)
    reestimate_bn(ref, x, batch_size=32)
    for a, b in zip(bns(site.net), bns(ref)):
        assert torch.equal(a.running_mean, b.running_mean) and torch.equal(a.running_var, b.running_var)
    assert all(torch.equal(p, q) for p, q in zip(site.net.parameters(), m.net.parameters()))
    assert not torch.allclose(bns(site.net)[0].running_mean, bns(m.net)[0].running_mean)
    noadapt = get_method("noadapt")(CTX)
    noadapt.prepare(None, None, source_model=src)
    assert noadapt.for_site(x) is noadapt and not get_method("noadapt").site_statistics
    assert {n for n in ("adabn", "tent", "fda", "selftrain") if get_method(n).site_statistics} == \
        {"adabn", "tent", "fda", "selftrain"}
    st = get_method("selftrain")(CTX, get_method("selftrain").Options(adabn=False))
    st.prepare(None, tgt, source_model=src)
    assert st.for_site(x) is st  # without AdaBN it carries the source segmenter's statistics: nothing to redo
