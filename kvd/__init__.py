"""kvd: a distributed key-value store on Twisted."""

from kvd.clients import (
    BadRequest,
    Client,
    ConnectionFailed,
    Entry,
    KvdError,
    NotFound,
    PreconditionFailed,
    ServerError,
    TooLarge,
    TwistedClient,
    Unauthorized,
    Unavailable,
    Written,
)

__version__ = "0.1.0"

__all__ = [
    "BadRequest",
    "Client",
    "ConnectionFailed",
    "Entry",
    "KvdError",
    "NotFound",
    "PreconditionFailed",
    "ServerError",
    "TooLarge",
    "TwistedClient",
    "Unauthorized",
    "Unavailable",
    "Written",
]
