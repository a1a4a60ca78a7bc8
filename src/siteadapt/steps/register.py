"""Names kept for models registered by earlier siteadapt versions.

The registry's work moved to :mod:`siteadapt.registry` (naming, gates, policy, registration, promotion,
verification) and the register step is :func:`siteadapt.steps.api.register`. A model registered before the move
carries a code file (``pyfunc_model.py`` / ``pyfunc_classifier.py``) that imports its wrapper class from this
module; these two names stay importable here so that such a model still loads.
"""

from __future__ import annotations

from ..registry.pyfunc import SiteadaptClassifier, SiteadaptSegmenter

__all__ = ["SiteadaptClassifier", "SiteadaptSegmenter"]
