"""siteadapt.nn: network shapes against the papers, receptive field, gradient flow, AMP/channels_last, losses on
hand-made inputs, and the image pool's determinism and checkpoint round trip. Runs in well under a minute on 2 CPUs."""

from __future__ import annotations

import io
import math
from typing import Callable

import numpy as np
import pytest
import torch
from torch import nn

from siteadapt.nn import (
    CycleConsistencyLoss,
    DilatedResidualEncoder,
    FeatureReconstructionLoss,
    ImagePool,
    LSGANDiscriminatorLoss,
    LSGANGeneratorLoss,
    LSGANLoss,
    PatchDiscriminator,
    PixelClassifier,
    PredictionAdversarialLoss,
    ResidualBlock,
    ResNetClassifier,
    ResnetDecoder,
    ResnetGenerator,
    SoftDiceLoss,
    WeightedCrossEntropyDiceLoss,
    WeightedCrossEntropyLoss,
    count_parameters,
    scaled,
)

QUICK = 0.25  # the CPU quick-profile width
NUM_CLASSES = 5  # background + MYO, LAC, LVC, AA


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _quick_factories() -> dict[str, Callable[[], nn.Module]]:
    enc_ch = scaled(512, QUICK)  # DilatedResidualEncoder(width=QUICK).out_channels
    return {
        "encoder": lambda: DilatedResidualEncoder(1, width=QUICK),
        "generator": lambda: ResnetGenerator(1, 1, width=QUICK),
        "decoder": lambda: ResnetDecoder(enc_ch, 1, width=QUICK, skip=True),
        "patchgan": lambda: PatchDiscriminator(1, width=QUICK),
        "patchgan_aux": lambda: PatchDiscriminator(1, width=QUICK, aux_head=True),
        "patchgan_pred": lambda: PatchDiscriminator(NUM_CLASSES, width=QUICK, norm="batch"),
        "classifier_c1": lambda: PixelClassifier(enc_ch, NUM_CLASSES),
        "resnet18": lambda: ResNetClassifier(1, 2, width=QUICK),
    }


QUICK_NAMES = list(_quick_factories())


def quick_modules() -> dict[str, nn.Module]:
    return {name: make() for name, make in _quick_factories().items()}


def run_module(name: str, m: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Forward ``m`` on image batch ``x`` as a method would, returning every output tensor."""
    if name == "encoder":
        f = m(x)
        return [f.high, f.low]
    if name in ("decoder", "classifier_c1"):
        g = torch.Generator().manual_seed(1)  # the same features for every call
        channels = m.in_channels if name == "decoder" else m.conv.in_channels
        feat = torch.randn(x.shape[0], channels, x.shape[2] // 8, x.shape[3] // 8, generator=g).to(x.dtype)
        if x.is_contiguous(memory_format=torch.channels_last):
            feat = feat.contiguous(memory_format=torch.channels_last)
        return [m(feat, x)] if name == "decoder" else [m(feat, x.shape[-2:])]
    if name == "patchgan_pred":
        g = torch.Generator().manual_seed(2)
        return [m(torch.softmax(torch.randn(x.shape[0], NUM_CLASSES, *x.shape[-2:], generator=g), 1).to(x.dtype))]
    if name == "resnet18":
        logits, feats = m.forward_features(x)
        return [logits, *feats]
    out = m(x)
    return list(out) if isinstance(out, tuple) else [out]


# =====================================================================================================================
# shapes at the paper's size (width 1.0, 256x256)
# =====================================================================================================================


@pytest.fixture(scope="module")
def paper_nets() -> dict[str, nn.Module]:
    """The width-1.0 networks, built once (initializing ~45M parameters takes a few seconds on 2 CPUs)."""
    torch.manual_seed(0)
    return {
        "encoder": DilatedResidualEncoder(1, width=1.0).eval(),
        "generator": ResnetGenerator(1, 1, width=1.0),
        "decoder": ResnetDecoder(512, 1, width=1.0, skip=True),
        "patchgan": PatchDiscriminator(1, width=1.0),
        "patchgan_aux": PatchDiscriminator(1, width=1.0, aux_head=True),
    }


@torch.no_grad()
def test_encoder_paper_shapes_256(paper_nets):
    enc = paper_nets["encoder"]
    f = enc(torch.randn(1, 1, 256, 256))
    # output stride 8: 32x32 at 512 channels; C2's lower-level feature (after 2xR512) has the same shape
    assert f.high.shape == (1, 512, 32, 32)
    assert f.low.shape == (1, 512, 32, 32)
    assert enc.output_stride == 8 and enc.out_channels == 512 and enc.low_channels == 512
    c1 = PixelClassifier(enc.out_channels, NUM_CLASSES)
    c2 = PixelClassifier(enc.low_channels, NUM_CLASSES)
    assert c1(f.high, (256, 256)).shape == (1, NUM_CLASSES, 256, 256)
    assert c2(f.low, (256, 256)).shape == (1, NUM_CLASSES, 256, 256)
    # {C16, R16, M, R32, M, 2xR64, M, 2xR128, 4xR256, 2xR512, 2xD512, 2xC512}: 3 max-pools, 14 residual blocks of
    # which the last 2 dilated (rate 2), and the residual blocks' output widths in order
    pools = [m for m in enc.modules() if isinstance(m, nn.MaxPool2d)]
    blocks = [m for m in enc.modules() if isinstance(m, ResidualBlock)]
    widths = [b.body[1][0].out_channels for b in blocks]
    assert len(pools) == 3
    assert widths == [16, 32, 64, 64, 128, 128, 256, 256, 256, 256, 512, 512, 512, 512]
    assert [b.body[0][0].dilation[0] for b in blocks] == [1] * 12 + [2, 2]


@torch.no_grad()
def test_generator_and_decoder_paper_shapes_256(paper_nets):
    x = torch.rand(1, 1, 256, 256) * 2 - 1
    g = paper_nets["generator"]
    y = g(x)
    assert y.shape == (1, 1, 256, 256) and y.abs().max() <= 1.0
    res = [m for m in g.body if isinstance(m, ResidualBlock)]
    ups = [m for m in g.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert len(res) == 9 and len(ups) == 2
    u = paper_nets["decoder"]
    out = u(torch.randn(1, 512, 32, 32), x)
    assert out.shape == (1, 1, 256, 256) and out.abs().max() <= 1.0
    assert len([m for m in u.body if isinstance(m, ResidualBlock)]) == 4
    assert len([m for m in u.modules() if isinstance(m, nn.ConvTranspose2d)]) == 3


@torch.no_grad()
def test_patchgan_output_map_at_256(paper_nets):
    d = paper_nets["patchgan"]
    assert d(torch.randn(1, 1, 256, 256)).shape == (1, 1, 30, 30)
    d_aux = paper_nets["patchgan_aux"]
    main, aux = d_aux(torch.randn(1, 1, 256, 256))
    assert main.shape == aux.shape == (1, 1, 30, 30)
    convs = [m for m in d.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 128, 256, 512, 1]
    assert [c.stride[0] for c in convs] == [2, 2, 2, 1, 1] and all(c.kernel_size == (4, 4) for c in convs)


@pytest.mark.parametrize("n_layers,width,size", [(3, 1.0, 256), (2, QUICK, 128)])
def test_patchgan_receptive_field_numerically(n_layers, width, size):
    # norm="none": instance norm couples every pixel through its statistics, which would hide the conv geometry
    d = PatchDiscriminator(1, width=width, n_layers=n_layers, norm="none")
    x = torch.randn(1, 1, size, size, requires_grad=True)
    out = d(x)
    h, w = out.shape[-2:]
    out[0, 0, h // 2, w // 2].backward()
    nz = (x.grad[0, 0] != 0).nonzero()
    (r0, c0), (r1, c1) = nz.min(0).values.tolist(), nz.max(0).values.tolist()
    assert r0 > 0 and c0 > 0 and r1 < size - 1 and c1 < size - 1, "patch must lie inside the image"
    assert (r1 - r0 + 1, c1 - c0 + 1) == (d.receptive_field, d.receptive_field)
    if n_layers == 3:
        assert d.receptive_field == 70


@torch.no_grad()
def test_resnet18_classifier_matches_resnet18():
    # with 3 input channels and 1000 classes it has exactly torchvision's ResNet-18 parameter count
    with torch.device("meta"):
        assert count_parameters(ResNetClassifier(3, 1000, width=1.0)) == 11_689_512
    m = ResNetClassifier(1, 2, width=1.0).eval()
    x = torch.randn(1, 1, 224, 224)
    logits, feats = m.forward_features(x)
    assert logits.shape == (1, 2)
    # TUNA-Net's mid-level features: conv 3 (128 ch, stride 8) and conv 4 (256 ch, stride 16)
    assert [f.shape for f in feats] == [(1, 128, 28, 28), (1, 256, 14, 14)]
    assert all(torch.equal(a, b) for a, b in zip(m.features(x), feats))


# =====================================================================================================================
# quick width
# =====================================================================================================================


def test_quick_width_runs_at_64():
    mods = quick_modules()
    x = torch.rand(2, 1, 64, 64) * 2 - 1
    with torch.no_grad():
        outs = {name: run_module(name, m, x) for name, m in mods.items()}
    assert [o.shape for o in outs["encoder"]] == [(2, 128, 8, 8), (2, 128, 8, 8)]
    assert outs["generator"][0].shape == (2, 1, 64, 64)
    assert outs["decoder"][0].shape == (2, 1, 64, 64)
    assert outs["patchgan"][0].shape == (2, 1, 6, 6)
    assert [o.shape for o in outs["patchgan_aux"]] == [(2, 1, 6, 6), (2, 1, 6, 6)]
    assert outs["classifier_c1"][0].shape == (2, NUM_CLASSES, 64, 64)
    assert [o.shape for o in outs["resnet18"]] == [(2, 2), (2, 32, 8, 8), (2, 64, 4, 4)]
    # DSAN's decoder variant: 3 residual blocks, 3 deconvs
    dsan_u = ResnetDecoder(128, 1, width=QUICK, n_blocks=3)
    assert dsan_u(torch.randn(2, 128, 8, 8)).shape == (2, 1, 64, 64)


@pytest.mark.parametrize("name", QUICK_NAMES)
def test_gradients_reach_every_parameter(name):
    m = _quick_factories()[name]().train()
    x = torch.rand(2, 1, 64, 64) * 2 - 1
    outs = run_module(name, m, x)
    # a random projection: sensitive to every output element (a plain mean would be blind after a norm layer)
    loss = sum((o * torch.randn_like(o)).sum() for o in outs)
    loss.backward()
    for pname, p in m.named_parameters():
        assert p.grad is not None, f"{name}.{pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}.{pname} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name}.{pname} has an all-zero gradient"


def test_skip_connections():
    x = torch.rand(2, 1, 64, 64) * 1.6 - 0.8
    g = ResnetGenerator(1, 1, width=QUICK, skip=True)
    last = g.body[-1]
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    with torch.no_grad():
        assert torch.allclose(g(x), torch.tanh(x))  # the generator learns a residual on the input image
    u = ResnetDecoder(128, 1, width=QUICK, skip=True)
    with pytest.raises(ValueError, match="input image"):
        u(torch.randn(2, 128, 8, 8))
    with pytest.raises(ValueError, match="same channels and size"):
        u(torch.randn(2, 128, 8, 8), torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError):
        ResnetGenerator(1, 3, skip=True)


def test_channels_last_matches_contiguous():
    mods = quick_modules()
    x = torch.rand(2, 1, 64, 64) * 2 - 1
    for name in ("encoder", "generator", "decoder", "patchgan_aux", "resnet18"):
        m = mods[name].eval()
        with torch.no_grad():
            ref = run_module(name, m, x)
            m_cl = m.to(memory_format=torch.channels_last)
            got = run_module(name, m_cl, x.contiguous(memory_format=torch.channels_last))
        for a, b in zip(ref, got):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=f"{name} differs under channels_last")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_autocast_forward_is_finite(dtype):
    mods = quick_modules()
    x = (torch.rand(1, 1, 64, 64) * 2 - 1).contiguous(memory_format=torch.channels_last)
    seg = WeightedCrossEntropyDiceLoss(NUM_CLASSES, class_weights="batch")
    labels = torch.randint(0, NUM_CLASSES, (1, 64, 64))
    with torch.autocast("cpu", dtype=dtype):
        for name, m in mods.items():
            m.to(memory_format=torch.channels_last)
            for o in run_module(name, m, x):
                assert torch.isfinite(o.float()).all(), f"{name} gave non-finite values under {dtype} autocast"
        f = mods["encoder"](x)
        logits = mods["classifier_c1"](f.high, x.shape[-2:])
        assert logits.dtype == dtype  # really ran in reduced precision
        loss = seg(logits, labels)
        g_loss = LSGANGeneratorLoss()(mods["patchgan"](mods["generator"](x)))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert g_loss.dtype == torch.float32 and torch.isfinite(g_loss)
    (loss + g_loss).backward()


def test_parameter_counts(capsys):
    rows = []
    for width in (1.0, QUICK):
        with torch.device("meta"):  # counting needs no real weights
            enc = DilatedResidualEncoder(1, width=width)
            nets = {
                "encoder E": enc,
                "classifier C1 (5 cls)": PixelClassifier(enc.out_channels, NUM_CLASSES),
                "decoder U": ResnetDecoder(enc.out_channels, 1, width=width),
                "generator (ngf 64)": ResnetGenerator(1, 1, width=width),
                "generator (ngf 32, SIFA code)": ResnetGenerator(1, 1, width=width, base_channels=32),
                "PatchGAN D (1 ch)": PatchDiscriminator(1, width=width),
                "PatchGAN D_s (aux)": PatchDiscriminator(1, width=width, aux_head=True),
                "PatchGAN D_p (5 ch)": PatchDiscriminator(NUM_CLASSES, width=width),
                "ResNet-18 classifier": ResNetClassifier(1, 2, width=width),
            }
        rows += [(width, name, count_parameters(m)) for name, m in nets.items()]
    with capsys.disabled():
        print("\nparameter counts (in_channels=1)")
        for width, name, n in rows:
            print(f"  width {width:<5} {name:<30} {n:>12,d}")
    full = {n: c for w, n, c in rows if w == 1.0}
    quick = {n: c for w, n, c in rows if w == QUICK}
    assert all(quick[n] < full[n] / 10 for n in full if "C1" not in n)  # ~width^2 scaling


# =====================================================================================================================
# losses on hand-made inputs
# =====================================================================================================================


def test_lsgan_losses():
    ones, zeros, halves = torch.ones(2, 1, 4, 4), torch.zeros(2, 1, 4, 4), torch.full((2, 1, 4, 4), 0.5)
    g, d = LSGANGeneratorLoss(), LSGANDiscriminatorLoss()
    assert g(ones).item() == 0.0 and g(zeros).item() == 1.0 and g(halves).item() == pytest.approx(0.25)
    assert d(ones, zeros).item() == 0.0  # perfect discriminator
    assert d(zeros, ones).item() == pytest.approx(1.0)  # 0.5 * (1 + 1)
    assert d(halves, halves).item() == pytest.approx(0.25)  # 0.5 * (0.25 + 0.25)
    assert LSGANLoss()(torch.tensor([3.0]), False).item() == pytest.approx(9.0)


def test_cycle_consistency_loss():
    loss = CycleConsistencyLoss()
    assert loss(torch.tensor([[1.0, -2.0]]), torch.zeros(1, 2)).item() == pytest.approx(1.5)
    with pytest.raises(ValueError):
        loss(torch.zeros(1, 2), torch.zeros(1, 3))


def test_weighted_cross_entropy():
    logits = torch.zeros(1, 2, 2, 2)  # uniform prediction: -log p = log 2 at every pixel
    labels = torch.tensor([[[0, 0], [0, 1]]])
    assert WeightedCrossEntropyLoss(2)(logits, labels).item() == pytest.approx(math.log(2))
    assert WeightedCrossEntropyLoss(2, [2.0, 1.0])(logits, labels).item() == pytest.approx(
        (3 * 2.0 + 1 * 1.0) / 4 * math.log(2)
    )
    # SIFA's batch weights: w_c = 1 - freq_c -> w0 = 0.25, w1 = 0.75
    assert WeightedCrossEntropyLoss(2, "batch")(logits, labels).item() == pytest.approx(
        (3 * 0.25 + 1 * 0.75) / 4 * math.log(2)
    )
    confident = torch.tensor([[[[9.0, 9.0], [9.0, -9.0]], [[-9.0, -9.0], [-9.0, 9.0]]]])
    assert WeightedCrossEntropyLoss(2)(confident, labels).item() < 1e-6
    with pytest.raises(ValueError):
        WeightedCrossEntropyLoss(2, [1.0])


def test_soft_dice():
    logits = torch.zeros(1, 2, 2, 2)  # p = 0.5 everywhere
    labels = torch.tensor([[[0, 1], [0, 1]]])
    # per class: intersection 1, sum p^2 = 1, sum g = 2 -> dice 2/3; non-squared: sum p = 2 -> dice 1/2
    assert SoftDiceLoss(2)(logits, labels).item() == pytest.approx(1 / 3, abs=1e-5)
    assert SoftDiceLoss(2, squared=False)(logits, labels).item() == pytest.approx(0.5, abs=1e-5)
    perfect = torch.nn.functional.one_hot(labels, 3).permute(0, 3, 1, 2).float() * 50  # class 2 absent
    assert SoftDiceLoss(3)(perfect, labels).item() == pytest.approx(0.0, abs=1e-5)
    wrong = torch.nn.functional.one_hot(1 - labels, 2).permute(0, 3, 1, 2).float() * 50
    assert SoftDiceLoss(2)(wrong, labels).item() == pytest.approx(1.0, abs=1e-5)
    assert SoftDiceLoss(2, include_background=False).per_class(logits, labels).shape == (1,)


def test_ce_dice_combination_and_target_formats():
    torch.manual_seed(1)
    logits = torch.randn(2, NUM_CLASSES, 8, 8)
    labels = torch.randint(0, NUM_CLASSES, (2, 8, 8))
    loss = WeightedCrossEntropyDiceLoss(NUM_CLASSES, class_weights="batch", ce_weight=1.0, dice_weight=0.5)
    ce, dice = loss.terms(logits, labels)
    assert loss(logits, labels).item() == pytest.approx(ce.item() + 0.5 * dice.item())
    onehot = torch.nn.functional.one_hot(labels, NUM_CLASSES).permute(0, 3, 1, 2).float()
    assert loss(logits, onehot).item() == pytest.approx(loss(logits, labels).item())
    assert loss(logits, labels[:, None]).item() == pytest.approx(loss(logits, labels).item())
    with pytest.raises(ValueError):
        loss(logits, labels[:, :4])


def test_prediction_adversarial_and_feature_losses():
    d = PatchDiscriminator(NUM_CLASSES, width=QUICK, n_layers=1)
    adv = PredictionAdversarialLoss()
    src = torch.randn(2, NUM_CLASSES, 32, 32, requires_grad=True)
    tgt = torch.randn(2, NUM_CLASSES, 32, 32, requires_grad=True)
    adv.discriminator_loss(d, src, tgt).backward()
    assert src.grad is None and tgt.grad is None  # D's loss never reaches the segmenter
    assert all(p.grad is not None for p in d.parameters())
    adv(d, tgt).backward()
    assert tgt.grad is not None and tgt.grad.abs().sum() > 0
    # TUNA-Net Eq. 5: sum over feature maps of ||f - f^||^2 / (HWC)
    feat = FeatureReconstructionLoss()
    f = [torch.ones(2, 3, 4, 4), torch.full((2, 6, 2, 2), 2.0)]
    r = [torch.zeros(2, 3, 4, 4), torch.zeros(2, 6, 2, 2)]
    assert feat(f, r).item() == pytest.approx(1.0 + 4.0)
    assert feat(f[0], r[0]).item() == pytest.approx(1.0)


# =====================================================================================================================
# image pool
# =====================================================================================================================


GENERATORS = [lambda: None, lambda: torch.Generator().manual_seed(7), lambda: np.random.default_rng(7)]


def _batches(n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 1, 8, 8, generator=g) for _ in range(n)]


@pytest.mark.parametrize("make_gen", GENERATORS, ids=["private", "torch", "numpy"])
def test_pool_deterministic(make_gen):
    def run():
        pool = ImagePool(10, generator=make_gen(), seed=3)
        return [pool.query(b) for b in _batches(12)]

    a, b = run(), run()
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_pool_behaviour():
    pool = ImagePool(8, seed=0)
    batches = _batches(400)
    # filling: the first 8 images come back unchanged
    assert torch.equal(pool.query(batches[0]), batches[0]) and torch.equal(pool.query(batches[1]), batches[1])
    assert len(pool) == 8
    old = 0
    for b in batches[2:]:
        out = pool.query(b)
        assert out.shape == b.shape and not out.requires_grad
        old += sum(not torch.equal(o, i) for o, i in zip(out, b))
    frac = old / (4 * 398)
    assert 0.45 < frac < 0.55  # an old image with probability 0.5
    x = torch.randn(2, 1, 8, 8, requires_grad=True)
    assert torch.equal(ImagePool(0).query(x), x) and not ImagePool(0).query(x).requires_grad


@pytest.mark.parametrize("make_gen", GENERATORS, ids=["private", "torch", "numpy"])
def test_pool_state_round_trip(make_gen):
    batches = _batches(30)
    pool = ImagePool(10, generator=make_gen(), seed=5)
    for b in batches[:15]:
        pool.query(b)
    buf = io.BytesIO()
    torch.save(pool.state_dict(), buf)  # as inside a training checkpoint
    uninterrupted = [pool.query(b) for b in batches[15:]]

    buf.seek(0)
    resumed_pool = ImagePool(10, generator=make_gen(), seed=999)  # different RNG: the state must override it
    resumed_pool.load_state_dict(torch.load(buf, weights_only=True))
    resumed = [resumed_pool.query(b) for b in batches[15:]]
    assert all(torch.equal(x, y) for x, y in zip(uninterrupted, resumed))
    with pytest.raises(ValueError, match="size mismatch"):
        ImagePool(5).load_state_dict(pool.state_dict())
