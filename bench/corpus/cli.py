"""`python -m bench.corpus build|serve ...`: write a corpus folder, or serve one until Ctrl-C."""

from __future__ import annotations

import argparse
from pathlib import Path

from .build import build_corpus, summary
from .serve import serve_forever


def main(argv: list[str] | None = None) -> None:
    """python -m bench.corpus build|serve ..."""
    ap = argparse.ArgumentParser(prog="python -m bench.corpus", description="Sample corpus: a LAION-style parquet of image URLs "
                                 "and the loopback server that serves them (docs/CORPUS.md).")
    sub = ap.add_subparsers(dest="cmd", required=True)
    bp = sub.add_parser("build", help="write DIR/files/* and DIR/corpus.parquet")
    bp.add_argument("--out", required=True, type=Path, help="corpus folder")
    bp.add_argument("--port", type=int, default=8765, help="port the URLs point at (serve it with `serve`)")
    bp.add_argument("--profile", choices=("small", "laion"), default="small", help="small: every bad case; laion: benchmark sizes")
    bp.add_argument("--n", type=int, default=None, help="good images (default 40 small, 2000 laion)")
    bp.add_argument("--seed", type=int, default=0, help="random seed (same seed, same corpus)")
    bp.add_argument("--bad-cases", choices=("on", "off", "default"), default="default", help="include the bad rows")
    sp = sub.add_parser("serve", help="serve a built corpus folder until Ctrl-C")
    sp.add_argument("--dir", required=True, type=Path, help="corpus folder (holding files/)")
    sp.add_argument("--port", type=int, default=8765, help="port to listen on (127.0.0.1)")
    sp.add_argument("--reuse-port", action="store_true", help="share the port with other server processes (SO_REUSEPORT)")
    args = ap.parse_args(argv)
    if args.cmd == "build":
        n = args.n if args.n is not None else (2000 if args.profile == "laion" else 40)
        bad = {"on": True, "off": False, "default": None}[args.bad_cases]
        path = build_corpus(args.out, f"http://127.0.0.1:{args.port}", n_images=n, profile=args.profile,
                            seed=args.seed, bad_cases=bad)
        print(f"{path}: {summary(path)}")
    else:
        serve_forever(args.dir, args.port, args.reuse_port)

