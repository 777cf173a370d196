#!/usr/bin/env python3
"""FusionLog robustness suite (issue 13, item 1): zero-label targets nobody tuned for, ../shared/data only.

    python bench/robust.py --data ../shared/data --llm-url http://127.0.0.1:8080/v1

Every variant is zero-label: the sources are labeled, the target's labels are read only to score. The
protocol is bench.py's: the target's sessions in first-appearance order, fit on the first half, scored on the
second half. Variants (`--variants` takes names or group names):
    healthy    each of HDFS, BGL, OpenStack with only its normal sessions (the other two as sources): the
               share flagged (goal <= 1%; F1 is undefined with one class)
    faulty     the same with only its anomalous sessions: the share caught (goal >= 90%)
    lines      one session per distinct BGL line, i.e. per distinct (masked template, inline label) pair, in
               order of first appearance (in BGL_2k no template carries both labels, so it is one session per
               distinct template), sources HDFS + OpenStack: F1 (goal >= 0.80)
    windows    BGL in windows of 10 and of 50 lines, sources HDFS + OpenStack: F1
    pairs      each target with a single source (HDFS<-BGL, HDFS<-OpenStack, ...): F1
Systems on every variant: fusionlog, sm_only, llm_only, isolation_forest, pca (all from bench.py), and two
zero-label detectors that use the target's own event frequencies, re-implemented in numpy from LogLead
(EvoTestOps/LogLead, loglead/OOV_detector.py and loglead/RarityModel.py, read, not installed):
    new_event  OOV_detector: a session's score is its number of lines whose event is out of the fit half's
               vocabulary; here "out" is widened to *rare*: held by fewer than 1% of the fit sessions (never
               seen included). Anomalous if the score is > 0 (LogLead's default is > 1, which no one-line
               session can reach).
    rarity     RarityModel as published (threshold 10, common_threshold 0.01): an event's weight is
               (-ln p)^3 with p its share of all event occurrences in the fit half, 0 if p > 1%, and twice
               the weight of a single occurrence for an event the fit half never saw; a session's score is
               the count-weighted sum of its events' weights over its number of distinct events; anomalous
               if the score is > 10. A fixed rule: nothing is tuned on labels.
and, as a diagnostic ceiling that reads the target's labels and is never a peer, bench.py's oracle_teacher
(fusionlog with a perfect teacher: what the rest of the pipeline makes of right answers).
F1 (or the share) is the first seed's, beside its range over --seeds for the seed-dependent systems; beside
fusionlog's, fusionlog (first seed) fitted and scored on all of the target (--no-transductive: not run).
fusionlog also runs again with k = --flips answers flipped (bench.py's harness).
`--llm-url fake` serves the test suite's keyword-rule fake LLM (the CI dry run); answers are cached (--cache).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def _load_bench():
    """bench/bench.py as the module `bench` (as test_fusionlog.load_bench does; bench/ is no package)."""
    if "bench" in sys.modules and hasattr(sys.modules["bench"], "run_fusionlog"):
        return sys.modules["bench"]
    spec = importlib.util.spec_from_file_location("bench", HERE / "bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench"] = module
    spec.loader.exec_module(module)
    return module


bench = _load_bench()
fl, distill, say = bench.fl, bench.distill, bench.say

SYSTEMS = ("fusionlog", "sm_only", "llm_only", "isolation_forest", "pca", "new_event", "rarity",
           "oracle_teacher")  # the last reads target labels: a diagnostic ceiling (bench.DIAGNOSTIC_SYSTEMS)
SEEDED = ("fusionlog", "sm_only", "isolation_forest")  # the others do not depend on the seed
LLM_SYSTEMS = ("fusionlog", "llm_only")  # skipped with --llm-url none
GROUPS = {"healthy": "Healthy targets: only normal sessions (share flagged)",
          "faulty": "Faulty targets: only anomalous sessions (share caught)",
          "lines": "One-line sessions: distinct BGL lines (F1)",
          "windows": "Other session kinds: BGL windows (F1)",
          "pairs": "Fewer sources: a single source (F1)"}
GOALS = {"flagged": ("≤ 1%", lambda v, best: v <= 0.01), "caught": ("≥ 90%", lambda v, best: v >= 0.90),
         "lines": ("≥ 0.80", lambda v, best: v >= 0.80), "peer": ("≥ best peer", lambda v, best: v >= best)}


@dataclasses.dataclass(frozen=True)
class Variant:
    """One target as the suite builds it: which system, which of its sessions, which sources."""
    name: str
    group: str
    target: str
    sources: tuple[str, ...]
    keep: str = "all"          # all | normal | anomalous | lines (one session per distinct labeled line)
    window: int | None = None  # BGL in windows of this many lines instead of its preset's
    measure: str = "f1"        # f1 | flagged | caught
    goal: str = "peer"         # a key of GOALS


def variants() -> list[Variant]:
    """The whole suite, in the order of its tables."""
    t, out = bench.TARGETS, []
    others = {x: tuple(y for y in t if y != x) for x in t}
    out += [Variant(f"healthy-{x}", "healthy", x, others[x], "normal", None, "flagged", "flagged") for x in t]
    out += [Variant(f"faulty-{x}", "faulty", x, others[x], "anomalous", None, "caught", "caught") for x in t]
    out.append(Variant("lines-BGL", "lines", "BGL", others["BGL"], "lines", goal="lines"))
    out += [Variant(f"BGL-w{w}", "windows", "BGL", others["BGL"], window=w) for w in (10, 50)]
    out += [Variant(f"{x}-from-{y}", "pairs", x, (y,)) for x in t for y in others[x]]
    return out


# ----------------------------------------------------------------------------------------------------
# the target's own event frequencies: LogLead's two detectors


class NewEventDetector:
    """LogLead's OOV_detector idea: a session is anomalous if it holds a line of an event that fewer than
    `min_share` of the fit sessions hold (an event the fit half never saw included)."""

    def __init__(self, min_share: float = 0.01):
        self.min_share = min_share

    def fit(self, counts: np.ndarray) -> "NewEventDetector":
        held = (counts > 0).mean(axis=0) if len(counts) else np.zeros(counts.shape[1])  # share of sessions
        self.rare = held < self.min_share
        return self

    def score(self, counts: np.ndarray) -> np.ndarray:
        return counts[:, self.rare].sum(axis=1)  # lines of rare events

    def predict(self, counts: np.ndarray) -> np.ndarray:
        return (self.score(counts) > 0).astype(np.int8)


class RarityScore:
    """LogLead's RarityModel: a session's mean (-ln p)^3 rarity of its events, anomalous above a fixed 10."""

    def __init__(self, threshold: float = 10.0, common: float = 0.01):
        self.threshold, self.common = threshold, common

    def fit(self, counts: np.ndarray) -> "RarityScore":
        total = max(float(counts.sum()), 1.0)
        p = counts.sum(axis=0) / total
        w = (-np.log(np.where(p > 0, p, 1.0 / total))) ** 3
        w[p == 0] *= 2.0                      # never seen in fitting: twice as rare as one occurrence
        w[p > self.common] = 0.0              # a common event adds nothing
        self.weights = w
        return self

    def score(self, counts: np.ndarray) -> np.ndarray:
        return counts @ self.weights / np.maximum((counts > 0).sum(axis=1), 1)

    def predict(self, counts: np.ndarray) -> np.ndarray:
        return (self.score(counts) > self.threshold).astype(np.int8)


def event_columns(*parts: fl.Sessions) -> dict[str, int]:
    """Column per event (template text) used by any session of `parts`, in first-use order."""
    seen = (p.templates[i] for p in parts for q in p.sequences for i in np.unique(q).tolist())
    return {x: j for j, x in enumerate(dict.fromkeys(seen))}


def run_frequency_peer(system: str, fit: fl.Sessions, test: fl.Sessions) -> dict:
    """new_event or rarity: fitted on the fit half's event counts, scored on the held-out half."""
    t = time.perf_counter()
    columns = event_columns(fit, test)  # the test's new events too: both detectors are about them
    X_fit, X_test = bench.count_matrix(fit, columns), bench.count_matrix(test, columns)
    model = (NewEventDetector() if system == "new_event" else RarityScore()).fit(X_fit)
    out = bench.metrics(test.labels, model.predict(X_test))
    out.update(seconds=round(time.perf_counter() - t, 3), events=len(columns))
    return out


# ----------------------------------------------------------------------------------------------------
# building the targets


class Data:
    """The shared logs, each read once per way of cutting it into sessions."""

    def __init__(self, root: Path):
        self.root, self._read = root, {}

    def get(self, name: str, window: int | None = None) -> fl.Sessions:
        key = (name, window)
        if key not in self._read:
            if window is None:
                self._read[key] = bench.read(self.root, name)
            else:
                spec = dataclasses.replace(fl.PRESETS[name], window=window, step=0, session_regex=None)
                self._read[key] = fl.read_system(self.root / bench.FILES[name][0], spec, name)
        return self._read[key]


def one_line_sessions(lines: fl.Sessions) -> fl.Sessions:
    """One session per distinct (template, inline label) of a log read in windows of one line."""
    keys = np.array([(int(q[0]), int(y)) for q, y in zip(lines.sequences, lines.labels)]).reshape(-1, 2)
    _, first = np.unique(keys, axis=0, return_index=True)
    return lines.subset(np.sort(first))


def build_target(v: Variant, data: Data) -> fl.Sessions:
    """The variant's target sessions (labels kept, for scoring only)."""
    if v.keep == "lines":
        return one_line_sessions(data.get(v.target, window=1))
    s = data.get(v.target, v.window)
    if v.keep == "all":
        return s
    return s.subset(np.flatnonzero(s.labels == (1 if v.keep == "anomalous" else 0)))


def halves(target: fl.Sessions) -> tuple[fl.Sessions, fl.Sessions]:
    """bench.py's inductive split: fit on the first half by first appearance, score the second."""
    n = len(target)
    return bench.compact(target.subset(range(n // 2))), bench.compact(target.subset(range(n // 2, n)))


# ----------------------------------------------------------------------------------------------------
# running a variant


def value(v: Variant, m: dict) -> float:
    """The variant's measure from a system's metrics: F1, the share flagged or the share caught."""
    if v.measure == "caught":
        return m["recall"]
    if v.measure == "flagged":
        return (m["tp"] + m["fp"]) / max(m["tp"] + m["fp"] + m["tn"] + m["fn"], 1)
    return m["f1"]


def run_system(system: str, args, cache, sources, fit, test, tag: str, seed: int, client=None) -> dict:
    """One system on one variant with one seed (bench.py's runners, and the two frequency peers); `client`
    (fusionlog only, default the system's) answers."""
    if system in ("new_event", "rarity"):
        return run_frequency_peer(system, fit, test)
    if system in ("isolation_forest", "pca"):
        return bench.run_peer(system, fit, test, seed)
    if system == "llm_only":
        return bench.run_llm_only(args, cache, [bench.labeled(s) for s in sources], test, tag)
    return bench.run_fusionlog(system, args, cache, sources, fit, test, f"{tag} seed {seed}", seed=seed,
                               client=client)


def run_variant(v: Variant, args, cache, data: Data) -> dict:
    """Every system of --systems on one variant; the seeded ones again with each further seed."""
    target = build_target(v, data)
    sources = [data.get(n) for n in v.sources]
    fit, test = halves(target)
    res = {"variant": v.name, "group": v.group, "target": v.target, "sources": list(v.sources),
           "keep": v.keep, "window": v.window, "measure": v.measure, "sessions": len(target),
           "fit_sessions": len(fit), "test_sessions": len(test),
           "test_anomalous": int((test.labels == 1).sum()), "systems": {}}
    say(f"{v.name}: {len(target):,} sessions, fit {len(fit):,}, scored {len(test):,} "
        f"({res['test_anomalous']:,} anomalous); sources {', '.join(v.sources)}")
    for system in [s for s in args.systems if args.llm_url != "none" or s not in LLM_SYSTEMS]:
        seeds = args.seeds if system in SEEDED else args.seeds[:1]
        flips = system == "fusionlog" and args.flips
        recorder = bench.FlipClient(bench.make_client(args, cache)) if flips else None
        runs = [run_system(system, args, cache, sources, fit, test, v.name, seed,
                           client=recorder if seed == args.seed else None) for seed in seeds]
        m = dict(runs[0], value=round(value(v, runs[0]), 4),
                 value_by_seed={str(s): round(value(v, r), 4) for s, r in zip(seeds, runs)})
        if "llm_calls" in m and len(runs) > 1:
            m["llm_calls_other_seeds"] = sum(r.get("llm_calls", 0) for r in runs[1:])
        if recorder is not None:  # again with k of its answers flipped, as bench.py does
            bench.flip_answers(args, m, recorder.asked, lambda flip: run_system(
                system, args, cache, sources, fit, test, f"{v.name} flipped", args.seed,
                client=bench.FlipClient(bench.make_client(args, cache), flip)), lambda r: value(v, r))
        res["systems"][system] = m
        say(f"{v.name}: {system}: {v.measure} {m['value']:.3f} (seeds {', '.join(m['value_by_seed'])}: "
            f"{cell(v.measure, m)}; {sum(r['seconds'] for r in runs):.1f}s)")
    if "fusionlog" in res["systems"] and args.transductive:  # fit and score on all of the target, seed 0
        m = run_system("fusionlog", args, cache, sources, target, target, f"{v.name} transductive", args.seed)
        x = round(value(v, m), 4)
        res["transductive"] = dict(m, value=x, value_by_seed={str(args.seed): x})
        say(f"{v.name}: fusionlog transductive: {v.measure} {res['transductive']['value']:.3f}")
    return res


# ----------------------------------------------------------------------------------------------------
# markdown


def show(measure: str, x: float) -> str:
    return f"{100 * x:.1f}%" if measure in ("flagged", "caught") else f"{x:.3f}"


def cell(measure: str, m: dict | None) -> str:
    """The first seed's value, with its range over seeds beside it when the seeds disagree."""
    if m is None:
        return "-"
    vals = m["value_by_seed"].values()
    lo, hi = show(measure, min(vals)), show(measure, max(vals))
    return show(measure, m["value"]) + ("" if lo == hi else f" ({lo}–{hi})")


def verdict(r: dict) -> str:
    """The goal and whether fusionlog (seed 0, and every seed) met it."""
    goal = GOALS["lines" if r["keep"] == "lines" else r["measure"] if r["measure"] != "f1" else "peer"]
    m = r["systems"].get("fusionlog")
    if m is None:
        return goal[0]
    peers = [p["value"] for s, p in r["systems"].items()
             if s != "fusionlog" and s not in bench.DIAGNOSTIC_SYSTEMS]
    best = max(peers, default=0.0)
    met = [goal[1](x, best) for x in m["value_by_seed"].values()]
    return f"{goal[0]}: " + ("met" if all(met) else "**missed**" if not any(met) else "met on some seeds")


def describe(r: dict) -> str:
    shown = {"normal": "normal sessions only", "anomalous": "anomalous sessions only",
             "lines": "one session per distinct line", "all": ""}[r["keep"]]
    kind = f"windows of {r['window']} lines" if r["window"] else shown
    return (f"{r['target']}{' ' + kind if kind else ''} ← {' + '.join(r['sources'])}; "
            f"{r['test_sessions']:,} scored ({r['test_anomalous']:,} anomalous)")


def group_table(group: str, rows: list[dict]) -> list[str]:
    ks = bench.flip_ks(r["systems"].get("fusionlog") for r in rows) or "-"
    lines = [f"## {GROUPS[group]}", "", f"| variant | fusionlog | fusionlog, k = {ks} answers flipped | "
             "fusionlog transductive | " + " | ".join(SYSTEMS[1:]) + " | goal |",
             "|---" * (len(SYSTEMS) + 4) + "|"]
    for r in rows:
        cells = [cell(r["measure"], r["systems"].get(s)) for s in SYSTEMS]
        cells[0:1] = [f"**{cells[0]}**", bench.flipped(r["systems"].get("fusionlog"),
                                                      lambda x, v=r["measure"]: show(v, x)),
                      cell(r["measure"], r.get("transductive"))]
        lines.append(f"| {describe(r)} | " + " | ".join(cells) + f" | {verdict(r)} |")
    return lines + [""]


def cost_table(rows: list[dict]) -> list[str]:
    """LLM questions and time per variant (questions must stay <= half of the distinct proprietary sets)."""
    lines = ["## Costs", "", "| variant | routed general | FusionLog questions (new) | distinct proprietary "
             "sets | questions ≤ half | transductive questions (new) of sets | llm_only questions (new) | "
             "seconds, all systems and seeds |", "|---" * 8 + "|"]
    for r in rows:
        f, lo = r["systems"].get("fusionlog"), r["systems"].get("llm_only")
        asked = f and f["llm_calls"] + f["llm_cached"]
        half = "-" if not f else "yes" if 2 * asked <= f["distinct_proprietary_sets"] else "**no**"
        tr = r.get("transductive")
        trans = (f"{tr['llm_calls'] + tr['llm_cached']} ({tr['llm_calls']}) of "
                 f"{tr['distinct_proprietary_sets']}" if tr else "-")
        lines.append(f"| {r['variant']} | {bench.fmt(f and f['general'])} | "
                     + (f"{asked} ({f['llm_calls']})" if f else "-")
                     + f" | {bench.fmt(f and f['distinct_proprietary_sets'])} | {half} | {trans} | "
                     + (f"{lo['llm_calls'] + lo['llm_cached']} ({lo['llm_calls']})" if lo else "-")
                     + f" | {r['seconds']:.1f} |")
    return lines + [""]


def render_md(results: dict) -> str:
    mc, llm = results["machine"], results["llm"]
    lines = ["# FusionLog robustness suite", "",
             f"Generated by `{results['command']}` on {results['date']}; do not edit by hand.", "",
             f"- Machine: {mc['cpu']}, {mc['cores']} cores, {bench.fmt(mc['ram_gb'], 1)} GB RAM; "
             f"Python {mc['python']}, numpy {mc['numpy']}",
             f"- LLM: {llm['model']}" + ("" if llm["url"] in ("none", "fake") else f" at {llm['url']}"),
             f"- Library: commit {results['library']}; seeds {', '.join(map(str, results['seeds']))}",
             "- Data: `../shared/data` only (HDFS 2% of blocks, BGL_2k, OpenStack nova)", "",
             "**Protocol.** Zero target labels: the sources are labeled, the target's labels are read only "
             "to score. The target's sessions in first-appearance order; every system fits on the first half "
             "and is scored on the second half (for healthy and faulty targets too, where one class is "
             "absent and F1 undefined: the share flagged, the share caught). Each cell is the first seed's, "
             f"with the range over seeds {', '.join(map(str, results['seeds']))} beside it for "
             f"{', '.join(SEEDED)} when they differ. The goal column judges fusionlog on every seed (issue "
             "13); the best peer is the best of every other column but `oracle_teacher` (a ceiling: FusionLog "
             "with a perfect teacher, which reads the target's labels). *fusionlog transductive* is fusionlog "
             "(first seed) fitted and scored on all of the target's sessions, as a user labels a log they "
             "have; it is not a peer and no goal judges it. *k = "
             f"{bench.flip_ks(r['systems'].get('fusionlog') for r in results['variants'].values()) or '-'} "
             "answers flipped* is fusionlog's range "
             "(first seed) over its runs again with k random answers of its run's LLM flipped, "
             f"{results.get('flip_trials', '-')} trials per k, as in bench.py.", ""]
    rows = list(results["variants"].values())
    for group in GROUPS:
        part = [r for r in rows if r["group"] == group]
        lines += group_table(group, part) if part else []
    lines += cost_table(rows)
    lines += [f"Wall time: {results['wall_seconds'] / 60:.1f} min.", "", "## Systems", ""]
    lines += [f"- `{k}`: {v}." for k, v in bench.SYSTEM_NOTES.items() if k in SYSTEMS]
    lines += ["- `new_event`: LogLead's OOV_detector, widened to rare events: anomalous if the session holds "
              "a line of an event held by fewer than 1% of the fit sessions (or by none).",
              "- `rarity`: LogLead's RarityModel as published: mean (-ln p)^3 of the session's events "
              "(p = an event's share of the fit half's lines; 0 above 1%; unseen events twice the rarest), "
              "anomalous above 10.", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# command line


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=str(HERE.parent.parent / "shared" / "data"))
    bench.llm_and_output_flags(p, "ROBUST.md")
    p.add_argument("--variants", default="all", help="comma-separated variant or group names "
                                                     f"({', '.join(GROUPS)}) or 'all'")
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--seeds", default="0,1,2", help="the first is reported; the range is over all")
    p.add_argument("--out", default=str(HERE / "robust.json"))
    p.add_argument("--md", default=str(HERE / "ROBUST.md"))
    p.add_argument("--flips", default="1,2,3", metavar="KS",
                   help="comma-separated k: fusionlog (first seed) runs again with k of its answers flipped, "
                        "--flip-trials times per k ('' = none)")
    p.add_argument("--flip-trials", type=int, default=None, metavar="N",
                   help="runs per k of --flips (default 5; 1 with --llm-url fake)")
    p.add_argument("--transductive", action=argparse.BooleanOptionalAction, default=True,
                   help="also fit and score fusionlog (first seed) on all of each target")
    args = p.parse_args(argv)
    return check_args(p, args)


def check_args(p, args):
    """Lists out of the comma-separated flags, with bench.py's defaults for the LLM."""
    every = variants()
    wanted = {x.strip() for x in args.variants.split(",") if x.strip()}
    unknown = wanted - {"all"} - set(GROUPS) - {v.name for v in every}
    if unknown:
        known = ", ".join(v.name for v in every)
        p.error(f"--variants: unknown {', '.join(sorted(unknown))} (known: {known}, {', '.join(GROUPS)})")
    args.variants = [v for v in every if {"all", v.group, v.name} & wanted]
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if set(args.systems) - set(SYSTEMS):
        p.error(f"--systems: known are {', '.join(SYSTEMS)}")
    try:
        args.seeds = list(dict.fromkeys(int(x) for x in args.seeds.split(",") if x.strip())) or [0]
    except ValueError:
        p.error(f"--seeds: not a comma-separated list of integers: {args.seeds!r}")
    args.seed, fake = args.seeds[0], args.llm_url == "fake"
    args.flips = bench.int_list(p, "--flips", args.flips)
    args.flip_trials = args.flip_trials or (1 if fake else 5)
    if any(k < 1 for k in args.flips) or args.flip_trials < 1:
        p.error("--flips and --flip-trials: counts of at least 1")
    args.llm_model = args.llm_model or (bench.FAKE_MODEL if fake else "local")
    args.cache = args.cache or str(HERE / ".cache" / ("fake-answers.jsonl" if fake else "answers.jsonl"))
    return args


def start_fake(args):
    """The test suite's FakeLLM on a free port; args.llm_url then points at it."""
    from test_fusionlog import FakeLLM  # needs the test extra (pytest)
    server = FakeLLM().start()
    args.llm_url = server.url
    return server


def main(argv=None) -> int:
    args = parse_args(argv)
    command = shlex.join(["python", "bench/robust.py", *(argv if argv is not None else sys.argv[1:])])
    started, fake = time.perf_counter(), start_fake(args) if args.llm_url == "fake" else None
    try:
        llm = bench.describe_llm(args, fake is not None)
        cache = distill.AnswerCache(args.cache) if args.llm_url != "none" and args.cache != "none" else None
        data, done = Data(Path(args.data)), {}
        for v in args.variants:
            t = time.perf_counter()
            done[v.name] = dict(run_variant(v, args, cache, data), seconds=round(time.perf_counter() - t, 1))
            md = write_outputs(args, command, llm, done, started)  # after each variant: a stopped run keeps
                                                                   # what it measured
    finally:
        if fake is not None:
            fake.stop()
    print(md)
    return 0


def write_outputs(args, command: str, llm: dict, done: dict, started: float) -> str:
    results = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "command": command,
               "machine": bench.machine(), "llm": llm, "library": bench.library_version(),
               "seeds": args.seeds, "flip_trials": args.flip_trials if args.flips else None,
               "wall_seconds": round(time.perf_counter() - started, 1), "variants": done}
    for path in (args.out, args.md):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    md = render_md(results)
    Path(args.md).write_text(md, encoding="utf-8")
    if args.readme != "none":
        bench.splice_readme(Path(args.readme), md, "bench/ROBUST.md", "bench/robust.py")
    return md


if __name__ == "__main__":
    sys.exit(main())
