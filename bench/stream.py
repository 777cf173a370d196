"""Streaming prediction in bounded memory (issue 11): `fusionlog predict` over 1x and 10x the HDFS sample.

A model is fitted once (BGL + OpenStack -> HDFS, no LLM, so nothing here needs a server), then
`fusionlog predict` labels the HDFS log and a 10x concatenation of it, each in a child process, from a
plain file, from a .gz file and from standard input. Printed: lines/s, peak RSS per run, and whether
every 10x run gives each 1x row ten times (with the default --idle, HDFS_2pct's sessions close between
copies: its longest gap between two lines of one block is 85,262 lines). Temporary files only.

    python bench/stream.py --data ../shared/data
"""
import argparse
import gzip
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent.parent


def child(argv, stdin=None) -> tuple[float, float]:
    """Run `python fusionlog.py argv`; its wall seconds and its own peak RSS in MB (os.wait4)."""
    t = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(HERE / "fusionlog.py"), "-q", *argv], stdin=stdin,
                            stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"fusionlog {' '.join(argv)} failed ({status})")
    return time.perf_counter() - t, usage.ru_maxrss / 1024


def fit_model(d: Path, model: Path) -> None:
    """BGL + OpenStack -> HDFS with no LLM, saved to `model`."""
    subprocess.run([sys.executable, str(HERE / "fusionlog.py"), "-q", "run",
                    "--source", f"BGL={d / 'BGL' / 'BGL_2k.log'}",
                    "--source", f"OpenStack={d / 'OpenStack' / 'openstack_nova.log'}",
                    "--labels", f"OpenStack={d / 'OpenStack' / 'anomaly_label.csv'}",
                    "--target", f"HDFS={d / 'HDFS' / 'HDFS_2pct.log'}", "--llm-url", "none",
                    "--out", str(model.with_suffix(".csv")), "--model-out", str(model)],
                   check=True, stdout=subprocess.DEVNULL)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(HERE.parent / "shared" / "data"))
    ap.add_argument("--copies", type=int, default=10)
    args = ap.parse_args()
    d = Path(args.data)
    tmp = Path(tempfile.mkdtemp(prefix="fusionlog-stream-"))
    try:
        hdfs = d / "HDFS" / "HDFS_2pct.log"
        fit_model(d, tmp / "m.npz")
        big = tmp / "hdfs10.log"
        with open(big, "wb") as out:
            for _ in range(args.copies):
                with open(hdfs, "rb") as f:
                    shutil.copyfileobj(f, out)
        with open(big, "rb") as f, gzip.open(tmp / "hdfs10.log.gz", "wb", compresslevel=1) as out:
            shutil.copyfileobj(f, out)
        lines = sum(1 for _ in open(hdfs, "rb"))
        rows = {}
        print("| input | lines | seconds | lines/s | peak RSS MB |")
        print("|---|---|---|---|---|")
        runs = [("1x file", hdfs, lines, None), (f"{args.copies}x file", big, lines * args.copies, None),
                (f"{args.copies}x .gz", tmp / "hdfs10.log.gz", lines * args.copies, None),
                (f"{args.copies}x stdin", "-", lines * args.copies, big)]
        for name, path, n, stdin in runs:
            out = tmp / f"{name.replace(' ', '_')}.csv"
            with open(stdin, "rb") if stdin else open(os.devnull, "rb") as f:
                wall, rss = child(["predict", "--model", str(tmp / "m.npz"), "--input", f"HDFS={path}",
                                      "--out", str(out)], stdin=f)
            rows[name] = sorted(out.read_text().splitlines()[1:])
            print(f"| {name} | {n:,} | {wall:.1f} | {n / wall:,.0f} | {rss:.0f} |", flush=True)
        one = rows["1x file"]
        same = all(r == sorted(one * args.copies) for k, r in rows.items() if k != "1x file")
        print(f"\nevery {args.copies}x run gives each 1x row {args.copies} times: {same}")
        return 0 if same else 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
