"""The trainer on damaged shards and interruptions: every case ends as a counted skip or a one-line error.

Real tar files written here, read through the trainer's own loader (trainer.data) or its CLI; the tiny
offline tokenizer and model (trainer.tiny).
"""

from __future__ import annotations

import io
import json
import os
import resource
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trainer.config import DataConfig
from trainer.data import SampleError, build_loader, decode_member, resize_crop
from trainer.lanes import Position
from trainer.precompute import npy_bytes
from trainer.synthetic import write_shards
from trainer.tiny import build_tiny_model, build_tiny_tokenizer

pytestmark = pytest.mark.quick
ROOT = Path(__file__).resolve().parents[1]
KEY = "0000000002"  # the damaged sample of the 6 in a shard


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """The tiny offline CLIP tokenizer."""
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """One good shard of six 40 px samples."""
    root = tmp_path_factory.mktemp("src")
    write_shards(root, n_shards=1, per_shard=6, size=40)
    return root / "00000.tar"


def members(tar: Path) -> list[tuple[str, bytes]]:
    """(name, bytes) of every member, in tar order."""
    with tarfile.open(tar) as t:
        return [(m.name, t.extractfile(m).read()) for m in t.getmembers()]


def write_tar(path: Path, items) -> Path:
    """A tar of (name, bytes) members."""
    with tarfile.open(path, "w") as t:
        for name, data in items:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return path


def damaged(source: Path, dest: Path, member: str, data: bytes | None) -> Path:
    """The source shard with KEY's `member` replaced by `data` (None: left out)."""
    items = [(n, data if n == f"{KEY}.{member}" else d) for n, d in members(source)]
    return write_tar(dest, [(n, d) for n, d in items if d is not None])


def encoded(img: Image.Image, fmt: str) -> bytes:
    """An image as file bytes."""
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def data_cfg(shards: str, **kw) -> DataConfig:
    """One sample at a time through the shuffle buffer, so the stream follows the tar's order."""
    return DataConfig(**{"shards": shards, "resolution": 32, "train_batch_size": 2, "num_workers": 0,
                         "shuffle_buffer": 1, "proportion_empty_prompts": 0.0, **kw})


def first_epoch(shards: str, tokenizer) -> list[dict]:
    """The three batches of a six-sample shard's first epoch."""
    it = iter(build_loader(data_cfg(shards), tokenizer, 0, Position(), False))
    return [next(it) for _ in range(3)]


# A damaged member of one sample: counted as failed and replaced within its batch, never trained on. Before these
# were refused, a missing txt (a tar cut after the sample's jpg) trained the picture with the empty prompt, bytes
# that are not UTF-8 with U+FFFD, and a map of another aspect ratio was stretched onto the picture.
@pytest.mark.parametrize("member, data", [
    ("txt", None),
    ("txt", b"caf\xe9 \xff"),
    ("cond.png", encoded(Image.new("L", (40, 16), 255), "PNG")),
])
def test_a_damaged_member_is_counted_not_trained_on(source, tmp_path, tokenizer, member, data):
    """The damaged sample counts as failed (once in the epoch); no batch holds its caption or an empty one."""
    batches = first_epoch(str(damaged(source, tmp_path / "00000.tar", member, data)), tokenizer)
    assert sum(int(b["failed"]) for b in batches) == 1
    captions = [c for b in batches for c in tokenizer.batch_decode(b["input_ids"], skip_special_tokens=True)]
    assert "" not in captions and not any("\ufffd" in c for c in captions)
    assert all(b["pixel_values"].shape == (2, 3, 32, 32) for b in batches)


@pytest.mark.parametrize("member, data", [
    ("txt", b""),  # no caption: the empty prompt, as caption dropout trains it anyway
    ("json", b"{not json"),  # the trainer never reads the json
    ("jpg", None),  # a map of its own size: scaled, as a map made at another resolution lines up
])
def test_harmless_oddities_train(source, tmp_path, tokenizer, member, data):
    """An empty caption and a broken json train; a map half the image's size (same aspect ratio) is scaled."""
    if data is None:  # the jpg at twice the map's size
        jpg = dict(members(source))[f"{KEY}.jpg"]
        data = encoded(Image.open(io.BytesIO(jpg)).resize((80, 80)), "JPEG")
    batches = first_epoch(str(damaged(source, tmp_path / "00000.tar", member, data)), tokenizer)
    assert sum(int(b["failed"]) for b in batches) == 0


def test_a_palette_png_without_its_palette_is_a_named_sample_error():
    """A palette PNG with a tRNS but no PLTE chunk (mutation fuzzing): Pillow's convert("RGB") failed a bare
    `assert self.palette is not None`, an AssertionError with no message; now a SampleError that says why."""
    png = encoded(Image.new("P", (40, 40), 3), "PNG")
    at = png.index(b"PLTE") - 4
    no_plte = png[:at] + png[at + 12 + int.from_bytes(png[at:at + 4], "big"):]
    trns = b"tRNS" + bytes([255, 255, 255, 0])
    idat = no_plte.index(b"IDAT") - 4
    body = no_plte[:idat] + (4).to_bytes(4, "big") + trns + zlib.crc32(trns).to_bytes(4, "big") + no_plte[idat:]
    with pytest.raises(SampleError, match="without a PLTE chunk"):
        decode_member({"cond.png": body}, "cond.png")


def test_a_very_long_image_is_cropped_before_it_is_resized():
    """A 60000x1 picture at 512 px: the center square is resized, not the whole picture (which made a
    30720000x512 intermediate, 47 GB: here, under a 1 GiB address-space margin, a MemoryError)."""
    long = Image.new("RGB", (60000, 1), (10, 20, 30))
    vm = next(int(x.split()[1]) for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmSize"))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (vm * 1024 + 2**30, hard))
    try:
        out = resize_crop(long, 512, Image.BILINEAR)
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    assert out.shape == (512, 512, 3) and (out == (10, 20, 30)).all()


def test_non_square_crops_keep_the_center():
    """Cropping in the source first keeps what the resize-then-crop kept: the center, at the same place."""
    img = np.zeros((40, 80, 3), np.uint8)
    img[:, 30:50] = 255
    out = resize_crop(Image.fromarray(img), 20, Image.NEAREST)
    assert out.shape == (20, 20, 3) and out[:, 5:15].min() == 255 and out[:, :5].max() == 0 and out[:, 15:].max() == 0


class Payload:
    """Unpickling this creates a file: proof that a .npy member was unpickled."""

    marker = ""

    def __reduce__(self):
        return open, (self.marker, "w")


def object_npy(marker: Path) -> bytes:
    """An object array whose unpickling would create `marker`."""
    Payload.marker = str(marker)
    buf = io.BytesIO()
    np.save(buf, np.array([Payload()], dtype=object), allow_pickle=True)
    return buf.getvalue()


LATENT = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float16)
EMBED = np.random.default_rng(1).standard_normal((77, 32)).astype(np.float16)


def precomputed_shards(folder: Path, bad_member: str, bad: bytes) -> Path:
    """A precomputed shard set as `python -m trainer precompute` writes it for the tiny model at 32 px (latents
    2x4x8x8, embeddings 77x32, fp16), with sample KEY's `bad_member` replaced."""
    folder.mkdir()
    (folder / "precompute.json").write_text(json.dumps({"model": "tiny", "resolution": 32, "latent_channels": 4,
                                                        "vae_scale_factor": 4, "text_dim": 32}))
    np.save(folder / "empty_prompt.npy", np.zeros((77, 32), np.float16), allow_pickle=False)
    cond = encoded(Image.new("L", (32, 32), 128), "PNG")
    items = []
    for i in range(6):
        key = f"{i:010d}"
        sample = {"latent.npy": npy_bytes(LATENT), "text.npy": npy_bytes(EMBED), "cond.png": cond, "txt": b"a photo"}
        if key == KEY:
            sample[bad_member] = bad
        items += [(f"{key}.{m}", d) for m, d in sample.items()]
    return write_tar(folder / "00000.tar", items)


@pytest.mark.parametrize("member, bad", [
    ("latent.npy", npy_bytes(LATENT[:, :, :4, :4])),  # another resolution's latent: stacking it crashed the run
    ("latent.npy", npy_bytes(LATENT[:, :3])),  # another VAE's channels: the same crash
    ("latent.npy", npy_bytes(LATENT.astype(np.float32))),  # made the whole batch fp32
    ("latent.npy", npy_bytes(LATENT.astype(np.int16))),  # garbage trained on
    ("latent.npy", npy_bytes(np.full_like(LATENT, np.nan))),  # stopped the run as a "non-finite loss"
    ("latent.npy", b"\x93NUMPY garbage"),
    ("text.npy", npy_bytes(EMBED[:10])),  # stacking crashed the run
    ("text.npy", npy_bytes(EMBED.astype(np.float32))),
    ("cond.png", encoded(Image.new("L", (16, 16)), "PNG")),
    ("pickle", b""),  # an object array (below)
])
def test_a_bad_precomputed_member_is_counted(tmp_path, tokenizer, member, bad):
    """Wrong shape, dtype, non-finite values, unreadable bytes or a pickled object array: the sample is counted
    as failed, every batch has the format's shapes and dtypes, and nothing is ever unpickled."""
    marker = tmp_path / "unpickled"
    if member == "pickle":
        member, bad = "latent.npy", object_npy(marker)
    shard = precomputed_shards(tmp_path / "pre", member, bad)
    batches = first_epoch(str(shard), tokenizer)
    assert sum(int(b["failed"]) for b in batches) == 1
    for b in batches:
        assert b["latent_mean"].shape == (2, 4, 8, 8) and b["latent_mean"].dtype == torch.float16
        assert b["encoder_hidden_states"].shape == (2, 77, 32) and b["encoder_hidden_states"].dtype == torch.float16
        assert torch.isfinite(b["latent_mean"]).all()
    assert not marker.exists()


def test_precomputed_samples_without_their_meta_are_counted(source, tmp_path, tokenizer):
    """A precomputed sample among pixel shards (no precompute.json): counted as failed with the reason, the
    pixel samples train (it used to stop the run at that batch with a RuntimeError traceback)."""
    pre = members(precomputed_shards(tmp_path / "pre", "txt", b"a photo"))[:4]  # one precomputed sample
    mixed = write_tar(tmp_path / "mixed.tar", members(source) + [(f"99{n}", d) for n, d in pre])
    it = iter(build_loader(data_cfg(str(mixed)), tokenizer, 0, Position(), False))
    batches = [next(it) for _ in range(4)]  # 7 samples: the epoch and one batch more
    assert sum(int(b["failed"]) for b in batches) == 1


@pytest.mark.parametrize("case", ["missing", "empty", "no match"])
def test_missing_or_empty_local_shards_stop_before_training(source, tmp_path, tokenizer, case):
    """A local shard that does not exist or is empty is a wrong --shards: an error naming it before any batch
    (a missing one was counted as a read error every epoch, the run training on the rest unawares)."""
    (tmp_path / "00001.tar").write_bytes(b"")
    pattern = {"missing": f"{source}::{tmp_path / '00002.tar'}", "empty": f"{source}::{tmp_path / '00001.tar'}",
               "no match": str(tmp_path / "x{00000..00003}.tar")}[case]
    with pytest.raises(ValueError, match=r"--shards: \d of \d shard\(s\) missing or empty") as e:
        build_loader(data_cfg(pattern), tokenizer, 0, Position(), False)
    assert {"missing": "00002.tar (missing)", "empty": "00001.tar (empty)", "no match": "x00000.tar (missing)"}[case] \
        in str(e.value)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """The tiny model."""
    return build_tiny_model(tmp_path_factory.mktemp("model"))


def train_args(shards: str, model: Path, output: Path, *extra: str) -> list[str]:
    """A 2-step CPU run of the CLI."""
    return ["--shards", shards, "--model", str(model), "--output", str(output), "--device", "cpu",
            "--mixed-precision", "no", "--resolution", "32", "--train-batch-size", "2",
            "--gradient-accumulation-steps", "1", "--optimizer", "adamw", "--max-train-steps", "2",
            "--dataloader-num-workers", "0", "--no-progress", "--max-failed-batches", "2", *extra]


@pytest.mark.parametrize("case", ["stats", "not a tar", "resume", "meta"])
def test_the_cli_says_one_line_and_exits_2(source, model, tmp_path, capsys, case):
    """Shards recorded at another size, a shard set with no readable tar, --resume of no checkpoint, an unreadable
    precompute.json: `error: ...` on one line, exit 2 (each was a Python traceback, exit 1)."""
    from trainer.cli import main

    shards = tmp_path / "00000.tar"
    shards.write_bytes(source.read_bytes())
    extra: tuple[str, ...] = ()
    if case == "stats":
        (tmp_path / "00000.stats.json").write_text(json.dumps({"image_size": 40}))
    elif case == "not a tar":
        shards.write_bytes(b"not a tar file " * 100)
    elif case == "resume":
        extra = ("--resume", str(tmp_path / "checkpoint-7"))
    else:
        (tmp_path / "precompute.json").write_text("{not json")
    status = main(train_args(str(shards), model, tmp_path / "out", *extra))
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and err[0].startswith("error: "), err
    says = {"stats": "--resize", "not a tar": "no readable samples", "resume": "not a complete checkpoint",
            "meta": "precompute.json or empty_prompt.npy unreadable"}[case]
    assert says in err[0]


# In a child process: the signal arrives at a chosen moment (while the models load; during the final export,
# after the last checkpoint), sent by the process to itself from a wrapper around the trainer's own function.
SIGNAL_AT = """
import importlib, os, signal, sys
module, name = sys.argv[1].split(":")
signum = getattr(signal, sys.argv[2])
if module == "import":  # as `name` starts importing (inside `import torch`): a half-imported torch
    class Hook:
        def find_spec(self, fullname, path=None, target=None):
            if fullname == name:
                sys.meta_path.remove(self)
                os.kill(os.getpid(), signum)
    sys.meta_path.insert(0, Hook())
else:
    module = importlib.import_module(module)
    real = getattr(module, name)
    def hit(*a, **k):
        os.kill(os.getpid(), signum)
        return real(*a, **k)
    setattr(module, name, hit)
from trainer.cli import main
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("where, sig, status, says", [
    ("trainer.train:load_models", "SIGTERM", 143, "none was written"),
    ("import:torch.autograd", "SIGINT", 130, "interrupted while starting"),  # re-importing torch to list
    # the checkpoints failed ("partially initialized module 'torch'"): a RuntimeError traceback, exit 1
    ("trainer.schedule:export_final", "SIGINT", 130, "the newest complete checkpoint is"),
])
def test_a_signal_outside_the_loop_says_what_is_left(source, model, tmp_path, where, sig, status, says):
    """SIGTERM while the models load (it killed the run silently, exit -15), Ctrl-C inside `import torch` and
    during the final export (a KeyboardInterrupt traceback): one line saying whether a checkpoint is there to resume, exit 128 + signal."""
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-c", SIGNAL_AT, where, sig, *train_args(str(source), model, out)],
                         cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == status, run.stderr[-3000:]
    assert "Traceback" not in run.stderr and says in run.stderr, run.stderr[-3000:]
    if "export" in where:
        assert f"{out / 'checkpoint-2'}" in run.stderr


# As SIGNAL_AT, but the signal is handled inside a weakref callback, where Python prints an exception that the
# handler raises ("Exception ignored in ...") and drops it: importlib's module locks have such callbacks, which
# run all through diffusers' imports while the models load.
SIGNAL_IN_A_CALLBACK = """
import os, signal, sys, weakref
import trainer.train as t
signum = getattr(signal, sys.argv[1])
real = t.load_models
class Thing:
    pass
def load_models(*a, **k):
    thing = Thing()
    ref = weakref.ref(thing, lambda _: (os.kill(os.getpid(), signum), sum(range(1000))))
    del thing  # the callback runs here, and the handler inside it
    return real(*a, **k)
t.load_models = load_models
from trainer.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("sig, status", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_python_drops_while_loading_still_stops_the_run(source, model, tmp_path, sig, status):
    """Found stress-killing torchrun runs: a SIGTERM while the models loaded reached one rank inside importlib's
    weakref callback; it printed `Exception ignored in: <function _get_module_lock.<locals>.cb ...>` and
    `trainer.cli.Interrupted`, and that rank trained on (the other had stopped; it failed at the next collective).
    In one process the run trained to its end, exit 0. Such a signal now stops the run at its first step, saved."""
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-c", SIGNAL_IN_A_CALLBACK, sig,
                          *train_args(str(source), model, out, "--max-train-steps", "5")],
                         cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == status, run.stdout[-2000:] + run.stderr[-3000:]
    assert "stopped at step 1; checkpoint saved" in run.stdout
    from trainer.checkpoint import list_checkpoints

    assert [s for s, _ in list_checkpoints(out)] == [1] and not (out / "controlnet").exists()


# Ctrl-C at step 1's log, then a second one handled inside a weakref callback (as inside the DataLoader iterator's
# __del__, which joins its workers when the loop ends), where Python drops the KeyboardInterrupt it raises.
SECOND_CTRL_C_IN_A_CALLBACK = """
import os, signal, sys, weakref
import trainer.loop as loop
real, sent = loop.log_step, []
class Thing:
    pass
def log_step(*a, **k):
    if not sent:
        sent.append(1)
        os.kill(os.getpid(), signal.SIGINT)
        thing = Thing()
        ref = weakref.ref(thing, lambda _: (os.kill(os.getpid(), signal.SIGINT), sum(range(1000))))
        del thing
    return real(*a, **k)
loop.log_step = log_step
from trainer.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("log_every", ["1", "10"])
def test_a_second_ctrl_c_python_drops_is_neither_lost_nor_a_traceback(source, model, tmp_path, log_every):
    """Found in the kill-and-resume stress (2 Ctrl-C 0.24 s apart): the second one landed in the DataLoader
    iterator's __del__ as the loop ended, and printed 21 lines, `Exception ignored in: <function
    _MultiProcessingDataLoaderIter.__del__ ...>` and a KeyboardInterrupt traceback, over the run's one line. Python
    drops such an exception: the run now still stops, says so in one line, and prints no traceback. Logged at step
    1, the first Ctrl-C stops the run at step 2, saved; logged only at the last step (5), the dropped second Ctrl-C
    let the run go on to export and exit 0: it now stops before the export."""
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "-c", SECOND_CTRL_C_IN_A_CALLBACK,
                          *train_args(str(source), model, out, "--max-train-steps", "5", "--log-every", log_every)],
                         cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 130, run.stdout[-2000:] + run.stderr[-3000:]
    assert "Traceback" not in run.stderr and "Exception ignored" not in run.stderr, run.stderr[-3000:]
    if log_every == "1":
        assert run.stdout.splitlines()[-1] == "stopped at step 2; checkpoint saved. Continue with --resume latest"
    else:
        assert run.stderr.strip().splitlines() == [
            "interrupted before any checkpoint was complete: none was written; rerun the same command to start again"]
        assert not (out / "controlnet").exists()
