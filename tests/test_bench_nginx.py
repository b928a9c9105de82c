"""bench.nginx: the engine benchmark's nginx serves the corpus's files byte for byte, and stops."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request

import pytest

from bench.nginx import NginxServer, config, nginx_binary


def test_the_config_serves_only_the_files_folder(tmp_path):
    text = config(tmp_path / "corpus", tmp_path / "state", 8123, 3)
    assert "listen 127.0.0.1:8123" in text and "worker_processes 3;" in text
    assert f"alias {(tmp_path / 'corpus').resolve()}/files/;" in text and "access_log off;" in text


@pytest.mark.skipif(not nginx_binary(), reason="no nginx here (apt-get install nginx-light)")
def test_nginx_serves_the_files_and_stops(tmp_path):
    (tmp_path / "files").mkdir()
    body = bytes(range(256)) * 4000
    (tmp_path / "files" / "a.jpg").write_bytes(body)
    (tmp_path / "secret.txt").write_text("not served")
    with NginxServer(tmp_path, 2, tmp_path / "state") as srv:
        with urllib.request.urlopen(f"{srv.base_url}/files/a.jpg") as r:
            assert r.read() == body and r.headers["Content-Type"] == "image/jpeg"
        for path in ("/files/missing.jpg", "/files/../secret.txt", "/secret.txt"):
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(srv.base_url + path)
            assert e.value.code in (400, 404)
        port = srv.port
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def engine_outcomes(urls, out, engine_args: list[str]) -> dict:
    """A real engine run (one worker, local runner) over a bench URL list: its stats.json outcomes."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    done = subprocess.run([sys.executable, "-m", "engine", "shards", str(urls), "--output", str(out), "--workers", "1",
                           "--no-progress", "--runner", "local", *engine_args],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads((out / "stats.json").read_text())["outcomes"]


def test_files_mode_lists_file_urls_the_engine_reads_under_its_local_root(tmp_path):
    """`--server files`: the URL list names the corpus's files as file:// URLs (what img2dataset's urllib opens),
    and the engine gets --local-root for them; a real engine run over two of them writes both."""
    import argparse

    import pyarrow as pa
    import pyarrow.parquet as pq

    from bench import engine_bench
    from tests.conftest import encode, photo, scaled

    folder = tmp_path / "corpus"
    (folder / "files").mkdir(parents=True)
    for name, rgb in (("a.jpg", photo("astronaut")), ("b.jpg", scaled(photo("coffee"), 768, 512))):
        (folder / "files" / name).write_bytes(encode(rgb, "JPEG", quality=90))
    pq.write_table(pa.table({"URL": [f"http://127.0.0.1:0/files/{n}" for n in ("a.jpg", "b.jpg")],
                             "TEXT": ["a", "b"]}), folder / "corpus.parquet")
    a = argparse.Namespace(server="files", engine_args=[], probe=True)
    with engine_bench.serving(folder, a) as srv:
        urls = engine_bench.url_list(folder, srv.base_url, tmp_path / "urls.parquet")
    listed = pq.read_table(urls).column("URL").to_pylist()
    assert listed == [(folder / "files" / n).resolve().as_uri() for n in ("a.jpg", "b.jpg")]
    assert a.engine_args == ["--local-root", str(folder.resolve())] and a.served_by == "files" and not a.probe
    assert engine_outcomes(urls, tmp_path / "out", a.engine_args) == {"ok": 2}


def test_a_folder_of_photos_becomes_a_corpus_the_engine_reads(tmp_path, monkeypatch):
    """`--photos DIR`: every distinct photo under DIR once (a link to one already listed is the same file;
    other files are skipped), copied under plain names, with sizes, captions and the score columns
    img2dataset is asked to keep; a real engine run over the list writes every photo."""
    import argparse

    import numpy as np
    import pyarrow.parquet as pq

    from bench import engine_bench
    from tests.conftest import encode, photo, scaled

    monkeypatch.setattr(engine_bench, "WORK", tmp_path / "work")
    src = tmp_path / "my photos"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "a_cat.jpg").write_bytes(encode(photo("astronaut"), "JPEG", quality=90))
    rgba = np.dstack([scaled(photo("coffee"), 1300, 1200), np.full((1200, 1300), 200, np.uint8)])
    (src / "b b.PNG").write_bytes(encode(rgba, "PNG"))
    (src / "c.webp").write_bytes(encode(scaled(photo("chelsea"), 2100, 2000), "WEBP", quality=90))
    (src / "same.jpg").symlink_to(src / "sub" / "a_cat.jpg")
    (src / "notes.txt").write_text("not a photo")

    folder = engine_bench.photo_corpus(src)
    table = pq.read_table(folder / "corpus.parquet").to_pydict()
    assert sorted(p.name for p in (folder / "files").iterdir()) == ["000000.png", "000001.webp", "000002.jpg"]
    assert table["TEXT"] == ["b b", "c", "a cat"]
    assert list(zip(table["WIDTH"], table["HEIGHT"], strict=True)) == [(1300, 1200), (2100, 2000), (512, 512)]
    assert all(table[c] == [None] * 3 for c in engine_bench.EXTRA_COLUMNS)
    facts = engine_bench.corpus_facts(folder)
    assert facts["formats"] == {"jpg": 1, "png": 1, "webp": 1} and facts["source"] == str(src.resolve())
    assert engine_bench.photo_corpus(src) == folder  # cached: built once per folder listing

    a = argparse.Namespace(server="files", engine_args=[], probe=True)
    with engine_bench.serving(folder, a) as srv:
        urls = engine_bench.url_list(folder, srv.base_url, tmp_path / "urls.parquet")
    assert engine_outcomes(urls, tmp_path / "out", a.engine_args) == {"ok": 3}
