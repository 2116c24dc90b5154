"""Credentials kept out of what a dump stores.

A URI may carry them (``s3://KEY:SECRET@bucket/data``, ``?secret_key=...``), and pyarrow takes
them from there. The manifest keeps the config and the source's identity in clear text, beside
the data, where anyone who reads the dump would read them too: :func:`redact` leaves them out
(the user name and password of every URI, and query parameters named like a key, secret, token,
password or credential). The stored URI still opens the same place; the credentials come from
the environment then, as they do for any URI without them.

>>> redact({"path": "s3://AKIA:sEcReT@bucket/train?endpoint_override=host:9000&secret_key=x", "n": 3})
{'path': 's3://bucket/train?endpoint_override=host:9000', 'n': 3}
>>> redact(["/data/{00..09}.tar", "gs://bucket/a#b"])
['/data/{00..09}.tar', 'gs://bucket/a#b']
>>> with_credentials("s3://bucket/train/x-01.tar?scheme=http", "s3://AKIA:sEcReT@bucket/train/x-*.tar?secret_key=x")
's3://AKIA:sEcReT@bucket/train/x-01.tar?scheme=http&secret_key=x'
>>> cannot_use("s3://AKIA:se#cret@bucket/train", ValueError("Cannot parse URI: 's3://AKIA:se#cret@bucket/train'"))
"cannot use 's3://***@bucket/train': Cannot parse URI: 's3://***@bucket/train' (a user name, password or key in a URI must be percent-encoded: '#' as %23, '/' as %2F, '?' as %3F, '@' as %40)"
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Mapping
from typing import Any

_SECRET = re.compile(r"key|secret|token|password|credential", re.IGNORECASE)


def redact(value: Any) -> Any:
    """``value`` (strings, and those in mappings, lists and tuples) with the credentials of every
    URI in it left out; what holds none is returned as it was."""
    if isinstance(value, str):
        return _redact_uri(value) if "://" in value else value
    if isinstance(value, Mapping):
        return {key: redact(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(item) for item in value)
    return value


def _redact_uri(uri: str) -> str:
    try:
        parts = urllib.parse.urlsplit(uri)
    except ValueError:  # not a URI after all
        return uri
    params = parts.query.split("&") if parts.query else []
    kept = [p for p in params if not _SECRET.search(p.partition("=")[0])]
    if "@" not in parts.netloc and len(kept) == len(params):
        return uri  # nothing to leave out: the text as it was, not as urllib would write it
    # a fragment after a secret parameter is the rest of its value (an unencoded '#'): left out too
    fragment = parts.fragment if len(kept) == len(params) else ""
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "&".join(kept),
                                    fragment))


def shown(uri: str) -> str:
    """``uri`` as an error message may quote it: :func:`redact`, and also the credentials a URI
    that does not parse as meant may carry (a password with an unencoded ``#`` or ``/`` ends the
    authority early): all between ``://`` and the last ``@`` is left out where it starts like
    ``user:password``."""
    uri = _redact_uri(uri)
    scheme, sep, rest = uri.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if sep and at and ":" in userinfo.partition("/")[0]:
        return f"{scheme}://***@{host}"
    return uri


def cannot_use(location: str, exc: BaseException) -> str:
    """Why ``location`` cannot be opened, from pyarrow's ``exc``, with its credentials left out
    (:func:`shown`); a URI that does not parse gets the rule that would mend it."""
    text = str(exc).replace(location, shown(location))
    if "parse URI" in text and "@" in location:
        text += (" (a user name, password or key in a URI must be percent-encoded: '#' as %23, '/' as %2F, "
                 "'?' as %3F, '@' as %40)")
    return f"cannot use {shown(location)!r}: {text}"


def with_credentials(uri: str, like: str) -> str:
    """``uri`` with the credentials that ``like`` carries (its user name and password, its
    secret query parameters): what :func:`redact` took from a URI made from ``like``."""
    if "://" not in like or "://" not in uri:
        return uri
    source, target = urllib.parse.urlsplit(like), urllib.parse.urlsplit(uri)
    user = source.netloc.rpartition("@")[0]
    secrets = [p for p in source.query.split("&") if p and _SECRET.search(p.partition("=")[0])]
    if not user and not secrets:
        return uri
    return urllib.parse.urlunsplit((target.scheme, f"{user}@{target.netloc}" if user else target.netloc, target.path,
                                    "&".join([p for p in target.query.split("&") if p] + secrets), target.fragment))
