"""A backup after takeover, serving as the primary for a new backup (pure).

The connections it migrated keep their mapping in the BackupCore for the
rest of their lives; no other host has their state, so they stay
unprotected. Connections born after the takeover are the PrimaryCore's: it
protects them with whichever backup joins next, exactly as a primary does.
Each segment goes to the core that owns its connection.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from . import tcpseg
from .actions import Accept, Action, Count
from .backup import BackupCore
from .primary import PrimaryCore
from .tcpseg import MalformedPacket

REASON_MIGRATED = "migrated at a failover; no backup holds its state"


@dataclass
class PromotedCore:
    backup: BackupCore
    primary: PrimaryCore

    def on_outbound(self, data: bytes, now: float) -> list[Action]:
        try:
            key = tcpseg.parse(data).server_key()
        except MalformedPacket:
            return self.backup.on_outbound(data, now)  # it gives the safe verdict
        if key in self.backup.conns:
            return self.backup.on_outbound(data, now)
        return self.primary.on_outbound(data, now)

    def on_inbound(self, data: bytes, now: float, csum_checked: Optional[bool] = None) -> list[Action]:
        try:
            seg = tcpseg.parse(data)
        except MalformedPacket:
            return self.backup.on_inbound(data, now)
        if seg.client_key() in self.backup.conns:
            return self.backup.on_inbound(data, now, csum_checked)
        self.primary.on_inbound_seen(seg)
        return [Accept(), Count("promoted_in")]

    def status(self, limit: Optional[int] = None) -> list[dict[str, object]]:
        """Per connection, at most ``limit`` of them: the migrated ones (no
        other host has their state) first."""
        migrated = []
        for st in self.backup.status(limit):
            if st["protected"]:
                st = dict(st, protected=False, reason=REASON_MIGRATED)
            migrated.append(st)
        return migrated + self.primary.status(None if limit is None else limit - len(migrated))

    def summary(self) -> dict[str, int]:
        mine, theirs = self.primary.summary(), self.backup.summary()
        migrated_closed = sum(1 for c in self.backup.conns.values() if c.ended())
        return {"connections": mine["connections"] + theirs["connections"], "protected": mine["protected"],
                "unprotected": mine["unprotected"] + theirs["connections"] - migrated_closed,
                "closed": mine["closed"] + migrated_closed,
                "held_bytes": mine["held_bytes"] + theirs["held_bytes"]}
