"""engine/hashes.py, hamming.py and dedup.py: hashes on real photos, the Hamming index against brute force, atomic claims
through several shards from threads and from Ray tasks, and the rebuild from parquet."""

import io
import random
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

from engine import dedup as D
from engine import hamming
from engine import hashes as H
from engine.claims import iter_rebuild_items
from engine.hamming import DEFAULT_THRESHOLD, HammingIndex

from .conftest import encode, photo

K = DEFAULT_THRESHOLD


def decoded(data: bytes) -> np.ndarray:
    """Bytes -> RGB uint8 array, as the engine's decoder hands it over."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def resized(rgb: np.ndarray, scale: float) -> np.ndarray:
    """The photo rescaled by `scale` (Lanczos, like most web resizers)."""
    h, w = rgb.shape[:2]
    return np.asarray(Image.fromarray(rgb).resize((round(w * scale), round(h * scale)), Image.Resampling.LANCZOS))


def variant(rgb: np.ndarray, kind: str) -> np.ndarray:
    """A re-encoded, rescaled, converted or slightly cropped copy of the photo, decoded again."""
    h, w = rgb.shape[:2]
    if kind.startswith("jpeg"):
        return decoded(encode(rgb, "JPEG", quality=int(kind[4:])))
    if kind.startswith("scale"):
        return decoded(encode(resized(rgb, float(kind[5:])), "JPEG", quality=90))
    if kind == "webp":
        return decoded(encode(rgb, "WEBP", quality=80))
    if kind == "png":
        return decoded(encode(rgb, "PNG"))
    if kind == "crop4":  # 2% off every side
        dy, dx = h // 50, w // 50
        return decoded(encode(np.ascontiguousarray(rgb[dy:h - dy, dx:w - dx]), "JPEG", quality=90))
    raise ValueError(kind)


VARIANTS = ["jpeg50", "jpeg75", "jpeg95", "scale0.5", "scale0.75", "scale1.5", "scale2.0", "webp", "png", "crop4"]


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    return {name: photo(name) for name in ("astronaut", "coffee", "chelsea", "rocket")}


@pytest.fixture(scope="module")
def groups(photos) -> list[list[D.Claim]]:
    return groups_of_claims(photos, 12)


def random_hashes(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2**64 - 1, n, dtype=np.uint64, endpoint=True)


def claim_of(key: str, rgb: np.ndarray, data: bytes | None = None) -> D.Claim:
    data = encode(rgb, "PNG") if data is None else data
    return D.Claim(key, *H.image_hashes(data, rgb))


# ------------------------------------------------------------------------------------ hashes

@pytest.mark.quick
def test_content_and_pixel_hash_tell_bytes_from_pixels(astronaut):
    png = encode(astronaut, "PNG")
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "re-saved by another site")
    resaved = encode(Image.fromarray(astronaut), "PNG", pnginfo=info)
    assert H.content_hash(png) == H.content_hash(bytes(png))
    assert H.content_hash(png) != H.content_hash(resaved)
    assert H.pixel_hash(decoded(png)) == H.pixel_hash(decoded(resaved))
    flat = np.ascontiguousarray(astronaut.reshape(256, 1024, 3))  # same bytes, other shape
    assert H.pixel_hash(flat) != H.pixel_hash(astronaut)
    assert 0 <= H.content_hash(png) < 2**64 and 0 <= H.pixel_hash(astronaut) < 2**64


@pytest.mark.quick
def test_int64_round_trip():
    for v in (0, 1, 2**63 - 1, 2**63, 2**64 - 1):
        s = H.to_int64(v)
        assert -(2**63) <= s < 2**63 and H.to_uint64(s) == v
    assert pa.array([H.to_int64(2**64 - 1)], pa.int64())[0].as_py() == -1


@pytest.mark.quick
@pytest.mark.parametrize("kind", VARIANTS)
def test_phash_variants_are_near(photos, kind):
    for name, rgb in photos.items():
        d = H.hamming(H.phash(rgb), H.phash(variant(rgb, kind)))
        assert d <= K, f"{name} {kind}: distance {d} > {K}"


@pytest.mark.quick
def test_phash_distinct_photos_and_regions_are_far(photos):
    hashes = {name: H.phash(rgb) for name, rgb in photos.items()}
    for rgb in list(photos.values())[:2]:  # four quadrants of one photo are different pictures
        h, w = rgb.shape[:2]
        for i, (y, x) in enumerate([(0, 0), (0, w // 2), (h // 2, 0), (h // 2, w // 2)]):
            hashes[f"{id(rgb)}-{i}"] = H.phash(np.ascontiguousarray(rgb[y:y + h // 2, x:x + w // 2]))
    names = list(hashes)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert H.hamming(hashes[a], hashes[b]) > 2 * K, (a, b)


@pytest.mark.quick
def test_phash_handles_tiny_huge_and_gray_images(astronaut):
    tiny = np.ascontiguousarray(astronaut[::40, ::40])  # 13 x 13: the thumbnail upsamples
    gray = np.repeat(astronaut.mean(axis=2, keepdims=True).astype(np.uint8), 3, axis=2)
    big = resized(astronaut, 3.0)  # 1536 px
    assert H.hamming(H.phash(big), H.phash(astronaut)) <= 2
    assert H.hamming(H.phash(gray), H.phash(astronaut)) <= K
    assert isinstance(H.phash(tiny), int)
    with pytest.raises(ValueError):
        H.phash(astronaut[..., 0])


def placeholder(w: int, h: int, fmt: str) -> bytes:
    """A host's "image removed" picture, drawn at the size the host serves it."""
    im = Image.new("RGB", (w, h), (230, 230, 230))
    draw = ImageDraw.Draw(im)
    draw.rectangle((w * 0.4, h * 0.25, w * 0.6, h * 0.5), outline=(150, 150, 150), width=max(1, h // 100))
    draw.text((w * 0.2, h * 0.6), "This image is no longer available", fill=(120, 120, 120),
              font=ImageFont.load_default(size=max(10, h // 12)))
    return encode(im, fmt, **({"quality": 85} if fmt == "JPEG" else {}))


@pytest.mark.quick
def test_placeholders_at_any_size_are_one_cluster():
    shard = D.DedupShard()
    bodies = [placeholder(1024, 768, "JPEG"), placeholder(640, 480, "JPEG"), placeholder(500, 375, "PNG")]
    bodies.append(bodies[0])  # the same file behind another URL
    out = shard.claim([D.Claim(f"k{i}", *H.image_hashes(b, decoded(b))) for i, b in enumerate(bodies)])
    assert [v.status for v in out] == [D.NEW, D.DUPLICATE_NEAR, D.DUPLICATE_NEAR, D.DUPLICATE_EXACT]
    assert [v.owner_key for v in out[1:]] == ["k0"] * 3  # one cluster: all three credited to the first


# ------------------------------------------------------------------------------------ index

def brute(queries: np.ndarray, hashes: np.ndarray, k: int) -> set[tuple[int, int, int]]:
    d = np.bitwise_count(queries[:, None] ^ hashes[None, :])
    return {(int(q), int(i), int(d[q, i])) for q, i in zip(*np.nonzero(d <= k), strict=True)}


def planted(hashes: np.ndarray, n: int, max_flip: int, seed: int = 1) -> np.ndarray:
    """Queries made by flipping 0..max_flip random bits of stored hashes, plus random ones."""
    rng = np.random.default_rng(seed)
    qs = []
    for i in rng.integers(0, len(hashes), n):
        bits = rng.choice(64, rng.integers(0, max_flip + 1), replace=False)
        qs.append(int(hashes[i]) ^ sum(1 << int(b) for b in bits))
    return np.array(qs + list(random_hashes(n, seed + 1)), np.uint64)


@pytest.mark.quick
@pytest.mark.parametrize("k", [0, 3, 8, 12])
def test_index_finds_exactly_what_brute_force_finds(k):
    hashes = random_hashes(23_000)
    index = HammingIndex(k)
    index.add(hashes[:20_000], hashes[:20_000], hashes[:20_000], [str(i) for i in range(20_000)])
    index.rebuild()  # the first 20k through the band tables...
    index.add(hashes[20_000:], hashes[20_000:], hashes[20_000:], [str(i) for i in range(20_000, 23_000)])
    assert index.tables.n_static < index.n  # ...the rest through the scan of recent entries
    queries = planted(hashes, 300, k + 2)
    got = {tuple(map(int, row)) for row in index.search(queries)}
    assert got == brute(queries, hashes, k)
    assert any(d == k for _, _, d in got) or k == 0  # the boundary distance is found


@pytest.mark.quick
@pytest.mark.parametrize("k", [0, 8])
def test_small_index_scans_with_numpy_like_the_kernel(k):
    """Before the first band tables the search is numpy's plain scan (no Numba start-up in the
    driver of a small run): the same rows, in the same order, as the Numba kernel's scan."""
    hashes = random_hashes(3_000)
    index = HammingIndex(k)
    index.add(hashes, hashes, hashes, [str(i) for i in range(len(hashes))])
    assert index.tables.n_static == 0 and not index.needs_rebuild()
    queries = planted(hashes, 40, k + 2)
    assert len(queries) * len(hashes) <= hamming.NUMPY_PAIRS
    got = index.search(queries)
    assert {tuple(map(int, row)) for row in got} == brute(queries, hashes, k)
    kernel = hamming._collect(hamming._scan_kernel, queries, k, hashes, len(hashes))
    numpy_rows = hamming.scan(queries, k, hashes)
    assert numpy_rows.dtype == kernel.dtype and np.array_equal(numpy_rows, kernel)
    assert np.array_equal(hamming._scan_numpy(queries, k, hashes[:0]), kernel[:0])
    xor = queries[:, None] ^ hashes[None, :50]
    assert np.array_equal(hamming._bit_count_table(xor), [[bin(int(v)).count("1") for v in r] for r in xor])


@pytest.mark.quick
def test_index_memory_per_hash():
    n = 200_000
    hashes = random_hashes(n)
    index = HammingIndex(K)
    index.add(hashes, hashes, hashes, [f"{i:010d}" for i in range(n)])
    index.rebuild()
    assert index.nbytes() / n < 120


# ------------------------------------------------------------------------------------ shards

@pytest.mark.quick
def test_shard_claim_exact_near_new_and_own_key(astronaut, coffee):
    shard = D.DedupShard()
    png = encode(astronaut, "PNG")
    first = claim_of("a", astronaut, png)
    again = D.Claim("b", *first[1:])
    jpeg = encode(astronaut, "JPEG", quality=70)
    near = D.Claim("c", *H.image_hashes(jpeg, decoded(jpeg)))
    out = shard.claim([first, again, near, claim_of("d", coffee), first])
    assert [v.status for v in out] == [D.NEW, D.DUPLICATE_EXACT, D.DUPLICATE_NEAR, D.NEW, D.NEW]
    assert out[1].owner_key == "a" and out[2].owner_key == "a" and out[1].distance == 0
    assert shard.claim([first])[0].status == D.NEW  # a retried task re-claims its own image
    assert shard.stats()["entries"] == 2


@pytest.mark.quick
def test_exact_only_mode_keeps_near_copies(astronaut):
    shard = D.DedupShard(exact_only=True)
    jpeg = encode(astronaut, "JPEG", quality=70)
    a, b = claim_of("a", astronaut), D.Claim("b", *H.image_hashes(jpeg, decoded(jpeg)))
    c = D.Claim("c", a.content, a.pixels, a.phash)
    assert [v.status for v in shard.claim([a, b, c])] == [D.NEW, D.NEW, D.DUPLICATE_EXACT]


@pytest.mark.quick
def test_three_phase_loser_learns_it_at_finalize():
    """A pending claim beaten by a query with the smaller key is a duplicate at finalize."""
    shard = D.DedupShard()
    h = 0x0123456789ABCDEF
    shard.reserve([D.Ticket(7, "z", 1, 1, h)])
    assert shard.query([D.Ticket(9, "a", 2, 2, h ^ 1)]) == [None]  # "a" wins against pending "z"
    assert shard.finalize([D.Decision(7, True, False)]) == [D.Verdict(D.DUPLICATE_NEAR, "a", 1)]
    assert shard.finalize([D.Decision(8, False, False)]) == [None]
    assert shard.stats()["entries"] == 0


@pytest.mark.quick
def test_expired_reservation_is_dropped_not_kept():
    shard = D.DedupShard(pending_ttl_s=0.0)
    shard.reserve([D.Ticket(1, "a", 1, 1, 5)])
    shard.reserve([D.Ticket(2, "b", 2, 2, 2**40)])  # expires "a"
    assert shard.finalize([D.Decision(1, True, False)])[0].status != D.NEW


def groups_of_claims(photos: dict, copies: int) -> list[list[D.Claim]]:
    """Per photo, `copies` claims of it: byte-identical copies and near copies, under distinct keys."""
    groups = []
    for g, rgb in enumerate(photos.values()):
        kinds = ["png", "png", "jpeg50", "jpeg95", "scale0.5", "scale2.0", "webp", "crop4"]
        group = []
        for c in range(copies):
            kind = kinds[c % len(kinds)]
            img = variant(rgb, kind)
            data = encode(rgb, "PNG") if kind == "png" else encode(img, "PNG") + bytes([c])
            group.append(D.Claim(f"{g:02d}-{c:03d}", *H.image_hashes(data, img)))
        groups.append(group)
    return groups


def assert_one_kept_per_group(groups, verdicts: dict[str, D.Verdict]):
    """Exactly one claim of each group is new; every other names a copy of the same photo as owner
    (the kept one, or in a race the pending copy that beat it before losing itself)."""
    for group in groups:
        statuses = [verdicts[c.key].status for c in group]
        assert statuses.count(D.NEW) == 1, statuses
        keys = {c.key for c in group}
        assert all(verdicts[k].owner_key in keys for k in keys if verdicts[k].status != D.NEW)


def race(shards: list, batches: list[list[D.Claim]], per_call: int = 3) -> dict[str, D.Verdict]:
    """Claim each batch from its own thread (all released at once), a few claims per call."""
    verdicts: dict[str, D.Verdict] = {}
    start = threading.Barrier(len(batches))

    def work(batch):
        client = D.DedupClient(shards)
        start.wait()
        for i in range(0, len(batch), per_call):
            part = batch[i:i + per_call]
            verdicts.update(zip([c.key for c in part], client.claim(part), strict=True))

    threads = [threading.Thread(target=work, args=(b,)) for b in batches]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return verdicts


@pytest.mark.quick
@pytest.mark.parametrize("n_shards", [1, 4])
def test_racing_threads_keep_exactly_one(groups, n_shards):
    for round_ in range(5):
        shards = [D.DedupShard() for _ in range(n_shards)]
        items = [c for g in groups for c in g]
        random.Random(round_).shuffle(items)
        verdicts = race(shards, [items[i::6] for i in range(6)])
        assert_one_kept_per_group(groups, verdicts)
        assert sum(s.stats()["entries"] for s in shards) == len(groups)
        assert sum(s.stats()["pending"] for s in shards) == 0


@pytest.mark.quick
@pytest.mark.parametrize("n_shards", [1, 3])
def test_racing_while_tables_rebuild(n_shards):
    """Thousands of inserts from threads force rebuilds mid-race; searches run beside them unlocked."""
    rng = np.random.default_rng(7)
    shards = [D.DedupShard() for _ in range(n_shards)]
    client = D.DedupClient(shards)
    client.load([D.Claim(f"old{i}", int(h), int(h), int(h)) for i, h in enumerate(random_hashes(6000, 3))])
    groups = []
    for g, base in enumerate(random_hashes(40, 4)):
        flips = [sum(1 << int(b) for b in rng.choice(64, rng.integers(0, 4), replace=False)) for _ in range(8)]
        groups.append([D.Claim(f"g{g:02d}-{c}", 10**6 * g + c, 10**6 * g + c, int(base) ^ f)
                       for c, f in enumerate(flips)])
    fresh = [D.Claim(f"new{i}", int(h), int(h), int(h)) for i, h in enumerate(random_hashes(12_000, 5))]
    batches = [fresh[i::4] + [c for g in groups for c in g[i::4]] for i in range(4)]
    for b in batches:
        random.Random(len(b)).shuffle(b)
    verdicts = race(shards, [b for b in batches], per_call=50)
    assert_one_kept_per_group(groups, verdicts)
    assert all(verdicts[c.key].status == D.NEW for c in fresh)
    assert sum(s.stats()["entries"] for s in shards) == 6000 + len(fresh) + len(groups)
    loaded = [sum(D.home_shard(f"old{i}", n_shards) == j for i in range(6000)) for j in range(n_shards)]
    assert all(s.index.tables.n_static > n for s, n in zip(shards, loaded, strict=True))  # rebuilt mid-race


@pytest.mark.quick
def test_client_reclaim_by_same_key_is_new_across_shards(groups):
    shards = [D.DedupShard() for _ in range(3)]
    client = D.DedupClient(shards)
    group = groups[0][:4]
    first = client.claim(group)
    kept = [c for c, v in zip(group, first, strict=True) if v.status == D.NEW]
    assert len(kept) == 1
    assert client.claim(kept)[0].status == D.NEW  # the retried task's own image
    again = client.claim(group)  # a retried batch: its owner stays kept, the copies stay dropped
    assert [v.status == D.NEW for v in again] == [c.key == kept[0].key for c in group]
    assert all(v.owner_key == kept[0].key for v in first + again if v.status != D.NEW)
    assert sum(s.stats()["entries"] for s in shards) == 1


# ------------------------------------------------------------------------------------ resume

@pytest.mark.quick
def test_rebuild_from_parquet_keeps_the_run_duplicate_free(tmp_path, groups):
    owners = [g[0] for g in groups]
    table = pa.table({
        "key": [c.key for c in owners] + ["99-000"],
        "url": [f"http://h/{c.key}.jpg" for c in owners] + ["http://h/gone.jpg"],
        "content_hash": pa.array([H.to_int64(c.content) for c in owners] + [None], pa.int64()),
        "pixel_hash": pa.array([H.to_int64(c.pixels) for c in owners] + [None], pa.int64()),
        "phash": pa.array([H.to_int64(c.phash) for c in owners] + [None], pa.int64()),
        "outcome": ["ok"] * len(owners) + ["http_error"],
    })
    pq.write_table(table.slice(0, 2), tmp_path / "00000.parquet")
    pq.write_table(table.slice(2), tmp_path / "00001.parquet")
    items = list(iter_rebuild_items(sorted(tmp_path.glob("*.parquet"))))
    assert sorted(items) == sorted(owners)
    client = D.DedupClient([D.DedupShard() for _ in range(2)], D.direct_call)
    assert client.load(items) == len(owners)
    later = [c for g in groups for c in g[1:]]
    assert all(v.status != D.NEW for v in client.claim(later))
    assert all(v.status == D.NEW for v in client.claim(owners))  # the resumed shards' own keys


# ------------------------------------------------------------------------------------ Ray

@pytest.mark.slow
def test_ray_tasks_racing_through_actor_shards_keep_exactly_one(groups):
    ray = pytest.importorskip("ray")
    items = [c for g in groups for c in g]
    random.Random(0).shuffle(items)
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")  # never join another run's cluster
    try:
        # threaded actors, as the engine should run them: searches in parallel, claims atomic by the lock
        actors = [ray.remote(D.DedupShard).options(num_cpus=0, max_concurrency=4).remote() for _ in range(3)]
        client = D.DedupClient(actors, lambda s, m, *a: ray.get(getattr(s, m.__name__).remote(*a)))

        @ray.remote(num_cpus=0.5)
        def claim_all(client, batch):
            out = []
            for i in range(0, len(batch), 4):
                out += client.claim(batch[i:i + 4])
            return out

        batches = [items[i::4] for i in range(4)]
        results = ray.get([claim_all.remote(client, b) for b in batches])
        verdicts = {c.key: v for b, r in zip(batches, results, strict=True) for c, v in zip(b, r, strict=True)}
        assert_one_kept_per_group(groups, verdicts)
        assert sum(s["entries"] for s in ray.get([a.stats.remote() for a in actors])) == len(groups)
    finally:
        ray.shutdown()
