"""Building blocks of the adaptation methods: networks (:mod:`.networks`), losses (:mod:`.losses`), the image
history pool (:mod:`.pool`) and small layers (:mod:`.blocks`). Methods compose these; none of them owns a loop."""

from .blocks import ConvNormAct, ResidualBlock, UpConvNormAct, count_parameters, make_norm, scaled
from .losses import (
    CycleConsistencyLoss,
    FeatureReconstructionLoss,
    LSGANDiscriminatorLoss,
    LSGANGeneratorLoss,
    LSGANLoss,
    PredictionAdversarialLoss,
    SoftDiceLoss,
    WeightedCrossEntropyDiceLoss,
    WeightedCrossEntropyLoss,
)
from .networks import (
    DilatedResidualEncoder,
    EncoderFeatures,
    PatchDiscriminator,
    PixelClassifier,
    ResNetClassifier,
    ResnetDecoder,
    ResnetGenerator,
)
from .pool import ImagePool

__all__ = [
    "ConvNormAct",
    "ResidualBlock",
    "UpConvNormAct",
    "count_parameters",
    "make_norm",
    "scaled",
    "CycleConsistencyLoss",
    "FeatureReconstructionLoss",
    "LSGANDiscriminatorLoss",
    "LSGANGeneratorLoss",
    "LSGANLoss",
    "PredictionAdversarialLoss",
    "SoftDiceLoss",
    "WeightedCrossEntropyDiceLoss",
    "WeightedCrossEntropyLoss",
    "DilatedResidualEncoder",
    "EncoderFeatures",
    "PatchDiscriminator",
    "PixelClassifier",
    "ResNetClassifier",
    "ResnetDecoder",
    "ResnetGenerator",
    "ImagePool",
]
