"""Small building blocks shared by the networks in :mod:`siteadapt.nn.networks`.

Conventions used everywhere in ``siteadapt.nn``:

- Tensors are NCHW; any memory format works (``channels_last`` is preserved by every block here).
- A convolution directly followed by a normalization layer has no bias (the norm's shift makes it redundant, and a
  bias there would receive an exactly-zero gradient). Convolutions without a following norm have a bias.
- No in-place activations, so autograd and ``torch.autocast`` (fp16/bf16) never trip over overwritten buffers.
- Channel counts are scaled by a ``width`` multiplier with :func:`scaled`; ``width=1.0`` is the paper's network.
- Normalization is chosen by name: ``"batch"``, ``"instance"`` or ``"none"`` (see :func:`make_norm`).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

NormKind = Literal["batch", "instance", "none"]
PaddingMode = Literal["zeros", "reflect", "replicate"]

_NORMS = ("batch", "instance", "none")
_PADDINGS = ("zeros", "reflect", "replicate")


def scaled(channels: int, width: float) -> int:
    """``channels`` times the width multiplier, rounded, at least 1."""
    if width <= 0:
        raise ValueError(f"width must be > 0, got {width}")
    return max(1, int(round(channels * width)))


def check_choice(name: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


def make_norm(kind: NormKind, channels: int) -> nn.Module:
    """A 2D normalization layer by name.

    - ``"batch"``: ``BatchNorm2d`` with PyTorch defaults (momentum 0.1 = TensorFlow decay 0.9, eps 1e-5).
    - ``"instance"``: ``InstanceNorm2d(affine=True)`` without running statistics, so training and eval behave the
      same (as in CycleGAN). The affine scale/shift is our choice where the papers are silent; it matches the
      TensorFlow instance norm the SIFA code relies on (centre and scale on).
    - ``"none"``: identity.
    """
    check_choice("norm", kind, _NORMS)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True, track_running_stats=False)
    return nn.Identity()


def make_act(kind: str) -> nn.Module:
    """``"relu"``, ``"lrelu"`` (slope 0.2, the PatchGAN value), ``"tanh"`` or ``"none"``."""
    if kind == "relu":
        return nn.ReLU()
    if kind == "lrelu":
        return nn.LeakyReLU(0.2)
    if kind == "tanh":
        return nn.Tanh()
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"activation must be relu, lrelu, tanh or none, got {kind!r}")


class ConvNormAct(nn.Sequential):
    """conv -> (dropout) -> norm -> activation, with "same" padding for odd kernels at stride 1.

    ``padding`` defaults to ``dilation * (kernel_size - 1) // 2``. Dropout (elementwise, as in the SIFA code where it
    sits right after the convolution) is only added when ``dropout > 0``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        *,
        dilation: int = 1,
        padding: int | None = None,
        norm: NormKind = "batch",
        act: str = "relu",
        padding_mode: PaddingMode = "zeros",
        dropout: float = 0.0,
    ):
        check_choice("padding_mode", padding_mode, _PADDINGS)
        if padding is None:
            padding = dilation * (kernel_size - 1) // 2
        layers: list[nn.Module] = [
            nn.Conv2d(
                in_channels,
                out_channels,
                kernel_size,
                stride=stride,
                padding=padding,
                dilation=dilation,
                bias=(norm == "none"),
                padding_mode=padding_mode,
            )
        ]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        layers += [make_norm(norm, out_channels), make_act(act)]
        super().__init__(*layers)


class UpConvNormAct(nn.Sequential):
    """Transposed 3x3 convolution with stride 2 (exactly doubles H and W) -> norm -> activation.

    ``padding=1, output_padding=1`` gives ``H_out = 2 * H_in``, the "SAME" behaviour of the TensorFlow deconvolutions
    the CycleGAN/SIFA generators use.
    """

    def __init__(self, in_channels: int, out_channels: int, *, norm: NormKind = "instance", act: str = "relu"):
        super().__init__(
            nn.ConvTranspose2d(
                in_channels, out_channels, 3, stride=2, padding=1, output_padding=1, bias=(norm == "none")
            ),
            make_norm(norm, out_channels),
            make_act(act),
        )


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (optionally dilated, optionally widening).

    ``body = conv-norm-ReLU-conv-norm``; output ``= act(body(x) + shortcut(x))`` with ``post_act="relu"`` (the
    encoder and decoder style of SIFA, and of ResNets) or ``body(x) + x`` with ``post_act="none"`` (the CycleGAN
    generator block).

    When ``out_channels > in_channels`` the shortcut is either
    - ``"pad"`` (default): the input is zero-padded with the missing channels (parameter-free, ResNet "option A"; the
      SIFA public code does this), or
    - ``"conv"``: a 1x1 convolution + norm projection (ResNet "option B").
    ``dilation=2`` gives the dilated residual block ``D`` of the SIFA encoder (padding 2 keeps the size).
    ``stride=2`` makes the first convolution strided (a ResNet down-sampling block); the shortcut then subsamples
    (``"pad"``) or uses a strided 1x1 convolution (``"conv"``).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        *,
        stride: int = 1,
        dilation: int = 1,
        norm: NormKind = "batch",
        padding_mode: PaddingMode = "zeros",
        dropout: float = 0.0,
        shortcut: Literal["pad", "conv"] = "pad",
        post_act: Literal["relu", "none"] = "relu",
    ):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        check_choice("shortcut", shortcut, ("pad", "conv"))
        check_choice("post_act", post_act, ("relu", "none"))
        if out_channels < in_channels and shortcut == "pad":
            raise ValueError("a zero-padding shortcut cannot reduce channels; use shortcut='conv'")
        common = dict(dilation=dilation, norm=norm, padding_mode=padding_mode, dropout=dropout)
        self.body = nn.Sequential(
            ConvNormAct(in_channels, out_channels, 3, stride, act="relu", **common),
            ConvNormAct(out_channels, out_channels, 3, act="none", **common),
        )
        self.stride = stride
        self.extra_channels = 0
        self.proj: nn.Module | None = None
        if out_channels != in_channels or stride != 1:
            if shortcut == "conv":
                self.proj = ConvNormAct(in_channels, out_channels, 1, stride, padding=0, norm=norm, act="none")
            else:
                self.extra_channels = out_channels - in_channels
        self.post_act = make_act(post_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.proj is not None:
            identity = self.proj(x)
        else:
            identity = x[:, :, :: self.stride, :: self.stride] if self.stride != 1 else x
            if self.extra_channels:
                identity = F.pad(identity, (0, 0, 0, 0, 0, self.extra_channels))
        return self.post_act(self.body(x) + identity)


# ---------------------------------------------------------------------------------------------------------------------
# parameter initialization
# ---------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def trunc_normal_(tensor: torch.Tensor, std: float) -> torch.Tensor:
    """Fill ``tensor`` with N(0, std^2) truncated to [-2 std, 2 std] by redrawing the out-of-range values until none
    is left. Same distribution as ``nn.init.trunc_normal_`` (which uses erfinv and is several times slower on CPU)."""
    if tensor.is_meta:
        return tensor
    bound = 2.0 * std
    draw = torch.empty_like(tensor).normal_(0.0, std).view(-1)
    idx = (draw.abs() > bound).nonzero().squeeze(1)
    while idx.numel():
        redraw = torch.randn(idx.numel(), dtype=draw.dtype, device=draw.device) * std
        draw[idx] = redraw
        idx = idx[redraw.abs() > bound]
    tensor.copy_(draw.view_as(tensor))
    return tensor


def init_truncated_normal(module: nn.Module, std: float) -> nn.Module:
    """Initialize every conv / transposed conv / linear weight with a normal(0, std) truncated at +-2 std, biases with
    0, and normalization layers with weight 1, bias 0. Returns ``module``.

    std 0.02 is the DCGAN/CycleGAN/pix2pix value (generators, decoders, discriminators); the SIFA public code uses the
    same truncated normal with std 0.01 for its encoder and pixel-wise classifiers. Deterministic under
    ``torch.manual_seed``.
    """
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            trunc_normal_(m.weight, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.InstanceNorm2d, nn.GroupNorm)):
            if m.weight is not None:
                nn.init.ones_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return module


def init_kaiming(module: nn.Module) -> nn.Module:
    """He (Kaiming) normal init, fan_out, for ReLU networks trained from scratch (the torchvision ResNet scheme):
    conv weights ~ N(0, 2/fan_out), linear layers N(0, 0.01), biases 0, norm weight 1 / bias 0. Returns ``module``."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.01)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.InstanceNorm2d, nn.GroupNorm)):
            if m.weight is not None:
                nn.init.ones_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return module


def count_parameters(module: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters of ``module``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
