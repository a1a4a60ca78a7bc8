"""The networks of the papers, as plain ``nn.Module``s that methods compose.

=========================  ==========================================================================================
class                      role
=========================  ==========================================================================================
DilatedResidualEncoder     SIFA's encoder E (shared by the segmenter E∘C and the target-to-source generator E∘U)
PixelClassifier            SIFA's pixel-wise classifiers C1 / C2: 1x1 conv + upsampling to the input size
ResnetDecoder              SIFA's decoder U (1 conv, 4 residual blocks, 3 deconvs, output conv); DSAN's decoders
ResnetGenerator            CycleGAN's ResNet generator (3 conv, 9 residual blocks, 2 deconvs, output conv, tanh):
                           SIFA's G_t, the generators of CycleGAN / SeUDA / TUNA-Net
PatchDiscriminator         70x70 PatchGAN (LSGAN output, no sigmoid), optional auxiliary head (SIFA's D_s)
ResNetClassifier           ResNet-18-like image classifier with mid-level features (TUNA-Net's F_A / F_P)
=========================  ==========================================================================================

Every network takes ``width`` (channel multiplier: 1.0 = the paper's network, e.g. 0.25 for the CPU quick profile)
and ``in_channels``. Where the papers are silent, choices follow the public reference implementations' *published
configuration* (CycleGAN/pix2pix, SIFA) and are stated in each class docstring. Spatial sizes: the encoder needs H, W
divisible by 8 (three 2x2 max-pools), the generator by 4; other sizes run but the decoder/generator output then does
not match the input size (a ``skip`` connection raises a ``ValueError`` naming both shapes).

Parameter initialization (the papers are silent; the code states it): truncated normal N(0, 0.02) clipped at
+-2 std for generators, decoders and discriminators (DCGAN/CycleGAN/pix2pix), truncated N(0, 0.01) for the encoder
and pixel-wise classifiers (SIFA public code), He/Kaiming normal for the ResNet classifier trained from scratch
(torchvision scheme); biases 0; norm weights 1, biases 0. Call ``reset_parameters()`` to re-draw.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import (
    ConvNormAct,
    NormKind,
    PaddingMode,
    ResidualBlock,
    UpConvNormAct,
    check_choice,
    init_kaiming,
    init_truncated_normal,
    scaled,
)

__all__ = [
    "EncoderFeatures",
    "DilatedResidualEncoder",
    "PixelClassifier",
    "ResnetDecoder",
    "ResnetGenerator",
    "PatchDiscriminator",
    "ResNetClassifier",
]


def _check_same_size(name: str, out: torch.Tensor, image: torch.Tensor) -> None:
    if out.shape[-2:] != image.shape[-2:] or out.shape[1] != image.shape[1]:
        raise ValueError(
            f"{name}: skip connection needs the output {tuple(out.shape)} and the input image {tuple(image.shape)} "
            "to have the same channels and size (use H, W divisible by the network's stride)"
        )


# =====================================================================================================================
# SIFA encoder
# =====================================================================================================================


class EncoderFeatures(NamedTuple):
    """What :class:`DilatedResidualEncoder` returns.

    ``high``: output of the final ``2xC512`` block (stride 8) -> pixel-wise classifier C1 and decoder U.
    ``low``: output of the ``2xR512`` block (stride 8) -> the deep-supervision classifier C2.
    """

    high: torch.Tensor
    low: torch.Tensor


class DilatedResidualEncoder(nn.Module):
    """SIFA's dilated residual encoder E (TMI 2020 Sec. III-D; AAAI 2019 "Network Configurations").

    Layers ``{C16, R16, M, R32, M, 2xR64, M, 2xR128, 4xR256, 2xR512, 2xD512, 2xC512}`` (channels times ``width``):
    ``Ck`` = 3x3 conv + BN + ReLU (the first, C16, uses a 7x7 kernel as in the SIFA public code; the paper does not
    give kernel sizes), ``Rk`` = residual block of two 3x3 convs (conv-BN-ReLU-conv-BN, add, ReLU), ``Dk`` = the same
    with dilation 2, ``M`` = 2x2 max-pool stride 2. Output stride 8: a 256x256 input gives 512x32x32 features at
    ``width=1``.

    Lower-level feature for deep supervision: the TMI paper connects "the pixel-wise classifier C2 ... to the final
    outputs of the 2xR512 block" (C1 to the final 2xC512 block), so ``low`` is the output of the second R512 block;
    it has the same shape as ``high`` (512x32x32 at 256 input), because no pooling happens after the third ``M``.

    Choices where the papers are silent:
    - widening residual blocks (R16->R32 etc.) use a parameter-free zero-channel-padding shortcut (``shortcut="pad"``,
      as in the SIFA public code); ``shortcut="conv"`` uses a 1x1 conv + BN projection instead;
    - zero padding for all convolutions (``padding_mode``), PyTorch BN defaults (momentum 0.1 = TF decay 0.9);
    - optional elementwise dropout after every convolution (``dropout``; the SIFA code has the hook but its released
      configuration keeps rate 1.0, i.e. no dropout, which is our default 0.0);
    - ``norm`` is configurable but the paper's value is ``"batch"``.

    ``forward(x)`` returns :class:`EncoderFeatures` ``(high, low)``.
    """

    output_stride = 8

    def __init__(
        self,
        in_channels: int = 1,
        *,
        width: float = 1.0,
        norm: NormKind = "batch",
        dropout: float = 0.0,
        shortcut: str = "pad",
        first_kernel: int = 7,
        padding_mode: PaddingMode = "zeros",
    ):
        super().__init__()
        c = lambda k: scaled(k, width)  # noqa: E731
        blk = dict(norm=norm, dropout=dropout, padding_mode=padding_mode)

        def res(cin: int, cout: int, dilation: int = 1) -> ResidualBlock:
            return ResidualBlock(c(cin), c(cout), dilation=dilation, shortcut=shortcut, **blk)

        pool = lambda: nn.MaxPool2d(2, 2)  # noqa: E731
        self.in_channels = in_channels
        self.width = width
        self.low_path = nn.Sequential(
            ConvNormAct(in_channels, c(16), first_kernel, act="relu", **blk),  # C16
            res(16, 16),  # R16
            pool(),
            res(16, 32),  # R32
            pool(),
            res(32, 64),  # 2xR64
            res(64, 64),
            pool(),
            res(64, 128),  # 2xR128
            res(128, 128),
            res(128, 256),  # 4xR256
            res(256, 256),
            res(256, 256),
            res(256, 256),
            res(256, 512),  # 2xR512  -> low-level feature (C2)
            res(512, 512),
        )
        self.high_path = nn.Sequential(
            res(512, 512, dilation=2),  # 2xD512
            res(512, 512, dilation=2),
            ConvNormAct(c(512), c(512), 3, act="relu", **blk),  # 2xC512 -> C1, U
            ConvNormAct(c(512), c(512), 3, act="relu", **blk),
        )
        self.out_channels = c(512)
        self.low_channels = c(512)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_truncated_normal(self, std=0.01)

    def forward(self, x: torch.Tensor) -> EncoderFeatures:
        low = self.low_path(x)
        return EncoderFeatures(high=self.high_path(low), low=low)


# =====================================================================================================================
# pixel-wise classifier
# =====================================================================================================================


class PixelClassifier(nn.Module):
    """SIFA's pixel-wise classifier C_i: a 1x1 convolution to ``num_classes`` logits, then upsampling to the input
    image size (TMI Sec. III-D). Used for both C1 (on ``EncoderFeatures.high``) and C2 (on ``.low``).

    ``forward(feature, size)`` returns logits of shape ``(N, num_classes, *size)``; ``size=None`` keeps the feature
    resolution. Upsampling is bilinear with ``align_corners=False`` (the paper says "an upsampling layer"; the SIFA
    code resizes bilinearly). Optional dropout before the 1x1 conv (default off).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        dropout: float = 0.0,
        upsample_mode: str = "bilinear",
    ):
        super().__init__()
        check_choice("upsample_mode", upsample_mode, ("bilinear", "nearest", "bicubic"))
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv = nn.Conv2d(in_channels, num_classes, 1)
        self.num_classes = num_classes
        self.upsample_mode = upsample_mode
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_truncated_normal(self, std=0.01)

    def forward(self, feature: torch.Tensor, size: Sequence[int] | None = None) -> torch.Tensor:
        logits = self.conv(self.drop(feature))
        if size is not None and tuple(logits.shape[-2:]) != tuple(size):
            kw = {} if self.upsample_mode == "nearest" else {"align_corners": False}
            logits = F.interpolate(logits, size=tuple(size), mode=self.upsample_mode, **kw)
        return logits


# =====================================================================================================================
# decoder U and ResNet generator
# =====================================================================================================================


class ResnetDecoder(nn.Module):
    """SIFA's decoder U: features -> image. "1 convolutional layer, 4 residual blocks, and 3 deconvolutional layers,
    finally also followed by one convolutional output layer" (TMI Sec. III-D). With the encoder it forms the
    target-to-source generator ``G_s = U∘E``. ``n_blocks=3`` gives DSAN's decoders (3 residual blocks, 3 deconvs).

    Layers (``b = base_channels * width``; defaults are the SIFA public code's, the paper gives no channel counts):
    3x3 conv ``in -> 4b`` + IN + ReLU; ``n_blocks`` residual blocks at ``4b`` (IN, ReLU after the sum); ``n_upsample``
    3x3 stride-2 transposed convs (``4b -> 2b -> 2b -> b`` for 3) + IN + ReLU; 7x7 conv to ``out_channels``; tanh.
    The output is ``2**n_upsample`` times the feature size (256x256 from 32x32 features).

    ``skip=True`` adds the encoder's input image to the output before the tanh, ``tanh(conv(...) + image)``, so U
    learns a residual on top of the image that E saw. The papers do not mention it; the SIFA public code does this
    for both G_t and U and enables it in its released configuration (``"skip": 1``). Default ``False`` (the papers'
    text); a method reproducing SIFA's code sets it. ``forward(feature, image=None)``: ``image`` is required when
    ``skip`` is on.
    """

    def __init__(
        self,
        in_channels: int | None = None,
        out_channels: int = 1,
        *,
        width: float = 1.0,
        base_channels: int = 32,
        n_blocks: int = 4,
        n_upsample: int = 3,
        norm: NormKind = "instance",
        padding_mode: PaddingMode = "zeros",
        skip: bool = False,
    ):
        super().__init__()
        if n_upsample < 1:
            raise ValueError("n_upsample must be >= 1")
        in_channels = scaled(512, width) if in_channels is None else in_channels
        b = scaled(base_channels, width)
        layers: list[nn.Module] = [ConvNormAct(in_channels, 4 * b, 3, norm=norm, padding_mode=padding_mode)]
        layers += [ResidualBlock(4 * b, norm=norm, padding_mode=padding_mode) for _ in range(n_blocks)]
        ch = 4 * b
        for i in range(n_upsample):
            nxt = 2 * b if i < n_upsample - 1 else b
            layers.append(UpConvNormAct(ch, nxt, norm=norm))
            ch = nxt
        layers.append(nn.Conv2d(ch, out_channels, 7, padding=3, padding_mode=padding_mode))
        self.body = nn.Sequential(*layers)
        self.skip = skip
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.upsample_factor = 2**n_upsample
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_truncated_normal(self, std=0.02)

    def forward(self, feature: torch.Tensor, image: torch.Tensor | None = None) -> torch.Tensor:
        out = self.body(feature)
        if self.skip:
            if image is None:
                raise ValueError("ResnetDecoder(skip=True) needs the encoder's input image: forward(feature, image)")
            _check_same_size("ResnetDecoder", out, image)
            out = out + image
        return torch.tanh(out)


class ResnetGenerator(nn.Module):
    """CycleGAN's ResNet generator (Zhu et al. 2017; SIFA's G_t "follows the practice of CycleGAN"): 3 convolutional
    layers, 9 residual blocks, 2 deconvolutional layers, one output convolution, tanh.

    Layers (``b = base_channels * width``): 7x7 conv ``in -> b``, 3x3 stride-2 convs ``b -> 2b -> 4b`` (each + norm +
    ReLU); ``n_blocks`` residual blocks at ``4b`` (CycleGAN style: ``x + body(x)``, no activation after the sum);
    3x3 stride-2 transposed convs ``4b -> 2b -> b`` (+ norm + ReLU); 7x7 conv ``b -> out_channels``; tanh.
    Output size = input size for H, W divisible by 4.

    Defaults: instance norm, reflection padding for the 7x7 and residual convs (CycleGAN), ``base_channels=64`` (the
    CycleGAN paper's, used by the CycleGAN/SeUDA/TUNA-Net baselines). The SIFA public code uses ``base_channels=32``,
    zero padding and ``skip=True`` for G_t; the SIFA papers give no channel counts. ``skip=True`` returns
    ``tanh(conv(...) + x)`` (needs ``in_channels == out_channels``).
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 1,
        *,
        width: float = 1.0,
        base_channels: int = 64,
        n_blocks: int = 9,
        norm: NormKind = "instance",
        padding_mode: PaddingMode = "reflect",
        skip: bool = False,
    ):
        super().__init__()
        if skip and in_channels != out_channels:
            raise ValueError("ResnetGenerator(skip=True) needs in_channels == out_channels")
        b = scaled(base_channels, width)
        layers: list[nn.Module] = [
            ConvNormAct(in_channels, b, 7, norm=norm, padding_mode=padding_mode),
            ConvNormAct(b, 2 * b, 3, 2, norm=norm),
            ConvNormAct(2 * b, 4 * b, 3, 2, norm=norm),
        ]
        layers += [
            ResidualBlock(4 * b, norm=norm, padding_mode=padding_mode, post_act="none") for _ in range(n_blocks)
        ]
        layers += [
            UpConvNormAct(4 * b, 2 * b, norm=norm),
            UpConvNormAct(2 * b, b, norm=norm),
            nn.Conv2d(b, out_channels, 7, padding=3, padding_mode=padding_mode),
        ]
        self.body = nn.Sequential(*layers)
        self.skip = skip
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_truncated_normal(self, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x)
        if self.skip:
            _check_same_size("ResnetGenerator", out, x)
            out = out + x
        return torch.tanh(out)


# =====================================================================================================================
# PatchGAN discriminator
# =====================================================================================================================


class PatchDiscriminator(nn.Module):
    """70x70 PatchGAN (Isola et al. 2017) with raw (LSGAN) outputs, optionally with an auxiliary output map.

    As configured in SIFA (TMI Sec. III-D): 5 convolutions with 4x4 kernels, stride 2 except the last two (stride 1),
    ``{64, 128, 256, 512, 1}`` feature maps (times ``width``), norm + LeakyReLU(0.2) after the first four. Padding 1
    (pix2pix), so a 256x256 input gives a 30x30 map of patch scores; each score sees a 70x70 input patch
    (``receptive_field``). No sigmoid: outputs are logits for the least-squares GAN losses in
    :mod:`siteadapt.nn.losses`.

    - ``norm``: ``"instance"`` (the papers) or ``"batch"`` (or ``"none"``).
    - ``norm_first_layer``: the SIFA text says the first four layers all have instance norm, while PatchGAN as
      published (and the SIFA and pix2pix code) has no norm on the first layer. Default ``False`` (PatchGAN); ``True``
      for the literal reading of the SIFA text.
    - ``n_layers``: number of stride-2 convolutions (3 gives the 70x70 PatchGAN; 1 -> 16x16, 2 -> 34x34, 4 ->
      142x142 receptive fields).
    - ``aux_head=True`` adds a second 4x4 output convolution on the shared trunk, for SIFA's source discriminator
      D_s. Its main head does the usual real-source vs generated-source task (L_adv^s); the auxiliary head, per TMI
      Sec. III-B.3 / Eq. (5), classifies whether a generated source-like image was *reconstructed from a synthesized
      target image*, U(E(x^{s->t})) (label "real"), or *transformed from a real target image*, U(E(x^t)) (label
      "fake"); the encoder is trained to fool it (L_adv^s~). With ``aux_head``, ``forward`` returns ``(main, aux)``;
      otherwise just ``main``. (A single 2-channel output conv, as in the SIFA code, is the same function.)

    ``in_channels`` is 1 for image discriminators, ``num_classes`` for prediction-space discriminators D_p.
    """

    def __init__(
        self,
        in_channels: int = 1,
        *,
        width: float = 1.0,
        base_channels: int = 64,
        n_layers: int = 3,
        norm: NormKind = "instance",
        norm_first_layer: bool = False,
        aux_head: bool = False,
    ):
        super().__init__()
        if n_layers < 1:
            raise ValueError("n_layers must be >= 1")
        b = scaled(base_channels, width)
        kw = dict(padding=1, act="lrelu")
        layers: list[nn.Module] = [ConvNormAct(in_channels, b, 4, 2, norm=norm if norm_first_layer else "none", **kw)]
        ch = b
        for i in range(1, n_layers):
            nxt = b * min(2**i, 8)
            layers.append(ConvNormAct(ch, nxt, 4, 2, norm=norm, **kw))
            ch = nxt
        nxt = b * min(2**n_layers, 8)
        layers.append(ConvNormAct(ch, nxt, 4, 1, norm=norm, **kw))
        self.trunk = nn.Sequential(*layers)
        self.head = nn.Conv2d(nxt, 1, 4, padding=1)
        self.aux = nn.Conv2d(nxt, 1, 4, padding=1) if aux_head else None
        self.aux_head = aux_head
        rf = 1
        for k, s in reversed([(4, 2)] * n_layers + [(4, 1), (4, 1)]):
            rf = (rf - 1) * s + k
        self.receptive_field = rf
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_truncated_normal(self, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        h = self.trunk(x)
        if self.aux is None:
            return self.head(h)
        return self.head(h), self.aux(h)


# =====================================================================================================================
# ResNet-18-like classifier (TUNA-Net)
# =====================================================================================================================


class ResNetClassifier(nn.Module):
    """A ResNet-18-like image classifier trained from scratch (TUNA-Net's F_A / F_P; the paper fine-tunes an
    ImageNet ResNet-18, which siteadapt does not download).

    Stem: 7x7 stride-2 conv ``in -> b`` + BN + ReLU, 3x3 stride-2 max-pool; four stages of ``blocks[i]`` basic
    residual blocks at ``b, 2b, 4b, 8b`` channels (stride 1, 2, 2, 2; 1x1 conv + BN projection shortcuts), global
    average pool, linear layer to ``num_classes`` logits. ``b = 64 * width``; ``blocks=(2, 2, 2, 2)`` is ResNet-18.

    ``features(x)`` returns the mid-level features used by TUNA-Net's feature reconstruction loss (Eq. 5): by default
    the outputs of stages 2 and 3 (``feature_stages=(2, 3)``), i.e. the paper's "conv 3" (128 channels, stride 8) and
    "conv 4" (256 channels, stride 16); the paper's 56x56 / 28x28 sizes correspond to a 448-pixel input.
    ``forward_features(x)`` returns ``(logits, features)`` in one pass. He (Kaiming) initialization.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 2,
        *,
        width: float = 1.0,
        blocks: Sequence[int] = (2, 2, 2, 2),
        norm: NormKind = "batch",
        feature_stages: Sequence[int] = (2, 3),
    ):
        super().__init__()
        if not all(1 <= s <= len(blocks) for s in feature_stages):
            raise ValueError(f"feature_stages {tuple(feature_stages)} must be in 1..{len(blocks)}")
        b = scaled(64, width)
        self.stem = nn.Sequential(
            ConvNormAct(in_channels, b, 7, 2, norm=norm),
            nn.MaxPool2d(3, 2, padding=1),
        )
        stages = []
        ch = b
        for i, n in enumerate(blocks):
            out = b * 2**i
            stride = 1 if i == 0 else 2
            stage = [ResidualBlock(ch, out, stride=stride, norm=norm, shortcut="conv")]
            stage += [ResidualBlock(out, out, norm=norm) for _ in range(n - 1)]
            stages.append(nn.Sequential(*stage))
            ch = out
        self.stages = nn.ModuleList(stages)
        self.fc = nn.Linear(ch, num_classes)
        self.feature_stages = tuple(feature_stages)
        self.feature_channels = tuple(b * 2 ** (s - 1) for s in self.feature_stages)
        self.num_classes = num_classes
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_kaiming(self)

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        h = self.stem(x)
        feats = []
        for i, stage in enumerate(self.stages, start=1):
            h = stage(h)
            if i in self.feature_stages:
                feats.append(h)
        logits = self.fc(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))
        return logits, feats

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Mid-level features (stages ``feature_stages``), computing only the stages needed."""
        h = self.stem(x)
        feats = []
        last = max(self.feature_stages)
        for i, stage in enumerate(self.stages, start=1):
            h = stage(h)
            if i in self.feature_stages:
                feats.append(h)
            if i == last:
                break
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)[0]

