"""Parquet rows: what the engine reads plus what a test checks it against, and the Builder that collects them."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from .encoders import encode
from .photos import COLOR_PHOTOS, GRAY_PHOTOS, is_near, perceptual_hash, render


@dataclass
class Row:
    """One parquet row: what the engine reads plus what a test checks it against."""

    url: str | None
    text: str | bytes | None  # bytes: stored as-is in the string column (invalid UTF-8 case)
    width: int | None
    height: int | None
    expected_outcome: str
    case: str
    source: str | None = None  # corpus-relative path of the upright, lossless source (EXIF cases)
    scores: dict = field(default_factory=dict)


ADJ = ("misty", "golden", "quiet", "vivid", "old", "tiny", "bright", "dark", "wild", "calm", "rustic", "modern")
NOUN = ("cat", "coffee cup", "rocket", "motorcycle", "astronaut", "galaxy", "retina scan", "tissue sample",
        "mountain", "harbour", "street", "forest", "lighthouse", "portrait", "garden", "bridge")
PLACE = ("at dawn", "in the rain", "on a table", "in space", "by the sea", "in a studio", "at night",
         "in autumn", "under neon lights", "in black and white")
UNICODE_CAPTIONS = (
    "Café crème sur la table – photo d'archive",
    "東京の夜景、雨上がりの街",
    "Ελληνικό καφενείο στο λιμάνι",
    "قطة نائمة على الأريكة",
    "Кошка на подоконнике 🐱",
    "Straße im Schnee, Müller & Söhne",
)


def caption(rng: random.Random) -> str:
    """A plausible alt-text caption."""
    return f"{rng.choice(ADJ)} {rng.choice(NOUN)} {rng.choice(PLACE)}".capitalize()


def scores(rng: random.Random, aesthetic: tuple[float, float] = (4.5, 8.0)) -> dict:
    """LAION score columns with plausible ranges."""
    return {
        "similarity": round(rng.uniform(0.26, 0.42), 6),
        "punsafe": round(rng.uniform(0.0, 0.2), 6),
        "pwatermark": round(rng.uniform(0.0, 0.6), 6),
        "AESTHETIC_SCORE": round(rng.uniform(*aesthetic), 6),
    }


SCHEMA = pa.schema([
    ("URL", pa.string()), ("TEXT", pa.string()), ("WIDTH", pa.int64()), ("HEIGHT", pa.int64()),
    ("similarity", pa.float64()), ("punsafe", pa.float64()), ("pwatermark", pa.float64()),
    ("AESTHETIC_SCORE", pa.float64()), ("expected_outcome", pa.string()), ("case", pa.string()),
    ("source", pa.string()),
])


def _text_column(texts: list) -> pa.Array:
    """TEXT as a string column; raw bytes go in unvalidated, as a non-Python writer could leave them."""
    if not any(isinstance(t, bytes) for t in texts):
        return pa.array(texts, pa.string())
    raw = [t.encode("utf-8") if isinstance(t, str) else t for t in texts]
    return pa.array(raw, pa.binary()).view(pa.string())


def write_parquet(rows: list[Row], path: Path) -> None:
    """Write rows with the LAION column names (plus expected_outcome, case, source)."""
    cols = {
        "URL": pa.array([r.url for r in rows], pa.string()),
        "TEXT": _text_column([r.text for r in rows]),
        "WIDTH": pa.array([r.width for r in rows], pa.int64()),
        "HEIGHT": pa.array([r.height for r in rows], pa.int64()),
    }
    for name in ("similarity", "punsafe", "pwatermark", "AESTHETIC_SCORE"):
        cols[name] = pa.array([r.scores.get(name) for r in rows], pa.float64())
    cols["expected_outcome"] = pa.array([r.expected_outcome for r in rows], pa.string())
    cols["case"] = pa.array([r.case for r in rows], pa.string())
    cols["source"] = pa.array([r.source for r in rows], pa.string())
    tmp = path.with_suffix(".parquet.tmp")
    pq.write_table(pa.table(cols, schema=SCHEMA), tmp)
    os.replace(tmp, path)


class Builder:
    """Collects rows and files for one corpus; one helper per group of cases."""

    def __init__(self, out: Path, base_url: str, rng: random.Random):
        self.out, self.files, self.base, self.rng = out, out / "files", base_url.rstrip("/"), rng
        self.files.mkdir(parents=True, exist_ok=True)
        self.rows: list[Row] = []
        self.hashes: list[int] = []
        self.n = 0

    def photo(self, w: int, h: int, gray: bool = False) -> Image.Image:
        """A fresh view of a random photo, re-drawn until no earlier view is a near duplicate of it."""
        for _ in range(50):
            name = self.rng.choice(GRAY_PHOTOS if gray else COLOR_PHOTOS + GRAY_PHOTOS)
            im = render(name, w, h, self.rng, grain=2.0, tint=not gray)
            h_ = perceptual_hash(im)
            if not is_near(h_, self.hashes):
                break
        self.hashes.append(h_)
        return im

    def save(self, case: str, data: bytes, ext: str) -> str:
        """Write one file under files/ and return its name."""
        self.n += 1
        name = f"{self.n:04d}_{case}{ext}"
        (self.files / name).write_bytes(data)
        return name

    def add(self, route: str | None, expected: str, case: str, wh=(None, None), text=None, source=None, url=None):
        """Append a row; `route` is relative to the base URL (or `url` is taken verbatim)."""
        if url is None and route is not None:
            url = f"{self.base}/{route.lstrip('/')}"
        text = caption(self.rng) if text == "auto" or text is None and case != "caption_null" else text
        self.rows.append(Row(url, text, wh[0], wh[1], expected, case, source, scores(self.rng)))

    def jpeg_file(self, case: str, w: int = 800, h: int = 600) -> tuple[str, tuple[int, int]]:
        """A fresh valid JPEG for rows whose failure is not in the image itself (or whose success is)."""
        return self.save(case, encode(self.photo(w, h), "JPEG", quality=90), ".jpg"), (w, h)
