"""engine/fetch.py against hostile or broken HTTP: compression bombs, bad framing, slow servers, odd URLs
and bad redirect targets. A raw asyncio server on 127.0.0.1 sends what aiohttp's server cannot (bad
chunking, two Content-Lengths, HTTP/0.9 bodies, endless 1xx) and records every connection, so "nothing
was sent" is checked, not assumed. Each case must end as a named outcome within the per-attempt timeout.
"""

from __future__ import annotations

import asyncio
import gzip
import tracemalloc
import zlib
from collections.abc import Awaitable, Callable

import pytest
from aiohttp.http_exceptions import TransferEncodingError

from engine import outcomes as O
from engine.config import FetchConfig
from engine.fetch import _classify, fetch, make_session

from .test_netpolicy import FakeDNS, loopback_one_is_public

pytestmark = pytest.mark.quick
MAX = 256 * 1024
CFG = FetchConfig(timeout=1.0, connect_timeout=1.0, retries=0, backoff=0.01, max_bytes=MAX,
                  allow_private_network=True)
SLOW = FetchConfig(**{**CFG.__dict__, "timeout": 0.5})
STRICT = FetchConfig(**{**CFG.__dict__, "allow_private_network": False})
DECODED = 64 << 20  # what each bomb decodes to: 256 x the byte budget
Respond = Callable[[asyncio.StreamWriter, asyncio.Event], Awaitable[None]]


class Raw:
    """A raw HTTP/1.1 server: reads each request head, then lets `respond` write whatever it likes.
    `connections` counts the connections accepted, `heads` holds the request heads received."""

    def __init__(self, respond: Respond):
        self.respond, self.heads, self.writers, self.connections = respond, [], [], 0
        self.stop = asyncio.Event()  # set when the test ends: handlers that "never answer" wait on it

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One connection: record its request head, respond, close."""
        self.connections += 1
        self.writers.append(writer)
        try:
            self.heads.append(await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5))
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError, ConnectionError):
            writer.close()  # no request head (a TLS ClientHello has no blank line): the client left first
            return
        try:
            await self.respond(writer, self.stop)
        except ConnectionError:  # the client gave up first: what the slow and endless cases expect
            pass
        finally:
            writer.close()

    async def start(self) -> int:
        """Listen on 127.0.0.1; returns the port."""
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        """Wake waiting handlers and drop every connection."""
        self.stop.set()
        for writer in self.writers:
            writer.close()
        self.server.close()
        await asyncio.sleep(0)


def get(respond: Respond, url: str = "http://127.0.0.1:PORT/x", cfg: FetchConfig = CFG, inject: bool = False,
        measure: bool = False):
    """Serve `respond`, fetch `url` (PORT replaced) once; returns (FetchResult, the server (its heads and
    connections), peak bytes traced during the fetch when `measure`)."""

    async def main():
        raw = Raw(respond)
        port = await raw.start()
        extra = {"allowed": loopback_one_is_public, "resolver": FakeDNS()} if inject else {}
        try:
            if measure:
                tracemalloc.start()
            async with make_session(cfg, **extra) as session:
                result = await fetch(session, url.replace("PORT", str(port)), cfg)
            peak = tracemalloc.get_traced_memory()[1] if measure else 0
        finally:
            tracemalloc.stop()
            await raw.close()
        return result, raw, peak

    return asyncio.run(main())


def reply(data: bytes) -> Respond:
    """A responder that sends `data` and closes."""

    async def respond(writer, stop):
        writer.write(data)
        await writer.drain()

    return respond


def response(headers: list[bytes], body: bytes = b"", status: bytes = b"HTTP/1.1 200 OK") -> bytes:
    """A response's bytes, exactly as given (no header is added or checked)."""
    return status + b"\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n" + body


def compress(wbits: int, size: int) -> bytes:
    """`size` zero bytes compressed in the given zlib container (31 gzip, 15 zlib, -15 raw deflate)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, wbits)
    block = bytes(1 << 20)
    return b"".join(packer.compress(block) for _ in range(size >> 20)) + packer.flush()


# --- compression ------------------------------------------------------------------------------------

BOMBS = {
    "gzip": (b"gzip", lambda: compress(31, DECODED)),
    "deflate": (b"deflate", lambda: compress(15, DECODED)),
    "raw-deflate": (b"deflate", lambda: compress(-15, DECODED)),
    "gzip-members": (b"gzip", lambda: b"".join(gzip.compress(bytes(8 << 20)) for _ in range(DECODED >> 23))),
}


@pytest.mark.parametrize("kind", BOMBS)
@pytest.mark.parametrize("framing", ["length", "close"])
def test_compression_bomb_is_too_large_without_holding_the_decoded_body(kind, framing):
    """64 MiB of zeros in ~64 KB ends too_large while the traced memory of the fetch stays a few times
    the 256 KiB budget (0.7 MiB here; 64 MiB if decoded whole): the decoded body is never held, and neither is the output of one network read."""
    coding, make = BOMBS[kind]
    body = make()
    assert len(body) < MAX  # on the wire it is small: only decoding shows the size
    framing_header = b"Content-Length: %d" % len(body) if framing == "length" else b"Connection: close"
    r, _, peak = get(reply(response([b"Content-Encoding: " + coding, framing_header], body)), measure=True)
    assert peak < 8 * MAX, f"{peak / 2**20:.1f} MiB traced for a {MAX >> 10} KiB budget"
    assert (r.outcome, r.attempts, r.body) == (O.TOO_LARGE, 1, None), r.reason
    assert "decodes to over" in r.reason


@pytest.mark.parametrize("coding,start", [(b"deflate", b"\x78\x9c"), (b"gzip", b"\x1f\x8b\x08" + bytes(7))])
def test_compressed_stream_that_decodes_to_nothing_is_cut_at_the_byte_budget(coding, start):
    """Empty stored deflate blocks, sent without end, decode to nothing: the bytes on the wire are held
    to --max-bytes too (they were read until the timeout, every attempt: 1.8 GB in 3 s on loopback)."""
    sent = [0]

    async def endless(writer, stop):
        writer.write(response([b"Content-Encoding: " + coding, b"Connection: close"], start))
        empty = b"\x00\x00\x00\xff\xff" * 20000  # 100 KB of non-final stored blocks of length 0
        while not stop.is_set() and sent[0] < 1 << 30:  # 1 GiB: the cap if the client never stops
            writer.write(empty)
            await writer.drain()
            sent[0] += len(empty)

    r, _, _ = get(endless, cfg=FetchConfig(**{**CFG.__dict__, "timeout": 5.0}))
    assert (r.outcome, r.reason, r.attempts) == (O.TOO_LARGE, f"body over {MAX} bytes", 1)


@pytest.mark.parametrize("coding", [b"gzip", b"deflate", b"x-gzip"])
def test_small_compressed_bodies_are_decoded(coding):
    """gzip (and the x-gzip alias), zlib-wrapped deflate, all within the budget: the original bytes."""
    data = bytes(range(256)) * 100
    body = gzip.compress(data) if b"gzip" in coding else zlib.compress(data)
    r, raw, _ = get(reply(response([b"Content-Encoding: " + coding, b"Content-Length: %d" % len(body)], body)))
    assert r.outcome is None and r.body == data and r.encoding == ""
    assert b"accept-encoding: gzip, deflate\r\n" in raw.heads[0].lower()  # only what is decoded is asked for


@pytest.mark.parametrize("coding", [b"br", b"zstd", b"gzip, gzip", b"compress"])
def test_codings_never_asked_for_are_left_as_they_came(coding):
    """br and zstd (never in Accept-Encoding) were a retried connection_error; now the bytes go to the
    decode stage, which names them, as aiohttp already did for codings it does not know."""
    r, raw, _ = get(reply(response([b"Content-Encoding: " + coding, b"Content-Length: 10"], b"0123456789")))
    assert (r.outcome, r.body, raw.connections) == (None, b"0123456789", 1), r.reason
    assert r.encoding == coding.decode()  # named in the row's reason if the bytes then fail to decode


def test_gzip_members_are_capped():
    """Each concatenated gzip member costs a decompressor: 1025 empty ones (20 KB) are refused."""
    body = gzip.compress(b"") * 1025
    r, _, _ = get(reply(response([b"Content-Encoding: gzip", b"Content-Length: %d" % len(body)], body)))
    assert r.outcome == O.INCOMPLETE_BODY and "over 1024 streams" in r.reason, r.reason
    r, _, _ = get(reply(response([b"Content-Encoding: gzip", b"Connection: close"], gzip.compress(b"ab") * 1024)))
    assert r.body == b"ab" * 1024


@pytest.mark.parametrize("coding,pack", [(b"gzip", gzip.compress), (b"deflate", zlib.compress),
                                         (b"deflate", lambda d: zlib.compress(d)[2:-4])], ids=["gzip", "zlib", "raw"])
@pytest.mark.parametrize("keep", [10, 0.5, -4, -1], ids=["header", "half", "no-checksum", "last-byte"])
@pytest.mark.parametrize("framing", ["length", "close"])
def test_compressed_stream_cut_short_is_incomplete_not_a_prefix(coding, pack, keep, framing):
    """A gzip/deflate stream cut short within complete HTTP framing (a Content-Length that counts only the
    bytes sent, or a close) was "ok" with a prefix of the image: 153 of 25600 bytes, or b"" (the fuzzer's
    find). The stream's own end is part of the body: incomplete_body, as for a body cut short on the wire."""
    body = pack(bytes(range(256)) * 100)
    cut = body[:keep if isinstance(keep, int) else int(len(body) * keep)]
    framing_header = b"Content-Length: %d" % len(cut) if framing == "length" else b"Connection: close"
    r, _, _ = get(reply(response([b"Content-Encoding: " + coding, framing_header], cut)))
    assert (r.outcome, r.body) == (O.INCOMPLETE_BODY, None), (r.outcome, r.body and len(r.body))
    assert r.reason == f"Content-Encoding {coding.decode()}: stream cut short before its end marker"


def test_corrupt_compressed_body_is_a_named_outcome():
    """A body that is not the gzip it claims ends incomplete_body with a reason naming the coding."""
    r, _, _ = get(reply(response([b"Content-Encoding: gzip", b"Content-Length: 10"], b"0123456789")))
    assert r.outcome == O.INCOMPLETE_BODY and r.reason.startswith("Content-Encoding gzip: corrupt"), r.reason


# --- framing ----------------------------------------------------------------------------------------

CHUNKED = b"Transfer-Encoding: chunked"
FRAMING = {  # what the server sends -> the outcome it must end as (no body, one attempt: retries=0)
    "chunk size not hex": (response([CHUNKED], b"zz\r\nabc\r\n0\r\n\r\n"), O.CONNECTION_ERROR),
    "chunk longer than its size": (response([CHUNKED], b"5\r\nabcdefghij\r\n0\r\n\r\n"), O.CONNECTION_ERROR),
    "chunk size overflows": (response([CHUNKED], b"ffffffffffffffffffff\r\nabc"), O.CONNECTION_ERROR),
    "chunked, closed mid-stream": (response([CHUNKED], b"3\r\nabc\r\n"), O.INCOMPLETE_BODY),
    "two Content-Lengths": (response([b"Content-Length: 5", b"Content-Length: 6"], b"xxxxxx"), O.CONNECTION_ERROR),
    "Transfer-Encoding and Content-Length": (response([CHUNKED, b"Content-Length: 3"], b"3\r\nabc\r\n0\r\n\r\n"),
                                             O.CONNECTION_ERROR),
    "negative Content-Length": (response([b"Content-Length: -1"], b"abc"), O.CONNECTION_ERROR),
    "garbage status line": (b"GARBAGE\r\n\r\nbody", O.CONNECTION_ERROR),
    "HTTP/0.9 body, no headers": (b"\xff\xd8\xff\xe0 a JPEG without any status line", O.CONNECTION_ERROR),
    "status 1000": (response([b"Content-Length: 3"], b"abc", b"HTTP/1.1 1000 X"), O.CONNECTION_ERROR),
    "HTTP/2 frames": (b"\x00\x00\x12\x04\x00\x00\x00\x00\x00" + bytes(18), O.CONNECTION_ERROR),
    "4 MiB header line": (response([b"X-A: " + b"a" * (4 << 20)]), O.CONNECTION_ERROR),
    # aiohttp before 3.13.4 read them all (a 4 MB flood: 295 MiB, past the timeout): pyproject requires 3.13.4
    "100000 headers": (response([b"X-A: a"] * 100000), O.CONNECTION_ERROR),
    "closed before any byte": (b"", O.CONNECTION_ERROR),
}


@pytest.mark.parametrize("case", FRAMING)
def test_broken_framing_is_a_named_outcome(case):
    data, outcome = FRAMING[case]
    r, _, _ = get(reply(data))
    assert (r.outcome, r.body) == (outcome, None), r.reason
    assert "\n" not in r.reason, r.reason  # one line in the row's json and the run's summary
    if outcome == O.CONNECTION_ERROR and data:  # the parser's refusal, named as such: no "400" the server never sent
        assert r.reason.startswith("malformed HTTP response: ") and "400" not in r.reason, r.reason


def test_nul_in_a_header_value_is_refused_or_harmless():
    """aiohttp 3.14 refuses the response, 3.13 keeps the header: either way a named result."""
    r, _, _ = get(reply(response([b"X-A: a\x00b", b"Content-Length: 3"], b"abc")))
    assert (r.outcome, r.body) in ((None, b"abc"), (O.CONNECTION_ERROR, None)), r.reason


def held_open(first: bytes, then: bytes) -> Respond:
    """A responder that sends `first`, then `then` a moment later, and keeps the connection open."""

    async def respond(writer, stop):
        writer.write(first)
        await writer.drain()
        await asyncio.sleep(0.05)  # the client has begun reading the body
        writer.write(then)
        await writer.drain()
        await stop.wait()

    return respond


REFUSED_MID_BODY = {  # a good first chunk, then framing the parser refuses, on a connection the server keeps
    "chunk size not hex": b"zz\r\nabc\r\n0\r\n\r\n",
    "chunk longer than its size": b"2\r\nabcdef\r\n0\r\n\r\n",
}


@pytest.mark.parametrize("case", REFUSED_MID_BODY)
def test_framing_refused_after_the_body_began_ends_the_read(case):
    """aiohttp's C parser filed this refusal on the connection, not the body: the read waited out the
    timeout (outcome timeout). It ends at once as the malformed response it is. (The pure-Python parser
    ends it as connection_error or incomplete_body.)"""
    r, _, _ = get(held_open(response([CHUNKED], b"3\r\nabc\r\n"), REFUSED_MID_BODY[case]))
    assert r.body is None and r.outcome in (O.CONNECTION_ERROR, O.INCOMPLETE_BODY), (r.outcome, r.reason)
    assert r.reason.startswith(("malformed HTTP response: ", "body cut short: ")), r.reason


def test_a_bare_parser_refusal_is_a_malformed_response():
    """Without aiohttp's C extension its parser raises a body's framing error bare, out of the read: named
    like the C parser's, not an unclassified error."""
    r = _classify(TransferEncodingError("zz\r"))
    assert (r.outcome, r.reason, r.retry) == (O.CONNECTION_ERROR, "malformed HTTP response: zz", True)


def test_a_body_short_of_its_content_length_says_how_short():
    r, _, _ = get(reply(response([b"Content-Length: 100"], b"abc")))
    assert r.outcome == O.INCOMPLETE_BODY and r.reason.startswith("body cut short: "), r.reason
    assert "received 3 of 100 bytes" in r.reason and "400" not in r.reason, r.reason


def test_content_length_shorter_than_the_body_never_yields_more_bytes():
    """The bytes past Content-Length are the next response's (smuggling): never part of this body."""
    r, _, _ = get(reply(response([b"Content-Length: 5"], b"x" * 1000)))
    assert (r.outcome, r.body) in ((None, b"xxxxx"), (O.CONNECTION_ERROR, None)), r.reason


def test_interim_1xx_responses_are_skipped():
    interim = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n"
    r, _, _ = get(reply(interim + response([b"Content-Length: 3"], b"abc")))
    assert (r.outcome, r.body) == (None, b"abc")


# --- slow servers -------------------------------------------------------------------------------------

async def drip_headers(writer, stop):
    """A complete response, one byte every 0.2 s."""
    for byte in response([b"Content-Length: 3"], b"abc"):
        if stop.is_set():
            return
        writer.write(bytes([byte]))
        await writer.drain()
        await asyncio.sleep(0.2)


async def never_answer(writer, stop):
    await stop.wait()


async def endless_interim(writer, stop):
    """103 Early Hints, again and again, never the response."""
    while not stop.is_set():
        writer.write(b"HTTP/1.1 103 Early Hints\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.01)


async def endless_chunks(writer, stop):
    """A chunked body of one byte every 0.05 s, never ending."""
    writer.write(response([CHUNKED]))
    while not stop.is_set():
        writer.write(b"1\r\nx\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("respond,url", [
    (drip_headers, "http://127.0.0.1:PORT/x"), (never_answer, "http://127.0.0.1:PORT/x"),
    (endless_interim, "http://127.0.0.1:PORT/x"), (endless_chunks, "http://127.0.0.1:PORT/x"),
    (never_answer, "https://127.0.0.1:PORT/x"),  # the TLS handshake never completes
], ids=["headers drip", "never answers", "endless 1xx", "endless chunked body", "TLS handshake stalls"])
def test_slow_servers_time_out(respond, url):
    r, raw, _ = get(respond, url, SLOW)
    assert (r.outcome, r.attempts, raw.connections) == (O.TIMEOUT, 1, 1), r.reason


# --- URLs -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("url", [
    "file:///etc/passwd", "data:image/png;base64,iVBORw0KGgo=", "ftp://127.0.0.1:PORT/x.jpg", "javascript:alert(1)",
    "gopher://127.0.0.1:PORT/x", "ws://127.0.0.1:PORT/x.jpg", "//127.0.0.1:PORT/x.jpg", "/x.jpg",
])
@pytest.mark.parametrize("cfg", [CFG, STRICT], ids=["private allowed", "default policy"])
def test_urls_that_are_not_http_are_refused_before_any_connection(url, cfg):
    """fetch refuses them itself (the plan stage does too): they were a connection_error retried, and
    ws:// and scheme-less //host URLs were fetched as http."""
    r, raw, _ = get(reply(response([b"Content-Length: 3"], b"abc")), url, cfg)
    assert (r.outcome, r.attempts, raw.connections) == (O.INVALID_URL, 1, 0), r.reason


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:PORT\r\nX-Injected: 1/a.jpg", "http://" + "a" * 300 + ".example/",
    "http://a\u200b.example/", "http://127.0.0.1:99999/x", "http://[::1/x",
])
def test_urls_that_cannot_be_requested_are_invalid_before_any_connection(url):
    r, raw, _ = get(reply(response([b"Content-Length: 3"], b"abc")), url)
    assert (r.outcome, r.attempts, raw.connections) == (O.INVALID_URL, 1, 0), r.reason


def test_cr_lf_and_spaces_in_a_path_never_reach_the_wire_raw():
    """No header injection: CR/LF are dropped or escaped, spaces escaped, in the one request line sent."""
    r, raw, _ = get(reply(response([b"Content-Length: 3"], b"abc")),
                    "http://127.0.0.1:PORT/a b\r\nX-Injected: 1\r\n.jpg?q=c d")
    assert r.body == b"abc" and len(raw.heads) == 1
    request_line, *headers = raw.heads[0].split(b"\r\n")
    assert b" " not in request_line[4:-9] and not [h for h in headers if h.lower().startswith(b"x-injected")]


# --- redirects --------------------------------------------------------------------------------------------

def redirect_to(location: bytes) -> Respond:
    """/start answers 302 to `location` (PORT replaced); every other path the 3-byte body."""

    async def respond(writer, stop):
        writer.write(response([b"Location: " + location.replace(b"PORT", str(writer.get_extra_info("sockname")[1])
                                                                    .encode()), b"Content-Length: 0"],
                              status=b"HTTP/1.1 302 Found"))
        await writer.drain()

    return respond


@pytest.mark.parametrize("location", [
    b"http://[::1", b"http://127.0.0.1:99999/ok", b"https:/127.0.0.1:PORT/ok",
    b"http://" + b"a" * 300 + b".example/",
])
def test_a_malformed_redirect_target_is_a_redirect_error(location):
    """The row's URL was fine: a Location that cannot be requested is the redirect's fault (it was
    counted invalid_url, the outcome of a bad input URL)."""
    r, raw, _ = get(redirect_to(location))
    assert (r.outcome, r.attempts, raw.connections) == (O.REDIRECT_ERROR, 1, 1), r.reason
    assert r.reason.startswith("bad redirect target"), r.reason


@pytest.mark.parametrize("location", [b"//127.0.0.2:PORT/ok", b"//private.test:PORT/ok", b"/\\127.0.0.2/ok"])
def test_protocol_relative_redirect_to_a_private_host_is_refused(location):
    """public.test (127.0.0.1, called public by the injected rule) redirects to //private-host/...:
    refused without a second request; a backslash path stays a path on the same host."""
    r, raw, _ = get(redirect_to(location), "http://public.test:PORT/start", STRICT, inject=True)
    if b"\\" in location:  # "/\127.0.0.2/ok" is a path of public.test, not another host
        assert r.outcome == O.REDIRECT_ERROR and r.reason == "redirect loop" and raw.connections == 2, r.reason
    else:
        assert (r.outcome, r.attempts, raw.connections) == (O.BLOCKED_ADDRESS, 1, 1), r.reason


def test_redirect_to_a_data_url_is_refused():
    r, raw, _ = get(redirect_to(b"data:image/png;base64,iVBORw0KGgo="))
    assert (r.outcome, r.reason, raw.connections) == (O.REDIRECT_ERROR, "redirect to data: scheme", 1)


def test_redirect_hops_beyond_max_redirects_are_not_requested():
    """Every hop redirects to a new URL: max_redirects hops are followed, the next is not requested."""
    counter = iter(range(100))

    async def respond(writer, stop):
        await redirect_to(f"/hop{next(counter)}".encode())(writer, stop)

    cfg = FetchConfig(**{**CFG.__dict__, "max_redirects": 3})
    r, raw, _ = get(respond, cfg=cfg)
    assert (r.outcome, r.reason, len(raw.heads)) == (O.REDIRECT_ERROR, "more than 3 redirects", 4)


def test_redirect_location_with_spaces_and_utf8_is_requested_escaped():
    """A raw UTF-8 Location with a space is followed, escaped, not refused."""
    r, raw, _ = get(redirect_to("/caf\u00e9 1.jpg".encode()))
    assert r.outcome == O.REDIRECT_ERROR and r.reason == "redirect loop"  # the raw server redirects every path
    assert raw.heads[1].startswith(b"GET /caf%C3%A9%201.jpg HTTP/1.1")
