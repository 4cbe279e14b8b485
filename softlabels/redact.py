"""Secrets in URLs are never stored or shown: one function redacts them from any text.

A URL's user information (`https://user:password@host/...`, `s3://KEY:SECRET@bucket/...`) and
the values of query parameters that carry credentials (presigned S3 and GCS URLs'
`X-Amz-Signature`, `X-Amz-Credential`, `X-Amz-Security-Token`, `X-Goog-Signature`, ...; Azure
SAS `sig`; `token`, `access_token`, `key`, `password`, `secret`, ...) become `REDACTED`.
Everything softlabels writes (set metadata and provenance, checkpoint metadata) and prints (CLI
output, one-line errors, log records) passes through `redact` / `redact_obj`.
"""

from __future__ import annotations

import logging
import re
from typing import Any

__all__ = ["REDACTED", "RedactingFilter", "redact", "redact_obj"]

REDACTED = "REDACTED"
# query parameter names whose values are credentials (compared case-insensitively)
_SECRET_PARAMS = ("x-amz-signature|x-amz-credential|x-amz-security-token|x-goog-signature|"
                  "x-goog-credential|signature|sig|token|access_token|id_token|auth|"
                  "authorization|key|api_key|apikey|password|passwd|pwd|secret|client_secret|"
                  "credential|credentials|sas|session_token")
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)(?P<user>[^/?#@\s'\"]+)@")
_QUERY = re.compile(rf"(?P<lead>[?&;](?:{_SECRET_PARAMS})=)(?P<value>[^&#\s'\"]*)",
                    re.IGNORECASE)


def redact(text: str) -> str:
    """`text` with every URL's user info and credential query values replaced by REDACTED."""
    if "://" not in text and "=" not in text:
        return text
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{REDACTED}@", text)
    return _QUERY.sub(lambda m: f"{m['lead']}{REDACTED}", text)


def redact_obj(obj: Any) -> Any:
    """A copy of a JSON-like object (dicts, lists, strings) with every string redacted."""
    if isinstance(obj, str):
        return redact(obj)
    if isinstance(obj, dict):
        return {k: redact_obj(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact_obj(v) for v in obj)
    return obj


class RedactingFilter(logging.Filter):
    """A logging filter (on the CLI's handler) that redacts each record's formatted message."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: leave it to logging's own error path
            return True
        record.msg, record.args = redact(message), None
        return True
