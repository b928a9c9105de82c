"""The sample corpus and its loopback server: the bad behaviours must be real on the wire."""

from __future__ import annotations

import asyncio
import collections
import hashlib
import io
import threading
import zlib

import aiohttp
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageOps

from bench import corpus
from engine import outcomes

# The outcomes of the bad inputs (the optional filters and dedup are exercised elsewhere).
OUTCOMES = {outcomes.OK, outcomes.INVALID_URL, outcomes.FILTERED_SIZE, outcomes.FILTERED_ASPECT,
            *outcomes.FETCH_OUTCOMES, *outcomes.DECODE_OUTCOMES}
REQUIRED_CASES = {
    "http_404", "http_500", "http_429", "http_503_once", "connection_refused", "reset_mid_body", "drip",
    "too_large", "content_length_lies", "gzip", "brotli_unasked", "redirect_loop", "redirect_chain", "redirect_ftp",
    "redirect_file", "html_as_jpeg", "svg_as_jpeg", "empty_as_jpeg", "text_as_jpeg", "truncated_jpeg",
    "bomb_png", "animated_gif", "cmyk", "png16", "exif_rotated_6", "exif_rotated_8", "too_small",
    "meta_small", "meta_elongated", "bad_aspect", "url_null", "url_not_a_url", "url_htp", "url_javascript",
    "optout_noai", "optout_noimageai", "caption_null", "caption_control", "caption_surrogate_escape",
    "caption_invalid_utf8", "caption_backslash", "caption_unicode",
}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A small corpus (every format once, every bad case) and its running server."""
    with corpus.serve_and_build(tmp_path_factory.mktemp("corpus"), n_images=11) as srv:
        yield srv


@pytest.fixture(scope="module")
def rows(served):
    """Parquet rows by case (lists: caption_unicode has several); TEXT read leniently."""
    table = pq.read_table(served.parquet)
    table = table.set_column(1, "TEXT", table.column("TEXT").cast(pa.binary()))
    by_case = collections.defaultdict(list)
    for r in table.to_pylist():
        by_case[r["case"]].append(r)
    return by_case


def one(rows, case):
    """The single row of a case."""
    (row,) = rows[case]
    return row


async def _get(url, *, timeout=10.0, read=True, **kw):
    """GET url; return (response, body) or the exception raised."""
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as s:
            async with s.get(url, **kw) as resp:
                body = await resp.read() if read else await resp.content.read(1 << 20)
                return resp, body
    except Exception as e:  # the tests look at the exception itself
        return e


def get(url, **kw):
    """Synchronous wrapper around _get."""
    return asyncio.run(_get(url, **kw))


def test_rows_name_known_outcomes_and_cover_every_bad_case(rows):
    """Each row's expected outcome is an engine outcome name; every bad case of the issue is present."""
    all_rows = [r for rs in rows.values() for r in rs]
    assert {r["expected_outcome"] for r in all_rows} == OUTCOMES  # each one named, each one exercised
    assert REQUIRED_CASES <= set(rows)
    assert one(rows, "url_null")["URL"] is None and one(rows, "caption_null")["TEXT"] is None


def test_invalid_utf8_caption_is_stored_raw(served, rows):
    """The raw-surrogate caption survives parquet, breaks strict decoding, decodes leniently."""
    text = pq.read_table(served.parquet, columns=["TEXT"]).column(0)
    with pytest.raises(UnicodeDecodeError):
        text.to_pylist()
    raw = one(rows, "caption_invalid_utf8")["TEXT"]
    assert b"\xed\xa0\xbd" in raw and "\ufffd" in raw.decode("utf-8", "replace")


def test_build_is_deterministic(tmp_path):
    """Same seed, same parquet and same file bytes."""
    digests = []
    for d in ("a", "b"):
        p = corpus.build_corpus(tmp_path / d, "http://127.0.0.1:9", n_images=4, seed=3)
        files = sorted((p.parent / "files").iterdir())
        digests.append([p.read_bytes()] + [(f.name, hashlib.sha1(f.read_bytes()).digest()) for f in files])
    assert digests[0] == digests[1]


def test_good_images_decode_to_their_metadata(served, rows):
    """Every ok row served from /files decodes (EXIF applied) to WIDTH x HEIGHT, within the size rules."""
    checked = 0
    for r in (r for rs in rows.values() for r in rs):
        if r["expected_outcome"] != "ok" or "/files/" not in (r["URL"] or "") or r["case"] == "unicode_url":
            continue
        path = served.parquet.parent / "files" / r["URL"].split("/files/")[1].split("?")[0]
        with Image.open(path) as im:
            w, h = ImageOps.exif_transpose(im).size
        if r["WIDTH"] is not None:
            assert (w, h) == (r["WIDTH"], r["HEIGHT"]), r["case"]
        assert min(w, h) >= 512 and max(w, h) / min(w, h) <= 2, r["case"]
        checked += 1
    assert checked >= 25


def test_file_route_serves_bytes_and_content_type(served, rows):
    """/files serves the exact bytes; ?type= overrides the Content-Type; unescaped unicode URLs work."""
    r = one(rows, "png_served_as_jpeg")
    resp, body = get(r["URL"])
    assert resp.status == 200 and resp.headers["Content-Type"] == "image/jpeg" and body[:4] == b"\x89PNG"
    resp, body = get(one(rows, "unicode_url")["URL"])
    assert resp.status == 200 and body[:2] == b"\xff\xd8"


def test_status_codes_are_persistent_and_transient_ones_recover(served, rows):
    """404/500/429 every time; the 503-once row answers 503 then 200."""
    for case, code in (("http_404", 404), ("http_500", 500), ("http_429", 429)):
        for _ in range(2):
            assert get(one(rows, case)["URL"])[0].status == code
    url = one(rows, "http_503_once")["URL"]
    assert get(url)[0].status == 503
    resp, body = get(url)
    assert resp.status == 200 and body[:2] == b"\xff\xd8"


def test_connection_refused_and_reset(served, rows):
    """The refused URL is refused; /reset really sends RST mid-body; /reset_once recovers."""
    assert isinstance(get(one(rows, "connection_refused")["URL"]), aiohttp.ClientConnectorError)
    for _ in range(2):
        err = get(one(rows, "reset_mid_body")["URL"])
        assert isinstance(err, aiohttp.ClientPayloadError) and "ConnectionResetError" in str(err)
    url = one(rows, "reset_once")["URL"]
    assert isinstance(get(url), aiohttp.ClientPayloadError)
    assert get(url)[0].status == 200


def test_content_length_lie_is_a_clean_short_body(served, rows):
    """/lie claims more bytes than it sends and closes (FIN, not RST)."""
    err = get(one(rows, "content_length_lies")["URL"])
    assert isinstance(err, aiohttp.ClientPayloadError)
    assert "ContentLengthError" in repr(err) and "ConnectionResetError" not in str(err)


def test_drip_sends_one_byte_per_second(served, rows):
    """A drip delivers the headers, then about a byte a second, so a total timeout fires."""

    async def count_bytes():
        got = 0
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2.5)) as s:
                async with s.get(one(rows, "drip")["URL"]) as resp:
                    assert int(resp.headers["Content-Length"]) == corpus.DRIP_CLAIMED_BYTES
                    while await resp.content.read(1):
                        got += 1
        except asyncio.TimeoutError:
            return got
        raise AssertionError("drip finished")

    assert 1 <= asyncio.run(count_bytes()) <= 4
    assert isinstance(get(one(rows, "stall_headers")["URL"], timeout=1.0), asyncio.TimeoutError)


def test_big_bodies_and_disconnecting_clients(served, rows):
    """/big announces 64 MiB (or streams chunked); clients leaving mid-body do not hurt the server."""
    for case, chunked in (("too_large", False), ("too_large_chunked", True)):
        resp, first = get(one(rows, case)["URL"], read=False)
        assert resp.status == 200 and len(first) > 0 and first[:2] == b"\xff\xd8"
        assert ("Content-Length" not in resp.headers) == chunked
        if not chunked:
            assert int(resp.headers["Content-Length"]) == 64 << 20
    assert get(one(rows, "http_404")["URL"])[0].status == 404  # still serving


def test_gzip_encoding(served, rows):
    """/gzip sends Content-Encoding: gzip; decoded, it is the original JPEG."""
    url = one(rows, "gzip")["URL"]
    name = url.rsplit("/", 1)[1]
    resp, body = get(url)
    assert resp.headers["Content-Encoding"] == "gzip"
    assert body == (served.parquet.parent / "files" / name).read_bytes()
    resp, raw = get(url, auto_decompress=False)
    assert raw[:2] == b"\x1f\x8b"


def test_unasked_brotli_encoding(served, rows):
    """/br sends Content-Encoding: br (never in our Accept-Encoding) over bytes that are not the JPEG."""
    url = one(rows, "brotli_unasked")["URL"]
    name = url.rsplit("/", 1)[1]
    resp, raw = get(url, auto_decompress=False)
    assert resp.headers["Content-Encoding"] == "br"
    original = (served.parquet.parent / "files" / name).read_bytes()
    assert raw != original and zlib.decompress(raw, -15) == original


def test_redirects(served, rows):
    """Loops never end, the chain ends at the image, scheme redirects point off http(s)."""
    assert isinstance(get(one(rows, "redirect_loop")["URL"], max_redirects=8), aiohttp.TooManyRedirects)
    assert isinstance(get(one(rows, "redirect_too_many")["URL"], max_redirects=10), aiohttp.TooManyRedirects)
    resp, body = get(one(rows, "redirect_chain")["URL"])
    assert resp.status == 200 and len(resp.history) == 3 and body[:2] == b"\xff\xd8"
    for case, prefix in (("redirect_ftp", "ftp://"), ("redirect_file", "file://")):
        resp, _ = get(one(rows, case)["URL"], allow_redirects=False)
        assert resp.status == 302 and resp.headers["Location"].startswith(prefix)


def test_non_image_bodies_and_opt_outs(served, rows):
    """HTML/SVG/empty/text claim image/jpeg; opt-out rows carry X-Robots-Tag."""
    for case, start in (("html_as_jpeg", b"<!DOCTYPE"), ("svg_as_jpeg", b"<?xml"), ("text_as_jpeg", b"This")):
        resp, body = get(one(rows, case)["URL"])
        assert resp.headers["Content-Type"] == "image/jpeg" and body.startswith(start)
    assert get(one(rows, "empty_as_jpeg")["URL"])[1] == b""
    for case, tag in (("optout_noai", "noai"), ("optout_noimageai", "noimageai"),
                      ("optout_combined", "noindex, noimageai")):
        assert get(one(rows, case)["URL"])[0].headers["X-Robots-Tag"] == tag


def _served_image(row) -> Image.Image:
    """Fetch a row's URL and open it with Pillow."""
    resp, body = get(row["URL"])
    assert resp.status == 200
    return Image.open(io.BytesIO(body))


def test_hard_images_are_what_they_claim(served, rows, monkeypatch):
    """Bombs are small but huge; truncated data fails; CMYK, 16-bit, GIF and EXIF are real."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # let Pillow read the bombs' headers
    bomb = _served_image(one(rows, "bomb_png"))
    assert bomb.size == (20000, 20000) and len(get(one(rows, "bomb_png")["URL"])[1]) < 200_000
    assert _served_image(one(rows, "bomb_jpeg")).size == (20000, 20000)
    with pytest.raises(OSError):
        _served_image(one(rows, "truncated_jpeg")).load()
    assert _served_image(one(rows, "cmyk")).mode == "CMYK"
    body = get(one(rows, "png16")["URL"])[1]
    assert body[24] == 16 and body[25] == 2  # IHDR bit depth 16, colour type RGB
    gif = _served_image(one(rows, "animated_gif"))
    assert gif.n_frames == 3
    for orientation in (6, 8, 3):
        row = one(rows, f"exif_rotated_{orientation}")
        im = _served_image(row)
        assert im.getexif()[0x0112] == orientation
        upright = np.asarray(ImageOps.exif_transpose(im).convert("RGB"), np.int16)
        source = np.asarray(Image.open(served.parquet.parent / row["source"]).convert("RGB"), np.int16)
        assert upright.shape == source.shape and np.abs(upright - source).mean() < 4


def test_stop_is_quick_during_a_drip_and_restart_serves_the_same_corpus(served, rows):
    """stop() returns while a drip is in flight; a new server on the same port serves old URLs."""
    srv = corpus.CorpusServer(served.parquet.parent).start()
    port, drip_url = srv.port, srv.base_url + "/drip/x"
    done = threading.Event()
    threading.Thread(target=lambda: (get(drip_url, timeout=30), done.set()), daemon=True).start()
    for _ in range(200):  # until the drip has started (at most ~10 s)
        if srv.hits["/drip/x"]:
            break
        threading.Event().wait(0.05)
    assert srv.hits["/drip/x"] == 1
    srv.stop()
    assert done.wait(10), "the dripping client was not released by stop()"
    url = rows["jpeg"][0]["URL"].replace(served.base_url, f"http://127.0.0.1:{port}")
    with corpus.CorpusServer(served.parquet.parent, port=port) as again:
        assert again.port == port and get(url)[0].status == 200


def test_laion_profile_sizes(tmp_path):
    """The laion sampler follows the 61/21/18 split; built files are distinct, large enough JPEGs."""
    import random

    rng = random.Random(0)
    shorts = np.array([min(corpus.laion_size(rng)) for _ in range(20000)])
    assert shorts.min() >= 512
    split = [np.mean(shorts < 768), np.mean((shorts >= 768) & (shorts < 1024)), np.mean(shorts >= 1024)]
    assert np.allclose(split, [0.61, 0.21, 0.18], atol=0.02)
    p = corpus.build_corpus(tmp_path, "http://127.0.0.1:9", n_images=6, profile="laion", workers=1)
    table = pq.read_table(p).to_pylist()
    assert {r["expected_outcome"] for r in table} == {"ok"} and len(table) == 6
    seen = set()
    for r in table:
        data = (tmp_path / "files" / r["URL"].rsplit("/", 1)[1]).read_bytes()
        seen.add(hashlib.sha1(data).digest())
        w, h = Image.open(io.BytesIO(data)).size
        assert (w, h) == (r["WIDTH"], r["HEIGHT"]) and min(w, h) >= 512 and max(w, h) / min(w, h) <= 1.8
    assert len(seen) == 6


def test_good_images_are_not_near_duplicates_to_the_engine(served, rows):
    """No two ok images of the corpus lie within the engine's near-duplicate reach (with margin)."""
    from engine.hashes import hamming, phash

    hashes = []
    for r in (r for rs in rows.values() for r in rs):
        if r["expected_outcome"] == "ok" and "/files/" in (r["URL"] or "") and r["case"] != "unicode_url":
            path = served.parquet.parent / "files" / r["URL"].split("/files/")[1].split("?")[0]
            with Image.open(path) as im:
                hashes.append(phash(np.asarray(ImageOps.exif_transpose(im).convert("RGB"))))
    assert len(hashes) >= 25
    assert min(hamming(a, b) for i, a in enumerate(hashes) for b in hashes[:i]) > 8
