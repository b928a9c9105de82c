"""The corpus's loopback server: the files, and every bad HTTP behaviour on a route of its own."""

from __future__ import annotations

import asyncio
import collections
import gzip
import signal
import socket
import struct
import threading
import zlib
from pathlib import Path

from aiohttp import web

CONTENT_TYPES = {".jpg": "image/jpeg", ".png": "image/png", ".webp": "image/webp", ".gif": "image/gif"}

HTML_BODY = b"<!DOCTYPE html><html><head><title>Not Found</title></head><body><h1>404</h1></body></html>\n"
SVG_BODY = (b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="800" height="600">'
            b'<rect width="800" height="600" fill="red"/></svg>\n')
TEXT_BODY = b"This image is no longer available.\n"
BODIES = {"html": HTML_BODY, "svg": SVG_BODY, "empty": b"", "text": TEXT_BODY}
DRIP_CLAIMED_BYTES = 100_000
LIE_EXTRA_BYTES = 50_000
CHUNK = 1 << 20


class _Handlers:
    """Route handlers; hold the corpus folder, per-path hit counters and the stop flag."""

    def __init__(self, root: Path):
        self.root = root
        self.hits: collections.Counter[str] = collections.Counter()
        self.stopping = asyncio.Event()

    def _file(self, name: str) -> Path:
        """A file under root/files, refusing paths that escape it."""
        base = (self.root / "files").resolve()
        path = (base / name).resolve()
        if base not in path.parents or not path.is_file():
            raise web.HTTPNotFound()
        return path

    async def _pause(self, seconds: float) -> bool:
        """Sleep unless the server stops first; True when stopping."""
        try:
            await asyncio.wait_for(self.stopping.wait(), seconds)
            return True
        except asyncio.TimeoutError:
            return False

    @staticmethod
    def _gone(request: web.Request) -> bool:
        """Whether the client has already gone away."""
        return request.transport is None or request.transport.is_closing()

    async def serve_file(self, request: web.Request) -> web.StreamResponse:
        """GET /files/{name}[?type=CT]: the file, with a Content-Type from its extension or ?type."""
        path = self._file(request.match_info["name"])
        ctype = request.query.get("type") or CONTENT_TYPES.get(path.suffix.lower(), "application/octet-stream")
        return web.FileResponse(path, headers={"Content-Type": ctype})

    async def status(self, request: web.Request) -> web.Response:
        """GET /status/{code}/{tag}: that status, every time."""
        code = int(request.match_info["code"])
        headers = {"Retry-After": "1"} if code in (429, 503) else None
        return web.Response(status=code, text=f"status {code}\n", headers=headers)

    async def flaky(self, request: web.Request) -> web.StreamResponse:
        """GET /flaky/{code}/{times}/{name}: `code` for the first `times` requests of this path, then the file."""
        if self.hits[request.path] <= int(request.match_info["times"]):
            return await self.status(request)
        return await self.serve_file(request)

    async def _partial_then(self, request: web.Request, path: Path, reset: bool) -> web.StreamResponse:
        """Send headers claiming more bytes than follow, part of the body, then close (RST if reset)."""
        data = path.read_bytes()
        resp = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
        resp.content_length = len(data) + (0 if reset else LIE_EXTRA_BYTES)
        await resp.prepare(request)
        try:
            await resp.write(data[: len(data) // 2] if reset else data)
            await asyncio.sleep(0.05)  # let the bytes leave before the close
        except ConnectionError:
            return resp
        transport = request.transport
        if transport is not None:
            if reset:
                sock = transport.get_extra_info("socket")
                if sock is not None:  # linger 0: close() sends RST instead of FIN
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                transport.abort()
            else:
                transport.close()
        return resp

    async def reset(self, request: web.Request) -> web.StreamResponse:
        """GET /reset/{name}: half the body, then a TCP reset, every time."""
        return await self._partial_then(request, self._file(request.match_info["name"]), reset=True)

    async def reset_once(self, request: web.Request) -> web.StreamResponse:
        """GET /reset_once/{name}: a reset mid-body on the first request of this path, then the file."""
        if self.hits[request.path] <= 1:
            return await self.reset(request)
        return await self.serve_file(request)

    async def lie(self, request: web.Request) -> web.StreamResponse:
        """GET /lie/{name}: Content-Length claims LIE_EXTRA_BYTES more than the file; close after it."""
        return await self._partial_then(request, self._file(request.match_info["name"]), reset=False)

    async def drip(self, request: web.Request) -> web.StreamResponse:
        """GET /drip/{tag}: a JPEG-looking body of DRIP_CLAIMED_BYTES, one byte per second."""
        resp = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
        resp.content_length = DRIP_CLAIMED_BYTES
        await resp.prepare(request)
        body = b"\xff\xd8\xff\xe0" + b"\x00" * (DRIP_CLAIMED_BYTES - 4)
        for i in range(DRIP_CLAIMED_BYTES):
            if self._gone(request):
                break
            try:
                await resp.write(body[i : i + 1])
            except ConnectionError:
                break
            if await self._pause(1.0):
                break
        return self._abort(request, resp)

    async def stall(self, request: web.Request) -> web.StreamResponse:
        """GET /stall/{tag}: accept the request and never answer (until the client or server gives up)."""
        while not self._gone(request) and not await self._pause(0.5):
            pass
        return self._abort(request, web.Response(status=504))

    @staticmethod
    def _abort(request: web.Request, resp: web.StreamResponse) -> web.StreamResponse:
        """Drop the connection of an unfinished response so aiohttp does not try to complete it."""
        if request.transport is not None:
            request.transport.abort()
        return resp

    async def big(self, request: web.Request) -> web.StreamResponse:
        """GET /big/{mib}/{tag}[?chunked=1]: `mib` MiB of JPEG-looking bytes, with or without Content-Length."""
        total = int(request.match_info["mib"]) << 20
        resp = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
        if request.query.get("chunked") == "1":
            resp.enable_chunked_encoding()
        else:
            resp.content_length = total
        await resp.prepare(request)
        first, zeros = b"\xff\xd8\xff\xe0" + bytes(CHUNK - 4), bytes(CHUNK)
        sent = 0
        try:
            while sent < total and not self.stopping.is_set() and not self._gone(request):
                part = (first if sent == 0 else zeros)[: min(CHUNK, total - sent)]
                await resp.write(part)
                sent += len(part)
        except ConnectionError:
            return resp
        if sent < total:
            return self._abort(request, resp)
        await resp.write_eof()
        return resp

    async def gzip_file(self, request: web.Request) -> web.Response:
        """GET /gzip/{name}: the file gzip-compressed, with Content-Encoding: gzip."""
        path = self._file(request.match_info["name"])
        body = gzip.compress(path.read_bytes(), mtime=0)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPES.get(path.suffix, "image/jpeg"),
                                                "Content-Encoding": "gzip"})

    async def brotli_unasked(self, request: web.Request) -> web.Response:
        """GET /br/{name}: the file compressed (raw deflate standing in for brotli, which the standard library
        lacks) with Content-Encoding: br, which no client here asks for: a misconfigured CDN's answer."""
        path = self._file(request.match_info["name"])
        packer = zlib.compressobj(6, zlib.DEFLATED, -15)
        body = packer.compress(path.read_bytes()) + packer.flush()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPES.get(path.suffix, "image/jpeg"),
                                                "Content-Encoding": "br"})

    async def redirect_loop(self, request: web.Request) -> web.Response:
        """GET /redirect/loop/{tag}/{0|1}: 0 -> 1 -> 0 -> ..."""
        step = 1 - int(request.match_info["step"])
        raise web.HTTPFound(f"/redirect/loop/{request.match_info['tag']}/{step}")

    async def redirect_chain(self, request: web.Request) -> web.Response:
        """GET /redirect/chain/{hops}/{name}: `hops` relative redirects, then /files/{name}."""
        hops, name = int(request.match_info["hops"]), request.match_info["name"]
        raise web.HTTPFound(f"/redirect/chain/{hops - 1}/{name}" if hops > 1 else f"/files/{name}")

    async def redirect_scheme(self, request: web.Request) -> web.Response:
        """GET /redirect/scheme/{ftp|file|javascript}/{tag}: a redirect to a non-http(s) URL."""
        target = {"ftp": "ftp://127.0.0.1/x.jpg", "file": "file:///etc/passwd",
                  "javascript": "javascript:alert(1)"}[request.match_info["scheme"]]
        return web.Response(status=302, headers={"Location": target})

    async def body(self, request: web.Request) -> web.Response:
        """GET /body/{html|svg|empty|text}/{tag}: that body, claiming to be image/jpeg."""
        kind = request.match_info["kind"]
        if kind not in BODIES:
            raise web.HTTPNotFound()
        return web.Response(body=BODIES[kind], headers={"Content-Type": "image/jpeg"})

    async def optout(self, request: web.Request) -> web.StreamResponse:
        """GET /optout/{directive}/{name}: the file with X-Robots-Tag: directive (commas get a space)."""
        resp = await self.serve_file(request)
        resp.headers["X-Robots-Tag"] = request.match_info["directive"].replace(",", ", ")
        return resp


def make_app(root: Path) -> tuple[web.Application, _Handlers]:
    """The aiohttp application with every route of the corpus."""
    h = _Handlers(root)

    @web.middleware
    async def count(request: web.Request, handler):
        h.hits[request.path] += 1
        return await handler(request)

    app = web.Application(middlewares=[count])
    app.add_routes([
        web.get("/files/{name:.+}", h.serve_file),
        web.get("/status/{code:\\d+}/{tag}", h.status),
        web.get("/flaky/{code:\\d+}/{times:\\d+}/{name:.+}", h.flaky),
        web.get("/reset/{name:.+}", h.reset),
        web.get("/reset_once/{name:.+}", h.reset_once),
        web.get("/lie/{name:.+}", h.lie),
        web.get("/drip/{tag}", h.drip),
        web.get("/stall/{tag}", h.stall),
        web.get("/big/{mib:\\d+}/{tag}", h.big),
        web.get("/gzip/{name:.+}", h.gzip_file),
        web.get("/br/{name:.+}", h.brotli_unasked),
        web.get("/redirect/loop/{tag}/{step:[01]}", h.redirect_loop),
        web.get("/redirect/chain/{hops:\\d+}/{name:.+}", h.redirect_chain),
        web.get("/redirect/scheme/{scheme:ftp|file|javascript}/{tag}", h.redirect_scheme),
        web.get("/body/{kind}/{tag}", h.body),
        web.get("/optout/{directive}/{name:.+}", h.optout),
    ])
    return app, h


class CorpusServer:
    """The corpus's aiohttp server on 127.0.0.1, in a background thread with its own event loop.

    `with CorpusServer(dir) as srv: ...srv.base_url...`; port 0 picks a free port. `hits` counts
    requests per path (a test can see retries). Stops within about a second, drips included.
    """

    def __init__(self, corpus_dir: str | Path | None = None, port: int = 0, host: str = "127.0.0.1",
                 reuse_port: bool = False):
        self.root = Path(corpus_dir) if corpus_dir is not None else Path(".")
        self.host, self.port = host, port
        self.reuse_port = reuse_port  # several server processes on one port (the benchmark's pool)
        self.parquet: Path | None = None  # set by serve_and_build
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._handlers: _Handlers | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def base_url(self) -> str:
        """http://127.0.0.1:PORT"""
        return f"http://{self.host}:{self.port}"

    @property
    def hits(self) -> collections.Counter:
        """Requests seen per URL path."""
        return self._handlers.hits if self._handlers else collections.Counter()

    def start(self) -> CorpusServer:
        """Start serving; returns once the socket listens (port resolved)."""
        self._thread = threading.Thread(target=self._run, name="corpus-server", daemon=True)
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None:
            raise RuntimeError(f"corpus server failed to start: {self._error!r}") from self._error
        return self

    def _run(self) -> None:
        """Thread body: set up the site, then run the loop until stop()."""
        loop = self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._setup())
        except BaseException as e:  # reported by start()
            self._error = e
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    async def _setup(self) -> None:
        """Bind the listening socket."""
        app, self._handlers = make_app(self.root)
        # shutdown_timeout: how long stop() lets handlers finish before cancelling them.
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True,
                           reuse_port=self.reuse_port or None)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]

    async def _shutdown(self) -> None:
        """Wake every waiting handler, then close the site and the connections."""
        self._handlers.stopping.set()
        await self._runner.cleanup()

    def stop(self) -> None:
        """Stop serving and join the thread (idempotent)."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            return
        fut = asyncio.run_coroutine_threadsafe(self._shutdown(), loop)
        try:
            fut.result(timeout=10)
        except Exception:  # a failed cleanup must not keep the thread alive
            pass
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        self._thread = None

    def __enter__(self) -> CorpusServer:
        return self if self._thread is not None else self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve_forever(directory: Path, port: int, reuse_port: bool = False) -> None:
    """Serve until Ctrl-C (or SIGTERM)."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with CorpusServer(directory, port=port, reuse_port=reuse_port) as srv:
        print(f"serving {directory} at {srv.base_url} (Ctrl-C stops)", flush=True)
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            print("stopping")
