"""Exact and near-duplicate claims across every shard of a run: the protocol and its actor.

`DedupShard` holds part of the index (plain Python; the Ray runner wraps it with
`ray.remote(DedupShard)`, the process runner serves it from the driver); `DedupClient` routes
batches of claims to the shards and keeps check-and-insert atomic across them (reserve -> query ->
finalize; docs/DEDUP.md says why two near duplicates racing through different shards still keep
exactly one). The hashes are engine/hashes.py's, the Hamming index engine/hamming.py's, the
messages engine/claims.py's.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import xxhash

from .claims import (
    Answer,
    Claim,
    Decision,
    Ticket,
    Verdict,
)
from .hamming import DEFAULT_THRESHOLD, HammingIndex, Snapshot, build_tables, scan
from .outcomes import DUPLICATE_EXACT, DUPLICATE_NEAR, NEW


@dataclass
class _Reservation:
    """A pending claim at its home shard; `beaten` is set when a winning query found it."""

    claim: Claim
    since: float
    beaten: Verdict | None = None


class _Pending:
    """Claims reserved by a multi-shard client and not yet finalized (a few batches at most)."""

    def __init__(self):
        self.tokens: list[int] = []
        self.rows: list[_Reservation] = []
        self.where: dict[int, int] = {}
        self.hashes = np.zeros(64, np.uint64)  # phash of row i at i; capacity doubles

    @property
    def phash(self) -> np.ndarray:
        """The pending claims' perceptual hashes, in row order."""
        return self.hashes[: len(self.tokens)]

    def add(self, ticket: Ticket) -> None:
        """Reserve one claim (a second reserve of the same token replaces the first)."""
        self.remove(ticket.token)
        self.where[ticket.token] = len(self.tokens)
        self.tokens.append(ticket.token)
        self.rows.append(_Reservation(ticket.claim, time.monotonic()))
        if len(self.tokens) > len(self.hashes):
            self.hashes = np.concatenate([self.hashes, np.zeros_like(self.hashes)])
        self.hashes[len(self.tokens) - 1] = ticket.phash

    def remove(self, token: int) -> _Reservation | None:
        """Drop a reservation (swap with the last one); returns it."""
        i = self.where.pop(token, None)
        if i is None:
            return None
        row, last = self.rows[i], len(self.tokens) - 1
        if i != last:
            self.tokens[i], self.rows[i] = self.tokens[last], self.rows[last]
            self.hashes[i] = self.hashes[last]
            self.where[self.tokens[i]] = i
        self.tokens.pop()
        self.rows.pop()
        return row

    def expire(self, ttl: float) -> int:
        """Forget reservations older than ttl seconds (their client died between phases)."""
        now = time.monotonic()
        if not self.rows or now - min(row.since for row in self.rows) <= ttl:
            return 0
        old = [t for t, row in zip(self.tokens, self.rows, strict=True) if now - row.since > ttl]
        for t in old:
            self.remove(t)
        return len(old)


def _kind(a: Claim, b_content: int, b_pixels: int) -> str:
    """Exact when bytes or pixels are equal, near otherwise."""
    return DUPLICATE_EXACT if a.content == b_content or a.pixels == b_pixels else DUPLICATE_NEAR


def _better(a: Verdict | None, b: Verdict) -> Verdict:
    """Of two conflicts, the one to report: exact first, then closest, then the smaller owner key."""
    if a is None:
        return b
    rank = lambda v: (v.status != DUPLICATE_EXACT, v.distance, v.owner_key)  # noqa: E731
    return b if rank(b) < rank(a) else a


class DedupShard:
    """One part of the global index: the images whose key routes here, plus pending reservations.

    Plain Python so the in-process runners can use it directly and the Ray runner can wrap it with
    `ray.remote(DedupShard)`; every public method holds a lock, so each call is atomic either way.
    `claim` is the one-call check-and-insert for a single shard; `reserve`, `query` and `finalize`
    are the three phases `DedupClient` uses when there are several (docs/DEDUP.md). Duplicate
    clusters are counted by the shards of the run (their stats), not here.
    """

    def __init__(self, threshold: int = DEFAULT_THRESHOLD, exact_only: bool = False,
                 pending_ttl_s: float = 600.0):
        self.exact_only = exact_only
        self.k = 0 if exact_only else threshold
        self.index = HammingIndex(self.k)
        self.pending = _Pending()
        self.pending_ttl_s = pending_ttl_s
        self.lock = threading.Lock()
        self._building = False  # a rebuild of the band tables is under way (outside the lock)

    def __getstate__(self):
        state = dict(self.__dict__)
        del state["lock"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.lock = threading.Lock()

    # -- one-call path (a single shard holds everything) --------------------------------------

    def claim(self, items: list[Claim]) -> list[Verdict]:
        """Check-and-insert a batch; earlier claims of the batch count as stored for later ones."""
        q, stored = self._search(items)
        with self.lock:
            found = self._conflicts(items, [(c.key, -1) for c in items], q, stored)
            kept: list[int] = []
            kept_set: set[int] = set()
            out = []
            inside = self._within_batch(items)
            for i, (c, answer) in enumerate(zip(items, found, strict=True)):
                best, own = answer
                for j, d in inside.get(i, ()):
                    if j not in kept_set:
                        continue
                    if items[j].key == c.key:
                        own = own or d == 0  # the same claim twice in one batch: kept once
                    else:
                        best = _better(best, Verdict(_kind(c, items[j].content, items[j].pixels), items[j].key, d))
                if not own and best is None:
                    kept.append(i)
                    kept_set.add(i)
                out.append(Verdict(NEW) if own or best is None else best)
            self._insert([items[i] for i in kept])
            return out

    def load(self, items: Iterable[Claim]) -> int:
        """Bulk insert claims known to be kept (resume); no checks. Returns how many."""
        items = list(items)
        with self.lock:
            self._insert(items)
        return len(items)

    # -- three-phase path (DedupClient with several shards) -----------------------------------

    def reserve(self, tickets: list[Ticket]) -> list[None]:
        """Phase 1: hold the claims as pending, visible to queries."""
        with self.lock:
            self.pending.expire(self.pending_ttl_s)
            for ticket in tickets:
                self.pending.add(ticket)
            return [None] * len(tickets)

    def query(self, tickets: list[Ticket]) -> list[Answer | None]:
        """Phase 2: per ticket, its Answer here, or None when this shard knows nothing of it.

        A pending claim that loses to the asking ticket (it has the larger key) is marked beaten
        instead.
        """
        claims = [t.claim for t in tickets]
        q, stored = self._search(claims)
        with self.lock:
            found = self._conflicts(claims, [(t.key, t.token) for t in tickets], q, stored)
            return [None if a.best is None and not a.own else a for a in found]

    def finalize(self, decisions: list[Decision]) -> list[Verdict | None]:
        """Phase 3: per decision, store or drop the reservation.

        A claim the client wants to keep is stored unless a winning query beat it meanwhile; the
        verdict says which (None for claims the client already knows are duplicates).
        """
        with self.lock:
            out: list[Verdict | None] = []
            kept: list[Claim] = []
            for d in decisions:
                row = self.pending.remove(d.token)
                if not d.keep:
                    out.append(None)
                elif d.stored:
                    out.append(Verdict(NEW))  # this key is already kept here (a retried task)
                elif row is None:
                    # the reservation expired: uniqueness can no longer be proven, so drop the image
                    out.append(Verdict(DUPLICATE_NEAR, None, None))
                elif row.beaten is not None:
                    out.append(row.beaten)
                else:
                    kept.append(row.claim)
                    out.append(Verdict(NEW))
            self._insert(kept)
            return out

    # -- shared helpers ------------------------------------------------------------------------

    def _search(self, claims: Sequence[Claim]) -> tuple[np.ndarray, tuple[np.ndarray, int]]:
        """The lock-free part of a check: (query hashes, (hits among a snapshot, its size)).

        Searches of concurrent calls run in parallel (Numba releases the GIL); whichever call finds
        the tables lagging rebuilds them here too, from a snapshot, while the others go on.
        """
        q = np.array([c.phash for c in claims], np.uint64)
        with self.lock:
            snap = self.index.snapshot()
            build = not self._building and self.index.needs_rebuild(snap)
            self._building = self._building or build
        if build:
            try:
                tables = build_tables(snap.phash, snap.n)
                with self.lock:
                    self.index.install(tables)
                snap = Snapshot(snap.phash, snap.n, tables)
            finally:
                self._building = False
        return q, (self.index.search(q, snap) if len(q) else np.zeros((0, 3), np.int64), snap.n)

    def _excluded(self, c: Claim, content: int, pixels: int) -> bool:
        """In exact-only mode, a phash match with neither bytes nor pixels equal does not count."""
        return self.exact_only and c.content != content and c.pixels != pixels

    def _conflicts(self, claims: Sequence[Claim], priority: Sequence[tuple], q: np.ndarray,
                   stored: tuple[np.ndarray, int]) -> list[Answer]:
        """Per claim: its best conflict (or None) and whether its own key is stored.

        Called under the lock with the lock-free hits of `_search`; adds the entries stored since.
        Stored entries always win. Between pending claims the smaller (key, token) wins: a claim
        that loses gets the conflict, one that wins marks the pending claim beaten.
        """
        best: list[Verdict | None] = [None] * len(claims)
        own = [False] * len(claims)
        idx = self.index
        hits, seen = stored
        for qi, i, d in hits.tolist() + idx.search_since(q, seen).tolist():
            c, content, pixels = claims[qi], int(idx.content[i]), int(idx.pixels[i])
            if self._excluded(c, content, pixels):
                continue
            owner = idx.key(i)
            if owner == c.key:
                own[qi] = own[qi] or d == 0
            else:
                best[qi] = _better(best[qi], Verdict(_kind(c, content, pixels), owner, d))
        pend = self.pending
        if pend.tokens:
            for qi, i, d in scan(q, self.k, pend.phash).tolist():
                c, row, token = claims[qi], pend.rows[i], pend.tokens[i]
                other = row.claim
                if other.key == c.key or self._excluded(c, other.content, other.pixels):
                    continue
                conflict = Verdict(_kind(c, other.content, other.pixels), other.key, d)
                if (other.key, token) < priority[qi]:
                    best[qi] = _better(best[qi], conflict)  # the earlier key wins: c loses
                else:  # c wins: that claim learns it at finalize
                    row.beaten = _better(row.beaten, conflict._replace(owner_key=c.key))
        return [Answer(b, o) for b, o in zip(best, own, strict=True)]

    def _within_batch(self, items: Sequence[Claim]) -> dict[int, list[tuple[int, int]]]:
        """For each claim, the earlier claims of the same batch within distance k: {i: [(j, d)]}."""
        if len(items) < 2:
            return {}
        q = np.array([c.phash for c in items], np.uint64)
        pairs: dict[int, list[tuple[int, int]]] = {}
        for i, j, d in scan(q, self.k, q).tolist():
            if j < i and not self._excluded(items[i], items[j].content, items[j].pixels):
                pairs.setdefault(i, []).append((j, d))
        return pairs

    def _insert(self, items: Sequence[Claim]) -> None:
        """Append kept claims to the index."""
        if items:
            self.index.add(np.array([c.phash for c in items], np.uint64),
                           np.array([c.content for c in items], np.uint64),
                           np.array([c.pixels for c in items], np.uint64), [c.key for c in items])

    def stats(self) -> dict:
        """Entries stored and pending, and the bytes they take."""
        with self.lock:
            n, nbytes = len(self.index), self.index.nbytes()
            return {"entries": n, "pending": len(self.pending.tokens), "bytes": nbytes,
                    "bytes_per_hash": round(nbytes / n, 1) if n else None}


# ------------------------------------------------------------------------------ the client

_POOL_LOCK = threading.Lock()
Call = Callable[..., list]
"""call(shard, method, *args) -> what `method(shard, *args)` returns, where `method` is a DedupShard
method (DedupShard.claim): typed, so go-to-definition works. How it reaches the shard is the
runner's business: `direct_call` in-process, an actor call under Ray, the pipe under processes."""


def direct_call(shard: DedupShard, method: Callable, *args):
    """Call a shard held in this process."""
    return method(shard, *args)


def home_shard(key: str, n_shards: int) -> int:
    """The shard that stores claims of `key` (stable across processes and runs)."""
    return xxhash.xxh3_64_intdigest(key.encode()) % n_shards


class DedupClient:
    """Routes batches of claims to the index shards: one call per shard per phase, not per image.

    With one shard, a batch is one `claim` call. With several, each claim is reserved at its home
    shard, queried at every shard, then finalized at home (docs/DEDUP.md). Picklable, so the Ray
    runner can send it into every task; calls to several shards go out in parallel on threads.
    """

    def __init__(self, shards: Sequence, call: Call = direct_call, parallel: bool = True):
        self.shards, self.call, self.parallel = list(shards), call, parallel
        self._pool: ThreadPoolExecutor | None = None

    def __getstate__(self):
        return {"shards": self.shards, "call": self.call, "parallel": self.parallel, "_pool": None}

    def _fan_out(self, method: Callable, args: dict[int, tuple]) -> dict[int, list]:
        """`method` on each shard s with args[s], in parallel where there are several; results by shard."""
        run = lambda s: self.call(self.shards[s], method, *args[s])  # noqa: E731
        if not self.parallel or len(args) <= 1:
            return {s: run(s) for s in args}
        with _POOL_LOCK:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(min(32, len(self.shards)), thread_name_prefix="dedup")
        return dict(zip(args, self._pool.map(run, args), strict=True))

    def claim(self, items: list[Claim]) -> list[Verdict]:
        """Verdicts for a batch of claims; check-and-insert is atomic across every caller."""
        if not items:
            return []
        if len(self.shards) == 1:
            return self.call(self.shards[0], DedupShard.claim, list(items))
        n = len(self.shards)
        tickets = [Ticket(secrets.randbits(62), *c) for c in items]
        by_home: dict[int, list[int]] = {}
        for i, c in enumerate(items):
            by_home.setdefault(home_shard(c.key, n), []).append(i)
        self._fan_out(DedupShard.reserve, {h: ([tickets[i] for i in idx],) for h, idx in by_home.items()})
        answers = self._fan_out(DedupShard.query, {s: (tickets,) for s in range(n)})
        best: list[Verdict | None] = [None] * len(items)
        own = [False] * len(items)
        for s in range(n):
            for i, a in enumerate(answers[s]):
                if a is not None:
                    own[i] = own[i] or a.own
                    if a.best is not None:
                        best[i] = _better(best[i], a.best)
        results = self._fan_out(DedupShard.finalize, {
            h: ([Decision(tickets[i].token, best[i] is None or own[i], own[i]) for i in idx],)
            for h, idx in by_home.items()})
        verdicts: list[Verdict] = [Verdict(NEW)] * len(items)
        for h, idx in by_home.items():
            for i, v in zip(idx, results[h], strict=True):
                verdicts[i] = v if v is not None else best[i]
        return verdicts

    def load(self, items: Iterable[Claim], batch: int = 100_000) -> int:
        """Bulk insert kept claims at their home shards (resume). Returns how many."""
        total, chunk = 0, []
        for c in items:
            chunk.append(c)
            if len(chunk) >= batch:
                total += self._load(chunk)
                chunk = []
        return total + self._load(chunk)

    def _load(self, chunk: list[Claim]) -> int:
        """One bulk insert per shard."""
        parts: dict[int, tuple[list[Claim]]] = {}
        for c in chunk:
            parts.setdefault(home_shard(c.key, len(self.shards)), ([],))[0].append(c)
        return sum(self._fan_out(DedupShard.load, parts).values())
