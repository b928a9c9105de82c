"""The progress counter that shard tasks report to and the driver drains (a Ray actor).

A module of its own with no imports, so the actor's process starts in a blink.
"""


class ProgressCounter:
    """Rows finished and samples written by each (shard, attempt) since the driver last asked:
    the driver takes back a failed attempt's counts, so they must stay apart."""

    def __init__(self):
        self.counts: dict = {}

    def add(self, rows: int, written: int, shard: int = -1, attempt: int = 1) -> None:
        """Count what a task finished."""
        counted = self.counts.setdefault((shard, attempt), [0, 0])
        counted[0] += rows
        counted[1] += written

    def take(self) -> list[tuple[int, int, int, int]]:
        """(shard, attempt, rows, written) counted since the last take, and reset."""
        counts, self.counts = self.counts, {}
        return [(shard, attempt, rows, written) for (shard, attempt), (rows, written) in counts.items()]
