"""Names in the model registry: each site's registered model, its aliases, and how values are written as tags."""

from __future__ import annotations

from ..errors import RegistryError

CANDIDATE = "candidate"
CHAMPION = "champion"


def model_name(task: str, site: str) -> str:
    return f"siteadapt-{task}-{site}"


def tag_value(v) -> str:
    if v is None:
        return "none"
    if isinstance(v, float):
        return repr(v)
    return str(v)


def float_tag(v: str | None) -> float | None:
    if v is None or v in ("none", "nan", ""):
        return None
    try:
        return float(v)
    except ValueError:
        return None


def by_alias(client, name: str, alias: str, hint: str = ""):
    """The version of ``name`` that ``alias`` points at; :class:`RegistryError` (with ``hint``) when there is none."""
    from .. import tracking

    try:
        return client.get_model_version_by_alias(name, alias)
    except Exception:  # noqa: BLE001 - MlflowException: no such model or alias
        raise RegistryError(f"{name}: no version has alias '{alias}' in "
                            f"{tracking.redact(tracking.tracking_uri())}{hint}") from None
