"""Beyond one machine (issue 15): `fusionlog predict` on Dask with 1 and 2 workers, against one process.

A model is fitted once (bench/stream.py's fit_model, no LLM), the HDFS sample is copied `--copies` times
into as many files (a 10x concatenation split into 10 files), and the files are labeled by one process
(`predict --idle 0`, a child) and by a local Dask cluster of 1 and 2 worker processes. Printed: a markdown
table of lines/s (cluster start-up excluded, given apart), peak RSS per worker (each worker's own
getrusage, via client.run), and whether every Dask run gives the one-process rows. Temporary files only.

    python bench/scale.py --data ../shared/data
"""
import argparse
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(HERE), str(HERE / "bench")]
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))

import fusionlog as fl  # noqa: E402
from stream import child, fit_model  # noqa: E402


def peak_rss_mb() -> float:
    """This process's peak RSS in MB (run on each worker)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def on_dask(workers: int, model: Path, files: list[str], out: Path, block_mb: int, memory_limit: str
            ) -> tuple[float, float, list]:
    """One Dask run: its start-up and wall seconds and each worker's peak RSS."""
    from distributed import Client, LocalCluster
    t = time.perf_counter()
    with LocalCluster(n_workers=workers, threads_per_worker=1, host="127.0.0.1", dashboard_address=None,
                      memory_limit=memory_limit) as cluster, Client(cluster) as client:
        start = time.perf_counter() - t
        t = time.perf_counter()
        fl.predict_on_client(client, str(model), files, fl.PRESETS["HDFS"], "HDFS", None, str(out),
                             block_mb << 20)
        wall = time.perf_counter() - t
        return start, wall, sorted(client.run(peak_rss_mb).values())


def rows_of(paths) -> dict[str, tuple[str, float]]:
    """Prediction files as session -> (label, score)."""
    return {r[0]: (r[1], float(r[2])) for p in paths for r in
            (line.split(",") for line in Path(p).read_text().splitlines()[1:])}


def same(a: dict, b: dict) -> bool:
    """The same sessions, labels, and scores to 1e-9."""
    return a.keys() == b.keys() and all(a[k][0] == b[k][0] and abs(a[k][1] - b[k][1]) <= 1e-9 for k in a)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(HERE.parent / "shared" / "data"))
    ap.add_argument("--copies", type=int, default=10)
    ap.add_argument("--block-mb", type=int, default=64)
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--memory-limit", default="auto", help="each worker's Dask memory limit (e.g. 250MB): "
                    "beyond 60%% of it a worker spills stored results to disk; auto = RAM / workers")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="fusionlog-scale-"))
    try:
        fit_model(Path(args.data), tmp / "m.npz")
        hdfs = Path(args.data) / "HDFS" / "HDFS_2pct.log"
        (tmp / "in").mkdir()
        files = [str(shutil.copyfile(hdfs, tmp / "in" / f"part-{k:02d}.log")) for k in range(args.copies)]
        n = sum(1 for _ in open(hdfs, "rb")) * args.copies
        wall, rss = child(["predict", "--model", str(tmp / "m.npz"), "--input",
                           f"HDFS={tmp / 'in' / '*.log'}", "--idle", "0", "--out", str(tmp / "one.csv")])
        one = rows_of([tmp / "one.csv"])
        print("| engine | lines | start-up s | seconds | lines/s | vs 1 worker | peak RSS MB per worker "
              "| same rows |")
        print("|---|---|---|---|---|---|---|---|")
        print(f"| one process | {n:,} | - | {wall:.1f} | {n / wall:,.0f} | | {rss:.0f} | (reference) |",
              flush=True)
        base = None
        for w in map(int, args.workers.split(",")):
            start, wall, rsses = on_dask(w, tmp / "m.npz", files, tmp / f"dask{w}", args.block_mb,
                                         args.memory_limit)
            ok = same(rows_of(sorted((tmp / f"dask{w}").glob("part-*.csv"))), one)
            base = base or n / wall
            print(f"| Dask, {w} worker{'s' * (w > 1)} | {n:,} | {start:.1f} | {wall:.1f} | {n / wall:,.0f} | "
                  f"{n / wall / base:.2f}x | {', '.join(f'{r:.0f}' for r in rsses)} | {ok} |", flush=True)
        size = os.path.getsize(hdfs) / 2**20
        print(f"\n{args.copies} files of {size:.0f} MB, blocks of {args.block_mb} MB, worker memory limit "
              f"{args.memory_limit}, {os.cpu_count()} cores")
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
