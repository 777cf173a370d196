"""Speed and memory of fusionlog at HDFS scale, measured against Drain3 in the same run.

    pip install -e '.[bench]'            # drain3 (the peer); the library itself never imports it
    python bench/speed.py --data ../shared/data [--quick] [--out bench/speed.json]

What it measures, on HDFS/HDFS_2pct.log (222,579 lines, 11,501 blocks) with BGL + OpenStack as sources:
  1. parse:   read + mask + session grouping (fusionlog.read_system), lines per second, and the same file
              fed line by line to Drain3's TemplateMiner (default config) as the peer; best of --repeat,
              the two interleaved so that machine load hits both alike; then (not with --quick) once more
              through Drain3 set up to mask variables as in its example config;
  2. router:  TF-IDF fit + transform of every system's templates, session vectors, routing of all target
              sessions against the BGL + OpenStack templates;
  3. small model: meta-training with the default config, and one fine-tuning pass as a distillation round
              runs it when every target session is pseudo-labeled (plus the replayed source sessions);
  4. end to end: `fusionlog.py run` (BGL + OpenStack -> HDFS) as a child process, after warm-up runs have
              filled the LLM answer cache from a fake OpenAI-compatible server, so the timed run asks the
              LLM nothing (checked): wall and CPU seconds, peak RSS of the child, and its phases (from
              the timestamps of its progress lines);
  5. scaling: the end-to-end time on the first 25%, 50% and 100% of the HDFS lines (cut at line
              boundaries into a temporary directory, never into the repository).
It prints a markdown table and writes everything as JSON to --out. Nothing here is asserted: the numbers
depend on the machine (and on whatever else runs on it); README reports a table measured with it.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TARGETS = {"parse_ratio_vs_drain3": 1.5,  # issue 12: one readable reading rule, >= 1.5x Drain3
           "e2e_seconds": 60.0, "e2e_peak_rss_mb": 1024.0}


# ----------------------------------------------------------------------------------------------------
# a tiny fake OpenAI-compatible teacher (keyword rule), only to fill the answer cache


class FakeTeacher:
    """127.0.0.1, any free port. Answers "anomalous" iff the prompt's last message names an error-like
    word; counts chat requests, so the timed run can be checked to have asked nothing."""
    KEYWORDS = re.compile(r"error|fail|exception|denied|timeout|terminat", re.IGNORECASE)

    def __init__(self):
        self.requests = 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, body: dict, status: int = 200):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._send({"object": "list", "data": [{"id": "fake", "object": "model"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                fake.requests += 1
                last = body["messages"][-1]["content"]
                label = int(bool(fake.KEYWORDS.search(last)))
                content = json.dumps({"label": ("normal", "anomalous")[label], "confidence": (0.9, 0.95)[label],
                                      "reason": "fake rule"})
                self._send({"id": "x", "object": "chat.completion", "model": body.get("model"),
                            "choices": [{"index": 0, "finish_reason": "stop",
                                         "message": {"role": "assistant", "content": content}}]})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


# ----------------------------------------------------------------------------------------------------
# 1. parsing, against Drain3


# The masking of Drain3's own example configuration (examples/drain3.ini in the drain3 repository, MIT):
# what Drain3 masks when it is set up to mask variables, as fusionlog always does.
DRAIN3_EXAMPLE_MASKING = [
    (r"((?<=[^A-Za-z0-9])|^)(([0-9a-f]{2,}:){3,}([0-9a-f]{2,}))((?=[^A-Za-z0-9])|$)", "ID"),
    (r"((?<=[^A-Za-z0-9])|^)(\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3})((?=[^A-Za-z0-9])|$)", "IP"),
    (r"((?<=[^A-Za-z0-9])|^)([0-9a-f]{6,} ?){3,}((?=[^A-Za-z0-9])|$)", "SEQ"),
    (r"((?<=[^A-Za-z0-9])|^)([0-9A-F]{4} ?){4,}((?=[^A-Za-z0-9])|$)", "SEQ"),
    (r"((?<=[^A-Za-z0-9])|^)(0x[a-f0-9A-F]+)((?=[^A-Za-z0-9])|$)", "HEX"),
    (r"((?<=[^A-Za-z0-9])|^)([\-\+]?\d+)((?=[^A-Za-z0-9])|$)", "NUM"),
    (r"(?<=executed cmd )(\".+?\")", "CMD"),
]


def drain3_parse(path: Path, masking: bool = False) -> int:
    """Every line of the file through Drain3's TemplateMiner, default config (which masks nothing; with
    masking=True, the masking of Drain3's example config); returns the cluster count."""
    try:
        from drain3 import TemplateMiner
        from drain3.masking import MaskingInstruction
        from drain3.template_miner_config import TemplateMinerConfig
    except ImportError:
        sys.exit("bench/speed.py needs drain3 as the peer: pip install -e '.[bench]'  (or: pip install drain3)")
    config = TemplateMinerConfig()  # the defaults, without looking for a drain3.ini
    if masking:
        config.masking_instructions = [MaskingInstruction(p, name) for p, name in DRAIN3_EXAMPLE_MASKING]
    miner = TemplateMiner(config=config)
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            miner.add_log_message(line.rstrip("\n"))
    return len(miner.drain.clusters)


class Clock:
    """Wall and CPU seconds (this process) of a `with` block. Other programs on the machine stretch the
    wall time; the CPU time shows what the code itself costs."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def bench_parse(data: Path, repeat: int, masked_peer: bool) -> dict:
    import fusionlog as fl
    path = data / "HDFS" / "HDFS_2pct.log"
    ours, peer = [], []
    for _ in range(repeat):  # interleaved: a load spike from elsewhere hits both sides alike
        with Clock() as c:
            s = fl.read_system(path, fl.PRESETS["HDFS"], "HDFS")
        ours.append(c)
        with Clock() as c:
            clusters = drain3_parse(path)
        peer.append(c)
    masked = None
    if masked_peer:  # once: it is slow
        with Clock() as masked:
            drain3_parse(path, masking=True)
    lines = s.stats["lines"]
    wall, cpu = min(c.wall for c in ours), min(c.cpu for c in ours)
    d_wall, d_cpu = min(c.wall for c in peer), min(c.cpu for c in peer)
    return dict(lines=lines, sessions=len(s), templates=len(s.templates), seconds=wall, cpu_seconds=cpu,
                lines_per_s=lines / wall, drain3_seconds=d_wall, drain3_cpu_seconds=d_cpu,
                drain3_lines_per_s=lines / d_wall, drain3_clusters=clusters,
                ratio=d_wall / wall, ratio_cpu=d_cpu / cpu,
                all_seconds=[c.wall for c in ours], drain3_all_seconds=[c.wall for c in peer],
                drain3_masked_seconds=masked and masked.wall, drain3_masked_cpu_seconds=masked and masked.cpu)


# ----------------------------------------------------------------------------------------------------
# 2.-3. router and small model, in process


def load_systems(data: Path):
    import fusionlog as fl
    bgl = fl.read_system(data / "BGL" / "BGL_2k.log", fl.PRESETS["BGL"], "BGL")
    ops = fl.attach_labels(fl.read_system(data / "OpenStack" / "openstack_nova.log", fl.PRESETS["OpenStack"],
                                          "OpenStack"), fl.read_labels(data / "OpenStack" / "anomaly_label.csv"))
    hdfs = fl.read_system(data / "HDFS" / "HDFS_2pct.log", fl.PRESETS["HDFS"], "HDFS")
    return [bgl, ops], hdfs


def bench_model(data: Path) -> dict:
    import numpy as np
    import scipy.sparse as sp
    import fusionlog as fl
    import metamodel
    import router
    sources, target = load_systems(data)
    model = fl.FusionLog()
    sources = [fl._labeled_part(s) for s in sources]
    out = {}

    t = time.perf_counter()
    model.embed(sources, target)  # TF-IDF fit over every system's templates
    t_fit = time.perf_counter() - t
    t = time.perf_counter()
    vecs = [(model.embedder.transform(s.templates), s) for s in sources + [target]]
    svecs = [router.session_vectors(s.sequences, tv) for tv, s in vecs]
    t_transform = time.perf_counter() - t
    t = time.perf_counter()
    _, general = model.route(target, vecs[-1][0])
    t_route = time.perf_counter() - t
    out["router"] = dict(tfidf_fit_s=t_fit, tfidf_transform_and_session_vectors_s=t_transform, route_s=t_route,
                         total_s=t_fit + t_transform + t_route, vocabulary=len(model.embedder.vocabulary_),
                         target_sessions=len(target), general=int(general.sum()))

    t = time.perf_counter()
    feats = [fl.Features(tv, sv, metamodel.session_features(sv, s.templates, s.sequences,
                                                            metamodel.Reference.measure(s.templates, s.sequences)))
             for (tv, s), sv in zip(vecs, svecs)]
    out["features_s"] = time.perf_counter() - t  # metamodel.session_features (structural block)

    with Clock() as c:
        params = model.meta_train(sources, feats[:-1])
    out["meta_train_s"], out["meta_train_cpu_s"] = c.wall, c.cpu

    # one fine-tuning pass as distill() runs it in a round where every target session is pseudo-labeled:
    # the target sessions plus as many replayed labeled source sessions as there are (replay_ratio 1)
    t_X = feats[-1][2]
    y = (metamodel.predict_proba(t_X, params) >= 0.5).astype(np.int64)
    X_rep = sp.vstack([f[2] for f in feats[:-1]]).tocsr()
    y_rep = np.concatenate([s.labels.astype(np.int64) for s in sources])
    m = min(len(y_rep), len(y))
    X = sp.vstack([t_X, X_rep[:m]]).tocsr()
    with Clock() as c:
        metamodel.fine_tune(params, X, np.concatenate([y, y_rep[:m]]), np.ones(X.shape[0]), model.config.meta)
    out["fine_tune_round_s"], out["fine_tune_round_cpu_s"] = c.wall, c.cpu
    out["fine_tune_rows"] = int(X.shape[0])
    return out


# ----------------------------------------------------------------------------------------------------
# 4.-5. end to end, as a child process


def run_cli(argv: list[str], env: dict) -> dict:
    """Run `python fusionlog.py ARGV`; wall seconds, the child's own peak RSS (os.wait4), its progress lines
    with timestamps, and stdout."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(REPO / "fusionlog.py"), *argv], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    progress, stdout = [], []
    readers = [threading.Thread(target=lambda: progress.extend((time.perf_counter() - t0, line.rstrip("\n"))
                                                               for line in proc.stderr)),
               threading.Thread(target=lambda: stdout.extend(proc.stdout))]
    for r in readers:
        r.start()
    _, status, usage = os.wait4(proc.pid, 0)  # this child's rusage alone, not the maximum over all children
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    for r in readers:
        r.join()
    if proc.returncode != 0:
        sys.exit(f"fusionlog run failed ({proc.returncode}):\n" + "\n".join(l for _, l in progress[-20:]))
    rss_kb = usage.ru_maxrss  # kilobytes on Linux
    return dict(seconds=wall, cpu_seconds=usage.ru_utime + usage.ru_stime, peak_rss_mb=rss_kb / 1024,
                progress=progress, stdout="".join(stdout))


def phases(progress: list[tuple[float, str]], total: float) -> dict:
    """Seconds per phase of `run`, from the first progress line of each phase. `distill` ends at the last
    round's report; `finish` is that round's fine-tuning, the prediction and the writing."""
    marks = [("read", None), ("embed_route", "embedding templates"), ("meta_train", "meta-training"),
             ("distill", "distillation:"), ("finish", None)]
    starts = {"read": 0.0}
    for name, prefix in marks[1:-1]:
        starts[name] = next((t for t, line in progress if line.startswith(f"fusionlog: {prefix}")), None)
    last_round = [t for t, line in progress if "distill round" in line and "agreed" in line]
    starts["finish"] = last_round[-1] if last_round else None
    names = [n for n, _ in marks if starts.get(n) is not None]
    out = {}
    for a, b in zip(names, names[1:] + ["end"]):
        out[a] = (starts[b] if b != "end" else total) - starts[a]
    rounds = [t for t, line in progress if re.match(r"fusionlog: distill round \d+: asking", line)]
    out["distill_rounds"] = len(rounds)
    return out


def bench_e2e(data: Path, target: Path, workdir: Path, env: dict, teacher: FakeTeacher, tag: str) -> dict:
    cache = workdir / f"answers-{tag}.jsonl"
    argv = ["run", "--source", f"BGL={data / 'BGL' / 'BGL_2k.log'}",
            "--source", f"OpenStack={data / 'OpenStack' / 'openstack_nova.log'}",
            "--labels", f"OpenStack={data / 'OpenStack' / 'anomaly_label.csv'}",
            "--target", f"HDFS={target}", "--labels", f"HDFS={data / 'HDFS' / 'anomaly_label.csv'}",
            "--llm-url", teacher.url, "--llm-model", "fake", "--cache", str(cache), "--response-format", "none",
            "--out", str(workdir / f"pred-{tag}.csv"), "--model-out", str(workdir / f"model-{tag}.npz"),
            "--report", str(workdir / f"report-{tag}.json")]
    # Warm-up runs fill the answer cache. A run asks at most its budget of NEW questions (cache hits are
    # free), so a later run can ask more; the first run that asks the server nothing is the timed one.
    warmups = []
    for _ in range(8):
        before = teacher.requests
        timed = run_cli(argv, env)
        if teacher.requests == before:
            break
        warmups.append(dict(seconds=timed["seconds"], new_questions=teacher.requests - before))
    else:
        sys.exit("fusionlog run still asks the LLM new questions after 8 runs: the cache does not hold")
    llm = re.search(r"LLM calls: (\d+) new, (\d+) from cache", timed["stdout"])
    report = json.loads((workdir / f"report-{tag}.json").read_text())
    return dict(seconds=timed["seconds"], cpu_seconds=timed["cpu_seconds"], peak_rss_mb=timed["peak_rss_mb"],
                phases=phases(timed["progress"], timed["seconds"]), warmups=warmups,
                llm_questions_total=sum(w["new_questions"] for w in warmups),
                llm_from_cache=int(llm.group(2)) if llm else None,
                fit_seconds=report.get("seconds"),  # the run report's own stage times, where it keeps them
                summary=[l for l in timed["stdout"].splitlines() if l.startswith(("target", "predicted", "eval"))])


def cut(path: Path, fraction: float, out: Path) -> tuple[Path, int]:
    """The first `fraction` of the file's lines, cut at a line boundary."""
    with open(path, "rb") as f:
        lines = f.readlines()
    k = round(len(lines) * fraction)
    out.write_bytes(b"".join(lines[:k]))
    return out, k


# ----------------------------------------------------------------------------------------------------
# report


def table(r: dict) -> str:
    p, m, rows = r.get("parse"), r.get("model"), []
    if p:
        rows += [("read + mask + sessions (HDFS, 222k lines)",
                  f"{p['seconds']:.2f} s = {p['lines_per_s']:,.0f} lines/s (CPU {p['cpu_seconds']:.2f} s)", ""),
                 ("  Drain3 TemplateMiner, same file, default config",
                  f"{p['drain3_seconds']:.2f} s = {p['drain3_lines_per_s']:,.0f} lines/s (CPU {p['drain3_cpu_seconds']:.2f} s)", ""),
                 ("  speed ratio fusionlog / Drain3", f"{p['ratio']:.2f}x wall, {p['ratio_cpu']:.2f}x CPU",
                  f">= {TARGETS['parse_ratio_vs_drain3']:g}x")]
        if p.get("drain3_masked_seconds"):
            rows += [("  Drain3 with the masking of its example drain3.ini",
                      f"{p['drain3_masked_seconds']:.2f} s (CPU {p['drain3_masked_cpu_seconds']:.2f} s): "
                      f"fusionlog {p['drain3_masked_cpu_seconds'] / p['cpu_seconds']:.1f}x faster (CPU)", "")]
    if m:
        ro = m["router"]
        rows += [("TF-IDF fit + transform + session vectors", f"{ro['tfidf_fit_s'] + ro['tfidf_transform_and_session_vectors_s']:.2f} s", ""),
                 ("routing 11,501 sessions vs BGL + OpenStack", f"{ro['route_s']:.3f} s", ""),
                 ("structural features (metamodel)", f"{m['features_s']:.2f} s", ""),
                 ("meta-training (default config)", f"{m['meta_train_s']:.2f} s (CPU {m['meta_train_cpu_s']:.2f} s)", ""),
                 (f"fine-tuning, one round ({m['fine_tune_rows']:,} rows)",
                  f"{m['fine_tune_round_s']:.2f} s (CPU {m['fine_tune_round_cpu_s']:.2f} s)", "")]
    e = r.get("e2e")
    if e:
        ph = ", ".join(f"{k} {v:.1f}" for k, v in e["phases"].items() if k != "distill_rounds")
        rows += [("end to end `fusionlog run`, LLM answers cached", f"{e['seconds']:.1f} s (CPU {e['cpu_seconds']:.1f} s)",
                  f"<= {TARGETS['e2e_seconds']:g} s"),
                 ("  peak RSS of the run", f"{e['peak_rss_mb']:,.0f} MB", f"<= {TARGETS['e2e_peak_rss_mb']:g} MB"),
                 ("  phases (s)", ph, "")]
    sc = r.get("scaling")
    if sc:
        cells = ", ".join(f"{x['fraction']:.0%}: {x['seconds']:.1f} s (CPU {x['cpu_seconds']:.1f})" for x in sc)
        per = ", ".join(f"{x['us_per_line']:.0f}" for x in sc)
        rss = ", ".join(f"{x['peak_rss_mb']:.0f}" for x in sc)
        rows += [("scaling, end to end (25/50/100% of lines)", cells, "<= linear"),
                 ("  microseconds per line (wall)", per, "not rising"),
                 ("  peak RSS, MB", rss, "")]
    out = ["| measurement | value | target |", "|---|---|---|"]
    out += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"), help="the shared LogHub samples")
    ap.add_argument("--out", default=str(REPO / "bench" / "speed.json"), help="JSON results")
    ap.add_argument("--quick", action="store_true", help="parse + router + small model + one end-to-end run; "
                                                          "no scaling, one repeat")
    ap.add_argument("--repeat", type=int, default=3, help="repeats of the parse measurement (best is kept)")
    ap.add_argument("--only", choices=["parse", "model", "e2e"], default=None, help="run one part only")
    ap.add_argument("--blas-threads", type=int, default=None,
                    help="set OPENBLAS_NUM_THREADS / OMP_NUM_THREADS for this run and its children")
    args = ap.parse_args(argv)
    if args.blas_threads is not None:  # before numpy is imported (fusionlog is imported lazily below)
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
            os.environ[var] = str(args.blas_threads)
    sys.path.insert(0, str(REPO))
    data = Path(args.data).resolve()
    if not (data / "HDFS" / "HDFS_2pct.log").exists():
        sys.exit(f"{data}: no HDFS/HDFS_2pct.log there (pass --data, the shared LogHub samples)")
    repeat = 1 if args.quick else args.repeat
    say = lambda msg: print(f"speed: {msg}", file=sys.stderr, flush=True)
    result = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "load_avg_at_start": os.getloadavg(),
                          "blas_threads": os.environ.get("OPENBLAS_NUM_THREADS", "default")}}
    if args.only in (None, "parse"):
        say(f"parse: fusionlog.read_system vs Drain3, best of {repeat}")
        result["parse"] = bench_parse(data, repeat, masked_peer=not args.quick)
    if args.only in (None, "model"):
        say("router, meta-training, fine-tuning")
        result["model"] = bench_model(data)
    if args.only in (None, "e2e"):
        teacher = FakeTeacher()
        env = dict(os.environ)
        try:
            with tempfile.TemporaryDirectory(prefix="fusionlog-speed-") as tmp:
                tmp = Path(tmp)
                say("end to end (warm-up runs fill the answer cache, then the timed run)")
                result["e2e"] = bench_e2e(data, data / "HDFS" / "HDFS_2pct.log", tmp, env, teacher, "full")
                if not args.quick:
                    result["scaling"] = []
                    for frac in (0.25, 0.5, 1.0):
                        if frac == 1.0:
                            e, lines = result["e2e"], 222_579
                        else:
                            say(f"scaling: {frac:.0%} of the lines")
                            path, lines = cut(data / "HDFS" / "HDFS_2pct.log", frac, tmp / f"hdfs-{frac}.log")
                            e = bench_e2e(data, path, tmp, env, teacher, f"{frac}")
                        result["scaling"].append(dict(fraction=frac, lines=lines, seconds=e["seconds"],
                                                      cpu_seconds=e["cpu_seconds"], peak_rss_mb=e["peak_rss_mb"],
                                                      us_per_line=1e6 * e["seconds"] / lines))
        finally:
            teacher.stop()
    result["machine"]["load_avg_at_end"] = os.getloadavg()
    print(table(result))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nJSON -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
