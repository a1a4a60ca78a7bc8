"""The pyfunc model definition MLflow stores with every registered siteadapt *classifier* ("models from code", as
:mod:`siteadapt.pyfunc_model` for segmenters). The class is :class:`siteadapt.registry.pyfunc.SiteadaptClassifier`:
preprocessed images (N, 1, H, W) -> P(positive class) per image; its weights are the model's artifacts. Input with
NaN or +/-Inf anywhere is refused with :class:`siteadapt.registry.pyfunc.NonFiniteInputError` (never a NaN score)."""

import mlflow

from siteadapt.registry.pyfunc import SiteadaptClassifier

mlflow.models.set_model(SiteadaptClassifier())
