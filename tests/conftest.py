"""Shared fixtures: real photos from scikit-image's data folder, encoded in the tests."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image


def photo(name: str = "astronaut") -> np.ndarray:
    """A real RGB photo shipped with scikit-image."""
    import skimage.data

    return np.ascontiguousarray(getattr(skimage.data, name)()[..., :3])


def scaled(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    """The photo resized to width x height (a stand-in for the many sizes found on the web)."""
    return np.asarray(Image.fromarray(rgb).resize((width, height), Image.Resampling.BICUBIC))


def encode(rgb_or_image, fmt: str = "JPEG", **kw) -> bytes:
    """Encode an array or PIL image with Pillow."""
    im = rgb_or_image if isinstance(rgb_or_image, Image.Image) else Image.fromarray(rgb_or_image)
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="session")
def astronaut() -> np.ndarray:
    return photo("astronaut")


@pytest.fixture(scope="session")
def coffee() -> np.ndarray:
    return photo("coffee")


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """The small sample corpus (good photos in every format plus one row per bad case), served on
    127.0.0.1 for the whole session."""
    from bench.corpus import CorpusServer, build_corpus

    root = tmp_path_factory.mktemp("corpus")
    with CorpusServer(root) as server:
        server.parquet = build_corpus(root, server.base_url, n_images=16, seed=1)
        yield server


@pytest.fixture
def one_torch_thread():
    """Tiny models gain nothing from threads, and threads crawl on a shared 2-core CI box."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def run_rows(out):
    """Every per-shard parquet of an engine run (one row per input row), concatenated (pa.Table)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    return pa.concat_tables([pq.read_table(p) for p in sorted(out.glob("[0-9]*.parquet"))])


S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def s3():
    """A moto S3 server on a free loopback port; yields (endpoint URL, boto3 client). The AWS
    variables are set for this process and every engine subprocess."""
    import os

    from moto.server import ThreadedMotoServer

    saved = {k: os.environ.get(k) for k in S3_ENV}
    os.environ.update(S3_ENV)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    client.create_bucket(Bucket="bucket")
    yield endpoint, client
    server.stop()
    for k, v in saved.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture(scope="module")
def local_run(corpus, tmp_path_factory):
    """One in-process engine run over the corpus into a local folder (the e2e tests' flags), shared by a
    module's read-only checks and compared with by the object-store tests."""
    from engine.pipeline import run

    from .test_engine_e2e import engine_cfg

    out = tmp_path_factory.mktemp("local") / "shards"
    run(engine_cfg(corpus.parquet, out, runner="local"))
    return out
