"""
The rules for values that arrive as text, stated once: base URLs (a node's advertised URL, a
registry's, a static node's) and numbers. The command line and the HTTP API both use them, so
what one accepts the other does too. Each raises L{Invalid} with a sentence naming the value.
"""

from __future__ import annotations

import re
from typing import TypeVar
from urllib.parse import urlsplit

__all__ = ["MAX_URL_LENGTH", "Invalid", "base_url", "number", "shown"]

MAX_URL_LENGTH = 2048
_URL_FORBIDDEN = re.compile(r"[\x00-\x20\x7f]")

N = TypeVar("N", int, float)


class Invalid(ValueError):
    """A value breaks its rule; the message is a sentence fit to show whoever sent it."""


def shown(value: object) -> str:
    """C{value} as it appears in a message: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def base_url(url: str, what: str) -> str:
    """
    Return C{url} if it is an http:// or https:// URL with a host, a valid port if any, no
    query or fragment, only printable ASCII and at most L{MAX_URL_LENGTH} characters; else
    raise L{Invalid}, naming the value as C{what}.
    """
    if len(url) > MAX_URL_LENGTH:
        raise Invalid(f"{what} is longer than {MAX_URL_LENGTH} characters.")
    if _URL_FORBIDDEN.search(url) is not None or not url.isascii():
        raise Invalid(f"{what} {shown(url)} contains spaces, control characters or non-ASCII characters.")
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. an unclosed IPv6 bracket
        raise Invalid(f"{what} {shown(url)} is not a URL.") from None
    if parts.scheme not in ("http", "https"):
        raise Invalid(f"{what} {shown(url)} must start with http:// or https://.")
    if not parts.hostname:
        raise Invalid(f"{what} {shown(url)} has no host.")
    try:
        port = parts.port
    except ValueError:  # not a number, or out of range
        port = 0
    if port == 0:
        raise Invalid(f"{what} {shown(url)} has an invalid port.")
    if parts.query or parts.fragment:
        raise Invalid(f"{what} {shown(url)} must be a base URL, without a query or fragment.")
    return url


def number(text: str, kind: type[N], minimum: float, what: str) -> N:
    """C{text} as a finite C{kind} (int or float) of at least C{minimum}, else L{Invalid} naming C{what}."""
    try:
        value = kind(text)
    except ValueError:
        raise Invalid(f"{what} must be a number, not {shown(text)}") from None
    if not minimum <= value < float("inf"):
        raise Invalid(f"{what} must be at least {minimum:g}, not {text}")
    return value
