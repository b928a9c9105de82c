"""The progress counter that shard tasks report to and the driver drains (a Ray actor).

A module of its own with no imports, so the actor's process starts in a blink.
"""


class ProgressCounter:
    """Rows finished and samples written since the driver last asked."""

    def __init__(self):
        self.rows = self.written = 0

    def add(self, rows: int, written: int) -> None:
        """Count what a task finished."""
        self.rows += rows
        self.written += written

    def take(self) -> tuple[int, int]:
        """The counts since the last take, and reset."""
        rows, written, self.rows, self.written = self.rows, self.written, 0, 0
        return rows, written
