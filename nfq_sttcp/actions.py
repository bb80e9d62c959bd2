"""What the pure cores ask the driver to do.

The cores (primary, backup, watchdog) never touch a packet, a socket or a
logger: they return a list of these and the driver carries them out. Every
packet event yields exactly one verdict (Accept or Drop) among its actions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Union

from .syncproto import SyncMessage


@dataclass(frozen=True, slots=True)
class Accept:
    """Verdict: let the packet go, rewritten to ``payload`` if given (a
    bytearray may be handed over as it is: the driver's checksum pass copies
    it once, into the bytes the kernel gets)."""

    payload: Optional[bytes | bytearray] = None


@dataclass(frozen=True, slots=True)
class Drop:
    """Verdict: drop the packet (it may have been copied into a hold buffer)."""

    reason: str = ""


@dataclass(frozen=True, slots=True)
class Defer:
    """Verdict later: the driver keeps the packet under ``token`` until a
    Release for it (the packet stays in the kernel queue meanwhile)."""

    token: int


@dataclass(frozen=True, slots=True)
class Release:
    """Give the deferred packet ``token`` its verdict: accept, rewritten to
    ``payload`` if given."""

    token: int
    payload: Optional[bytes | bytearray] = None


@dataclass(frozen=True, slots=True)
class Inject:
    """Send a complete IPv4 packet through a marked raw socket.

    The mark keeps it out of our own queues (DESIGN.md trap 18).
    """

    packet: bytes
    why: str = ""


@dataclass(frozen=True, slots=True)
class SendSync:
    message: SyncMessage


@dataclass(frozen=True, slots=True)
class Log:
    event: str
    level: str = "info"
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Count:
    """Increment a named counter (shown by status)."""

    name: str
    n: int = 1


@dataclass(frozen=True, slots=True)
class TakeOver:
    """Watchdog decision: the primary is dead, take the service address."""

    reason: str


Action = Union[Accept, Drop, Defer, Release, Inject, SendSync, Log, Count, TakeOver]
