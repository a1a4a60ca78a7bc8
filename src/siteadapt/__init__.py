"""siteadapt: adapt a medical image segmenter (or classifier) trained on a labeled source site to a new,
unlabeled hospital site with unsupervised domain adaptation, as a reproducible pipeline."""

__version__ = "0.1.0"
