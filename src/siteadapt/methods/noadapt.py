"""No adaptation: the source segmenter (classifier, for classification tasks: TUNA-Net's "NoAdapt" row) applied to
target images as they are. The lower bound of every table."""

from __future__ import annotations

from .base import Method, MethodOptions


class NoAdapt(Method):
    name = "noadapt"
    Options = MethodOptions
    needs_source_model = True
    needs_target_images = False
    trains = False

    def prepare(self, source, target, source_model=None):
        if source_model is None:
            raise ValueError("noadapt needs the trained source segmenter")
        self.source_model = source_model

    def predict(self, images):
        return self.source_model.predict(images)
