"""`make demo`: the whole path offline on a fresh machine.

A loopback server serves the sample corpus (real photos plus every kind of bad response), the
engine turns it into shards, the trainer runs a short CPU training of a tiny model on them, and
`python -m trainer generate` makes pictures with the trained ControlNet into OUTPUT/generate/.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from bench.corpus import serve_and_build
from engine.cli import main as engine_main


def make_shards(out: Path, n_images: int, workers: int) -> Path:
    """Serve the sample corpus and run the engine on it, as a user would from the command line."""
    corpus, shards = out / "corpus", out / "shards"
    with serve_and_build(corpus, n_images=n_images) as server:
        print(f"demo: corpus of {n_images} photos + bad cases served at {server.base_url}")
        # Short timeouts: the corpus has a server that drips one byte a second. The server is on
        # loopback, which the engine fetches only when told.
        code = engine_main(["shards", str(server.parquet), "--output", str(shards), "--workers", str(workers),
                            "--shard-size", "32", "--timeout", "3", "--retries", "1", "--max-bytes",
                            str(8 * 1024 * 1024), "--allow-private-network"])
    if code not in (0, 1):
        sys.exit(f"demo: the engine failed with exit code {code}")
    return shards


def train(shards: Path, out: Path) -> dict | None:
    """A short CPU training run of a tiny model on the shards (trainer/demo.py)."""
    try:
        from trainer.demo import run_demo
    except ImportError as exc:
        print(f"demo: trainer not available ({exc}); shards only")
        return None
    tars = sorted(p.name for p in shards.glob("[0-9]*.tar"))
    pattern = str(shards / f"{{{tars[0][:5]}..{tars[-1][:5]}}}.tar")
    return run_demo(pattern, str(out / "train"))


def generate(result: dict, out: Path) -> None:
    """Pictures from the ControlNet just trained: `python -m trainer generate` on a photo of the shards."""
    from trainer.demo import run_generate

    print(f"demo: generated {', '.join(run_generate(result, out))}")


def main(argv: list[str] | None = None) -> int:
    """Run the demo into --output (replaced if it exists)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", default="demo-out")
    p.add_argument("--images", type=int, default=48, help="good photos in the corpus")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--no-train", action="store_true", help="stop after the shards")
    a = p.parse_args(argv)
    out = Path(a.output)
    shutil.rmtree(out, ignore_errors=True)
    start = time.monotonic()
    shards = make_shards(out, a.images, a.workers)
    stats = json.loads((shards / "stats.json").read_text())
    print(f"demo: {stats['written']} samples in {shards.resolve()} (stats.json, NNNNN.parquet per shard)")
    result = None if a.no_train else train(shards, out)
    if result:
        print("demo: training:", json.dumps(result, indent=2, default=str))
        generate(result, out / "generate")
    print(f"demo: done in {time.monotonic() - start:.0f} s; everything is under {out.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
