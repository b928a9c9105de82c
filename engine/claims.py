"""The words of the dedup protocol (engine/dedup.py): a Claim and its Verdict, the messages of the
three phases, and the claims a resumed run reloads from the parquet of its finished shards.

They travel between processes (Ray, the process runner's pipes), so they are plain NamedTuples.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import NamedTuple

from .hashes import to_uint64


class Claim(NamedTuple):
    """One image asking to be kept: its sample key and its three hashes (unsigned ints)."""

    key: str
    content: int
    pixels: int
    phash: int


class Verdict(NamedTuple):
    """The index's answer: NEW (keep it), or DUPLICATE_EXACT / DUPLICATE_NEAR of `owner_key`."""

    status: str
    owner_key: str | None = None
    distance: int | None = None


class Ticket(NamedTuple):
    """A claim on its way through the three phases, with the client's random token for it."""

    token: int
    key: str
    content: int
    pixels: int
    phash: int

    @property
    def claim(self) -> Claim:
        """The claim itself."""
        return Claim(self.key, self.content, self.pixels, self.phash)


class Answer(NamedTuple):
    """What one shard knows about a ticket (phase 2): its best conflict there, and whether that
    shard already stores the ticket's own key with the same hash (a retried task)."""

    best: Verdict | None
    own: bool


class Decision(NamedTuple):
    """The client's word on a reservation (phase 3): keep it, and whether it is already stored."""

    token: int
    keep: bool
    stored: bool


HASH_COLUMNS = ("key", "content_hash", "pixel_hash", "phash")
"""The per-row parquet columns of a written sample that a resumed run reloads into the index."""


def iter_rebuild_items(paths: Iterable[str | os.PathLike], batch_size: int = 65_536) -> Iterator[Claim]:
    """Claims of every written sample (outcome "ok") in per-shard parquet files, streamed."""
    import pyarrow.parquet as pq

    for path in paths:
        f = pq.ParquetFile(path)
        for b in f.iter_batches(batch_size=batch_size, columns=[*HASH_COLUMNS, "outcome"]):
            cols = b.to_pydict()
            for key, content, pixels, ph, outcome in zip(*(cols[c] for c in HASH_COLUMNS), cols["outcome"],
                                                         strict=True):
                if outcome == "ok" and ph is not None:
                    yield Claim(key, to_uint64(content), to_uint64(pixels), to_uint64(ph))
