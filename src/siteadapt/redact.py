"""Keep credentials out of everything siteadapt prints, logs or writes.

A location may arrive with a secret inside it: ``http://user:password@host/...`` (userinfo), or a query parameter that
carries a token (``?access_token=...``, a presigned S3 URL's ``X-Amz-Signature=...``). siteadapt never *uses* such a
secret (credentials come from the environment, see :data:`WHERE_CREDENTIALS_GO`), and this module makes sure it is
never shown either:

- :func:`redact_uri` rewrites one URI: the userinfo becomes ``***`` and the value of every secret-bearing query (or
  fragment) parameter becomes ``***``; everything else is kept as it was, so the message still says which server;
- :func:`redact_text` does the same to every URI found in free text (an error message, a log line, a traceback), and
  also masks ``Bearer``/``Basic`` authorization values and ``name=value`` pairs of the secret names outside URIs;
- :func:`secret_parts` says *what kind* of secret a URI carries (for a refusal message that names no value);
- :class:`RedactingFilter` / :func:`install` apply :func:`redact_text` to log records, and :func:`format_exception`
  to a traceback, at the sinks (the CLI's handlers and error line, Kubeflow component bodies).

Secret parameter names (:data:`SECRET_PARAMS`, compared case-insensitively): ``access_token``, ``id_token``,
``refresh_token``, ``token``, ``auth``, ``auth_token``, ``authorization``, ``api_key``, ``api-key``, ``apikey``,
``key``, ``password``, ``passwd``, ``pwd``, ``pass``, ``secret``, ``client_secret``, ``signature``, ``sig``,
``credential``, ``credentials``, ``session_token``, ``security_token``, ``x-amz-signature``, ``x-amz-credential``,
``x-amz-security-token``, ``awsaccesskeyid``, ``x-goog-signature``, ``x-goog-credential``; also any name ending in
``_token``, ``_secret``, ``_password`` or ``_key`` (``private_key``, ``sas_key``, ...).
"""

from __future__ import annotations

import logging
import re
import sys
import traceback
from urllib.parse import urlsplit

MASK = "***"

SECRET_PARAMS = frozenset({
    "access_token", "id_token", "refresh_token", "token", "auth", "auth_token", "authorization",
    "api_key", "api-key", "apikey", "key", "password", "passwd", "pwd", "pass", "secret", "client_secret",
    "signature", "sig", "credential", "credentials", "session_token", "security_token",
    "x-amz-signature", "x-amz-credential", "x-amz-security-token", "awsaccesskeyid",
    "x-goog-signature", "x-goog-credential",
})
SECRET_SUFFIXES = ("_token", "_secret", "_password", "_key")

# Where each kind of location takes its credentials from (for messages that refuse an inline secret).
WHERE_CREDENTIALS_GO = {
    "dicomweb": "set SITEADAPT_DICOMWEB_USER and SITEADAPT_DICOMWEB_PASSWORD (HTTP basic) or SITEADAPT_DICOMWEB_TOKEN "
                "(bearer) in the environment",
    "s3": "use the AWS credential chain: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN) in the "
          "environment, AWS_PROFILE or AWS_SHARED_CREDENTIALS_FILE (a mounted file), or an instance role; the "
          "endpoint comes from AWS_ENDPOINT_URL",
    "mlflow": "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or MLFLOW_TRACKING_TOKEN, in the environment",
}

# "scheme://"; one slash too, as a URI looks once it went through pathlib
# (``Path("http://u:p@h")`` -> ``http:/u:p@h``)
_SCHEME = r"[A-Za-z][A-Za-z0-9+.-]*:/{1,3}"
_URI_IN_TEXT = re.compile(_SCHEME + r"[^\s'\"<>`]+")
_NAME = r"[A-Za-z0-9_.~-]+"
# name=value inside a URI's query or fragment (separators ? & ; #)
_PARAM_IN_URI = re.compile(r"([?&;#])(" + _NAME + r")=([^&;#]*)")
# name=value in free text (outside a URI): the name must start a word
_PARAM_IN_TEXT = re.compile(r"(?<![A-Za-z0-9_.~-])(" + _NAME + r")=([^\s&;#'\",)\]}]+)")
# an Authorization header (or a dict key of that name) with its value, with or without a scheme word before it
_AUTH_HEADER = re.compile(r"(?i)(\bauthorization['\"]?\s*[:=]\s*['\"]?)(?:(bearer|basic|token|digest)(\s+))?"
                          r"[^\s'\",}]+")
# a bare "Bearer <token>" / "Basic <base64>": the value has 8+ characters, one of them not a letter (so that English
# such as "Basic authentication" is left alone)
_AUTH_SCHEME = re.compile(r"\b(Bearer|Basic)(\s+)(?=[A-Za-z]*[0-9._~+/=-])[A-Za-z0-9._~+/=-]{8,}")


def is_secret_param(name: str) -> bool:
    """Whether a query parameter of this name carries a credential (case-insensitive)."""
    n = name.strip().lower()
    return n in SECRET_PARAMS or n.endswith(SECRET_SUFFIXES)


def _authority_span(uri: str) -> tuple[int, int] | None:
    """Start and end of the authority (``user:pass@host:port``) of ``uri``; None when it has no ``scheme://``."""
    m = re.match(_SCHEME, uri)
    if not m:
        return None
    start = m.end()
    end = len(uri)
    for sep in "/?#":
        i = uri.find(sep, start)
        if i != -1:
            end = min(end, i)
    return start, end


def secret_parts(uri: str) -> list[str]:
    """What kind of secret ``uri`` carries, without any value: ``["user:password@"]`` for userinfo and
    ``["query parameter 'access_token'"]`` per secret parameter (names as written); empty when none."""
    uri = str(uri)
    found = []
    span = _authority_span(uri)
    if span is not None and "@" in uri[span[0]:span[1]]:
        found.append("user:password@" if ":" in uri[span[0]:span[1]].rpartition("@")[0] else "user@")
    for m in _PARAM_IN_URI.finditer(uri if span is None else uri[span[1]:]):
        if is_secret_param(m.group(2)) and m.group(3):
            found.append(f"query parameter {m.group(2)!r}")
    return found


def redact_uri(uri: str, *, drop_userinfo: bool = False) -> str:
    """``uri`` without its credentials: the userinfo (``user:pass@``) becomes ``***@`` (or is removed with
    ``drop_userinfo``) and the value of each secret parameter (:data:`SECRET_PARAMS`) of the query or fragment
    becomes ``***``. The rest of the text is kept unchanged, e.g.
    ``dicomweb+http://u:p@pacs:8042/dicom-web?Modality=CT&access_token=abc`` ->
    ``dicomweb+http://***@pacs:8042/dicom-web?Modality=CT&access_token=***``."""
    uri = str(uri)
    span = _authority_span(uri)
    if span is None:
        return _PARAM_IN_URI.sub(_mask_param_in_uri, uri) if "=" in uri else uri
    start, end = span
    authority = uri[start:end]
    if "@" in authority:
        host = authority.rpartition("@")[2]
        authority = host if drop_userinfo else f"{MASK}@{host}"
    rest = _PARAM_IN_URI.sub(_mask_param_in_uri, uri[end:])
    return uri[:start] + authority + rest


def _mask_param_in_uri(m: re.Match) -> str:
    if is_secret_param(m.group(2)) and m.group(3):
        return f"{m.group(1)}{m.group(2)}={MASK}"
    return m.group(0)


def _mask_param_in_text(m: re.Match) -> str:
    if is_secret_param(m.group(1)) and m.group(2) != MASK:
        return f"{m.group(1)}={MASK}"
    return m.group(0)


def redact_text(text) -> str:
    """``text`` with every URI in it passed through :func:`redact_uri`, bare ``Bearer``/``Basic`` authorization
    values replaced by ``***`` and ``name=value`` pairs of secret names (``password=...``, ``token=...``) masked
    wherever they stand; an ``Authorization`` header's value is masked too. Anything that is not a ``str`` is
    converted with ``str()`` first."""
    text = str(text)
    text = _URI_IN_TEXT.sub(lambda m: redact_uri(m.group(0)), text)
    text = _PARAM_IN_TEXT.sub(_mask_param_in_text, text)
    text = _AUTH_HEADER.sub(lambda m: f"{m.group(1)}{m.group(2) or ''}{m.group(3) or ''}{MASK}", text)
    return _AUTH_SCHEME.sub(lambda m: f"{m.group(1)}{m.group(2)}{MASK}", text)


def format_exception(exc: BaseException) -> str:
    """The traceback of ``exc`` as Python prints it, redacted."""
    return redact_text("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))


class RedactingFilter(logging.Filter):
    """A logging filter that redacts each record in place: its message (arguments merged in first), the text of an
    attached exception and stack. Installed on a handler it covers every record the handler emits."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string: let the handler report it as it would
            return True
        red = redact_text(msg)
        if red != msg or record.args:
            record.msg, record.args = red, None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact_text(logging.Formatter().formatException(record.exc_info))
        elif record.exc_text:
            record.exc_text = redact_text(record.exc_text)
        if record.stack_info:
            record.stack_info = redact_text(record.stack_info)
        return True


def _excepthook(exc_type, exc, tb):
    sys.stderr.write(redact_text("".join(traceback.format_exception(exc_type, exc, tb))))


def _redacting_factory(base):
    def make(*args, **kwargs):
        record = base(*args, **kwargs)
        RedactingFilter().filter(record)
        return record

    make.redacts = True
    return make


def install(logger: logging.Logger | None = None, *, at_creation: bool = False) -> None:
    """Redact at the process's sinks: a :class:`RedactingFilter` on every handler of ``logger`` (default: the root
    logger; call after the handlers are set up, e.g. after ``logging.basicConfig``) and a ``sys.excepthook`` that
    prints uncaught tracebacks redacted. ``at_creation`` also redacts every log record when it is made (a record
    factory), whatever handlers are added later: for a process whose logging is set up by others (a Kubeflow
    component body). Safe to call more than once."""
    for h in (logger or logging.getLogger()).handlers:
        if not any(isinstance(f, RedactingFilter) for f in h.filters):
            h.addFilter(RedactingFilter())
    if sys.excepthook is sys.__excepthook__:
        sys.excepthook = _excepthook
    if at_creation and not getattr(logging.getLogRecordFactory(), "redacts", False):
        logging.setLogRecordFactory(_redacting_factory(logging.getLogRecordFactory()))


def inline_secret_message(where: str, uri, kind: str | None = None) -> str | None:
    """A refusal message for a location that carries credentials (None when it carries none): names ``where`` (an
    option or a settings key; "" for none) and the kind of secret found, never its value, and says where
    credentials go instead.
    ``kind``: ``dicomweb``, ``s3`` or ``mlflow`` (default: from the URI's scheme)."""
    parts = secret_parts(str(uri))
    if not parts:
        return None
    if kind is None:
        kind = "s3" if str(uri).startswith("s3://") else "dicomweb"
    return (f"{where + ': ' if where else ''}credentials in the URI are refused ({', '.join(parts)}; not stored "
            f"and not shown); {WHERE_CREDENTIALS_GO[kind]}")


def error_line(command: str, err: BaseException) -> str:
    """The one line ``siteadapt <command>`` prints for an error it ends on, credentials masked; the CLI and the
    Kubeflow components (:func:`siteadapt.kfp.runtime.cli_errors`) print the same."""
    return f"siteadapt {command}: error: {redact_text(err)}"
