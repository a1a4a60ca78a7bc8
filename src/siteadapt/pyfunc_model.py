"""The pyfunc model definition MLflow stores with every registered siteadapt model ("models from code": MLflow keeps
this file instead of a pickled object). The class is :class:`siteadapt.registry.pyfunc.SiteadaptSegmenter`; its
weights are the model's artifacts (``model`` and, for methods that apply it, ``source_model``). Input with NaN or
+/-Inf anywhere is refused with :class:`siteadapt.registry.pyfunc.NonFiniteInputError` (never an all-background map)."""

import mlflow

from siteadapt.registry.pyfunc import SiteadaptSegmenter

mlflow.models.set_model(SiteadaptSegmenter())
