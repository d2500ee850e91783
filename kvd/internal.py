"""
Values that travel on the internal API between gateways and nodes, shared by both sides.
"""

from __future__ import annotations

from typing import Any

from attrs import frozen


@frozen
class RepairReport:
    """What a repair sweep moved for one node; the node shows it in C{GET /node} as C{rebalance}."""

    keys_to_send: int = 0
    sent: int = 0
    dropped: int = 0
    last_error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "keys_to_send": self.keys_to_send,
            "sent": self.sent,
            "dropped": self.dropped,
            "last_error": self.last_error,
        }

    @classmethod
    def from_json(cls, body: object) -> RepairReport:
        """@raise ValueError: unless C{body} is a report."""
        counts = ("keys_to_send", "sent", "dropped")
        if not isinstance(body, dict) or not all(type(body.get(name)) is int for name in counts):
            raise ValueError("a progress report has keys_to_send, sent, dropped and last_error")
        error = body.get("last_error")
        return cls(body["keys_to_send"], body["sent"], body["dropped"], error if isinstance(error, str) else None)
