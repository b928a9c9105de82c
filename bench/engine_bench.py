"""Engine vs img2dataset on the same URL list from the loopback corpus server.

Builds (once, cached in bench/.work) a laion-profile corpus, serves it on 127.0.0.1, warms the
page cache, then runs img2dataset (installed by this bench into bench/.peers/img2dataset-venv)
and our engine one after the other with the same worker processes, downloads in flight, output
size and crop (shorter side to 512, center crop 512x512, JPEG quality 95). Wall time is the
whole command (process and Ray start included), as a user sees it. Figures go to the "engine"
section of bench/RESULTS.md, one row per machine (earlier machines' rows are kept).

    python -m bench.engine_bench [--n 2000] [--workers N] [--repeat 1]
    python -m bench.engine_bench --photos DIR      # your own photos (JPEG, PNG, WebP, ...) instead
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bench import corpus
from bench.nginx import NginxServer, nginx_binary
from bench.nginx import version as nginx_version
from bench.results import RESULTS, machine_line, update_section

HERE = Path(__file__).parent
WORK = HERE / ".work"
PEER_VENV = HERE / ".peers" / "img2dataset-venv"
IMG2DATASET_SPEC = "img2dataset==1.47.0"  # the version these figures were taken with
EXTRA_COLUMNS = ["similarity", "punsafe", "pwatermark", "AESTHETIC_SCORE"]
SECTION = "engine"


@dataclass
class ToolRun:
    """One timed run of one tool."""

    tool: str
    seconds: float
    ok: int
    rows: int
    outcomes: dict = field(default_factory=dict)
    load: float = 0.0  # 1-minute load average when the run started: other work on the box skews figures
    stages: dict = field(default_factory=dict)  # engine: CPU-ms per written image by stage (shard stats)
    cpu_s: float = 0.0  # CPU seconds of the command and every process it waited for (robust to other load)

    @property
    def cpu_ms_per_image(self) -> float:
        """Whole-command CPU milliseconds per written image."""
        return 1000 * self.cpu_s / max(self.ok, 1)

    @property
    def images_per_s(self) -> float:
        """Successful images per wall-clock second."""
        return self.ok / self.seconds


# ------------------------------------------------------------------------------------ corpus


def cached_corpus(n: int, seed: int, rebuild: bool = False) -> Path:
    """The laion-profile corpus folder for (n, seed), built on first use."""
    folder = WORK / f"corpus-laion-v2-{n}-s{seed}"  # v2: bump when bench/corpus/'s generator changes
    done = folder / "BUILT"
    if rebuild and folder.exists():
        shutil.rmtree(folder)
    if not done.exists():
        t = time.perf_counter()
        print(f"building {n} images into {folder} ...", flush=True)
        # The URLs are rewritten for each run's port (see url_list), so any base works here.
        corpus.build_corpus(folder, "http://127.0.0.1:0", n_images=n, profile="laion", seed=seed)
        done.write_text(f"{time.perf_counter() - t:.1f} s\n")
        print(f"built in {time.perf_counter() - t:.0f} s", flush=True)
    return folder


PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")


def photo_corpus(source: Path, rebuild: bool = False) -> Path:
    """A corpus folder made of the photos under `source` (searched recursively), for a side by side on
    other pictures than the laion profile's: each distinct file once, as files/NNNNNN.<suffix> (copied:
    nginx and the engine's --local-root both refuse links out of the folder), with a parquet like the
    laion corpus's (caption: the file's stem; the score columns empty, as img2dataset is asked to keep them)."""
    from PIL import Image

    source = source.resolve()
    found = sorted({p.resolve() for p in source.rglob("*") if p.suffix.lower() in PHOTO_SUFFIXES and p.is_file()})
    if not found:
        raise SystemExit(f"--photos {source}: no {'/'.join(PHOTO_SUFFIXES)} files under it")
    key = hashlib.sha256("\n".join(f"{p}:{p.stat().st_size}" for p in found).encode()).hexdigest()[:12]
    folder = WORK / f"corpus-photos-{key}"
    if rebuild and folder.exists():
        shutil.rmtree(folder)
    if (folder / "BUILT").exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "files").mkdir(parents=True)
    rows: dict[str, list] = {"URL": [], "TEXT": [], "WIDTH": [], "HEIGHT": [], **{c: [] for c in EXTRA_COLUMNS}}
    for i, path in enumerate(found):
        name = f"{i:06d}{path.suffix.lower()}"
        shutil.copyfile(path, folder / "files" / name)
        try:
            with Image.open(path) as im:
                width, height = im.size
        except Exception:  # noqa: BLE001 -- both tools meet it all the same; the parquet just has no size
            width = height = None
        for col, value in (("URL", f"http://127.0.0.1:0/files/{name}"), ("TEXT", path.stem.replace("_", " ")),
                           ("WIDTH", width), ("HEIGHT", height), *((c, None) for c in EXTRA_COLUMNS)):
            rows[col].append(value)
    schema = pa.schema([("URL", pa.string()), ("TEXT", pa.string()), ("WIDTH", pa.int64()), ("HEIGHT", pa.int64()),
                        *((c, pa.float64()) for c in EXTRA_COLUMNS)])
    pq.write_table(pa.table(rows, schema=schema), folder / "corpus.parquet")
    (folder / "SOURCE").write_text(f"{source}\n")
    (folder / "BUILT").write_text(f"{len(found)} photos\n")
    print(f"corpus of {len(found)} photos from {source} in {folder}", flush=True)
    return folder


def url_list(folder: Path, base_url: str, out: Path) -> Path:
    """The corpus parquet with its URLs pointed at this run's server."""
    table = pq.read_table(folder / "corpus.parquet")
    urls = [base_url + "/" + u.split("/", 3)[3] for u in table.column("URL").to_pylist()]
    table = table.set_column(table.column_names.index("URL"), "URL", pa.array(urls, pa.string()))
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out)
    return out


def corpus_facts(folder: Path) -> dict:
    """Shorter-side split and mean file sizes of the corpus, for the results table."""
    table = pq.read_table(folder / "corpus.parquet", columns=["URL", "WIDTH", "HEIGHT"]).to_pydict()
    short = np.minimum([w or 0 for w in table["WIDTH"]], [h or 0 for h in table["HEIGHT"]])
    size = np.array([(folder / "files" / u.rsplit("/", 1)[1]).stat().st_size for u in table["URL"]])
    small, large = short < 1024, short >= 1024
    suffixes = [u.rsplit(".", 1)[-1].lower() for u in table["URL"]]
    source = folder / "SOURCE"
    return {
        "formats": {s: suffixes.count(s) for s in sorted(set(suffixes))},
        "source": source.read_text().strip() if source.exists() else "laion profile",
        "n": len(short),
        "split": [round(float(np.mean(m)), 3) for m in (short < 768, small & (short >= 768), large)],
        "kb_small": round(float(size[small].mean()) / 1e3) if small.any() else 0,
        "kb_large": round(float(size[large].mean()) / 1e3) if large.any() else 0,
        "mb_total": round(float(size.sum()) / 1e6),
    }


def warm_page_cache(folder: Path) -> None:
    """Read every file once, so neither tool pays for the disk."""
    for f in (folder / "files").iterdir():
        f.read_bytes()


class ServerPool:
    """The corpus server in this process plus `processes - 1` more on the same port (SO_REUSEPORT),
    so that serving never limits what the tools can fetch on many cores."""

    def __init__(self, folder: Path, processes: int):
        self.folder, self.processes = folder, processes
        self.main: corpus.CorpusServer | None = None
        self.others: list[subprocess.Popen] = []

    def __enter__(self) -> ServerPool:
        self.main = corpus.CorpusServer(self.folder, reuse_port=self.processes > 1).start()
        for _ in range(self.processes - 1):
            p = subprocess.Popen([sys.executable, "-m", "bench.corpus", "serve", "--dir", str(self.folder),
                                  "--port", str(self.main.port), "--reuse-port"], stdout=subprocess.PIPE, text=True)
            self.others.append(p)
            if not p.stdout.readline().startswith("serving"):  # printed once listening
                self.__exit__()
                raise RuntimeError("a corpus server process failed to start")
        return self

    @property
    def base_url(self) -> str:
        """http://127.0.0.1:PORT"""
        return self.main.base_url

    def __exit__(self, *exc) -> None:
        for p in self.others:
            p.terminate()
        for p in self.others:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        self.main.stop()


class FilesOnDisk:
    """No server: both tools read the corpus's files through file:// URLs (img2dataset through urllib, the
    engine under --local-root). What a many-core box measures where loopback HTTP is the limit (the lent
    GPU hosts' gVisor sandbox holds any HTTP client near 10 img/s per worker), and a figure without the
    server's CPU on the same cores."""

    def __init__(self, folder: Path):
        self.folder = folder.resolve()

    @property
    def base_url(self) -> str:
        """file:///abs/corpus/folder (url_list appends /files/NAME)."""
        return "file://" + str(self.folder)

    def __enter__(self) -> FilesOnDisk:
        return self

    def __exit__(self, *exc) -> None:
        pass


def serving(folder: Path, a: argparse.Namespace):
    """The server the run uses (a.server: nginx when found, else the aiohttp pool; files: none); sets
    a.served_by."""
    if a.server == "files":
        a.served_by, a.probe = "files", False  # nothing to probe
        a.engine_args = ["--local-root", str(folder.resolve()), *a.engine_args]
        return FilesOnDisk(folder)
    binary = nginx_binary() if a.server in ("auto", "nginx") else None
    if a.server == "nginx" and not binary:
        raise SystemExit("--server nginx: no nginx binary found (Debian: apt-get install nginx-light)")
    if binary:
        a.served_by = nginx_version(binary)
        return NginxServer(folder, a.server_processes, WORK / "nginx", binary)
    a.served_by = "aiohttp"
    return ServerPool(folder, a.server_processes)


def _probe_slice(args: tuple[list[str], int]) -> tuple[int, float, float]:
    """Fetch URLs (bodies read and dropped) at a given concurrency; (count, start, end) wall clock."""
    import asyncio

    import aiohttp

    urls, concurrency = args

    async def go() -> int:
        sem = asyncio.Semaphore(concurrency)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as s:
            async def one(u: str) -> int:
                async with sem, s.get(u) as r:
                    return len(await r.read())
            return sum(1 for n in await asyncio.gather(*map(one, urls)) if n)

    start = time.time()
    n = asyncio.run(go())
    return n, start, time.time()


def probe_server(urls: list[str], processes: int, concurrency: int = 32) -> float:
    """Images/s the server pool delivers to bare aiohttp clients in `processes` processes."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    slices = [(urls[i::processes], concurrency) for i in range(processes)]
    with ProcessPoolExecutor(processes, mp_context=get_context("spawn")) as pool:
        done = list(pool.map(_probe_slice, slices))
    return sum(d[0] for d in done) / (max(d[2] for d in done) - min(d[1] for d in done))


# ------------------------------------------------------------------------------------ peers


def ensure_img2dataset(python: str | None, wheels: Path | None) -> list[str]:
    """The command prefix that runs img2dataset; creates its venv on first use.

    With `python`, that interpreter is used as is (it must import img2dataset). With `wheels`, the
    venv is filled offline from that folder (for machines without a package index).
    """
    if python:
        return [python, "-c", "from img2dataset.main import main; main()"]
    py = PEER_VENV / "bin" / "python"
    if not (PEER_VENV / "bin" / "img2dataset").exists():
        print(f"installing {IMG2DATASET_SPEC} into {PEER_VENV} ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True)
        offline = ["--no-index", "--find-links", str(wheels)] if wheels else []
        subprocess.run([str(py), "-m", "pip", "install", "-q", *offline, IMG2DATASET_SPEC], check=True)
    return [str(py), "-c", "from img2dataset.main import main; main()"]


# ------------------------------------------------------------------------------------ runs


LAST_CPU = [0.0]  # CPU seconds of the last timed() command and all its descendants


def poll_tree_cpu(proc: subprocess.Popen, every: float = 0.2) -> float:
    """Wait for `proc`; the CPU seconds of it and every descendant seen while it ran."""
    import psutil

    seen: dict[tuple[int, float], float] = {}
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            tree = []
        for p in tree:
            try:
                times = p.cpu_times()
                seen[(p.pid, p.create_time())] = times.user + times.system
            except psutil.Error:
                pass
        time.sleep(every)
    return sum(seen.values())


def timed(cmd: list[str], log: Path, env: dict | None = None) -> float:
    """Run a command to completion, output to a log file; wall seconds (its CPU seconds in
    LAST_CPU). Raises on failure."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        polled = poll_tree_cpu(proc)
    seconds = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    # rusage misses processes nobody waited for (Ray's workers); polling misses the last moments
    # of processes that end between two looks: the larger of the two
    LAST_CPU[0] = max(polled, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    if proc.returncode != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"{cmd[0]} exited {proc.returncode}; log {log}:\n{tail}")
    return seconds


def run_img2dataset(prefix: list[str], urls: Path, out: Path, a: argparse.Namespace) -> ToolRun:
    """img2dataset with the engine's settings; successes from its per-shard stats."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = prefix + [
        "--url_list", str(urls), "--input_format", "parquet", "--url_col", "URL", "--caption_col", "TEXT",
        "--output_format", "webdataset", "--output_folder", str(out),
        "--processes_count", str(a.workers), "--thread_count", str(a.concurrency),
        "--number_sample_per_shard", str(a.shard_size),
        "--image_size", str(a.image_size), "--resize_mode", "center_crop", "--resize_only_if_bigger", "True",
        "--min_image_size", "512", "--max_aspect_ratio", "2", "--encode_format", "jpg", "--encode_quality", "95",
        "--timeout", "10", "--retries", "2", "--save_additional_columns", json.dumps(EXTRA_COLUMNS),
        "--enable_wandb", "False", "--distributor", "multiprocessing",
    ]
    # No wandb, and no albumentations update check (a PyPI request in every spawned worker).
    env = dict(os.environ, WANDB_MODE="disabled", WANDB_SILENT="true", NO_ALBUMENTATIONS_UPDATE="1")
    load = os.getloadavg()[0]
    seconds = timed(cmd, out.with_suffix(".log"), env)
    ok = rows = 0
    failures: dict[str, int] = {}
    for f in out.glob("*_stats.json"):
        s = json.loads(f.read_text())
        ok, rows = ok + s["successes"], rows + s["count"]
        for reason, n in s.get("status_dict", {}).items():
            if reason != "success":
                failures[reason[:60]] = failures.get(reason[:60], 0) + n
    return ToolRun("img2dataset", seconds, ok, rows, {"ok": ok, **failures}, load, cpu_s=LAST_CPU[0])


def run_engine(urls: Path, out: Path, a: argparse.Namespace) -> ToolRun:
    """Our engine, same settings; successes from its stats.json."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "engine", "shards", str(urls), "--output", str(out),
           "--workers", str(a.workers), "--concurrency", str(a.concurrency), "--shard-size", str(a.shard_size),
           "--image-size", str(a.image_size), "--min-image-size", "512", "--max-aspect-ratio", "2",
           "--timeout", "10", "--retries", "2", "--no-progress", "--allow-private-network", *a.engine_args]
    load = os.getloadavg()[0]
    seconds = timed(cmd, out.with_suffix(".log"))
    cpu = LAST_CPU[0]
    stats = json.loads((out / "stats.json").read_text())
    ok = stats["outcomes"].get("ok", 0)
    return ToolRun("engine", seconds, ok, stats["rows"], stats["outcomes"], load, stage_ms(out, ok), cpu)


def stage_ms(out: Path, written: int) -> dict:
    """CPU-ms per written image by stage, summed over the shards' stats (engine/shard.py cpu_ms)."""
    total: dict[str, float] = {}
    for path in out.glob("[0-9]*.stats.json"):
        for stage, ms in json.loads(path.read_text()).get("cpu_ms", {}).items():
            total[stage] = total.get(stage, 0.0) + ms
    return {k: round(v / max(written, 1), 2) for k, v in total.items()}


def fixed_costs(prefix: list[str], urls: Path, a: argparse.Namespace) -> dict:
    """Wall seconds of each whole command on a 1-row list, less a bare `python -c pass`: the
    fixed cost a run pays (interpreter, imports, Ray start and shutdown)."""
    one = urls.with_name("one.parquet")
    pq.write_table(pq.read_table(urls).slice(0, 1), one)
    bare = min(timed([sys.executable, "-c", "pass"], one.with_suffix(".log")) for _ in range(3))
    tiny = argparse.Namespace(**{**vars(a), "shard_size": 1})
    costs = {"engine": run_engine(one, WORK / "run" / "one-engine", tiny).seconds - bare,
             "engine_local": run_engine(one, WORK / "run" / "one-local", argparse.Namespace(
                 **{**vars(tiny), "engine_args": [*a.engine_args, "--runner", "local"]})).seconds - bare}
    if prefix:
        costs["img2dataset"] = run_img2dataset(prefix, one, WORK / "run" / "one-i2d", tiny).seconds - bare
    return {k: round(v, 2) for k, v in costs.items()}


def check_output(out: Path, size: int, strict: bool = True) -> str:
    """The first sample's files in the first tar, and the crop's size (both tools must match)."""
    from PIL import Image

    tar = sorted(out.glob("*.tar"))[0]
    with tarfile.open(tar) as t:
        members = t.getmembers()
        jpg = next(m for m in members if m.name.endswith(".jpg"))
        w, h = Image.open(t.extractfile(jpg)).size
        key = jpg.name[: -len(".jpg")]
        exts = sorted(m.name[len(key):] for m in members if m.name.startswith(key + "."))
    if (w, h) != (size, size) and strict:  # img2dataset keeps images whose shorter side is exactly 512 uncropped
        raise RuntimeError(f"{tar}: {jpg.name} is {w}x{h}, not {size}x{size}")
    return f"{' '.join(exts)} ({w}x{h})"


# ------------------------------------------------------------------------------------ report


def load_records() -> dict:
    """Earlier records (one per machine), from the hidden data line of our section."""
    text = RESULTS.read_text() if RESULTS.exists() else ""
    start = text.find(f"<!-- BEGIN {SECTION} -->")
    marker = "<!-- data: "
    i = text.find(marker, start) if start >= 0 else -1
    if i < 0:
        return {}
    return json.loads(text[i + len(marker) : text.index(" -->", i)])


def render(records: dict) -> str:
    """The section's markdown: one row per machine, then the notes."""
    lines = [
        "## Engine vs img2dataset (`make bench-engine`)",
        "",
        "Same URL list from the loopback corpus server (laion profile, or `--photos` where a row says so), run one",
        "after the other on the same machine; both crop the shorter side to 512 and center-crop 512x512 (JPEG q95),",
        "same worker processes and downloads in flight. Our engine also writes the palette conditioning map and runs",
        "exact + near dedup. Wall time is the whole command (interpreter and Ray start included).",
        "",
        "| machine | images | workers | img2dataset s | img2dataset img/s | engine s | engine img/s |"
        " img/s per worker (i2d / engine) | ratio | whole-command CPU-ms per image (i2d / engine) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records.values():
        i2d, eng = r["img2dataset"], r["engine"]
        lines.append(
            f"| {r['machine']} | {eng['ok']}/{eng['rows']} (i2d {i2d['ok']}) | {r['workers']} | {i2d['seconds']:.1f} "
            f"| {i2d['ok'] / i2d['seconds']:.1f} | {eng['seconds']:.1f} | {eng['ok'] / eng['seconds']:.1f} "
            f"| {i2d['ok'] / i2d['seconds'] / r['workers']:.1f} / {eng['ok'] / eng['seconds'] / r['workers']:.1f} "
            f"| **{r['ratio']:.2f}x** | {cpu_per_image(i2d)} / {cpu_per_image(eng)} |"
        )
    lines.append("")
    lines += stage_table(records)
    for r in records.values():
        c = r["corpus"]
        lines.append(
            f"- {r['machine']}: {r['date']}, img2dataset {r['img2dataset_version']}, corpus {corpus_label(c)} "
            f"({c['mb_total']} MB; shorter side "
            f"{'512-767' if c.get('source', 'laion profile') == 'laion profile' else 'under 768'}/768-1023/>=1024: "
            f"{' / '.join(f'{x:.0%}' for x in c['split'])}; mean {c['kb_small']} KB below 1024, "
            f"{c['kb_large']} KB above), shard size {r['shard_size']}, concurrency {r['concurrency']}, "
            f"{served(r)}"
            f"{', serving ' + str(c['server_img_s']) + ' img/s alone' if c.get('server_img_s') else ''}"
            f"{', ' + r['note'] if r.get('note') else ''}; load average at start "
            f"{r['img2dataset'].get('load', 0):.1f} (img2dataset) / {r['engine'].get('load', 0):.1f} (engine); "
            f"engine outcomes {r['engine']['outcomes']}."
        )
    lines.append("")
    lines.append(f"<!-- data: {json.dumps(records, sort_keys=True)} -->")
    return "\n".join(lines)


def corpus_label(c: dict) -> str:
    """What a record's corpus was: the laion profile's JPEGs, or photos from a folder (--photos) by format."""
    if c.get("source", "laion profile") == "laion profile":
        return f"{c['n']} JPEGs"
    formats = ", ".join(f"{n} {s}" for s, n in c.get("formats", {}).items())
    return f"{c['n']} photos from {c['source']} ({formats})"


def served(r: dict) -> str:
    """How a record's corpus reached the tools."""
    if r.get("server") == "files":
        return "read from disk by both tools (file:// URLs, no server)"
    return f"{r.get('server_processes', 1)} {r.get('server', 'aiohttp')} server process(es)"


def cpu_per_image(run: dict) -> str:
    """Whole-command CPU-ms per image of a recorded run, or n/a for records without it."""
    return f"{1000 * run['cpu_s'] / max(run['ok'], 1):.1f}" if run.get("cpu_s") else "n/a"


STAGE_NAMES = {"fetch": "fetch/parse (event loop)", "decode": "decode", "resize": "resize",
               "jpeg": "JPEG encode", "remap": "remap", "png": "PNG", "hashes": "hashes",
               "claims": "dedup claims", "tar": "tar", "other": "everything else", "total": "**total**"}


def stage_table(records: dict) -> list[str]:
    """CPU-ms per written image by stage, and the fixed cost per run, for records that have them."""
    with_stages = [r for r in records.values() if r["engine"].get("stages")]
    if not with_stages:
        return []
    lines = ["", "Engine CPU-ms per written image by stage (thread CPU time, summed over the shards' stats):", "",
             "| machine | " + " | ".join(STAGE_NAMES.values()) + " | fixed cost per run, s (engine / engine"
             " local / img2dataset) |", "|---" * (len(STAGE_NAMES) + 2) + "|"]
    for r in with_stages:
        st, fx = r["engine"]["stages"], r.get("fixed", {})
        lines.append(f"| {r['machine']} | " + " | ".join(f"{st.get(k, 0):.2f}" for k in STAGE_NAMES)
                     + f" | {fx.get('engine', '?')} / {fx.get('engine_local', '?')} / {fx.get('img2dataset', '?')} |")
    lines.append("")
    return lines


def label_suffix(a: argparse.Namespace) -> str:
    """What sets a run's row apart from the default one of the same machine (rows are keyed by label)."""
    return (f", photos of {a.photos.resolve()}" if a.photos else "") + (", file:// URLs" if a.served_by == "files" else "")


def record(a: argparse.Namespace, facts: dict, i2d: ToolRun, eng: ToolRun, version: str) -> dict:
    """One machine's record for the results section."""
    return {
        "machine": a.machine or machine_line() + label_suffix(a), "date": time.strftime("%Y-%m-%d"), "workers": a.workers,
        "concurrency": a.concurrency, "shard_size": a.shard_size, "corpus": facts,
        "img2dataset": asdict(i2d), "engine": asdict(eng), "img2dataset_version": version,
        "ratio": eng.images_per_s / i2d.images_per_s, "note": a.note, "server_processes": a.server_processes,
        "cores": a.cores, "server": a.served_by,
    }


def save(rec: dict) -> None:
    """Merge one record (keyed by machine) into the section."""
    records = load_records()
    records[rec["machine"]] = rec
    update_section(SECTION, render(records))


def peer_version(prefix: list[str]) -> str:
    """img2dataset's installed version."""
    code = "import importlib.metadata as m; print(m.version('img2dataset'))"
    return subprocess.run([prefix[0], "-c", code], capture_output=True, text=True).stdout.strip() or "?"


# ------------------------------------------------------------------------------------ main


def default_shard_size(n: int, workers: int) -> int:
    """Rows per shard unless --shard-size says: four shards per worker, at least 50 rows each."""
    return max(50, n // (4 * workers))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    cores = os.cpu_count() or 1
    ap = argparse.ArgumentParser(prog="python -m bench.engine_bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=2000, help="images in the corpus")
    ap.add_argument("--seed", type=int, default=0, help="corpus seed")
    ap.add_argument("--workers", type=int, default=cores, help="worker processes for both tools (default: cores)")
    ap.add_argument("--concurrency", type=int, default=64, help="downloads in flight per worker (img2dataset thread_count)")
    ap.add_argument("--shard-size", type=int, default=None, help="rows per shard (default: n / (4 x workers), at least 50)")
    ap.add_argument("--image-size", type=int, default=512, help="output crop side")
    ap.add_argument("--repeat", type=int, default=2, help="alternating runs of each tool; the fastest counts")
    ap.add_argument("--no-fixed", dest="fixed", action="store_false", help="skip measuring the fixed cost per run")
    ap.add_argument("--server-processes", type=int, default=max(1, cores // 4), help="corpus server processes (default: cores / 4)")
    ap.add_argument("--server", choices=("auto", "nginx", "aiohttp", "files"), default="auto",
                    help="what serves the corpus: nginx (cheapest per image, as the issue measured) when found, else "
                         "aiohttp; files: no server, both tools read file:// URLs (a many-core box whose loopback "
                         "HTTP is the limit)")
    ap.add_argument("--no-probe", dest="probe", action="store_false", help="skip measuring the server alone first")
    ap.add_argument("--only", choices=("both", "img2dataset", "engine"), default="both", help="run one tool only (no results written)")
    ap.add_argument("--img2dataset-python", default=None, help="an interpreter that already imports img2dataset (skips the venv)")
    ap.add_argument("--peer-wheels", type=Path, default=None, help="install img2dataset offline from this wheel folder")
    ap.add_argument("--engine-args", nargs=argparse.REMAINDER, default=[], help="extra engine flags (last)")
    ap.add_argument("--machine", default=None, help="machine label for the results (default: bench.results.machine_line())")
    ap.add_argument("--note", default="", help="free note for this machine's results line")
    ap.add_argument("--json-out", type=Path, default=None, help="also write this run's record here")
    ap.add_argument("--add-record", type=Path, default=None, help="merge a record written by --json-out elsewhere; run nothing")
    ap.add_argument("--photos", type=Path, default=None,
                    help="use the photos under this folder (recursively; JPEG, PNG, WebP, ...) as the corpus instead "
                         "of the laion profile's; --n and --seed are then unused")
    ap.add_argument("--rebuild", action="store_true", help="rebuild the cached corpus")
    ap.add_argument("--no-save", dest="save", action="store_false", help="print the figures, leave bench/RESULTS.md alone")
    a = ap.parse_args(argv)
    a.cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    return a


def main(argv: list[str] | None = None) -> None:
    """Build, serve, run both tools, record."""
    a = parse_args(argv)
    if a.add_record:
        rec = json.loads(a.add_record.read_text())
        save(rec)
        print(f"merged the record of {rec['machine']} into {RESULTS}")
        return
    folder = photo_corpus(a.photos, a.rebuild) if a.photos else cached_corpus(a.n, a.seed, a.rebuild)
    facts = corpus_facts(folder)
    a.shard_size = a.shard_size or default_shard_size(facts["n"], a.workers)  # --photos: --n counts nothing
    prefix = ensure_img2dataset(a.img2dataset_python, a.peer_wheels) if a.only != "engine" else []
    warm_page_cache(folder)
    runs: dict[str, list[ToolRun]] = {"img2dataset": [], "engine": []}
    with serving(folder, a) as srv:
        urls = url_list(folder, srv.base_url, WORK / "run" / "urls.parquet")
        print(f"{facts['n']} images, {facts['mb_total']} MB at {srv.base_url} ({served(vars(a) | {'server': a.served_by})}); "
              f"{a.workers} workers, {a.concurrency} in flight each, shards of {a.shard_size}", flush=True)
        if a.probe:
            url_strings = pq.read_table(urls, columns=["URL"]).column(0).to_pylist()
            facts["server_img_s"] = round(probe_server(url_strings, a.workers))
            print(f"server alone: {facts['server_img_s']} img/s to {a.workers} bare aiohttp client processes", flush=True)
        for _ in range(a.repeat):
            if a.only in ("both", "img2dataset"):
                r = run_img2dataset(prefix, urls, WORK / "run" / "img2dataset", a)
                print(f"img2dataset: {r.ok}/{r.rows} ok in {r.seconds:.1f} s = {r.images_per_s:.1f} img/s, "
                      f"{r.cpu_ms_per_image:.1f} CPU-ms/img "
                      f"[{check_output(WORK / 'run' / 'img2dataset', a.image_size, strict=False)}] {r.outcomes}", flush=True)
                runs["img2dataset"].append(r)
            if a.only in ("both", "engine"):
                r = run_engine(urls, WORK / "run" / "engine", a)
                print(f"engine:      {r.ok}/{r.rows} ok in {r.seconds:.1f} s = {r.images_per_s:.1f} img/s, "
                      f"{r.cpu_ms_per_image:.1f} CPU-ms/img "
                      f"[{check_output(WORK / 'run' / 'engine', a.image_size)}] {r.outcomes}", flush=True)
                runs["engine"].append(r)
        fixed = fixed_costs(prefix, urls, a) if a.fixed else {}
        if fixed:
            print(f"fixed cost per run (1-row list, less a bare Python start): {fixed} s", flush=True)
    if a.only != "both":
        return
    i2d = max(runs["img2dataset"], key=lambda r: r.images_per_s)
    eng = max(runs["engine"], key=lambda r: r.images_per_s)
    rec = record(a, facts, i2d, eng, peer_version(prefix))
    rec["fixed"] = fixed
    print(f"ratio engine / img2dataset: {rec['ratio']:.2f}x "
          f"({eng.images_per_s / a.cores:.1f} vs {i2d.images_per_s / a.cores:.1f} img/s per core)")
    print("engine CPU-ms per written image by stage: " + ", ".join(f"{k} {v}" for k, v in eng.stages.items()))
    if a.json_out:
        a.json_out.write_text(json.dumps(rec, indent=1))
    if a.save:
        save(rec)
        print(f"results: {RESULTS} (section {SECTION})")


if __name__ == "__main__":
    main()
