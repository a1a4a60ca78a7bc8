"""BigAug (siteadapt.nn.bigaug): each stacked transformation does what it says by the amount drawn or forced
(rotation, scaling, elastic displacement, brightness, contrast, intensity map, blur, noise, sharpening), p = 0 is the
identity, label maps move with their images without new values, draws are reproducible, and the ``bigaug`` option
of the source segmenter / supervised reference (off: training unchanged, no random numbers drawn; on: trains for
segmentation and classification; unknown keys are configuration errors).

Tiny shapes and one thread keep the file to a few seconds.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from siteadapt.data.shards import SliceSet
from siteadapt.errors import ConfigError
from siteadapt.methods import get_method
from siteadapt.methods.base import Batch, Context
from siteadapt.nn.bigaug import OPS, bigaug
from siteadapt.train.engine import TrainConfig, fit

CTX = Context(n_classes=3, image_size=32, width=0.125)
CLS_CTX = Context(n_classes=2, image_size=32, width=0.125, kind="classification")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: torch on one thread


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def blobs(b: int = 4, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Label maps with nested squares (classes 0, 1, 2) and images equal to the labels scaled to [-1, 1]."""
    g = gen(seed)
    y = torch.zeros(b, size, size, dtype=torch.long)
    for i in range(b):
        r, c = (torch.randint(size // 4, 3 * size // 4, (2,), generator=g)).tolist()
        y[i, max(r - 7, 0):r + 7, max(c - 6, 0):c + 6] = 1
        y[i, max(r - 3, 0):r + 3, max(c - 3, 0):c + 3] = 2
    return (y[:, None].float() - 1.0), y


def hand_kernel(sigma: float) -> torch.Tensor:
    r = math.ceil(3 * sigma)
    d = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-d ** 2 / (2 * sigma ** 2))
    return k / k.sum()


def hand_blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    """(H, W) -> interior of the blur with the outer product of the hand-made kernel (valid convolution)."""
    k = hand_kernel(sigma)
    return F.conv2d(img[None, None], (k[:, None] * k[None, :])[None, None])[0, 0]


# ---- identity, determinism, shapes -----------------------------------------------------------------------------------
def test_p0_is_the_identity_and_shapes_are_kept():
    x, y = blobs()
    x = x * 0.7 + 0.1 * torch.randn(x.shape, generator=gen(1)).clamp(-1, 1)
    x = x.clamp(-1, 1)
    xo, yo = bigaug(x, y, gen(), p=0.0)
    assert torch.equal(xo, x) and torch.equal(yo, y)
    x0, y0 = x.clone(), y.clone()
    xo, yo = bigaug(x, y, gen(), p=1.0)
    assert torch.equal(x, x0) and torch.equal(y, y0)  # inputs untouched
    assert xo.shape == x.shape and xo.dtype == x.dtype and yo.shape == y.shape and yo.dtype == y.dtype
    assert xo.min() >= -1 and xo.max() <= 1
    assert not torch.equal(xo, x)


def test_same_seed_same_output_and_global_rng():
    x, y = blobs()
    a = bigaug(x, y, gen(5))
    b = bigaug(x, y, gen(5))
    c = bigaug(x, y, gen(6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    torch.manual_seed(3)
    d = bigaug(x, y)
    torch.manual_seed(3)
    e = bigaug(x, y)
    assert torch.equal(d[0], e[0]) and torch.equal(d[1], e[1])


def test_draw_count_does_not_depend_on_the_outcome():
    """The number of random numbers drawn depends only on shapes and ops (not on p or which images were picked)."""
    x, y = blobs()
    states = []
    for p in (0.0, 0.5, 1.0):
        g = gen(9)
        bigaug(x, y, g, p=p)
        states.append(g.get_state())
    assert all(torch.equal(states[0], s) for s in states[1:])


def test_image_level_labels_and_none_pass_through():
    x, _ = blobs()
    yc = torch.tensor([0, 1, 1, 0])
    xo, yo = bigaug(x, yc, gen(), p=1.0)
    assert torch.equal(yo, yc) and not torch.equal(xo, x)
    assert bigaug(x, None, gen(), p=1.0)[1] is None


def test_bad_arguments():
    x, y = blobs()
    with pytest.raises(ValueError, match="unknown transformations"):
        bigaug(x, y, ops=("rotate", "flip"))
    with pytest.raises(ValueError, match="p must lie"):
        bigaug(x, y, p=1.5)
    with pytest.raises(ValueError, match="labels must be"):
        bigaug(x, y[:, :5])


# ---- spatial ---------------------------------------------------------------------------------------------------------
def test_rotation_by_90_degrees_is_rot90():
    x, y = blobs(size=16)
    xo, yo = bigaug(x, y, gen(), p=1.0, ops=("rotate",), rotate_deg=(90.0, 90.0))
    # positive angles turn the content clockwise as displayed (rows downward): torch.rot90 with k = -1
    assert torch.equal(yo, torch.rot90(y, -1, dims=(-2, -1)))
    assert torch.allclose(xo, torch.rot90(x, -1, dims=(-2, -1)), atol=1e-5)


def test_rotation_by_a_drawn_angle_moves_a_blob_where_the_rotation_puts_it():
    size, b = 33, 3
    y = torch.zeros(b, size, size, dtype=torch.long)
    r0, c0 = 6, 22  # blob centre (row, col); image centre (16, 16)
    y[:, r0 - 1:r0 + 2, c0 - 1:c0 + 2] = 1
    x = y[:, None].float() * 2 - 1
    _, yo = bigaug(x, y, gen(4), p=1.0, ops=("rotate",))
    g = gen(4)  # the documented draw order: selection mask (B,), then the amount (B,)
    torch.rand(b, generator=g)
    angles = -20.0 + 40.0 * torch.rand(b, generator=g)
    cy = cx = (size - 1) / 2
    for i in range(b):
        a = math.radians(float(angles[i]))
        dx, dy = c0 - cx, r0 - cy
        ex, ey = cx + dx * math.cos(a) - dy * math.sin(a), cy + dx * math.sin(a) + dy * math.cos(a)
        rows, cols = torch.nonzero(yo[i] == 1, as_tuple=True)
        assert 6 <= len(rows) <= 12
        assert abs(float(cols.float().mean()) - ex) < 0.75 and abs(float(rows.float().mean()) - ey) < 0.75


def test_scaling_zooms_about_the_centre_and_pads_black_and_background():
    size = 32
    y = torch.zeros(1, size, size, dtype=torch.long)
    y[:, 12:20, 12:20] = 1  # 8 x 8 square about the centre
    x = y[:, None].float() * 2 - 1 + 0.5  # inside 1 -> clipped, outside -0.5
    x = x.clamp(-1, 1)
    _, yo = bigaug(x, y, gen(), p=1.0, ops=("scale",), scale_range=(1.5, 1.5))
    assert int(yo.sum()) == 144  # 12 x 12
    xo, yo = bigaug(x, y, gen(), p=1.0, ops=("scale",), scale_range=(0.5, 0.5))
    assert int(yo.sum()) == 16  # 4 x 4
    assert torch.equal(xo[0, 0, :7, :], torch.full((7, size), -1.0))  # outside the shrunken image: black
    assert torch.allclose(xo[0, 0, 9:23, 9:11], torch.full((14, 2), -0.5))  # inside: the old background
    assert int(yo[0, :8].sum()) == 0


def test_elastic_displacements_are_smooth_with_the_stated_std():
    b, size = 16, 128
    col = torch.arange(size, dtype=torch.float32)
    x = ((col - (size - 1) / 2) / size).expand(b, 1, size, size).contiguous()  # ramp: value = column / size
    xo, _ = bigaug(x, None, gen(2), p=1.0, ops=("elastic",), elastic_px=(2.0, 2.0))
    m = 16  # away from the border, where the padding enters
    dx = ((xo - x) * size)[..., m:-m, m:-m]  # horizontal displacement in pixels
    assert 0.8 * 2.0 < float(dx.std()) < 1.2 * 2.0
    assert float((dx[..., 1:] - dx[..., :-1]).std()) < 0.15 * float(dx.std())  # smooth: neighbours move together
    xo, _ = bigaug(x, None, gen(2), p=1.0, ops=("elastic",), elastic_px=(0.0, 0.0))
    assert torch.allclose(xo, x, atol=1e-5)


def test_labels_stay_in_the_label_set_and_move_with_the_image():
    x, y = blobs(b=8, size=48)
    xo, yo = bigaug(x, y, gen(11), p=1.0, ops=("rotate", "scale", "elastic"))
    assert set(yo.unique().tolist()) <= {0, 1, 2}
    assert not torch.equal(yo, y)
    thresholded = torch.round(xo[:, 0] + 1).long()  # the image is the label map scaled: 0 -> -1, 1 -> 0, 2 -> 1
    assert float((thresholded == yo).float().mean()) > 0.98
    # and with the whole stack (intensity changes included) the labels still only take known values
    _, yo = bigaug(x, y, gen(12), p=1.0)
    assert set(yo.unique().tolist()) <= {0, 1, 2}


# ---- intensity -------------------------------------------------------------------------------------------------------
def smooth_image(b: int = 4, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Images well inside [-1, 1], so that the final clipping does not touch them."""
    return 0.3 * torch.tanh(torch.randn(b, 1, size, size, generator=gen(seed)))


def test_brightness_shifts_the_mean_by_the_drawn_amount():
    x = smooth_image()
    xo, _ = bigaug(x, None, gen(3), p=1.0, ops=("brightness",))
    g = gen(3)
    torch.rand(4, generator=g)
    shift = -0.1 + 0.2 * torch.rand(4, generator=g)  # fraction of the range; the range [-1, 1] is 2 wide
    assert torch.allclose(xo.mean(dim=(1, 2, 3)) - x.mean(dim=(1, 2, 3)), 2 * shift, atol=1e-6)
    assert torch.allclose(xo - x, (2 * shift).view(4, 1, 1, 1).expand_as(x), atol=1e-6)


def test_contrast_keeps_the_mean_and_scales_the_std():
    x = smooth_image()
    xo, _ = bigaug(x, None, gen(), p=1.0, ops=("contrast",), contrast=(1.4, 1.4))
    assert torch.allclose(xo.mean(dim=(1, 2, 3)), x.mean(dim=(1, 2, 3)), atol=1e-6)
    assert torch.allclose(xo.std(dim=(1, 2, 3)), 1.4 * x.std(dim=(1, 2, 3)), rtol=1e-5)
    xo, _ = bigaug(x, None, gen(), p=1.0, ops=("contrast",), contrast=(0.65, 0.65))
    assert torch.allclose(xo.std(dim=(1, 2, 3)), 0.65 * x.std(dim=(1, 2, 3)), rtol=1e-5)


def test_intensity_perturbation_is_a_linear_map_about_black():
    x = smooth_image()
    xo, _ = bigaug(x, None, gen(), p=1.0, ops=("intensity",), intensity_scale=(1.1, 1.1),
                   intensity_shift=(0.05, 0.05))
    assert torch.allclose(xo, (x + 1) * 1.1 - 1 + 0.1, atol=1e-6)


def test_blur_keeps_an_impulse_sum_and_matches_a_hand_made_gaussian():
    size = 31
    x = torch.zeros(2, 1, size, size)
    x[:, :, 15, 15] = 1.0  # impulse of height 1 on a flat background
    for sigma in (0.7, 1.3):
        xo, _ = bigaug(x, None, gen(), p=1.0, ops=("blur",), blur_sigma=(sigma, sigma))
        assert torch.allclose(xo.sum(dim=(1, 2, 3)), torch.ones(2), atol=1e-6)
        r = math.ceil(3 * sigma)
        k = hand_kernel(sigma)
        assert torch.allclose(xo[:, 0, 15 - r:16 + r, 15 - r:16 + r], (k[:, None] * k[None, :]).expand(2, -1, -1),
                              atol=1e-6)


def test_noise_std_is_the_drawn_fraction_of_the_image_std():
    x = 0.1 * torch.randn(2, 1, 192, 192, generator=gen(1))
    xo, _ = bigaug(x, None, gen(8), p=1.0, ops=("noise",))
    g = gen(8)
    torch.rand(2, generator=g)
    rel = 0.1 + 0.9 * torch.rand(2, generator=g)
    n = xo - x
    expected = rel * x.std(dim=(1, 2, 3), correction=0)
    assert torch.allclose(n.std(dim=(1, 2, 3)), expected, rtol=0.03)
    assert float(n.mean(dim=(1, 2, 3)).abs().max()) < 0.03 * float(expected.min())


def test_sharpening_is_unsharp_masking_of_the_blurred_image():
    size = 40
    x = 0.3 * torch.tanh(torch.randn(1, 1, size, size, generator=gen(4)))
    x = F.avg_pool2d(x, 3, stride=1, padding=1)  # some structure, values well inside the range
    s1, alpha = 1.2, 20.0
    xo, _ = bigaug(x, None, gen(), p=1.0, ops=("sharpen",), sharpen_sigma=(s1, s1), sharpen_alpha=(alpha, alpha))
    b1 = hand_blur(x[0, 0], s1)  # valid: loses ceil(3 s1) = 4 pixels a side
    b2 = hand_blur(b1, s1 / 3)  # loses ceil(3 * 0.4) = 2 more
    expected = b1[2:-2, 2:-2] + alpha * (b1[2:-2, 2:-2] - b2)
    m = 6
    assert torch.allclose(xo[0, 0, m:-m, m:-m], expected.clamp(-1, 1), atol=1e-4)
    # a linear ramp is left as it is (away from the border)
    ramp = (torch.arange(size, dtype=torch.float32) / size - 0.5).expand(1, 1, size, size)
    ro, _ = bigaug(ramp, None, gen(), p=1.0, ops=("sharpen",), sharpen_sigma=(s1, s1), sharpen_alpha=(alpha, alpha))
    assert torch.allclose(ro[..., m:-m, m:-m], ramp[..., m:-m, m:-m], atol=1e-4)


def test_every_op_changes_something_with_p1():
    x, y = blobs()
    x = (x * 0.5 + 0.05 * torch.randn(x.shape, generator=gen(2))).clamp(-1, 1)
    for op in OPS:
        xo, _ = bigaug(x, y, gen(1), p=1.0, ops=(op,))
        assert not torch.equal(xo, x), op


# ---- the segmenter's option ------------------------------------------------------------------------------------------
def make(name: str, ctx: Context, opts: dict | None = None, seed: int = 0):
    cls = get_method(name)
    torch.manual_seed(seed)
    m = cls(ctx, cls.parse_options(opts or {}, f"methods.{name}"))
    m.attach_optimizers()
    m.train()
    return m


def seg_batch(ctx: Context = CTX, b: int = 2, size: int = 32) -> Batch:
    x, y = blobs(b=b, size=size)
    if ctx.kind == "classification":
        y = torch.tensor([0, 1][:b])
    return Batch(x, y, None)


def params(m) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in m.state_dict().items()}


def test_option_validation():
    cls = get_method("source")
    assert cls.parse_options({"bigaug": True}, "methods.source").bigaug is True
    assert cls.parse_options({}, "methods.source").bigaug is False
    with pytest.raises(ConfigError, match="methods.source.bigaugg: unknown key"):
        cls.parse_options({"bigaugg": True}, "methods.source")
    with pytest.raises(ConfigError, match="methods.supervised.bigaug"):
        get_method("supervised").parse_options({"bigaug": "sometimes"}, "methods.supervised")


def test_flag_off_is_the_plain_training_step():
    """bigaug off: the same parameters as a hand-written step (forward, loss, Adam) and no random numbers drawn."""
    batch = seg_batch()
    a = make("source", CTX)
    torch.manual_seed(123)
    a.train_step(batch)
    rng_a = torch.get_rng_state()
    b = make("source", CTX)
    torch.manual_seed(123)
    opt = b.optimizers["seg"]
    loss = b.seg_loss(b.net(batch.src_x), batch.src_y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    assert torch.equal(rng_a, torch.get_rng_state())
    pa, pb = params(a), params(b)
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)


@pytest.mark.parametrize("name,ctx", [("source", CTX), ("supervised", CTX), ("source", CLS_CTX)])
def test_flag_on_trains_and_is_reproducible(name, ctx):
    batch = seg_batch(ctx)
    runs = []
    for _ in range(2):
        m = make(name, ctx, {"bigaug": True, "augment": name == "supervised"})
        before = params(m)
        torch.manual_seed(321)
        losses = [m.train_step(batch) for _ in range(2)]
        assert all(math.isfinite(v) for d in losses for v in d.values())
        after = params(m)
        assert any(not torch.equal(before[k], after[k]) for k in before if after[k].is_floating_point())
        runs.append((after, torch.get_rng_state()))
    (p1, r1), (p2, r2) = runs
    assert torch.equal(r1, r2) and all(torch.equal(p1[k], p2[k]) for k in p1)  # draws only from the global RNG
    m = make(name, ctx)
    torch.manual_seed(321)
    m.train_step(batch)
    assert not torch.equal(torch.get_rng_state(), r1)  # the flag-on path did draw (and the flag-off one did not)


def test_kill_and_resume_with_bigaug_equals_uninterrupted(tmp_path):
    """BigAug draws from the global RNG, whose state the engine checkpoints: a killed and resumed run ends
    bit-identical (CPU) to an uninterrupted one."""
    n = 8
    _, y = blobs(b=n, size=32, seed=3)
    x = (y.float() * 0.4 - 0.5 + 0.05 * torch.randn(y.shape, generator=gen(3))).clamp(-1, 1)
    src = SliceSet("s", "train", x.numpy(), y.numpy().astype(np.uint8), np.repeat(np.arange(n // 4), 4),
                   np.tile(np.arange(4), n // 4), [])
    cfg = TrainConfig(iterations=4, batch_size=2, seed=3, checkpoint_every=2, log_every=100, device="cpu")
    cls = get_method("source")
    opts = cls.parse_options({"bigaug": True}, "methods.source")
    torch.manual_seed(0)
    a = cls(CTX, opts)
    fit(a, src, None, cfg, tmp_path / "a")
    torch.manual_seed(0)
    b = cls(CTX, opts)
    fit(b, src, None, cfg, tmp_path / "b", stop_after=2)  # "killed" after the checkpoint at iteration 2
    torch.manual_seed(123)  # a fresh process starts from other RNG states
    c = cls(CTX, opts)
    assert fit(c, src, None, cfg, tmp_path / "b")["iterations"] == 4
    sa, sc = params(a), params(c)
    assert sa.keys() == sc.keys() and all(torch.equal(sa[k], sc[k]) for k in sa)
