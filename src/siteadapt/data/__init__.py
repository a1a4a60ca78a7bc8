"""Data: preprocessing, datasets and the synthetic multi-site generator."""
