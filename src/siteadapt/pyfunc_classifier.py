"""The pyfunc model definition MLflow stores with every registered siteadapt *classifier* ("models from code", as
:mod:`siteadapt.pyfunc_model` for segmenters). The class is :class:`siteadapt.steps.register.SiteadaptClassifier`:
preprocessed images (N, 1, H, W) -> P(positive class) per image; its weights are the model's artifacts. Input with
NaN or +/-Inf anywhere is refused with :class:`siteadapt.steps.register.NonFiniteInputError` (never a NaN score)."""

import mlflow

from siteadapt.steps.register import SiteadaptClassifier

mlflow.models.set_model(SiteadaptClassifier())
