"""The network policy (engine/netpolicy.py, engine/fetch.py) against a real aiohttp server on loopback.

The server listens on 127.0.0.1, 127.0.0.2 and ::1 (where the machine has IPv6) on one port, so a
refused URL that slipped through would really reach it: "no request in the log" means something.
Each case also runs once with --allow-private-network, which must reach the server.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import tarfile
from pathlib import Path
from urllib.parse import quote

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver
from aiohttp.resolver import ThreadedResolver

from engine import outcomes as O
from engine.config import EngineConfig, FetchConfig, FilterConfig, ImageConfig
from engine.fetch import fetch, make_session
from engine.netpolicy import is_public, literal_address, strip_credentials
from engine.plan import prefilter

from .conftest import run_rows

BODY = b"\xff\xd8\xff" + bytes(range(256)) * 16 + b"\xff\xd9"
STRICT = FetchConfig(timeout=2.0, connect_timeout=1.0, retries=2, backoff=0.01)
OPEN = FetchConfig(**{**STRICT.__dict__, "allow_private_network": True})
CERT = Path(__file__).parent / "assets" / "selfsigned-test-only.pem"


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


IPV6 = has_ipv6_loopback()


# --- the address rule, on its own ---------------------------------------------------------------

@pytest.mark.quick
@pytest.mark.parametrize("address,public", [
    ("8.8.8.8", True), ("1.1.1.1", True), ("2606:4700:4700::1111", True), ("2a00:1450:4001:81c::200e", True),
    ("::ffff:8.8.8.8", True), ("2002:808:808::1", True), ("64:ff9b::808:808", True),
    ("2001:0:4136:e378:8000:63bf:f7f7:f7f7", True),  # Teredo, client 8.8.8.8
    ("127.0.0.1", False), ("127.0.0.2", False), ("10.0.0.1", False), ("172.16.0.1", False),
    ("192.168.1.1", False), ("169.254.169.254", False), ("100.64.0.1", False), ("0.0.0.0", False),
    ("0.1.2.3", False), ("255.255.255.255", False), ("224.0.0.1", False), ("239.255.255.250", False),
    ("240.0.0.1", False), ("198.18.0.1", False), ("192.0.2.1", False),
    ("::1", False), ("::", False), ("fe80::1", False), ("fe80::1%eth0", False), ("fc00::1", False),
    ("fd12:3456::1", False), ("fec0::1", False), ("ff02::1", False), ("ff0e::1", False), ("2001:db8::1", False),
    ("::ffff:127.0.0.1", False), ("::ffff:10.0.0.1", False), ("::ffff:169.254.169.254", False),
    ("2002:7f00:1::1", False), ("2002:a00:1::1", False), ("64:ff9b::7f00:1", False),
    ("64:ff9b::a9fe:a9fe", False), ("64:ff9b:1::808:808", False), ("::7f00:1", False),
    ("2001:0:4136:e378:8000:63bf:80ff:fffe", False),  # Teredo, client 127.0.0.1
    ("not an address", False), ("", False),
])
def test_is_public(address, public):
    assert is_public(address) == public


@pytest.mark.quick
@pytest.mark.parametrize("host,address", [
    ("127.0.0.1", "127.0.0.1"), ("2130706433", "127.0.0.1"), ("017700000001", "127.0.0.1"),
    ("0x7f.1", "127.0.0.1"), ("0177.0.0.1", "127.0.0.1"), ("127.1", "127.0.0.1"), ("127.0.0.1.", "127.0.0.1"),
    ("0", "0.0.0.0"), ("[::1]", "::1"), ("::ffff:7f00:1", "::ffff:7f00:1"),
    ("example.com", None), ("localhost", None), ("localhost.", None), ("", None), (None, None),
])
def test_literal_address(host, address):
    got = literal_address(host)
    assert (None if got is None else str(got)) == address


@pytest.mark.quick
@pytest.mark.parametrize("url,clean", [
    ("http://user:secret@example.com/a.jpg", "http://example.com/a.jpg"),
    ("https://user@example.com:8443/a.jpg?x=1#f", "https://example.com:8443/a.jpg?x=1#f"),
    ("http://a@b@example.com/", "http://example.com/"),
    ("HTTP://u:p@example.com/a@b.jpg?to=c@d", "HTTP://example.com/a@b.jpg?to=c@d"),
    ("http://example.com/a@b.jpg", "http://example.com/a@b.jpg"),
    ("http://example.com/?u=http://x:y@z/", "http://example.com/?u=http://x:y@z/"),
    ("  http://u:p@example.com/caf\u00e9 1.jpg", "  http://example.com/caf\u00e9 1.jpg"),
])
def test_strip_credentials(url, clean):
    assert strip_credentials(url) == clean


@pytest.mark.quick
def test_prefilter_refuses_private_literals_only():
    image, none = ImageConfig(), FilterConfig()
    for url in ("http://127.0.0.1:8/x.jpg", "http://[::1]/x", "https://10.1.2.3/x", "http://2130706433/",
                "http://169.254.169.254/latest/meta-data/", "http://[::ffff:192.168.0.1]/", "http://0/"):
        assert prefilter({"url": url}, image, none)[0] == O.BLOCKED_ADDRESS, url
        assert prefilter({"url": url}, image, none, allow_private_network=True) is None, url
    for url in ("http://8.8.8.8/x.jpg", "http://example.com/x.jpg", "http://localhost/x.jpg"):
        assert prefilter({"url": url}, image, none) is None, url  # names are judged after DNS, by fetch
    assert prefilter({"url": "ftp://127.0.0.1/x"}, image, none)[0] == O.INVALID_URL
    assert prefilter({"url": "http://[::1/x"}, image, none)[0] == O.INVALID_URL


# --- through a real server ------------------------------------------------------------------------

class FakeDNS(AbstractResolver):
    """Test names with fixed answers; every other name through the system resolver."""

    NAMES = {"public.test": ["127.0.0.1"], "private.test": ["127.0.0.2"],
             "mixed.test": ["127.0.0.1", "127.0.0.2"], "mixed-private-first.test": ["127.0.0.2", "127.0.0.1"]}

    def __init__(self):
        self.system = ThreadedResolver()

    async def resolve(self, host, port=0, family=socket.AF_INET):
        if host not in self.NAMES:
            return await self.system.resolve(host, port, family)
        return [{"hostname": host, "host": a, "port": port, "family": socket.AF_INET, "proto": 0,
                 "flags": socket.AI_NUMERICHOST} for a in self.NAMES[host]]

    async def close(self):
        pass


def loopback_one_is_public(address: str) -> bool:
    """The rule with 127.0.0.1 standing in for a public address (127.0.0.2, ::1 stay private)."""
    return address == "127.0.0.1" or is_public(address)


def app(log: list) -> web.Application:
    """/ok serves an image; /redirect?to=URL redirects. Every request is logged with its headers."""

    @web.middleware
    async def record(request, handler):
        log.append((request.host, request.path, request.headers.get("Authorization")))
        return await handler(request)

    async def ok(request):
        return web.Response(body=BODY, content_type="image/jpeg")

    async def redirect(request):
        raise web.HTTPFound(request.query["to"])

    application = web.Application(middlewares=[record])
    application.add_routes([web.get("/ok", ok), web.get("/redirect", redirect)])
    return application


async def serve(log: list, ssl_context=None):
    """The app on 127.0.0.1, 127.0.0.2 and ::1 (if present), one port; returns (runner, port)."""
    runner = web.AppRunner(app(log), access_log=None)
    await runner.setup()
    first = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context)
    await first.start()
    port = first._server.sockets[0].getsockname()[1]
    for host in ["127.0.0.2"] + (["::1"] if IPV6 else []):
        await web.TCPSite(runner, host, port, ssl_context=ssl_context).start()
    return runner, port


def get(url: str, cfg: FetchConfig = STRICT, inject: bool = False, ssl_context=None):
    """Serve, fetch one URL (PORT replaced), stop; returns (FetchResult, request log)."""
    log: list = []

    async def main():
        runner, port = await serve(log, ssl_context)
        extra = {"allowed": loopback_one_is_public, "resolver": FakeDNS()} if inject else {}
        try:
            async with make_session(cfg, **extra) as session:
                return await fetch(session, url.replace("PORT", str(port)), cfg)
        finally:
            await runner.cleanup()

    return asyncio.run(main()), log


V6 = pytest.mark.skipif(not IPV6, reason="no IPv6 loopback")
# (host, reachable): reachable ones must reach the server with --allow-private-network.
PRIVATE_HOSTS = [
    ("127.0.0.1", True), ("127.0.0.2", True), ("localhost", True), ("LocalHost", True), ("0.0.0.0", True),
    ("0x7f.1", True), ("2130706433", False), ("017700000001", False), ("127.1", False),
    pytest.param("[::1]", True, marks=V6), pytest.param("[::ffff:127.0.0.1]", True, marks=V6),
    ("10.0.0.1", False), ("169.254.169.254", False), ("[fe80::1%25lo]", False), ("[64:ff9b::7f00:1]", False),
    # more spellings of loopback and of "any": hex, octal, short, IPv4-mapped hex, unspecified, and
    # fullwidth digits or ideographic dots that IDNA folds into 127.0.0.1
    ("0x7f000001", False), ("0177.0.0.1", False), ("127.0.0.0x1", False), ("0", False), ("[::]", False),
    ("[::ffff:7f00:1]", False), ("[0:0:0:0:0:ffff:127.0.0.1]", False), ("[::127.0.0.1]", False),
    ("\uff11\uff12\uff17.\uff10.\uff10.\uff11", False), ("127\u30020\u30020\u30021", False),
]


@pytest.mark.quick
@pytest.mark.parametrize("host,reachable", PRIVATE_HOSTS)
def test_private_hosts_are_refused_without_a_request(host, reachable):
    r, log = get(f"http://{host}:PORT/ok")
    assert (r.outcome, r.attempts, log) == (O.BLOCKED_ADDRESS, 1, []), r.reason
    assert "not a public address" in r.reason and "--allow-private-network" in r.reason
    if reachable:  # the same URL does reach the server when the flag allows it
        r, log = get(f"http://{host}:PORT/ok", OPEN)
        assert r.body == BODY and len(log) == 1


@pytest.mark.quick
def test_injected_resolver_and_rule_reach_the_server():
    r, log = get("http://public.test:PORT/ok", inject=True)
    assert r.body == BODY and [p for _, p, _ in log] == ["/ok"]
    r, log = get("http://private.test:PORT/ok", inject=True)
    assert (r.outcome, log) == (O.BLOCKED_ADDRESS, []) and "127.0.0.2" in r.reason


@pytest.mark.quick
@pytest.mark.parametrize("target", [
    # Not localhost or 2130706433: the injected rule calls 127.0.0.1 public (both are refused above).
    "http://127.0.0.2:PORT/ok", "http://private.test:PORT/ok", "http://mixed.test:PORT/ok",
    "http://2130706434:PORT/ok", "http://0.0.0.0:PORT/ok",
    pytest.param("http://[::1]:PORT/ok", marks=V6), "http://169.254.169.254/latest/meta-data/",
])
def test_redirect_from_a_public_host_to_a_private_one_is_refused(target):
    url = f"http://public.test:PORT/redirect?to={quote(target, safe=':/')}"
    r, log = get(url, inject=True)
    assert r.outcome == O.BLOCKED_ADDRESS and r.attempts == 1, r.reason
    assert [p for _, p, _ in log] == ["/redirect"]  # the first hop only


@pytest.mark.quick
def test_redirect_control_the_second_hop_is_requested_when_allowed():
    url = f"http://public.test:PORT/redirect?to={quote('http://127.0.0.2:PORT/ok', safe=':/')}"
    r, log = get(url, OPEN, inject=True)
    assert r.body == BODY and [(h.split(':')[0], p) for h, p, _ in log] == [("public.test", "/redirect"),
                                                                           ("127.0.0.2", "/ok")]
    r, log = get(f"http://public.test:PORT/redirect?to={quote('http://public.test:PORT/ok', safe=':/')}",
                 inject=True)
    assert r.body == BODY and len(log) == 2


@pytest.mark.quick
@pytest.mark.parametrize("name", ["mixed.test", "mixed-private-first.test"])
def test_a_name_with_any_private_address_is_refused(name):
    r, log = get(f"http://{name}:PORT/ok", inject=True)
    assert (r.outcome, log) == (O.BLOCKED_ADDRESS, []) and "127.0.0.2" in r.reason


@pytest.mark.quick
def test_credentials_are_never_sent():
    r, log = get("http://user:secret@127.0.0.1:PORT/ok", OPEN)
    assert r.body == BODY and [(p, a) for _, p, a in log] == [("/ok", None)]
    hop = quote("http://u:p@127.0.0.1:PORT/ok", safe=":/")
    r, log = get(f"http://127.0.0.1:PORT/redirect?to={hop}", OPEN)
    assert r.body == BODY and [a for _, _, a in log] == [None, None]


@pytest.mark.quick
def test_a_certificate_failure_is_a_tls_connection_error_not_retried():
    import ssl

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(CERT)
    r, log = get("https://127.0.0.1:PORT/ok", OPEN, ssl_context=context)
    assert r.outcome == O.CONNECTION_ERROR and r.reason.startswith("TLS:") and r.attempts == 1, r.reason
    assert log == []


# --- the engine, end to end ----------------------------------------------------------------------

@pytest.mark.slow
def test_cli_without_the_flag_refuses_the_loopback_corpus(corpus, tmp_path):
    """Every row with a valid URL ends blocked_address, the server sees nothing, counts add up."""
    rows = pq.read_table(corpus.parquet, columns=["expected_outcome"]).column(0).to_pylist()
    before = sum(corpus.hits.values())
    res = subprocess.run([sys.executable, "-m", "engine", "shards", str(corpus.parquet), "--output",
                          str(tmp_path / "out"), "--runner", "local", "--workers", "1", "--shard-size", "16",
                          "--no-progress"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "--allow-private-network" in res.stderr
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    expected = {O.INVALID_URL: rows.count(O.INVALID_URL),
                O.BLOCKED_ADDRESS: len(rows) - rows.count(O.INVALID_URL)}
    assert stats["outcomes"] == expected and stats["rows"] == len(rows) == sum(expected.values())
    assert sum(corpus.hits.values()) == before


@pytest.mark.slow
def test_credentials_are_not_stored(corpus, tmp_path):
    """A URL with user:password@ is fetched without them; parquet and KEY.json hold it without."""
    from engine.pipeline import run

    table = pq.read_table(corpus.parquet, columns=["URL", "expected_outcome"]).to_pylist()
    url = next(r["URL"] for r in table if r["expected_outcome"] == O.OK)
    secret = url.replace("http://", "http://user:hunter2@", 1)
    pq.write_table(pa.table({"URL": [secret], "TEXT": ["a photo"]}), tmp_path / "in.parquet")
    out = tmp_path / "out"
    cfg = EngineConfig(inputs=(str(tmp_path / "in.parquet"),), output=str(out), shard_size=4, workers=1,
                       runner="local", progress=False, fetch=OPEN)
    assert run(cfg)["outcomes"] == {O.OK: 1}
    assert run_rows(out).column("url").to_pylist() == [url]
    with tarfile.open(out / "00000.tar") as tar:
        meta = json.load(tar.extractfile(next(m for m in tar.getmembers() if m.name.endswith(".json"))))
    assert meta["url"] == url
    assert not [p for p in out.iterdir() if p.is_file() and b"hunter2" in p.read_bytes()]
