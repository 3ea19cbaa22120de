"""Credentials never leave the process: what the platform saves (checkpoints, MLflow parameters, tags and the
config.yaml artifact) and prints goes through `redact`, which replaces the user-info part of URLs
(`http://user:password@host` -> `http://***@host`) and the values of secret-looking query parameters
(`?token=...`, `&password=...`) with `***`. MLflow reads credentials from its own environment variables
(MLFLOW_TRACKING_USERNAME / _PASSWORD / _TOKEN), so nothing is lost by not storing them.

`secret_env_name` says whether an environment variable's name looks like a secret; configs may not pull such
variables in through `${oc.env:NAME}` (class_paths refuses them before parsing), since the value would land
in the run's parameters, its name and config.yaml.
"""

from __future__ import annotations

import re
from typing import Any

REDACTED = "***"

# scheme://userinfo@ — the greedy part stops at the authority's end, so a password holding '@' is covered.
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/?#\s@]*(?:@[^/?#\s@]*)*)@")
_QUERY_PARAM = re.compile(r"(?P<sep>[?&;])(?P<key>[\w.\-~%]+)=(?P<value>[^&;#\s]*)")
_SECRET_WORDS = re.compile(
    r"TOKEN|SECRET|PASSWORD|PASSWD|PASSPHRASE|PWD|KEY|CREDENTIAL|AUTH|SIGNATURE|COOKIE|PRIVATE", re.IGNORECASE
)
_SECRET_EXACT = {"sig", "pass", "pw", "code"}


def _secret_query_key(key: str) -> bool:
    return key.lower() in _SECRET_EXACT or bool(_SECRET_WORDS.search(key))


def redact(text: str) -> str:
    """`text` with URL credentials and secret query values replaced by `***` (other text unchanged)."""
    if not isinstance(text, str) or ("@" not in text and "=" not in text):
        return text
    text = _USERINFO.sub(lambda m: m["scheme"] + REDACTED + "@", text)

    def query(m: re.Match) -> str:
        if not _secret_query_key(m["key"]) or m["value"] in ("", REDACTED):
            return m[0]
        return f"{m['sep']}{m['key']}={REDACTED}"

    return _QUERY_PARAM.sub(query, text)


def redact_tree(value: Any) -> Any:
    """`redact` applied to every string in nested dicts, lists and tuples (other values unchanged)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        items = {k: redact_tree(v) for k, v in value.items()}
        try:
            return type(value)(items)  # a dict subclass (Lightning's AttributeDict) stays one
        except TypeError:
            return items
    if isinstance(value, list):
        return [redact_tree(v) for v in value]
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(redact_tree(v) for v in value)
    return value


def has_credentials(text: str) -> bool:
    return isinstance(text, str) and redact(text) != text


_ENV_SECRET = re.compile(
    r"TOKEN|SECRET|PASSWORD|PASSWD|PASSPHRASE|KEY|CREDENTIAL|AUTH|COOKIE|PRIVATE|SIGNATURE|(^|_)PASS($|_)|"
    r"(^|_)PW($|_)|SESSION",
    re.IGNORECASE,
)


def secret_env_name(name: str) -> bool:
    """Whether an environment variable's name looks like it holds a secret (MLFLOW_TRACKING_PASSWORD,
    HF_TOKEN, AWS_SECRET_ACCESS_KEY, ...)."""
    return bool(_ENV_SECRET.search(name))
