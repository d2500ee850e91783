"""
Log observers for twistd's C{--logger} option.

kvd logs through twisted.logger with structured fields (node ids, URLs, statuses as event
keys, never pre-formatted into the text), so a JSON observer keeps them machine-readable::

    twistd -n --logger=kvd.logs.json kvd --role node ...

writes one JSON object a line to standard output (journald keeps each line as one entry).
"""

from __future__ import annotations

import sys

from twisted.logger import ILogObserver, jsonFileLogObserver


def json() -> ILogObserver:
    """One JSON event a line on standard output."""
    return jsonFileLogObserver(sys.stdout)
