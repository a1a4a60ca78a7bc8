"""FDA (Yang & Soatto, CVPR 2020): the amplitude swap (window size, amplitude and phase on and off the window, a real
result, the mean intensity), the Charbonnier entropy against its closed form, the training step (finite losses,
parameters change, lambda_ent = 0 equals a hand-made step on the restyled images, the entropy pass leaves BN running
statistics alone), initialisation from the source segmenter, and option validation.

Tiny shapes (32x32, batch 2, width 0.125) and one thread.
"""

from __future__ import annotations

import math

import pytest
import torch

from siteadapt.errors import ConfigError
from siteadapt.methods import get_method
from siteadapt.methods.base import Batch, Context, Method
from siteadapt.methods.fda import FDA, TRANSLATION_KEY, charbonnier_entropy, fda_restyle, low_frequency_mask

CTX = Context(n_classes=3, image_size=32, width=0.125)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: torch on one thread


def images(seed: int, b: int = 2, size: int = 32, lo: float = -1.0, hi: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 1, size, size, generator=g, dtype=torch.float64).float() * (hi - lo) + lo


def spectrum(x: torch.Tensor) -> torch.Tensor:
    return torch.fft.fftshift(torch.fft.fft2(x.double()), dim=(-2, -1))


def source_model(seed: int = 7) -> Method:
    torch.manual_seed(seed)
    return get_method("source")(CTX).eval()


def build(opts: dict | None = None, seed: int = 0, src: Method | None = None) -> FDA:
    torch.manual_seed(seed)
    m = FDA(CTX, FDA.Options(**(opts or {})))
    if m.needs_source_model:
        m.prepare(None, None, source_model=src if src is not None else source_model())
    m.attach_optimizers()
    m.train()
    return m


def batch(seed: int = 0, b: int = 2, size: int = 32) -> Batch:
    g = torch.Generator().manual_seed(seed)
    xs = torch.rand(b, 1, size, size, generator=g) * 2 - 1
    ys = torch.randint(0, CTX.n_classes, (b, size, size), generator=g)
    xt = torch.rand(b, 1, size, size, generator=g) * 1.2 - 0.9  # another intensity distribution
    return Batch(xs, ys, xt)


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-4) -> bool:
    return bool(((a - b).abs() <= rel * b.abs().max()).all())


# ---- the amplitude swap -------------------------------------------------------------------------------------------
def test_window_half_size_is_floor_min_side_times_beta():
    m = torch.fft.fftshift(low_frequency_mask(32, 32, 0.1))  # b = floor(3.2) = 3: a 7x7 window around (16, 16)
    assert int(m.sum()) == 49
    assert m[13:20, 13:20].all()
    m = torch.fft.fftshift(low_frequency_mask(40, 32, 0.1))  # b from the shorter side; DC at (20, 16)
    assert int(m.sum()) == 49 and m[17:24, 13:20].all()
    assert int(low_frequency_mask(32, 32, 0.0).sum()) == 1 and bool(low_frequency_mask(32, 32, 0.0)[0, 0])
    assert int(low_frequency_mask(32, 32, 0.03).sum()) == 1  # floor(0.96) = 0
    assert int(low_frequency_mask(32, 32, 0.5).sum()) == 32 * 32  # b = 16 covers every frequency
    mask = low_frequency_mask(32, 32, 0.1)  # symmetric under k -> -k: the swapped spectrum stays Hermitian
    assert torch.equal(mask, torch.roll(torch.flip(mask, (0, 1)), (1, 1), (0, 1)))


def test_swapped_band_has_target_amplitude_and_the_rest_the_source_amplitude_with_source_phase():
    src, tgt = images(1), images(2, lo=-0.5, hi=0.9)
    out = fda_restyle(src, tgt, 0.1)
    assert out.shape == src.shape and out.dtype == src.dtype
    fo, fs, ft = spectrum(out), spectrum(src), spectrum(tgt)
    win = torch.zeros(32, 32, dtype=torch.bool)
    win[13:20, 13:20] = True  # b = 3
    ao, as_, at = fo.abs(), fs.abs(), ft.abs()
    assert close(ao[..., win], at[..., win])
    assert close(ao[..., ~win], as_[..., ~win])
    # just outside the window (k_y = -4, k_x = 0 and k_y = 0, k_x = +4): the source's amplitude, not the target's
    for i, j in ((12, 16), (16, 20)):
        assert close(ao[..., i, j], as_[..., i, j])
        assert not close(ao[..., i, j], at[..., i, j], rel=1e-2)
    # the phase is the source's wherever the amplitude is not ~0 (compared as unit phasors: no wrap-around at ±π)
    ok = (ao > 1e-3 * ao.max()) & (as_ > 1e-3 * as_.max())
    assert ok.float().mean() > 0.99
    assert close((fo / ao)[ok], (fs / as_)[ok])


def test_beta_zero_swaps_only_the_dc_term():
    src, tgt = images(3), images(4, lo=0.0, hi=1.0)
    out = fda_restyle(src, tgt, 0.0)
    fo, fs, ft = torch.fft.fft2(out.double()), torch.fft.fft2(src.double()), torch.fft.fft2(tgt.double())
    rest = torch.ones(32, 32, dtype=torch.bool)
    rest[0, 0] = False
    assert close(fo[..., rest], fs[..., rest])
    assert close(fo[..., 0, 0].abs(), ft[..., 0, 0].abs())
    d = out - src  # only the DC term changed: a constant shift per image
    assert torch.allclose(d, d.mean(dim=(-2, -1), keepdim=True), atol=1e-5)


def test_restyled_image_is_real():
    src, tgt = images(5), images(6)
    fs, ft = torch.fft.fft2(src.double()), torch.fft.fft2(tgt.double())
    for beta in (0.0, 0.01, 0.05, 0.09, 0.1):
        amp = torch.where(low_frequency_mask(32, 32, beta), ft.abs(), fs.abs())
        full = torch.fft.ifft2(torch.polar(amp, fs.angle()))
        assert full.imag.abs().max() < 1e-9 * full.real.abs().max()
        assert torch.allclose(fda_restyle(src, tgt, beta).double(), full.real, atol=1e-5)


def test_mean_comes_from_the_target_dc_amplitude_with_the_source_sign_and_the_offset_gives_the_target_mean():
    src = images(7, lo=-0.9, hi=0.1)  # mean < 0
    tgt = images(8, lo=-0.1, hi=0.9)  # mean > 0
    ms, mt = src.mean(dim=(-2, -1)), tgt.mean(dim=(-2, -1))
    assert (ms < 0).all() and (mt > 0).all()
    plain = fda_restyle(src, tgt, 0.05)  # the formula on [-1, 1] images: DC phase from the source (pi)
    assert torch.allclose(plain.mean(dim=(-2, -1)), torch.sign(ms) * mt.abs(), atol=1e-5)
    shifted = fda_restyle(src, tgt, 0.05, offset=1.0)  # on [0, 2]: the target's mean, as the paper's raw pixels
    assert torch.allclose(shifted.mean(dim=(-2, -1)), mt, atol=1e-5)
    d = shifted - plain  # the offset changes the DC coefficient only
    assert torch.allclose(d, d.mean(dim=(-2, -1), keepdim=True), atol=1e-5)
    same_sign = fda_restyle(src, src.flip(0), 0.05)  # equal signs: the two agree
    assert torch.allclose(same_sign, fda_restyle(src, src.flip(0), 0.05, offset=1.0), atol=1e-5)


# ---- the entropy term ---------------------------------------------------------------------------------------------
def test_charbonnier_entropy_closed_form():
    p = torch.tensor([[0.7, 0.2, 0.1], [1 / 3, 1 / 3, 1 / 3], [0.98, 0.01, 0.01], [0.5, 0.25, 0.25]],
                     dtype=torch.float64)
    logits = p.log().T.reshape(1, 3, 2, 2) + 5.0  # (N, K, H, W); a constant shift does not change softmax
    h = -(p * p.log()).sum(1) / math.log(3)
    for eta in (2.0, 1.5, 0.5):
        want = ((h ** 2 + 1e-6) ** eta).mean()
        assert math.isclose(float(charbonnier_entropy(logits, eta)), float(want), rel_tol=1e-5)
    uniform = torch.zeros(2, 3, 4, 4)
    assert math.isclose(float(charbonnier_entropy(uniform, 2.0)), (1 + 1e-6) ** 2, rel_tol=1e-6)
    sure = torch.zeros(1, 3, 4, 4)
    sure[:, 0] = 100.0  # H = 0: rho(0) = eps^(2 eta)
    assert math.isclose(float(charbonnier_entropy(sure, 2.0)), 1e-12, rel_tol=1e-3, abs_tol=1e-15)


# ---- the method ---------------------------------------------------------------------------------------------------
def test_registered_and_flags():
    assert get_method("fda") is FDA
    m = FDA(CTX)
    assert m.needs_source_model and m.needs_target_images and not m.trains_on_target_labels
    assert not FDA(CTX, FDA.Options(init_from_source=False)).needs_source_model


def test_train_step_finite_losses_and_parameters_change():
    m = build()
    before = {k: v.clone() for k, v in m.net.state_dict().items()}
    out = m.train_step(batch())
    assert set(out) == {"seg", "ent"} and all(math.isfinite(v) for v in out.values())
    assert 0 < out["ent"] <= (1 + 1e-6) ** 2
    changed = [k for k, v in m.net.named_parameters() if not torch.equal(v, before[k])]
    assert len(changed) == len(list(m.net.parameters()))
    logits = m.predict(batch().src_x)
    assert logits.shape == (2, CTX.n_classes, 32, 32)


def test_lambda_ent_zero_equals_a_step_on_the_restyled_images_and_entropy_changes_only_parameters():
    src, b = source_model(), batch(1)
    m0, m1, hand = build({"lambda_ent": 0.0}, src=src), build({"lambda_ent": 0.005}, src=src), \
        build({"lambda_ent": 0.0}, src=src)
    out0, out1 = m0.train_step(b), m1.train_step(b)
    assert out0["seg"] == out1["seg"] and out0["ent"] == out1["ent"]  # same init, same batch, same forward
    # by hand: the segmenter's loss on the restyled (offset, clamped) source images, one Adam step
    x = fda_restyle(b.src_x, b.tgt_x, 0.01, offset=1.0).clamp(-1, 1)
    opt = hand.optimizers["seg"]
    opt.zero_grad(set_to_none=True)
    hand.seg_loss(hand.net(x), b.src_y).backward()
    opt.step()
    s0, s1, sh = m0.net.state_dict(), m1.net.state_dict(), hand.net.state_dict()
    for k in sh:
        assert torch.equal(s0[k], sh[k]), k  # parameters and BN statistics: lambda_ent = 0 has no effect
    params = dict(m0.net.named_parameters())
    assert any(not torch.equal(s1[k], s0[k]) for k in params)  # the entropy term moves the parameters ...
    for k in s0:
        if k not in params:  # ... and leaves the BN running statistics (those of the restyled images) alone
            assert torch.equal(s1[k], s0[k]), k


def test_init_from_source_copies_the_weights_and_the_source_never_changes():
    src = source_model()
    ref = {k: v.clone() for k, v in src.state_dict().items()}
    torch.manual_seed(0)
    m = FDA(CTX)
    fresh = {k: v.clone() for k, v in m.net.state_dict().items()}
    m.prepare(None, None, source_model=src)
    got = m.net.state_dict()
    for k, v in src.net.state_dict().items():
        assert torch.equal(got[k], v), k
    assert any(not torch.equal(fresh[k], got[k]) for k in got)
    m.attach_optimizers()
    m.train()
    for i in range(2):
        m.train_step(batch(i))
    for k, v in src.state_dict().items():
        assert torch.equal(v, ref[k]), k
    assert not any(k.startswith("source_model") for k in m.state_dict())
    with pytest.raises(ValueError, match="source segmenter"):
        FDA(CTX).prepare(None, None, source_model=None)
    scratch = build({"init_from_source": False})  # random weights: no source model needed
    assert math.isfinite(scratch.train_step(batch())["seg"])


def test_translations_are_the_training_images():
    m = build({"beta": 0.09})
    b = batch(2)
    tr = m.translations(b.src_x, b.tgt_x)
    assert list(tr) == [TRANSLATION_KEY]
    x = tr[TRANSLATION_KEY]
    assert x.shape == b.src_x.shape and float(x.abs().max()) <= 1.0
    assert torch.equal(x, fda_restyle(b.src_x, b.tgt_x, 0.09, offset=1.0).clamp(-1, 1))
    unclamped = build({"beta": 0.09, "clamp": False}).translations(b.src_x, b.tgt_x)[TRANSLATION_KEY]
    assert torch.equal(unclamped, fda_restyle(b.src_x, b.tgt_x, 0.09, offset=1.0))
    one = m.translations(b.src_x, b.tgt_x[:1])[TRANSLATION_KEY]  # fewer target images: reused cyclically
    assert torch.equal(one, fda_restyle(b.src_x, b.tgt_x[:1].expand_as(b.src_x), 0.09, offset=1.0).clamp(-1, 1))


def test_options_and_context_validation():
    with pytest.raises(ConfigError, match=r"methods\.fda\.betta: unknown key"):
        FDA.parse_options({"betta": 0.05}, "methods.fda")
    with pytest.raises(ConfigError, match=r"methods\.fda\.beta"):
        FDA.parse_options({"beta": -0.1}, "methods.fda")
    with pytest.raises(ConfigError, match=r"methods\.fda\.eta"):
        FDA.parse_options({"eta": 0}, "methods.fda")
    o = FDA.parse_options({"beta": 0.05, "lambda_ent": 0.0, "init_from_source": False}, "methods.fda")
    assert (o.beta, o.lambda_ent, o.eta, o.lr, o.clamp) == (0.05, 0.0, 2.0, 2e-4, True)
    with pytest.raises(ValueError, match="segmentation"):
        FDA(Context(n_classes=2, image_size=32, width=0.125, kind="classification"))
