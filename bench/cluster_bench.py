"""The engine on a Ray cluster of two nodes against one node with as many CPUs, on one machine.

Issue 9's yardstick for scale-out: 16 workers spread over two Ray nodes of 8 CPUs each must do at
least 0.95x the images/s of one node of 16, so that joining nodes costs (almost) nothing. Both
clusters are real Ray clusters started here (ray.cluster_utils.Cluster: a head and worker raylets as
separate processes, as `ray start` makes them); the engine joins with `--runner ray --ray-address`,
reads the same local files (bench.scaling's corpus and list) and runs the whole command, dedup on.
The two layouts alternate, `--repeats` times each; the steady rate (first shard start to last shard
end) and the whole-command rate are both reported, and the shards' node ids prove the spread.

    python -m bench.cluster_bench [--n 3000] [--workers 16] [--repeats 2] [--save]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from bench import scaling
from bench.results import machine_line, update_section

HERE = Path(__file__).parent


def start_cluster(layout: list[int]):
    """A local Ray cluster with one node per entry of `layout` (its CPU count); the first is the head."""
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": layout[0], "include_dashboard": False})
    for cpus in layout[1:]:
        c.add_node(num_cpus=cpus)
    c.wait_for_nodes()
    return c


def one_run(layout: list[int], urls: Path, root: Path, out: Path, workers: int, rows: int) -> dict:
    """The whole engine command on a fresh cluster of `layout`; rates and the nodes that ran shards."""
    c = start_cluster(layout)
    try:
        r = scaling.run_engine(urls, root, out, workers, rows, ["--runner", "ray", "--ray-address", c.address])
    finally:
        c.shutdown()
    stats = scaling.shard_stats(out)
    nodes = {s.get("node_id") for s in stats}
    r.update(layout=layout, nodes=len(nodes - {None}), per_node=per_node(stats))
    return r


def per_node(stats: list[dict]) -> list[dict]:
    """Each node's shards, rows, and when its first shard started and its last ended (seconds after
    the run's first shard started): whether one node of a cluster started late or finished early."""
    if not stats:
        return []
    t0, out = min(s["window"][0] for s in stats), []
    for node in sorted({s.get("node_id") or "?" for s in stats}):
        mine = [s for s in stats if (s.get("node_id") or "?") == node]
        out.append({"node": node[:8], "shards": len(mine), "rows": sum(s["rows"] for s in mine),
                    "first_start_s": round(min(s["window"][0] for s in mine) - t0, 2),
                    "last_end_s": round(max(s["window"][1] for s in mine) - t0, 2)})
    return out


def summary(runs: list[dict]) -> dict:
    """Median rates of one layout's runs."""
    return {"layout": runs[0]["layout"], "runs": len(runs), "nodes_used": min(r["nodes"] for r in runs),
            "per_node": runs[-1].get("per_node", []),
            "img_s": statistics.median(r["img_s"] for r in runs),
            "steady_rows_s": statistics.median(r["steady_rows_s"] for r in runs),
            "cpu_ms_per_row": statistics.median(r["cpu_ms_per_row"] for r in runs),
            "outcomes": runs[-1]["outcomes"]}


def render(rec: dict) -> str:
    """The engine-cluster section of bench/RESULTS.md."""
    one, two = rec["one"], rec["two"]
    lines = ["## Engine on two Ray nodes against one (`python -m bench.cluster_bench`)", "",
             f"Machine: {rec['machine']}, {rec['date']}. {rec['rows']} laion-profile JPEGs read from disk, "
             f"{rec['workers']} workers, dedup on, default flags, `--runner ray --ray-address` of a local Ray "
             f"cluster (ray.cluster_utils.Cluster, raylets as separate processes); layouts alternated, "
             f"median of {one['runs']} runs each.", "",
             "| cluster | nodes that ran shards | img/s (whole command) | rows/s (steady) | CPU-ms per row |",
             "|---|---|---|---|---|"]
    for s in (one, two):
        name = " + ".join(f"{n} CPUs" for n in s["layout"])
        lines.append(f"| {name} | {s['nodes_used']} | {s['img_s']} | {s['steady_rows_s']} | {s['cpu_ms_per_row']} |")
    ratio = two["steady_rows_s"] / one["steady_rows_s"]
    whole = two["img_s"] / one["img_s"]
    verdict = "met" if ratio >= 0.95 else "missed"
    lines += ["", f"Two nodes against one: **{ratio:.2f}x** steady, {whole:.2f}x whole command (goal >= 0.95x: "
              f"{verdict})."]
    for s in (one, two):
        if s.get("per_node"):
            nodes = "; ".join(f"{n['node']}: {n['shards']} shards, {n['rows']} rows, first start +{n['first_start_s']} s, "
                              f"last end +{n['last_end_s']} s" for n in s["per_node"])
            lines.append(f"- {' + '.join(f'{c} CPUs' for c in s['layout'])}, last run, per node: {nodes}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Build the corpus, alternate the two layouts, print and optionally save."""
    ap = argparse.ArgumentParser(prog="python -m bench.cluster_bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=3000, help="images in the corpus (and rows per run)")
    ap.add_argument("--workers", type=int, default=16, help="workers; the two-node layout splits them in half")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each layout, alternating")
    ap.add_argument("--work", type=Path, default=HERE / ".work" / "scaling")
    ap.add_argument("--json-out", type=Path, default=None)
    ap.add_argument("--save", action="store_true", help="write the engine-cluster section of bench/RESULTS.md")
    ap.add_argument("--add-record", type=Path, default=None, help="render a --json-out file from elsewhere; run nothing")
    a = ap.parse_args(argv)
    if a.add_record:
        update_section("engine-cluster", render(json.loads(a.add_record.read_text())))
        return
    folder = scaling.ensure_corpus(a.work, a.n)
    urls = scaling.local_list(folder, a.n, a.work / f"local-{a.n}.parquet")
    scaling.warm_kernels(folder, a.work)  # else the first layout alone pays Numba's compiling (seen: 1.72x, not 1.02x)
    layouts = {"one": [a.workers], "two": [a.workers // 2, a.workers - a.workers // 2]}
    runs: dict[str, list[dict]] = {"one": [], "two": []}
    for _ in range(a.repeats):
        for name, layout in layouts.items():
            r = one_run(layout, urls, folder, a.work / f"out-cluster-{name}", a.workers, a.n)
            runs[name].append(r)
            print(name, json.dumps(r), flush=True)
    rec = {"machine": machine_line(), "date": time.strftime("%Y-%m-%d"), "rows": a.n, "workers": a.workers,
           "one": summary(runs["one"]), "two": summary(runs["two"])}
    print(render(rec))
    if a.json_out:
        a.json_out.write_text(json.dumps(rec, indent=1))
    if a.save:
        update_section("engine-cluster", render(rec))


if __name__ == "__main__":
    main()
