"""The single-writer lease of an object store: one run at a time writes to an s3:// or gs:// --output.

Object stores have no flock (a local folder has one on .lock, engine/storage.py), and pyarrow cannot
send a conditional put (If-None-Match), so the run holds a lease object (LEASE) that it renews every
RENEW_S seconds: see Leased.lock. The run's id travels with every shard to its worker (the runners
pass it to process_shard), and each shard compares the lease with that id before it uploads anything
and again before its marker (ObjectStore.upload_shard), so a run that lost it never marks a shard done.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid

LEASE = ".lock.json"  # an object store's single-writer lease (a local folder has a flock on .lock)
LEASE_TTL_S = 60.0  # a lease not renewed for this long, by a driver on another host, is stale
RENEW_S = 10.0  # how often the holder renews it
SETTLE_S = 1.0  # wait after writing a lease before reading it back: the last of two racing writers wins


class Leased:
    """The lease of a store (mixed into ObjectStore): needs its read, write_json, delete, check, failure,
    url and lost (set here too: once the lease is lost every later request of the store fails at once)."""

    held: str | None = None  # the run id of the lease this process's lock() holds (the driver's), else None

    def lease_run(self) -> str | None:
        """The run id the lease object names, None when there is none (or it is no lease)."""
        return self._lease().get("run")

    def _lease(self) -> dict:
        """The lease object as written, {} when there is none or it is torn or foreign."""
        try:
            lease = json.loads(self.read(LEASE) or b"{}")
        except ValueError:
            return {}
        return lease if isinstance(lease, dict) else {}

    def lease_taken(self) -> str | None:
        """Why this process's run no longer holds its lease (also kept in `lost`, so nothing more is
        written), None while it does or it holds none. Asks the store (an OSError when it does not answer)."""
        if not self.held:
            return None
        now = self._lease()
        if now.get("run") == self.held:
            return None
        what = f"another run ({now.get('host')} pid {now.get('pid')}) took over the lease {LEASE} of {self.url}" \
            if now.get("run") else f"the lease {LEASE} of {self.url} was deleted"
        self.lost = (f"{what} while this run was writing: this run stopped and marks nothing more done (its "
                     "complete shards are kept; the shards it was writing are left to the run holding the lease)")
        return self.lost

    @contextlib.contextmanager
    def lock(self):
        """Hold the lease object LEASE for this run, renewed every RENEW_S seconds.

        Object stores have no flock, and pyarrow cannot send a conditional put (If-None-Match), so:
        a lease held by a live run (same host: its process is alive; another host: renewed within
        LEASE_TTL_S) refuses this run; else this run writes its own, waits SETTLE_S and reads it
        back (of two racing runs the last writer wins, the other stops). Every shard compares the
        lease with this run's id (`held`, carried to its worker) before its upload and its marker,
        so a run that lost it never marks a shard done; the driver then stops (lease_taken)."""
        self.check()
        try:  # the run's first write: credentials that may read but not write are told here
            lease = self._take()
        except OSError as exc:
            raise self.failure(exc, f"--output {self.url} (writing {LEASE})") from None
        stop = threading.Event()
        renew = threading.Thread(target=self._renew, args=(lease, stop), daemon=True, name="lease")
        self.held = lease["run"]
        renew.start()
        try:
            yield lease
        finally:
            stop.set()
            self.held = None
            self._release(lease, renew)

    def _take(self) -> dict:
        """Write this run's lease unless a live run holds one; refuse when another run wins the race."""
        held = self._holder()
        if held:
            raise RuntimeError(f"another run ({held}) is writing to {self.url}; wait for it or choose another "
                               f"--output (a lease of a run on another host expires {LEASE_TTL_S:.0f} s after "
                               f"its last renewal; delete {self.url}/{LEASE} if that run is gone)")
        lease = {"run": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(), "renewed": time.time()}
        self.write_json(LEASE, lease)
        time.sleep(SETTLE_S)
        try:
            now = json.loads(self.read(LEASE) or b"{}")
        except ValueError:  # what was put comes back other than written: no object store to trust
            raise self.failure(ValueError(f"{LEASE} read back other than it was written"),
                               f"--output {self.url}") from None
        if now.get("run") != lease["run"]:
            raise RuntimeError(f"another run ({now.get('host')} pid {now.get('pid')}) started writing to "
                               f"{self.url} at the same moment; wait for it or choose another --output")
        return lease

    def _holder(self) -> str | None:
        """'host pid N' of a live run holding the lease, None when there is none or it is stale."""
        held = self._lease()
        if not held.get("run"):  # none, or a torn or foreign lease object: it cannot hold anyone out
            return None
        # Stale once not renewed for LEASE_TTL_S, whatever its pid says: a pid is reused (a container's
        # restarted run is often pid 1 again), so a live pid alone would keep a crashed run's lease forever.
        # On this host a gone process also makes it stale at once.
        alive = time.time() - float(held.get("renewed", 0)) < LEASE_TTL_S
        if alive and held.get("host") == socket.gethostname():
            alive = pid_alive(int(held.get("pid", 0)))
        return f"{held.get('host')} pid {held.get('pid')}" if alive else None

    def _release(self, lease: dict, renew: threading.Thread) -> None:
        """Delete the lease if it is still this run's, after a renewal in flight (which would put it back).
        A store lost mid-run is not waited for: its requests fail at once, and a renewal hung on it
        would hold the process's exit for the SDK's timeouts; the lease left behind goes stale."""
        if self.lost:
            return
        renew.join()
        with contextlib.suppress(OSError):
            if self.lease_run() == lease["run"]:
                self.delete(LEASE)

    def _renew(self, lease: dict, stop: threading.Event) -> None:
        """Rewrite the lease's time while the run lasts (a failed renewal is retried at the next); once
        another run holds it, stop renewing and mark the store lost to this run (lease_taken)."""
        while not stop.wait(RENEW_S):
            with contextlib.suppress(OSError):
                if self.held != lease["run"] or self.lease_taken():
                    return
                self.write_json(LEASE, {**lease, "renewed": time.time()})


def pid_alive(pid: int) -> bool:
    """Whether a process of this host has this id."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
