"""Exceptions with a file and a reason, so that a user always learns *which* input is wrong and *why*.

Exit codes of the ``siteadapt`` command (each :class:`SiteadaptError` subclass carries its own ``exit_code``; the CLI
prints the error in one line, without a traceback, and returns that code). DVC and Kubeflow see any non-zero code as a
failed step; the codes tell a script or an operator which kind of failure it was without parsing text:

- ``0``: done.
- ``1``: a check answered "no" without an error: ``promote`` refused by a gate, ``dvc-gen --check`` found dvc.yaml
  stale.
- ``2``: invalid settings or an unusable input (:class:`ConfigError`, :class:`InputError` and every error without a
  code of its own); also argparse's usage errors.
- ``3``: :class:`NothingUsableError`: a site ends with nothing usable (every input refused); ingest still writes the
  manifest with the refusals, preprocess names them.
- ``4``: :class:`LabelError` and its subclasses: labels would be lost or carry nothing to score
  (:class:`LabelValuesError`: label values that are not the task's ids; :class:`EmptyReferenceError`: a labelled
  site's references hold no structure).
- ``5``: :class:`GateLoosenedError`: ``promote`` of a version whose recorded gates are looser than the model's admin
  gate policy (``siteadapt policy set``; no override), or with gates looser than those recorded at registration,
  without ``--override-gates --reason``.
- ``6``: :class:`UnverifiedChampionError`: ``promote --check``: the ``champion`` alias points at a version without a
  matching siteadapt promotion record (moved by another client, or a record that does not verify).
- ``7``: :class:`IncompletePullError`: a PACS pull ended with series it could not fetch completely (the server
  stopped answering, instances went missing); the complete series are kept and recorded, the incomplete ones are
  neither recorded nor ingested, and the next pull fetches what they lack.
"""

from __future__ import annotations

from pathlib import Path


class SiteadaptError(Exception):
    """Base class of every error siteadapt raises on purpose (the CLI prints these without a traceback and returns
    ``exit_code``)."""

    exit_code: int = 2


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


class NothingUsableError(SiteadaptError):
    """A site ends with nothing usable: every input was refused (ingest), or the ingested site has no item
    (preprocess). The message counts the refusals per reason and names no input file."""

    exit_code = 3

    @staticmethod
    def count_refusals(rejected: list[dict]) -> str:
        """``3 x input: unreadable image file, 1 x labels: label file matches no image``: a manifest's ``rejected``
        entries counted per kind, without file names or paths. The kind is the reason's head (the text before the
        first ': ', after a leading ``line N: ``) with quoted text dropped, so that details (exception text, values)
        neither split the counts nor carry a name."""
        import re

        counts: dict[str, int] = {}
        for r in rejected:
            reason = re.sub(r"^line \d+: ", "", str(r.get("reason", "")))
            head = re.sub(r"'[^']*'|\"[^\"]*\"", "[...]", reason.split(": ", 1)[0]).strip()[:80]
            key = f"{r.get('in', 'input')}: {head or 'refused'}"
            counts[key] = counts.get(key, 0) + 1
        return ", ".join(f"{n} x {k}" for k, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))) or "none"


class LabelError(SiteadaptError):
    """Labels that would be silently lost or that carry nothing to score (see the subclasses)."""

    exit_code = 4


class LabelValuesError(LabelError):
    """Label maps hold values that are not the task's ids (0 + its structure ids) after the site's ``label_map``:
    the message lists the values found, the ids expected and the labels' redacted positions."""


class EmptyReferenceError(LabelError):
    """A labelled site's reference label maps hold no voxel of any structure: every score would be undefined."""


class RegistryError(SiteadaptError):
    """Nothing to promote (no candidate), or the registry refused an operation."""


class GateLoosenedError(RegistryError):
    """A promotion asked for gates looser than the ones recorded on the version at registration, without an explicit
    override, or the version was registered with gates looser than the model's admin gate policy (never
    overridable); the message names the policy or each gate with its recorded and requested value. Nothing is
    moved."""

    exit_code = 5


class UnverifiedChampionError(RegistryError):
    """The ``champion`` alias points at a version whose siteadapt promotion record is missing or does not match."""

    exit_code = 6


class IncompletePullError(SiteadaptError):
    """A PACS pull fetched some series only in part: they are left unrecorded (the next pull resumes them); the
    message counts them and names the server root only."""

    exit_code = 7


class SiteRefused(ConfigError):
    """``siteadapt site add`` refused the request (bad or existing name, unknown task or source site, missing folder,
    no images of the task's kind); the message names the option, never an input path. Nothing is written."""
