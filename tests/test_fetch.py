"""engine/fetch.py against a real aiohttp server on 127.0.0.1, one behaviour per route."""

import asyncio
import gzip
import socket

import pytest
from aiohttp import web

from engine import outcomes as O
from engine.config import FetchConfig
from engine.fetch import fetch, make_session

pytestmark = pytest.mark.quick
BODY = b"\xff\xd8\xff" + bytes(range(256)) * 64 + b"\xff\xd9"
# The server is on loopback: these tests opt in to it (tests/test_netpolicy.py covers the default policy).
FAST = FetchConfig(timeout=1.5, connect_timeout=1.0, retries=2, backoff=0.01, max_bytes=64 * 1024,
                   allow_private_network=True)


def routes(hits: dict) -> web.Application:
    """Every behaviour fetch must name; `hits` counts requests per path."""

    async def counted(request):
        hits[request.path] = hits.get(request.path, 0) + 1
        return hits[request.path]

    async def ok(request):
        await counted(request)
        return web.Response(body=BODY, content_type="image/jpeg")

    async def flaky(request):  # 503 twice, then the image
        n = await counted(request)
        return web.Response(status=503) if n <= 2 else web.Response(body=BODY, content_type="image/jpeg")

    async def status(request):
        await counted(request)
        return web.Response(status=int(request.match_info["code"]), text="no")

    async def redirect(request):
        raise web.HTTPFound(request.query["to"])

    async def loop(request):
        raise web.HTTPFound("/loop")

    async def chain(request):
        n = int(request.match_info["n"])
        raise web.HTTPFound(f"/chain/{n - 1}" if n > 0 else "/ok")

    async def noai(request):
        return web.Response(body=BODY, headers={"X-Robots-Tag": request.query.get("tag", "noai")})

    async def big(request):
        resp = web.StreamResponse()
        await resp.prepare(request)
        for _ in range(64):
            await resp.write(b"\0" * 8192)
        return resp

    async def big_declared(request):
        return web.Response(body=b"\0" * (FAST.max_bytes + 1))

    async def gzipped(request):
        return web.Response(body=gzip.compress(BODY), headers={"Content-Encoding": "gzip",
                                                               "Content-Type": "image/jpeg"})

    async def drip(request):
        resp = web.StreamResponse(headers={"Content-Length": "1000"})
        await resp.prepare(request)
        for _ in range(1000):
            await resp.write(b"x")
            await asyncio.sleep(0.5)
        return resp

    async def liar(request):  # claims 10000 bytes, sends 100, closes
        hits[request.path] = hits.get(request.path, 0) + 1
        resp = web.StreamResponse(headers={"Content-Length": "10000"})
        await resp.prepare(request)
        await resp.write(b"y" * 100)
        request.transport.close()
        return resp

    app = web.Application()
    app.add_routes([web.get("/ok", ok), web.get("/flaky", flaky), web.get("/status/{code}", status),
                    web.get("/redirect", redirect), web.get("/loop", loop), web.get("/chain/{n}", chain),
                    web.get("/noai", noai), web.get("/big", big), web.get("/big_declared", big_declared),
                    web.get("/gzip", gzipped), web.get("/drip", drip), web.get("/liar", liar)])
    return app


def run(path: str, cfg: FetchConfig = FAST, hits: dict | None = None):
    """Start the server, fetch one path (or absolute URL), stop the server."""
    hits = {} if hits is None else hits

    async def main():
        runner = web.AppRunner(routes(hits))
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        url = path if path.startswith("http") else f"http://127.0.0.1:{port}{path}"
        try:
            async with make_session(cfg) as session:
                return await fetch(session, url.replace("PORT", str(port)), cfg)
        finally:
            await runner.cleanup()

    return asyncio.run(main())


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ok():
    r = run("/ok")
    assert r.outcome is None and r.body == BODY and r.status == 200 and r.attempts == 1


def test_transient_503_is_retried():
    hits = {}
    r = run("/flaky", hits=hits)
    assert r.outcome is None and r.body == BODY and hits["/flaky"] == 3


@pytest.mark.parametrize("code,attempts", [(404, 1), (403, 1), (500, 3), (429, 3)])
def test_http_errors(code, attempts):
    hits = {}
    r = run(f"/status/{code}", hits=hits)
    assert (r.outcome, r.status) == (O.HTTP_ERROR, code)
    assert hits[f"/status/{code}"] == attempts


def test_redirects():
    assert run("/chain/3").body == BODY
    assert run("/chain/9").outcome == O.REDIRECT_ERROR
    assert run("/loop").outcome == O.REDIRECT_ERROR
    for target in ("ftp://example.com/x.jpg", "file:///etc/passwd", "javascript:alert(1)"):
        r = run(f"/redirect?to={target}")
        assert r.outcome == O.REDIRECT_ERROR and "scheme" in r.reason


@pytest.mark.parametrize("tag,blocked", [("noai", True), ("noimageai", True), ("otherbot: noai", True),
                                         ("noindex, nofollow", False), ("NoAI", True)])
def test_optout(tag, blocked):
    r = run(f"/noai?tag={tag}")
    assert (r.outcome == O.OPTED_OUT) == blocked
    assert run(f"/noai?tag={tag}", FetchConfig(**{**FAST.__dict__, "respect_optout": False})).outcome is None


def test_byte_cap_streamed_and_declared():
    assert run("/big").outcome == O.TOO_LARGE
    assert run("/big_declared").outcome == O.TOO_LARGE


def test_gzip_is_decoded():
    assert run("/gzip").body == BODY


def test_drip_times_out_within_bound():
    cfg = FetchConfig(timeout=0.6, connect_timeout=0.5, retries=1, backoff=0.01, allow_private_network=True)
    r = run("/drip", cfg)
    assert r.outcome == O.TIMEOUT and r.attempts == 2 and r.seconds < 3


def test_lying_content_length():
    hits = {}
    r = run("/liar", hits=hits)
    assert r.outcome == O.INCOMPLETE_BODY and hits["/liar"] == 3


def test_connection_refused():
    r = run(f"http://127.0.0.1:{closed_port()}/x.jpg")
    assert r.outcome == O.CONNECTION_ERROR and r.attempts == 3


def test_url_with_scheme_in_query_and_non_ascii_path():
    assert run("/ok?u=http://example.com/a.jpg&w=1").body == BODY
    assert run("/status/404/caf%C3%A9").outcome in (O.HTTP_ERROR,)
