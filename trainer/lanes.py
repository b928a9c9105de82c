"""The lanes a run's sample stream is cut into, and where the stream stands (its checkpointed position).

The stream is cut into lanes (Layout), fixed when a run starts and kept in its checkpoints, so a run
is the same with 0 or 8 workers on those lanes and a resume continues exactly where it left off:

* one lane per DataLoader worker of every process when there are tars enough (fewer: workers share a
  process's lanes; fewer tars than processes: one lane that every worker reads, each decoding only its
  own samples). Epoch e shuffles the shards by (seed, e) and gives lane l every L-th of them; the lane
  passes its raw (undecoded) samples through its own shuffle buffer. Each tar is read once an epoch
  over all workers and ranks; lanes of unequal length run through their epochs at their own pace;
* global samples are numbered 0, 1, 2, ...; sample i belongs to global batch i // (world x batch_size)
  and comes from lane Layout.lane(i); under the run's own layout DataLoader worker w of rank r needs
  exactly one lane (the batches it owns, round-robin in the order the DataLoader asks for them, and
  rank r's samples j % W == r of each); with other counts a worker reads the lanes it needs;
* every batch reports where its lanes stand ("lanes": lane, epoch, offset, end sample); the loop keeps
  the latest in TrainState.extra (all ranks' under torchrun), and the position is counted in global
  samples, so a resume on another number of processes or workers continues at the same sample.

trainer/data.py reads the lanes (ShardStream); this module only plans them and keeps their positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Position:
    """Where the stream stands: batches consumed, and the epoch / sample offset that follows them."""

    batches: int = 0
    epoch: int = 0
    offset: int = 0
    samples: int | None = None
    """Global samples consumed (all ranks); None in checkpoints older than it: batches x batch size."""
    layout: Layout | None = None
    """The lane layout the run started with (kept across resumes); None: chosen now (fresh run) or one lane
    (checkpoints older than lanes, whose epoch and offset then belong to that lane)."""
    lanes: dict[int, tuple[int, int]] | None = None
    """Each lane's (epoch, offset) after the samples consumed; a lane missing here has not been read yet."""


@dataclass(frozen=True)
class Layout:
    """How the sample stream is cut into lanes, each lane a disjoint set of tars per epoch.

    Global sample i comes from lane ((i // global_batch) % workers) * ranks + i % ranks: with the layout's own
    process and worker counts, DataLoader worker w of rank r needs exactly one lane, so each tar is read once
    an epoch. Fixed when a run starts and kept in its checkpoints: a resume with other counts reads the lanes
    each of its workers needs (sharing some) and continues exactly.
    """

    ranks: int = 1
    """Processes the lanes are cut for (a divisor of the global batch)."""
    workers: int = 1
    """DataLoader workers per process the lanes are cut for."""
    global_batch: int = 1
    """Samples of one global batch (batch size x processes) when the run started."""

    @property
    def lanes(self) -> int:
        """Number of lanes."""
        return self.ranks * self.workers

    def lane(self, index: int) -> int:
        """The lane that global sample `index` is read from."""
        return ((index // self.global_batch) % self.workers) * self.ranks + index % self.ranks


def plan_layout(n_shards: int, world: int, workers: int, global_batch: int) -> Layout:
    """One lane per worker of every process when there are tars enough; else fewer workers per lane.

    With fewer tars than processes x workers, the workers of a process share its lanes (a divisor of the
    worker count, so each worker still reads one lane); with fewer tars than processes everything is one
    lane that every worker reads, each decoding only its own samples (sample-level splitting).
    """
    if n_shards < world:
        return Layout(1, 1, global_batch)
    per_rank = max(d for d in range(1, max(1, workers) + 1) if max(1, workers) % d == 0 and world * d <= n_shards)
    return Layout(world, per_rank, global_batch)


def record_lanes(extra: dict, lanes: torch.Tensor) -> None:
    """Keep each lane's latest (epoch, offset) from a batch's lane report in the checkpointed `extra`."""
    report = {str(lane): [epoch, offset, end] for lane, epoch, offset, end in lanes.tolist()}
    extra["data_lanes"] = merge_lanes([extra.get("data_lanes", {}), report])


def merge_lanes(tables: list[dict]) -> dict:
    """The lane tables of several ranks as one: for each lane the entry reported at the latest sample."""
    merged: dict = {}
    for table in tables:
        for lane, entry in table.items():
            if entry[2] >= merged.get(lane, (0, 0, -1))[2]:
                merged[lane] = list(entry)
    return merged


def resume_position(state) -> Position:
    """The data position a TrainState (a checkpoint's counters) records, lanes and their layout included."""
    layout = state.extra.get("data_layout")
    lanes = {int(k): (v[0], v[1]) for k, v in state.extra.get("data_lanes", {}).items()}
    return Position(state.batches, state.epoch, state.offset, state.samples,
                    Layout(**layout) if layout else None, lanes if layout else None)
