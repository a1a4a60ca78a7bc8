"""The served model: a pyfunc wrapper around a trained method (segmentation: label maps; classification:
P(positive class)), stored as code (``siteadapt/pyfunc_model.py`` / ``pyfunc_classifier.py``), and its refusal of
non-finite input."""

from __future__ import annotations

from pathlib import Path

import mlflow.pyfunc
import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from ..errors import SiteadaptError


class NonFiniteInputError(SiteadaptError, MlflowException):
    """The serving input holds NaN or infinite values: nothing is predicted. An ``MlflowException`` with error code
    ``INVALID_PARAMETER_VALUE`` as well, so that a model server answers 400 with this message rather than a
    generic 500."""

    def __init__(self, message: str):
        MlflowException.__init__(self, message, error_code=INVALID_PARAMETER_VALUE)


class _SiteadaptModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper around a trained method (its ``model.pt`` and, for methods that apply it, the source model)."""

    _skip_type_hint_validation = True  # no type-hint validation: the input is a float32 tensor that the signature checks

    def load_context(self, context):
        from siteadapt.methods.build import load_model

        self.method, _ = load_model(Path(context.artifacts["model"]))
        if self.method.needs_source_model:
            src, _ = load_model(Path(context.artifacts["source_model"]))
            self.method.source_model = src

    def _logits(self, model_input):
        import torch

        with np.errstate(over="ignore"):  # a value beyond float32 becomes +/-Inf here, and is counted as such
            x = np.asarray(model_input, dtype=np.float32)
        check_finite(x)
        if x.ndim == 3:
            x = x[:, None]
        with torch.no_grad():
            return self.method.predict_subject(torch.from_numpy(np.ascontiguousarray(x))).float()


class SiteadaptSegmenter(_SiteadaptModel):
    """Segmentation: preprocessed slices of one subject -> label map (see the module docstring)."""

    def predict(self, context, model_input, params=None):
        return self._logits(model_input).argmax(1).numpy().astype(np.uint8)


class SiteadaptClassifier(_SiteadaptModel):
    """Classification: preprocessed images (N, 1, H, W) -> P(positive class) per image, float32 (N,)."""

    def predict(self, context, model_input, params=None):
        import torch

        logits = self._logits(model_input)
        if logits.ndim != 2:
            raise ValueError(f"expected class logits (N, K) from {self.method.name}, got shape {tuple(logits.shape)}")
        return torch.softmax(logits, 1)[:, 1].numpy().astype(np.float32)


def check_finite(x: np.ndarray) -> None:
    """Refuse input with NaN or +/-Inf anywhere (counted after the cast to float32, as the network would see it):
    a network maps NaN to some class silently (an all-background label map), so garbage in must not look like a
    result. Raises :class:`NonFiniteInputError` with the counts; names no value and no file."""
    finite = np.isfinite(x)
    if finite.all():
        return
    n_nan = int(np.isnan(x).sum())
    n_pos, n_neg = int(np.isposinf(x).sum()), int(np.isneginf(x).sum())
    raise NonFiniteInputError(
        f"input refused: {x.size - int(finite.sum())} of {x.size} values are not finite (NaN {n_nan}, +Inf {n_pos}, "
        f"-Inf {n_neg}); the model takes preprocessed images (siteadapt preprocess: float32 in [-1, 1]) and "
        "predicted nothing")


WRAPPERS = {"segmentation": (SiteadaptSegmenter, "pyfunc_model.py"),
            "classification": (SiteadaptClassifier, "pyfunc_classifier.py")}
