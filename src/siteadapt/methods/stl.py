"""STL: supervised transfer learning, the "T-STL" row of SeUDA's Table 1 (after Ghafoorian et al. 2017): the trained
source segmenter fine-tuned on the *labeled* target training site. Like ``supervised`` it is an upper-bound
reference that reads target labels (``trains_on_target_labels``), never an adaptation method.

Same network, loss and optimiser as :mod:`.segmenter` (E∘C1, class-weighted CE + Dice, Adam lr 2e-4, weight decay
1e-4, optional augmentation); the weights start from the source segmenter instead of random values.

Choices where the paper is silent (options): every layer is fine-tuned (``freeze_encoder: true`` fine-tunes only
the classifier C1, the shallow end of the layer-count study of Ghafoorian et al.); the learning rate is the source
segmenter's, and the schedule is the profile's iteration count like every other method. Segmentation only: the
classification counterpart belongs with the classification source model.
"""

from __future__ import annotations

from pydantic import Field

from .segmenter import SegmenterOptions, Supervised


class STLOptions(SegmenterOptions):
    freeze_encoder: bool = Field(False, description="fine-tune only the classifier C1")


class STL(Supervised):
    name = "stl"
    Options = STLOptions
    needs_source_model = True
    trains_on_target_labels = True

    def __init__(self, ctx, options: STLOptions | None = None):
        super().__init__(ctx, options)
        if self.opts.freeze_encoder:
            for p in self.net.encoder.parameters():
                p.requires_grad_(False)

    def prepare(self, source, target, source_model=None) -> None:
        if source_model is None:
            raise ValueError("stl needs the trained source segmenter (run train-source first)")
        self.net.load_state_dict(source_model.net.state_dict())

    def train(self, mode: bool = True):
        super().train(mode)
        if self.opts.freeze_encoder:
            self.net.encoder.eval()  # a frozen encoder keeps the source batch-norm statistics too
        return self
