"""Exceptions with a file and a reason, so that a user always learns *which* input is wrong and *why*."""

from __future__ import annotations

from pathlib import Path


class SiteadaptError(Exception):
    """Base class of every error siteadapt raises on purpose (the CLI prints these without a traceback)."""


class ConfigError(SiteadaptError):
    """params.yaml (or a settings override) is invalid; the message names the key."""


class InputError(SiteadaptError):
    """An input file or folder cannot be used. ``path`` names it, ``reason`` says why (short, stable text)."""

    def __init__(self, path: str | Path | None, reason: str):
        self.path = None if path is None else Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}" if self.path is not None else reason)


class SeriesRejected(InputError):
    """A DICOM series was read but would give wrong geometry (missing slices, tilt, ...): it is not written."""
