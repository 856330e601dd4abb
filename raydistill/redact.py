"""Credentials in URIs, masked wherever raydistill shows or records a location.

A data location or cache may be a pyarrow filesystem URI, and pyarrow reads credentials from it: a key and secret
as user info (``s3://KEY:SECRET@bucket/prefix``) or as options after ``?`` (``secret_key=``, ``session_token=``,
an Azure ``account_key=`` or ``sas_token=``). Everything a person or another tool reads (the console, one-line
errors, report.json and report.md, sweep_report.json, MLflow params) gets ``redact``'s text, in which the secret
parts are ``***``; the files a rerun reads as its input (config.yaml, best_config.yaml) keep the URI as given, as
Ray's job submission and MLflow keep what they were given. Written here because pyarrow has no masking helper,
and Ray's (``ray.dashboard.modules.job.utils.redact_url_password``, a dashboard internal) handles only the
password of an http(s) URL, not pyarrow's ``?secret_key=`` options or other schemes.
"""

from __future__ import annotations

import re
from typing import Any

MASK = "***"

# scheme://user:password@  ->  scheme://user:***@  (the user part of an S3 URI is the access key id: kept, as AWS
# treats it as an identifier, so that a reader can still tell which key was used)
_USERINFO = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^\s/@:?#'\"]*):(?P<secret>[^\s/@?#'\"]+)@")
# ?name=value or &name=value where the name says it holds a credential (pyarrow's S3, GCS and Azure options and the
# signature/token parameters of pre-signed URLs)
_OPTION = re.compile(r"(?P<head>[?&](?P<name>[A-Za-z0-9_.-]+)=)(?P<value>[^&\s'\"#]*)")
_SECRET_NAME = re.compile(r"secret|token|passw|credential|signature|^sig$|key|sas", re.IGNORECASE)


def redact(text: str) -> str:
    """``text`` with the credentials of every URI in it replaced by ``***``."""
    if "://" not in text and "?" not in text:  # no URI: nothing to mask (the common case, kept cheap)
        return text
    text = _USERINFO.sub(lambda m: f"{m['head']}:{MASK}@", text)
    return _OPTION.sub(lambda m: m["head"] + (MASK if _SECRET_NAME.search(m["name"]) and m["value"] else m["value"]),
                       text)


def redact_obj(obj: Any) -> Any:
    """A copy of a JSON-like object (dicts, lists, strings, numbers) with every string ``redact``-ed."""
    if isinstance(obj, str):
        return redact(obj)
    if isinstance(obj, dict):
        return {k: redact_obj(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact_obj(v) for v in obj)
    return obj
