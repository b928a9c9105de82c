"""Sample corpus: a LAION-style parquet of image URLs and the loopback server that serves them.

`build_corpus` writes image files (real photos from scikit-image's shipped data folder, rescaled,
cropped and re-encoded) and a parquet whose rows point at a base URL; every row carries the outcome
the engine should give it (`expected_outcome`) and the case it exercises (`case`). `CorpusServer`
serves the files and every kind of bad HTTP behaviour on dedicated, relative routes, from a
background thread, so tests, `make demo` and the benchmarks all download from 127.0.0.1.
Routes and cases are listed in docs/CORPUS.md.

One module per job: photos.py (source photos, views, grain, hash), encoders.py (bytes, odd ones by
hand), rows.py (parquet rows and the Builder), cases.py (profile small: good formats and the catalogue
of bad cases), laion.py (profile laion), build.py (build_corpus), serve.py (CorpusServer and its
routes), cli.py.

CLI:  python -m bench.corpus build --out DIR [--port P] [--profile small|laion] [--n N]
      python -m bench.corpus serve --dir DIR --port P
"""

from .build import build_corpus, serve_and_build, summary
from .cases import GOOD_FORMATS, REFUSED_URL
from .cli import main
from .encoders import animated_gif, encode, exif_rotated_jpeg, jpeg_bomb, png16, png_bomb
from .laion import LAION_BINS, laion_size
from .photos import (
    COLOR_PHOTOS,
    GRAY_PHOTOS,
    MIN_HASH_DISTANCE,
    add_grain,
    load_photo,
    perceptual_hash,
    render,
    view,
)
from .rows import SCHEMA, Row, caption, scores, write_parquet
from .serve import BODIES, CONTENT_TYPES, DRIP_CLAIMED_BYTES, LIE_EXTRA_BYTES, CorpusServer, make_app

__all__ = [
    "BODIES", "COLOR_PHOTOS", "CONTENT_TYPES", "DRIP_CLAIMED_BYTES", "GOOD_FORMATS", "GRAY_PHOTOS", "LAION_BINS",
    "LIE_EXTRA_BYTES", "MIN_HASH_DISTANCE", "REFUSED_URL", "SCHEMA", "CorpusServer", "Row", "add_grain",
    "animated_gif", "build_corpus", "caption", "encode", "exif_rotated_jpeg", "jpeg_bomb", "laion_size",
    "load_photo", "main", "make_app", "perceptual_hash", "png16", "png_bomb", "render", "scores",
    "serve_and_build", "summary", "view", "write_parquet",
]
