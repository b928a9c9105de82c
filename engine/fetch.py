"""Fetch: URLs -> response bodies with aiohttp, every failure named by an outcome.

Only this module knows about aiohttp. One session per shard task; the caller bounds concurrency
(and therefore the number of bodies in memory) with a semaphore around `fetch`.
The session enforces the network policy (engine/netpolicy.py) at connection time: see `make_session`.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.resolver import DefaultResolver

from . import outcomes as O
from .config import FetchConfig
from .netpolicy import Allowed, is_public, refused_host, strip_credentials
from .storefail import one_line

OPTOUT_DIRECTIVES = {"noai", "noimageai"}
RETRY_STATUSES = {408, 425, 429, 500, 502, 503, 504, 520, 521, 522, 523, 524}
CHUNK = 256 * 1024
SCHEMES = ("http", "https")
# The codings asked for (Accept-Encoding) are the ones _Decoder undoes; aiohttp's own decoding is off.
ACCEPT_ENCODING = "gzip, deflate"
GZIP, DEFLATE, IDENTITY = ("gzip", "x-gzip"), ("deflate",), ("", "identity")
MAX_MEMBERS = 1024  # concatenated gzip/deflate streams in one body (aiohttp's cap); each costs a decompressor


@dataclass
class FetchResult:
    """A body, or the outcome and reason that explain why there is none."""

    url: str
    body: bytes | None = None
    outcome: str | None = None
    reason: str = ""
    status: int | None = None
    final_url: str | None = None
    attempts: int = 0
    seconds: float = 0.0
    encoding: str = ""
    """A Content-Encoding the body came with and still has (br, zstd, a list of codings: never asked for), named
    when the body then fails to decode."""


class _Failure(Exception):
    """A failed attempt: `outcome` names it, `retry` says whether another attempt may help."""

    def __init__(self, outcome: str, reason: str, retry: bool = False, status: int | None = None):
        super().__init__(reason)
        self.outcome, self.reason, self.retry, self.status = outcome, reason, retry, status


class BlockedAddress(Exception):
    """A host the network policy refuses; raised before any byte is sent to it."""


class GuardedResolver(AbstractResolver):
    """DNS through `inner`, refusing a host when ANY of its addresses fails `allowed`.

    aiohttp connects only to the addresses its resolver returns, so the addresses checked are the
    ones connected to: a name cannot be re-pointed (DNS rebinding) between check and connect.
    A host with one private address among public ones is refused whole, not filtered: its owner
    points it at a private network, which is reason enough not to trust it.
    """

    def __init__(self, allowed: Allowed, inner: AbstractResolver | None = None):
        self.allowed, self.inner = allowed, inner or DefaultResolver()

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        """The inner resolver's answer, or BlockedAddress naming the first refused address."""
        found = await self.inner.resolve(host, port, family)
        refused = [r["host"] for r in found if not self.allowed(r["host"])]
        if refused:
            raise BlockedAddress(f"{host} resolves to {refused[0]}, not a public address "
                                 "(--allow-private-network fetches it)")
        return found

    async def close(self) -> None:
        """Close the inner resolver."""
        await self.inner.close()


def literal_guard(allowed: Allowed):
    """Client middleware refusing IP-literal hosts (aiohttp never asks the resolver about those)."""

    async def guard(request: aiohttp.ClientRequest, handler):
        reason = refused_host(request.url.host, allowed)
        if reason:
            raise BlockedAddress(reason)
        return await handler(request)

    return guard


def make_session(cfg: FetchConfig, allowed: Allowed | None = None,
                 resolver: AbstractResolver | None = None) -> aiohttp.ClientSession:
    """One session per shard task: pooled connections, our User-Agent, transparent gzip, and the
    network policy on every request and redirect hop (names via the resolver, IP literals via a
    middleware) unless cfg.allow_private_network. `allowed` (default: public addresses only) and
    `resolver` (default: aiohttp's) let a test stand in for the address rule and for DNS."""
    if not cfg.allow_private_network:
        allowed = allowed or is_public
        resolver = GuardedResolver(allowed, resolver)
    connector = aiohttp.TCPConnector(limit=cfg.concurrency, ttl_dns_cache=300, enable_cleanup_closed=True,
                                     resolver=resolver)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=cfg.connect_timeout, sock_read=cfg.timeout)
    headers = {"User-Agent": cfg.user_agent, "Accept": "image/*,*/*;q=0.5", "Accept-Encoding": ACCEPT_ENCODING}
    # trust_env stays off: an HTTP(S)_PROXY from the environment would resolve hosts past the policy.
    # auto_decompress off: _read_body decodes, so --max-bytes bounds the wire bytes as well (see _Decoder).
    return aiohttp.ClientSession(connector=connector, timeout=timeout, headers=headers, trust_env=False,
                                 auto_decompress=False,
                                 middlewares=() if cfg.allow_private_network else (literal_guard(allowed),))


def opted_out(headers) -> str | None:
    """The X-Robots-Tag directive that forbids AI use of this image, if any."""
    for value in headers.getall("X-Robots-Tag", []):
        for token in value.split(","):
            # "otherbot: noai" limits a directive to a named agent; we honour it for every agent.
            directive = token.strip().lower().rsplit(":", 1)[-1].strip()
            if directive in OPTOUT_DIRECTIVES:
                return directive
    return None


def _bad_scheme(url: str) -> str | None:
    """The scheme of a URL that is not http(s) (file, data, ftp, ws, "" for none), or None."""
    scheme = urlsplit(url).scheme.lower()
    return None if scheme in SCHEMES else scheme


def _redirect_target(url: str, resp: aiohttp.ClientResponse, seen: set[str]) -> str:
    """The next hop of a redirect, checked for scheme and loops (its host is checked on connect)."""
    location = resp.headers.get("Location")
    if not location:
        raise _Failure(O.REDIRECT_ERROR, f"{resp.status} without Location")
    try:
        target = strip_credentials(urljoin(url, location))
        scheme = _bad_scheme(target)
    except ValueError as exc:  # e.g. an unclosed "[" of an IPv6 host: the redirect's fault, not the row's
        raise _Failure(O.REDIRECT_ERROR, f"bad redirect target: {exc}"[:200]) from None
    if scheme is not None:
        raise _Failure(O.REDIRECT_ERROR, f"redirect to {scheme or 'relative'}: scheme")
    if target in seen:
        raise _Failure(O.REDIRECT_ERROR, "redirect loop")
    return target


class _Decoder:
    """A body's Content-Encoding undone within --max-bytes: gzip (concatenated members too), deflate
    (zlib-wrapped or raw), or none. Other codings (br, zstd: never asked for) and lists of codings are
    left as they came, as aiohttp leaves unknown ones: the decode stage names what the bytes are, and the
    row's reason the coding (FetchResult.encoding).

    aiohttp's decoding is off (make_session): it decodes inside the connection, so --max-bytes could
    only count its output. A compressed stream that decodes to nothing (empty deflate blocks) was then
    read for the whole timeout, every attempt (1.8 GB in 3 s on loopback), and aiohttp before 3.13.3
    held the whole output of one network read of a gzip bomb in memory. Here zlib is asked for at
    most the bytes left in the budget, and _read_body counts the bytes read off the wire.
    """

    def __init__(self, coding: str | None, max_bytes: int):
        self.coding = (coding or "").strip().lower()
        self.max_bytes, self.left, self.members = max_bytes, max_bytes, 0
        self.inflate = None
        self.undone = "" if self.coding in GZIP + DEFLATE + IDENTITY else self.coding[:40]

    def _take(self, piece: bytes) -> bytes:
        """`piece` counted against the budget; TOO_LARGE once the decoded body is over it."""
        self.left -= len(piece)
        if self.left < 0:
            raise _Failure(O.TOO_LARGE, f"body decodes to over {self.max_bytes} bytes")
        return piece

    def _start(self, data: bytes):
        """A decompressor for the member (stream) that `data` begins: gzip, zlib-wrapped deflate, or raw
        deflate as some servers send it (aiohttp's rule: a zlib header's first byte has low nibble 8)."""
        self.members += 1
        if self.members > MAX_MEMBERS:
            raise _Failure(O.INCOMPLETE_BODY, f"Content-Encoding {self.coding}: over {MAX_MEMBERS} streams", True)
        wbits = 31 if self.coding in GZIP else (15 if data[0] & 0x0F == 8 else -15)
        return zlib.decompressobj(wbits)

    def feed(self, data: bytes) -> bytes:
        """The decoded bytes of the next piece of the body, produced CHUNK bytes at a time (one large
        call would build its output twice over: 63 MiB of RSS for a 32 MiB budget)."""
        if self.coding not in GZIP + DEFLATE:
            return self._take(data)
        out = []
        while data or self.inflate is not None:  # each turn: CHUNK bytes out, a member ended, or all input taken
            if self.inflate is None:
                self.inflate = self._start(data)
            cap = min(self.left + 1, CHUNK)  # one byte past the budget is enough to know it is over
            try:
                piece = self.inflate.decompress(data, cap)
            except zlib.error as exc:
                raise _Failure(O.INCOMPLETE_BODY, f"Content-Encoding {self.coding}: corrupt data ({exc})"[:200],
                               True) from None
            out.append(self._take(piece))
            if self.inflate.eof:  # what follows is the next member, as aiohttp reads it
                data, self.inflate = self.inflate.unused_data, None
                continue
            data = self.inflate.unconsumed_tail
            if not data and len(piece) < cap:  # all input taken and no output held back: wait for more
                break
        return b"".join(out)

    def finish(self) -> None:
        """INCOMPLETE_BODY if the body ended inside a gzip/deflate stream: its framing (Content-Length, the
        last chunk, the close) was complete, yet the stream's own end (and checksum) never came, so what was
        decoded is a prefix of the image, not the image. aiohttp checks this for deflate only, not gzip."""
        if self.inflate is not None:
            raise _Failure(O.INCOMPLETE_BODY, f"Content-Encoding {self.coding}: stream cut short before its end marker", True)


async def _read_body(resp: aiohttp.ClientResponse, max_bytes: int) -> tuple[bytes, str]:
    """The whole body, decoded, refused early once it is known or seen to exceed `max_bytes`: the bytes
    on the wire and the bytes they decode to are each held to it. With it, the coding left undone ("" if none)."""
    declared = resp.content_length
    if declared is not None and declared > max_bytes:
        raise _Failure(O.TOO_LARGE, f"Content-Length {declared} > {max_bytes}")
    decoder = _Decoder(resp.headers.get("Content-Encoding"), max_bytes)
    parts, size = [], 0
    with _refusal_ends_body(resp):
        async for chunk in resp.content.iter_chunked(CHUNK):
            size += len(chunk)
            if size > max_bytes:
                raise _Failure(O.TOO_LARGE, f"body over {max_bytes} bytes")
            parts.append(decoder.feed(chunk))
    decoder.finish()
    return b"".join(parts), decoder.undone


@contextmanager
def _refusal_ends_body(resp: aiohttp.ClientResponse):
    """While the body is read, a parser refusal on its connection ends the read at once.

    aiohttp's C parser, refusing bytes after the body began (a bad chunk size after a good chunk),
    closes the connection and files the error on the connection, never on the body, so the read
    waited for --timeout and the row ended as a timeout. When that connection closes, the refusal
    is passed to the body. One callback per response, removed after, so the read loop pays nothing."""
    protocol = resp.connection.protocol if resp.connection is not None else None
    closed = getattr(protocol, "closed", None)  # made on first use: from here on, its end must be retrieved
    if not isinstance(closed, asyncio.Future):
        yield
        return

    def forward(_closed: asyncio.Future) -> None:
        refusal = protocol.exception()
        if isinstance(refusal, HttpProcessingError) and not resp.content.is_eof():
            resp.content.set_exception(_Failure(O.CONNECTION_ERROR, _malformed(refusal), True))

    closed.remove_done_callback(_retrieved)  # one per connection, however many responses it carries
    closed.add_done_callback(_retrieved)
    closed.add_done_callback(forward)
    try:
        yield
    finally:
        closed.remove_done_callback(forward)


def _retrieved(closed: asyncio.Future) -> None:
    """Take a closed connection's error: a reset, during a read (the read names it) or later in the pool
    (nobody's failure), is not for asyncio to log as "Future exception was never retrieved"."""
    if not closed.cancelled():
        closed.exception()


async def _open(session: aiohttp.ClientSession, url: str, redirected: bool) -> aiohttp.ClientResponse:
    """GET `url` without aiohttp's redirects. A redirect target aiohttp cannot request (port 99999,
    a host IDNA refuses) is the redirect's fault, not an invalid URL in the row."""
    try:
        return await session.get(url, allow_redirects=False)
    except Exception as exc:
        failure = _classify(exc)
        if redirected and failure.outcome == O.INVALID_URL:
            raise _Failure(O.REDIRECT_ERROR, f"bad redirect target: {failure.reason}"[:200]) from exc
        raise


async def _attempt(session: aiohttp.ClientSession, url: str, cfg: FetchConfig) -> tuple[bytes, str, int, str]:
    """One attempt, following redirects by hand so every hop's scheme is checked: (body, coding left undone,
    status, final url)."""
    scheme = _bad_scheme(url)
    if scheme is not None:  # aiohttp calls file:, data:, ftp: connection errors (retried) and fetches ws: as http
        raise _Failure(O.INVALID_URL, f"unsupported scheme {scheme!r}" if scheme else "not an absolute url")
    seen = {url}
    for hop in range(cfg.max_redirects + 1):
        async with await _open(session, url, redirected=hop > 0) as resp:
            if resp.status in (301, 302, 303, 307, 308):
                url = _redirect_target(url, resp, seen)
                seen.add(url)
                continue
            if resp.status >= 400:
                raise _Failure(O.HTTP_ERROR, f"HTTP {resp.status}", resp.status in RETRY_STATUSES, resp.status)
            if resp.status != 200:
                raise _Failure(O.HTTP_ERROR, f"HTTP {resp.status}", False, resp.status)
            directive = opted_out(resp.headers) if cfg.respect_optout else None
            if directive:
                raise _Failure(O.OPTED_OUT, f"X-Robots-Tag {directive}", False, resp.status)
            return *await _read_body(resp, cfg.max_bytes), resp.status, url
    raise _Failure(O.REDIRECT_ERROR, f"more than {cfg.max_redirects} redirects")


def _cause(exc: BaseException, kind: type) -> BaseException | None:
    """The first exception of `kind` in the exception's cause chain, or None."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, kind):
            return exc
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def _caused_by(exc: BaseException, kind: type) -> bool:
    """Whether `kind` is anywhere in the exception's cause chain."""
    return _cause(exc, kind) is not None


def _classify(exc: BaseException) -> _Failure:
    """Map a library exception to an outcome; the retry flag marks transient ones."""
    if isinstance(exc, _Failure):
        return exc
    blocked = _cause(exc, BlockedAddress)
    if blocked is not None:  # never retried: no request was sent, and the answer will not change
        return _Failure(O.BLOCKED_ADDRESS, str(blocked)[:200])
    if isinstance(exc, (asyncio.TimeoutError, aiohttp.ServerTimeoutError)):
        return _Failure(O.TIMEOUT, "timed out", True)
    if isinstance(exc, aiohttp.ClientPayloadError):
        # A reset (RST) mid-body is a connection failure; a clean close short of the
        # Content-Length is a body that lied about its size.
        if _caused_by(exc, ConnectionResetError) or "ConnectionResetError" in str(exc):
            return _Failure(O.CONNECTION_ERROR, f"connection reset mid-body: {exc}"[:200], True)
        short = _cause(exc, HttpProcessingError)  # its message, without aiohttp's "400" around it
        return _Failure(O.INCOMPLETE_BODY, f"body cut short: {_parser_words(short) if short else exc}"[:200], True)
    if isinstance(exc, (aiohttp.ClientSSLError, ssl.SSLError)):
        # Before the ValueError branch: a certificate error is a ValueError too, yet says nothing
        # about the URL. A certificate that fails verification stays failed; other TLS errors may pass.
        certificate = isinstance(exc, (aiohttp.ClientConnectorCertificateError, ssl.CertificateError))
        return _Failure(O.CONNECTION_ERROR, f"TLS: {type(exc).__name__}: {exc}"[:200], not certificate)
    if isinstance(exc, (aiohttp.InvalidURL, UnicodeError, ValueError)):
        return _Failure(O.INVALID_URL, f"{type(exc).__name__}: {exc}"[:200])
    parse = _cause(exc, HttpProcessingError)
    if isinstance(exc, (aiohttp.ClientResponseError, HttpProcessingError)) and parse is not None:
        # aiohttp's parser refused the response and says "400" (its own code, not the server's status);
        # a fresh connection sometimes helps, so it is retried like any broken connection. The pure-Python
        # parser (no C extension) raises its refusal of a body's framing bare, out of the body read.
        return _Failure(O.CONNECTION_ERROR, _malformed(parse), True)
    if isinstance(exc, (aiohttp.ClientError, OSError)):
        return _Failure(O.CONNECTION_ERROR, f"{type(exc).__name__}: {exc}"[:200], True)
    return _Failure(O.ERROR, f"{type(exc).__name__}: {exc}"[:200])


def _malformed(err: HttpProcessingError) -> str:
    """The reason for a response aiohttp's parser refused."""
    return f"malformed HTTP response: {_parser_words(err)}"[:200]


def _parser_words(err: HttpProcessingError) -> str:
    """aiohttp's parser message (what it expected, the bytes, a caret under them) on one line, caret dropped."""
    return one_line(err.message).removesuffix(" ^")


def _backoff(cfg: FetchConfig, attempt: int) -> float:
    """Seconds to wait before retry number `attempt` (1-based): exponential, capped."""
    return min(cfg.backoff * (2 ** (attempt - 1)), 30.0)


def _record(result: FetchResult, failure: _Failure) -> bool:
    """Put the failure's outcome into `result`; whether another attempt may help (a function of its
    own, so no local of fetch() holds the exception)."""
    result.outcome, result.reason, result.status = failure.outcome, failure.reason, failure.status
    return failure.retry


def _drop_tracebacks(exc: BaseException | None) -> None:
    """Forget the tracebacks of a handled failure and of its causes: only its text is kept. They hold
    frames in reference cycles (the frame that keeps the exception, asyncio.wait_for's task holding
    it), and through those frames the shard being downloaded, which then outlived its run until
    Python's rare full collection: a worker's memory crept from shard to shard (issue 10)."""
    for _ in range(10):
        if exc is None:
            return
        exc.__traceback__ = None
        exc = exc.__cause__ or exc.__context__


async def fetch(session: aiohttp.ClientSession, url: str, cfg: FetchConfig) -> FetchResult:
    """Download one URL with retries; never raises (cancellation aside)."""
    start = time.monotonic()
    url = strip_credentials(url)
    result = FetchResult(url=url)
    for attempt in range(1, cfg.retries + 2):
        result.attempts = attempt
        try:
            body, coding, status, final = await asyncio.wait_for(_attempt(session, url, cfg), cfg.timeout)
            result.body, result.encoding, result.status, result.final_url = body, coding, status, final
            result.outcome, result.reason = None, ""
            break
        except Exception as exc:  # noqa: BLE001 -- every failure becomes an outcome, by design
            retry = _record(result, _classify(exc))
            _drop_tracebacks(exc)
            if not retry or attempt > cfg.retries:
                break
            await asyncio.sleep(_backoff(cfg, attempt))
    result.seconds = time.monotonic() - start
    return result
