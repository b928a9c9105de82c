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
