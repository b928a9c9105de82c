"""nginx serving the corpus's files on 127.0.0.1, for the engine benchmark.

The benchmark's own aiohttp server costs about 1.7 CPU-ms per image on a 2-core box (bench/RESULTS.md,
engine timeline), on the same cores as the two tools it serves: that share is the same for both
tools, so it pulls their ratio towards 1 and measures the server as much as the tools. nginx with
sendfile serves a file for a fraction of that, as the issue's first measurement did. Used when an
`nginx` binary is found (Debian: `apt-get install nginx-light`); the benchmark falls back to the
aiohttp server otherwise and says which one served in its results line.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

TYPES = "image/jpeg jpg jpeg; image/png png; image/webp webp; image/gif gif;"


def nginx_binary() -> str | None:
    """The nginx executable, or None (it often lies in /usr/sbin, outside a user's PATH)."""
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")


def version(binary: str) -> str:
    """nginx -v's version, e.g. 'nginx 1.22.1'."""
    out = subprocess.run([binary, "-v"], capture_output=True, text=True).stderr.strip()
    return out.replace("nginx version: ", "").replace("/", " ") or "nginx"


def free_port() -> int:
    """A port nothing listens on now (nginx binds it a moment later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config(folder: Path, prefix: Path, port: int, processes: int) -> str:
    """nginx.conf serving folder/files/NAME at /files/NAME; state (pid, logs, temp) under prefix."""
    user = "user root;\n" if hasattr(os, "geteuid") and os.geteuid() == 0 else ""  # workers read our files
    return f"""{user}worker_processes {processes};
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
daemon off;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  sendfile on;
  tcp_nopush on;
  keepalive_requests 1000000;
  client_body_temp_path {prefix}/body;
  types {{ {TYPES} }}
  default_type application/octet-stream;
  server {{
    listen 127.0.0.1:{port} reuseport;
    location /files/ {{ alias {folder.resolve()}/files/; }}
  }}
}}
"""


class NginxServer:
    """`with NginxServer(folder, processes) as srv: ...srv.base_url...`: nginx in the foreground of a
    child process, stopped (SIGQUIT, then kill) on exit."""

    def __init__(self, folder: Path, processes: int, prefix: Path, binary: str | None = None):
        self.folder, self.processes, self.prefix = folder, processes, prefix
        self.binary = binary or nginx_binary()
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        """http://127.0.0.1:PORT"""
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> NginxServer:
        if not self.binary:
            raise RuntimeError("no nginx binary found")
        self.prefix.mkdir(parents=True, exist_ok=True)
        conf = self.prefix / "nginx.conf"
        conf.write_text(config(self.folder, self.prefix, self.port, self.processes))
        self.proc = subprocess.Popen([self.binary, "-p", str(self.prefix), "-c", str(conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self._wait_listening()
        return self

    def _wait_listening(self, timeout: float = 10.0) -> None:
        """Return once the port accepts; raise with nginx's own message when it exited instead."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited {self.proc.returncode}: {self.proc.stderr.read()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        self.__exit__()
        raise RuntimeError(f"nginx did not listen on {self.port} within {timeout} s")

    def __exit__(self, *exc) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # graceful stop of master and workers
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
