"""The pyfunc model definition MLflow stores with every registered siteadapt model ("models from code": MLflow keeps
this file instead of a pickled object). The class is :class:`siteadapt.steps.register.SiteadaptSegmenter`; its
weights are the model's artifacts (``model`` and, for methods that apply it, ``source_model``). Input with NaN or
+/-Inf anywhere is refused with :class:`siteadapt.steps.register.NonFiniteInputError` (never an all-background map)."""

import mlflow

from siteadapt.steps.register import SiteadaptSegmenter

mlflow.models.set_model(SiteadaptSegmenter())
