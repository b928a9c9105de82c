"""PostScript, EPS and PDF served as .jpg (real loopback server, real engine run) and stored in a shard
(real trainer stream): refused by the decoding policy, and Ghostscript is never started.

A `gs` first on PATH records every start in a marker file: Pillow's EPS plugin runs `gs` by name, so
any render (or even its `gs --version` probe) would leave the marker.
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bench.corpus import CorpusServer
from engine import outcomes as O
from engine.pipeline import run
from trainer.config import DataConfig
from trainer.data import Position, ShardDataError, build_loader
from trainer.synthetic import write_shards
from trainer.tiny import build_tiny_tokenizer

from .conftest import encode, scaled
from .test_engine_e2e import engine_cfg, read_samples

pytestmark = pytest.mark.slow


def postscript(marker: Path) -> dict[str, bytes]:
    """Bodies that would make Ghostscript write `marker`, in every disguise Pillow's EPS plugin accepts."""
    program = (f"%%BoundingBox: 0 0 800 600\n({marker}) (w) file closefile\n"
               "newpath 0 0 moveto 800 600 lineto stroke showpage\n%%EOF\n").encode()
    ps = b"%!PS-Adobe-3.0 EPSF-3.0\n" + program
    binary = b"%!PS-Adobe-3.0 EPSF-3.0\n%\x80\x81\xfe binary comment\n" + program
    # DOS EPS: C5D0D3C6, offset and length of the PostScript section, no WMF/TIFF preview
    header = b"\xc5\xd0\xd3\xc6" + (30).to_bytes(4, "little") + len(ps).to_bytes(4, "little") + bytes(18)
    pdf = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"
    return {"ps": ps, "ps_binary": binary, "dos_eps": header + ps, "pdf": pdf}


@pytest.fixture
def gs_marker(tmp_path, monkeypatch) -> Path:
    """A fake `gs` first on PATH that leaves a marker file whenever it is started."""
    shim = tmp_path / "shim"
    shim.mkdir()
    marker = tmp_path / "gs-was-started"
    (shim / "gs").write_text(f"#!/bin/sh\necho \"$@\" >> {marker}\nexit 1\n")
    (shim / "gs").chmod(0o755)
    monkeypatch.setenv("PATH", f"{shim}{os.pathsep}{os.environ['PATH']}")
    # engine.imagepolicy switches Pillow's Ghostscript hook off process-wide; switch it back on here so
    # these tests prove that the format allowlist alone keeps PostScript away from gs.
    from PIL import EpsImagePlugin

    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)
    return marker


def test_engine_refuses_postscript_and_pdf_served_as_jpeg(tmp_path, gs_marker, astronaut):
    """Each disguised body ends unsupported_format, no sample is written, gs never runs; a photo passes."""
    files = tmp_path / "files"
    files.mkdir()
    bodies = postscript(tmp_path / "ps-wrote-this") | {"photo": encode(scaled(astronaut, 800, 600), quality=90)}
    for name, data in bodies.items():
        (files / f"{name}.jpg").write_bytes(data)
    with CorpusServer(tmp_path) as server:
        urls = [f"{server.base_url}/files/{name}.jpg" for name in bodies]
        parquet = tmp_path / "in.parquet"
        pq.write_table(pa.table({"URL": urls, "TEXT": list(bodies)}), parquet)
        out = tmp_path / "out"
        run(engine_cfg(parquet, out, runner="local"))
    assert not gs_marker.exists(), f"Ghostscript was started: {gs_marker.read_text()}"
    assert not (tmp_path / "ps-wrote-this").exists()
    rows = pa.concat_tables([pq.read_table(p) for p in sorted(out.glob("[0-9]*.parquet"))]).to_pylist()
    outcome = {r["url"].rsplit("/", 1)[1]: r["outcome"] for r in rows}
    assert outcome == {f"{n}.jpg": (O.OK if n == "photo" else O.UNSUPPORTED_FORMAT) for n in bodies}
    assert len(read_samples(out)) == 1


def disguised_shard(tmp_path, name: str, bodies: list[bytes], replace) -> str:
    """A real shard of 4 synthetic samples whose members chosen by `replace(index, name)` hold `bodies`."""
    write_shards(tmp_path / "src", n_shards=1, per_shard=4, size=40)
    with tarfile.open(tmp_path / "src" / "00000.tar") as src, tarfile.open(tmp_path / name, "w") as dst:
        for i, m in enumerate(src.getmembers()):
            data = bodies[i % len(bodies)] if replace(i, m.name) else src.extractfile(m).read()
            m.size = len(data)
            dst.addfile(m, io.BytesIO(data))
    return str(tmp_path / name)


@pytest.mark.timeout(120)
def test_trainer_refuses_postscript_stored_as_jpg_and_cond_png(tmp_path, gs_marker):
    """A shard whose .jpg / .cond.png members hold PostScript: refused, counted, then the named error."""
    bodies = list(postscript(tmp_path / "ps-wrote-this").values())
    shard = disguised_shard(tmp_path, "00007.tar", bodies, lambda i, name: name.endswith((".jpg", ".cond.png")))
    cfg = DataConfig(shards=shard, resolution=32, train_batch_size=2, num_workers=0,
                     shuffle_buffer=1, max_failed_batches=3)
    tokenizer = build_tiny_tokenizer(tmp_path / "tok")
    with pytest.raises(ShardDataError) as e:
        next(iter(build_loader(cfg, tokenizer, 0, Position(), False)))
    assert "00007.tar" in str(e.value) and "refused (unsupported_format" in str(e.value)
    assert not gs_marker.exists(), f"Ghostscript was started: {gs_marker.read_text()}"
    assert not (tmp_path / "ps-wrote-this").exists()


def test_preview_skips_postscript_members(tmp_path, gs_marker):
    """`python -m engine preview` over a shard of disguised PostScript: skipped and counted, gs never runs."""
    from engine.preview import read_samples as preview_samples

    bodies = list(postscript(tmp_path / "ps-wrote-this").values())
    # the first two samples' images are PostScript
    shard = disguised_shard(tmp_path, "00001.tar", bodies, lambda i, name: name.endswith(".jpg") and i < 8)
    samples, skipped = preview_samples([shard], limit=10)
    assert skipped == 2 and len(samples) == 2
    assert not gs_marker.exists(), f"Ghostscript was started: {gs_marker.read_text()}"
    assert not (tmp_path / "ps-wrote-this").exists()


@pytest.mark.timeout(180)
def test_trainer_cli_on_shards_without_maps_exits_with_the_named_member(tmp_path, capsys, one_torch_thread):
    """The whole CLI, DataLoader workers included: exit 2 and one line naming shard and member."""
    from trainer.cli import main
    from trainer.tiny import build_tiny_model

    write_shards(tmp_path / "src", n_shards=1, per_shard=3, size=40)
    with tarfile.open(tmp_path / "src" / "00000.tar") as src, tarfile.open(tmp_path / "00003.tar", "w") as dst:
        for m in src.getmembers():
            if not m.name.endswith(".cond.png"):
                dst.addfile(m, src.extractfile(m))
    code = main(["--shards", str(tmp_path / "00003.tar"), "--model", str(build_tiny_model(tmp_path / "model")),
                 "--output", str(tmp_path / "out"), "--device", "cpu", "--mixed-precision", "no",
                 "--optimizer", "adamw", "--resolution", "32", "--train-batch-size", "2",
                 "--dataloader-num-workers", "2", "--max-failed-batches", "6", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "00003.tar: no cond.png" in err and "Traceback" not in err, err
