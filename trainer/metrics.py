"""Scalars of a run: a JSONL log (one record per logged step), TensorBoard events, a progress bar."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from engine.atomic import write_text_atomic


class RunLog:
    """Writes each logged step to output/train_log.jsonl and output/tensorboard/, and drives tqdm."""

    wait_s = 0.0
    """Seconds the training thread waited for batches since the last record (trainer.loop adds them)."""
    window_s = 1e-9
    """Wall seconds between the last two records (set by `rate`)."""
    host = (0.0, 0.0)
    """CPU seconds of the training thread and of the whole training process at the last record."""
    host_busy = (0.0, 0.0)
    """The last window's CPU time over its wall time: the training thread's (1.0: the step is bound by
    host work) and the whole process's (cores: the pin-memory thread and CUDA's own threads included)."""

    def __init__(self, output: Path, start_step: int, total_steps: int, enable_bar: bool = True) -> None:
        output = Path(output)
        output.mkdir(parents=True, exist_ok=True)
        path = output / "train_log.jsonl"
        _drop_records_after(path, start_step)  # a resume replays the steps after its checkpoint
        self.jsonl = open(path, "a", buffering=1)
        self.tb = _summary_writer(output / "tensorboard", purge_step=start_step + 1)
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                        disable=not enable_bar, dynamic_ncols=True)
        self.start_clock(start_step)

    def start_clock(self, start_step: int) -> None:
        """The step, wall time and CPU times the first record's window starts from (in the training thread)."""
        self.last_step, self.last_time = start_step, time.perf_counter()
        self.host = (time.thread_time(), time.process_time())

    def rate(self, step: int, samples_per_step: int) -> float:
        """Samples per second since the previous call."""
        now = time.perf_counter()
        self.window_s = max(now - self.last_time, 1e-9)
        rate = (step - self.last_step) * samples_per_step / self.window_s
        self.last_step, self.last_time = step, now
        host = (time.thread_time(), time.process_time())  # called from the training thread
        self.host_busy = tuple(round((h - h0) / self.window_s, 3) for h, h0 in zip(host, self.host, strict=True))
        self.host = host
        return rate

    def waited(self, seconds: float) -> None:
        """The training thread waited this long for the next batch."""
        self.wait_s += seconds

    def data_wait(self) -> float:
        """Fraction of the last `rate` window spent waiting for batches (0: the loader kept ahead); resets."""
        frac, self.wait_s = min(1.0, self.wait_s / self.window_s), 0.0
        return frac

    def log(self, step: int, scalars: dict[str, float]) -> None:
        """One record: JSONL line, TensorBoard scalars, progress-bar postfix."""
        record = {"step": step, **scalars, "time": time.time()}
        self.jsonl.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in scalars.items():
                if v is not None:  # mfu is None off CUDA
                    self.tb.add_scalar(f"train/{k}", v, step)
        self.bar.set_postfix(loss=f"{scalars['loss']:.4f}", lr=f"{scalars['lr']:.2e}")

    def advance(self, n: int = 1) -> None:
        """Move the progress bar (no host sync: called every step)."""
        self.bar.update(n)

    def note(self, text: str) -> None:
        """A message that does not break the progress bar."""
        self.bar.write(text)

    def close(self) -> None:
        """Flush and close everything."""
        self.bar.close()
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


class SilentLog(RunLog):
    """The log of a torchrun rank other than 0: keeps the step clock for the throughput, writes nothing."""

    def __init__(self, output: Path, start_step: int, total_steps: int, enable_bar: bool = False) -> None:
        self.start_clock(start_step)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        """Rank 0 writes the record."""

    def advance(self, n: int = 1) -> None:
        """No progress bar."""

    def note(self, text: str) -> None:
        """Rank 0 prints."""

    def close(self) -> None:
        """Nothing open."""


def _drop_records_after(path: Path, step: int) -> None:
    """Keep only the records of steps up to `step` (all of them gone for a fresh start at 0)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines() if (logged := _step_of(line)) is not None and logged <= step]
    write_text_atomic(path, "".join(line + "\n" for line in keep))  # a crash here keeps the old log


def _step_of(line: str) -> int | None:
    """A record's step; None for a line that is no record (one torn by a power loss or a full disk would
    otherwise stop every resume with a JSONDecodeError; it is dropped with the records past the checkpoint)."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def _summary_writer(path: Path, purge_step: int):
    """TensorBoard writer (events from purge_step on are dropped), or None without tensorboard."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(path), purge_step=purge_step)


def gpu_memory_gb(device: torch.device) -> float:
    """Peak allocated GPU memory so far, in GiB (0 on the CPU)."""
    if device.type != "cuda":
        return 0.0
    return torch.cuda.max_memory_allocated(device) / 2**30


def measure_matmul_flops(device: torch.device, n: int = 8192, reps: int = 10) -> float | None:
    """Dense fp16 matmul FLOP/s of this CUDA device (mean of `reps` products after warm-up); None elsewhere."""
    if device.type != "cuda":
        return None
    a = torch.randn(n, n, device=device, dtype=torch.float16)
    b = torch.randn(n, n, device=device, dtype=torch.float16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        a @ b
    end.record()
    end.synchronize()
    return 2 * n**3 * reps / (start.elapsed_time(end) / 1e3)


def mfu(samples_per_s: float, flops_per_sample: float | None, peak_flops: float | None) -> float | None:
    """Model FLOPs utilisation: achieved FLOP/s over the measured matmul rate (None without a rate)."""
    if not flops_per_sample or not peak_flops:
        return None
    return samples_per_s * flops_per_sample / peak_flops
