"""Where a device can fetch the sealed chunks it lacks: a transport-neutral interface.

A download (agent/binary_sync.py) asks its remote chunk sources in order of preference — LAN
peers first (agent/peer_chunks.py), then the relay's blob channel (agent/blob_transfer.py) —
and verifies whatever comes back the same way whatever the transport: AEAD plus the recomputed
keyed id (``ChunkKeys.decrypt``). A source that does not have a chunk says so (None); a source
that cannot answer now raises :class:`BlobUnavailable`; a chunk that fails verification is
refused and the next source is asked.
"""

from __future__ import annotations

from typing import Literal, Protocol

from qmoi_sync.agent.blob_transfer import BlobLink

Path = Literal["lan", "relay"]

#: How long a download waits for a relay that is known to be down.
RELAY_DOWN_WAIT_S = 2.0


class RemoteChunks(Protocol):
    """One transport that can fetch sealed chunks of a space."""

    path: Path

    def ready(self) -> bool:
        """Worth asking now (connected, or able to connect on demand)."""
        ...

    async def get(self, epoch: int, chunk_id: bytes) -> bytes | None:
        """The sealed chunk (ciphertext), or None if this source does not have it.

        Raises BlobUnavailable (or another BlobError) when the source cannot answer now."""
        ...

    def refused(self, chunk_id: bytes) -> None:
        """What it sent for ``chunk_id`` failed verification (tampered or corrupt)."""
        ...


class RelayChunks:
    """The relay's blob channel as a chunk source (the relay stores sealed chunks as they are,
    whatever their epoch)."""

    path: Path = "relay"

    def __init__(self, link: BlobLink) -> None:
        self.link = link

    def ready(self) -> bool:
        # The blob link connects on demand; while paused it refuses at once.
        return not self.link.paused

    async def get(self, epoch: int, chunk_id: bytes) -> bytes | None:
        link = self.link
        # A relay whose last connection attempt failed is given a short wait (which still keeps
        # the link retrying): the download moves on and is retried, instead of stalling a
        # minute on a relay that is down while LAN peers may have the chunk.
        down = not link.state.connected and link.state.last_error is not None
        return await link.get(chunk_id, timeout=RELAY_DOWN_WAIT_S if down else 60.0)

    def refused(self, chunk_id: bytes) -> None:
        # Nothing to remember: the relay stores what a member uploaded; the download is retried
        # later (another member may upload a good copy under the same id).
        return None
