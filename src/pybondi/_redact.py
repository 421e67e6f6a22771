"""Credentials kept out of reprs, logs and errors.

URLs carry secrets in three places: a password in the user info
(`postgresql://app:S3cret@db/bank`), a token standing alone there (`nats://s3cr3t@host`),
and query parameters (`redis://host?password=S3cret`, `...?sslpassword=...`). `redact`
masks all three wherever a URL appears in a text; `scrub` also masks the secrets of a
known URL where a library's error message repeats them without the URL around them.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

__all__ = ["redact", "scrub"]

MASK = "***"

# scheme://userinfo@ : the user info ends at the last @ before the host (a raw @ in a
# password, though invalid, is common).
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^\s/?#]*)@")
# A query parameter whose name says it holds a secret: password, sslpassword, token,
# auth_token, secret, api_key, private_key, credentials, signature...
_SECRET_NAME = re.compile(r"pass|pwd|token|secret|key|auth|cred|sig", re.IGNORECASE)
_PARAMETER = re.compile(r"(?P<lead>[?&;](?P<name>[^=&;#\s/]+)=)(?P<value>[^&;#\s,'\"]*)")


def redact(text: str) -> str:
    """`text` with the credentials of every URL in it masked.

    A password in the user info becomes `user:***`; in a NATS URL, user info without a
    colon is a token, masked whole; secret query values become `***`.
    """
    text = _USERINFO.sub(_masked_userinfo, text)
    return _PARAMETER.sub(_masked_parameter, text)


def scrub(text: str, url: str) -> str:
    """`text` (a driver's error message, say) with the secrets of `url` masked, URL or not."""
    text = redact(text)
    for secret in _secrets(url):
        text = text.replace(secret, MASK)
    return text


def _masked_userinfo(match: re.Match[str]) -> str:
    user, colon, _ = match["userinfo"].partition(":")
    if not colon and not _token(match["scheme"]):
        return match[0]  # a user name alone
    return f"{match['scheme']}{f'{user}:{MASK}' if colon else MASK}@"


def _token(scheme: str) -> bool:
    """Whether user info without a colon is a token under this scheme (NATS's), not a name."""
    return scheme.lower().startswith(("nats", "tls"))


def _masked_parameter(match: re.Match[str]) -> str:
    if not _SECRET_NAME.search(match["name"]) or not match["value"]:
        return match[0]
    return f"{match['lead']}{MASK}"


def _secrets(url: str) -> list[str]:
    """The secrets of a URL, as written and decoded, longest first."""
    found: list[str] = []
    for match in _USERINFO.finditer(url):
        user, colon, password = match["userinfo"].partition(":")
        if colon or _token(match["scheme"]):
            found.append(password if colon else user)
    found += [
        match["value"] for match in _PARAMETER.finditer(url) if _SECRET_NAME.search(match["name"])
    ]
    # A secret of a character or two would mask half of any message: not worth it.
    secrets = {form for secret in found for form in (secret, unquote(secret)) if len(form) > 2}
    return sorted(secrets, key=len, reverse=True)
