#!/usr/bin/env python3
"""FusionLog benchmark: each of HDFS, BGL, OpenStack as the zero-label target, the other two as sources.

    python bench/bench.py --data ../shared/data --llm-url http://127.0.0.1:8080/v1 --out bench/results.json

Protocol. The target's sessions are ordered by first appearance. FusionLog fits on the first half (routing,
every LLM call, distillation); the metrics are on the second half, which no LLM and no fit saw. The
transductive numbers fit and score on all of the target. Target labels are read only to score. fusionlog's
held-out half is also scored in consecutive batches of 1, 10 and 100 sessions: a session's label and score
must not depend on what else is in the batch (issue 11), so each must equal the one-batch result. fusionlog
also runs again with k = 1..3 of its LLM answers flipped (--flips, --flip-trials): the F1 range says how much
its F1 hangs on a few answers another machine's LLM may give the other way (issue 13).

Systems, all scored with precision / recall / F1 of the anomalous class on the same sessions:
    fusionlog         the full method (router -> meta-learned small model -> LLM <-> SM distillation)
    sm_only           the meta-learned small model alone (no LLM, no distillation)
    llm_only          the same LLM and prompts labeling each test template-set directly (no small model)
    no_router         every target session treated as proprietary (tau = 2, above any cosine)
    one_round         distillation stopped after a single round
    oracle_teacher    FusionLog with a perfect teacher: each question answered with the true majority label of
                      its template-set. A diagnostic ceiling (it reads target labels), not a peer: it tells
                      whether a shortfall is the teacher's or the pipeline's. No LLM, no cache, 0 LLM calls
    isolation_forest  scikit-learn IsolationForest on template count vectors (loglizer's demo settings)
    pca               loglizer's PCA detector (Xu et al., SOSP'09), re-implemented in numpy below

Each target runs in its own subprocess (`--target NAME`) so its peak RSS is its own; the parent merges the
results into --out (JSON) and --md (markdown), rewritten after each target, and refreshes README between
its `<!-- bench/RESULTS.md: start/end -->` markers. Progress goes to stderr, the table to stdout at the end.
`--llm-url fake` serves the test suite's keyword-rule fake LLM for a dry run; `--llm-url none` skips the LLM
systems; `--from-json bench/results.json` only re-renders the markdown. Every LLM answer is cached
(bench/.cache/answers.jsonl), so a rerun asks only prompts it has not seen.

scikit-learn is a peer, not a dependency: it comes with the optional `bench` extra
(pip install -e '.[bench]') and is imported only here, only for the isolation_forest peer.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import platform
import re
import resource
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import numpy as np  # noqa: E402

import distill  # noqa: E402
import fusionlog as fl  # noqa: E402
import router  # noqa: E402

TARGETS = ("HDFS", "BGL", "OpenStack")
FILES = {  # system -> (log, label csv or None for inline labels), relative to --data
    "HDFS": ("HDFS/HDFS_2pct.log", "HDFS/anomaly_label.csv"),
    "BGL": ("BGL/BGL_2k.log", None),
    "OpenStack": ("OpenStack/openstack_nova.log", "OpenStack/anomaly_label.csv"),
}
LLM_SYSTEMS = ("fusionlog", "llm_only", "no_router", "one_round")
SYSTEMS = ("fusionlog", "sm_only", "llm_only", "no_router", "one_round", "oracle_teacher", "isolation_forest",
           "pca")
SEED_FREE = ("llm_only", "pca")  # their results do not depend on --seed: no F1 spread over seeds
DIAGNOSTIC_SYSTEMS = ("oracle_teacher",)  # read target labels: a ceiling, never a peer of fusionlog
LIBRARY_FILES = ("fusionlog.py", "distill.py", "metamodel.py", "router.py")
STAGES = ("read_parse", "embed_route", "meta_train", "distill", "predict")
BATCH_SIZES = (1, 10, 100)  # fusionlog's held-out half is also scored in consecutive batches of these sizes
CONTRACT = "a session's label and score depend only on the model and that session"  # issue 11
FAKE_MODEL = "fake-keyword-rule"  # the model name sent to the fake server: its answers never share cache keys
                                  # with a real model's

_t0 = time.perf_counter()


def say(msg: str) -> None:
    print(f"bench [{time.perf_counter() - _t0:7.1f}s]: {msg}", file=sys.stderr, flush=True)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


# ----------------------------------------------------------------------------------------------------
# data


def read(data: Path, name: str) -> fl.Sessions:
    log, labels = FILES[name]
    s = fl.read_system(data / log, fl.PRESETS[name], name)
    if labels is not None:
        fl.attach_labels(s, fl.read_labels(data / labels))
    return s


def compact(s: fl.Sessions) -> fl.Sessions:
    """The same sessions over only the templates they use. `Sessions.subset` keeps the whole template
    list, so a fit on the first half would otherwise see the text of templates that occur only in the
    second half (in the TF-IDF vocabulary and idf): the inductive protocol must not."""
    used = np.unique(np.concatenate(s.sequences)) if len(s) else np.zeros(0, dtype=np.int64)
    remap = np.full(len(s.templates), -1, dtype=np.int64)
    remap[used] = np.arange(len(used))
    return fl.Sessions(s.name, [s.templates[i] for i in used], list(s.ids), [remap[q] for q in s.sequences],
                       None if s.labels is None else s.labels.copy(), dict(s.stats))


def labeled(s: fl.Sessions) -> fl.Sessions:
    """A source's labeled sessions (what FusionLog.fit keeps of a source)."""
    return s.subset(np.flatnonzero(s.labels >= 0))


def metrics(y_true, y_pred) -> dict:
    m = fl.evaluate(y_true, y_pred)
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in m.items()}


# ----------------------------------------------------------------------------------------------------
# the FusionLog systems (public API only)


def make_config(system: str, seed: int) -> fl.FusionLogConfig:
    c = fl.FusionLogConfig()  # fresh per system: the dataclass default factories give fresh sub-configs
    c.meta.seed = c.distill.seed = seed
    if system == "no_router":
        c.tau = 2.0  # above any cosine: nothing is "general", every session goes to the proprietary branch
                     # (router.route refuses a non-finite tau)
    elif system == "one_round":
        c.distill.rounds = 1
    return c


def make_client(args, cache: distill.AnswerCache | None) -> distill.ChatClient:
    return distill.ChatClient(base_url=args.llm_url, model=args.llm_model, response_format=args.response_format,
                              cache=cache, logprobs=args.logprobs, timeout=args.llm_timeout)


class OracleClient:
    """A perfect teacher in place of distill.ChatClient: each question is answered with the true majority
    label of the template-set it is about (a tie is normal, as in fl.example_pool). No HTTP request, no cache. It reads the target's
    labels, so `oracle_teacher` is a diagnostic ceiling, never a peer.

    distill asks about a set with the text of its first session (distill.format_session of
    fl.templates_with_counts, as FusionLog.distill_proprietary builds it), so every session's text maps to its set's
    label. Two sets whose texts coincide (cut at max_templates) pool their sessions; `ambiguous` counts them."""

    model = "oracle"

    def __init__(self, target: fl.Sessions, max_templates: int):
        if target.labels is None:
            raise ValueError(f"oracle_teacher: target {target.name} has no labels")
        group, _, keys = fl.group_by_template_set(target)   # (n,) each session's template-set
        labeled = target.labels >= 0
        anomalous = np.bincount(group, weights=labeled & (target.labels == 1), minlength=len(keys))  # (G,)
        counted = np.bincount(group, weights=labeled, minlength=len(keys))                          # (G,)
        texts: dict[str, set] = {}                # question text -> the sets it can stand for
        for seq, g in zip(target.sequences, group):
            text = distill.format_session(fl.templates_with_counts(target.templates, seq), max_templates)
            texts.setdefault(text, set()).add(int(g))
        self.labels: dict[str, int] = {}          # question text -> majority label (no entry: no labeled session)
        self.ambiguous = 0
        for text, sets in texts.items():
            self.ambiguous += len(sets) > 1
            a, n = anomalous[list(sets)].sum(), counted[list(sets)].sum()
            if n:
                self.labels[text] = int(a / n > 0.5)  # a tie is normal, as in fl.example_pool
        self.faults: Counter = Counter()
        self.answered = 0
        self._lock = threading.Lock()

    def key(self, messages: list[dict]) -> str:
        return distill.cache_key(self.model, messages)

    def cached(self, messages: list[dict]) -> None:
        return None  # no cache: every question is "asked" (answered here, at no cost)

    def answer(self, messages: list[dict]) -> distill.Answer:
        label = self.labels.get(messages[-1]["content"])
        with self._lock:
            if label is None:  # not a session of the fit part, or none of its sessions labeled
                self.faults["oracle_unknown_question"] += 1
                raise distill.BadAnswer("oracle_teacher: the question is no labeled template-set of the target")
            self.answered += 1
        return distill.Answer(label, 0.9, "oracle")


class FlipClient:
    """A client (distill.ChatClient, or OracleClient: the same shape) that answers as the one it wraps, except
    that the answers to the question keys in `flip` come back with the other label (same confidence and
    reason; p_anomalous, if given, as 1 - p); `asked` records the key of every question it answered."""

    def __init__(self, client, flip=()):
        self.client, self.flip, self.asked = client, frozenset(flip), set()
        self._lock = threading.Lock()

    def __getattr__(self, name: str):
        return getattr(self.client, name)  # model, faults, key, ...: the wrapped client's

    def _seen(self, messages: list[dict], ans: distill.Answer | None) -> distill.Answer | None:
        """The wrapped client's answer, recorded, and flipped if its key is one of `flip`."""
        if ans is None:
            return None
        key = self.client.key(messages)
        with self._lock:
            self.asked.add(key)
        if key not in self.flip:
            return ans
        p = None if ans.p_anomalous is None else 1.0 - ans.p_anomalous
        return dataclasses.replace(ans, label=1 - ans.label, p_anomalous=p)

    def cached(self, messages: list[dict]) -> distill.Answer | None:
        return self._seen(messages, self.client.cached(messages))

    def answer(self, messages: list[dict]) -> distill.Answer:
        return self._seen(messages, self.client.answer(messages))


def score_in_batches(model: fl.FusionLog, test: fl.Sessions, whole: fl.Predictions) -> list[dict]:
    """Score `test` again in consecutive batches of each of BATCH_SIZES sessions: per size the flagged count,
    F1, whether every session's label and score equal the one-batch result, and the largest score difference."""
    rows = []
    for size in BATCH_SIZES:
        t = time.perf_counter()
        parts = [model.predict(test.subset(range(i, min(i + size, len(test)))))
                 for i in range(0, len(test), size)]
        labels = np.concatenate([p.labels for p in parts])
        diff = float(np.max(np.abs(np.concatenate([p.scores for p in parts]) - whole.scores), initial=0.0))
        rows.append({"batch": size, "flagged": int(labels.sum()), "f1": metrics(test.labels, labels)["f1"],
                     "max_abs_score_diff": diff, "identical": bool(np.array_equal(labels, whole.labels)
                                                                   and diff <= 1e-9),
                     "seconds": round(time.perf_counter() - t, 3)})
    return rows


def run_fusionlog(system: str, args, cache, sources, fit, test, tag: str, seed: int | None = None,
                  batches: bool = False, client=None) -> dict:
    """One FusionLog system fitted on `fit`, scored on `test`; `client` (default: the system's) answers."""
    config = make_config(system, args.seed if seed is None else seed)
    if client is not None or system == "sm_only":
        pass
    elif system == "oracle_teacher":
        client = OracleClient(fit, distill.MAX_TEMPLATES)
    else:
        client = make_client(args, cache)
    model = fl.FusionLog(config, client, progress=lambda m: say(f"{tag} {system}: {m}"))
    t = time.perf_counter()
    report = model.fit(sources, fit)
    t_fit = time.perf_counter() - t
    all_answered(f"{tag} {system}", sum(r.get("failed", 0) for r in report["rounds"]), report["llm_faults"])
    t = time.perf_counter()
    pred = model.predict(test)
    t_pred = time.perf_counter() - t
    out = metrics(test.labels, pred.labels)
    if batches:
        out["batches"] = score_in_batches(model, test, pred)
        say(f"{tag} {system}: in batches of " + "; ".join(
            f"{b['batch']}: {b['flagged']} flagged, F1 {b['f1']:.3f}, max |dscore| "
            f"{b['max_abs_score_diff']:.4g} ({b['seconds']:.1f}s)" for b in out["batches"]))
    out.update(flagged=int(pred.labels.sum()), seconds=round(t_fit + t_pred, 3),
               predict_seconds=round(t_pred, 3),
               stage_seconds=report["seconds"], llm_calls=report["llm_calls"], llm_cached=report["llm_cached"],
               llm_faults=report["llm_faults"], rounds=len(report["rounds"]),
               proprietary=report["proprietary"], general=report["general"],
               distinct_proprietary_sets=report["distinct_proprietary_sets"])
    if system == "oracle_teacher":  # its questions cost no LLM call: keep them out of every LLM count
        out.update(llm_calls=0, llm_cached=0, oracle_answers=client.answered,
                   oracle_ambiguous_texts=client.ambiguous)
    return out


def all_answered(what: str, failed: int, faults: dict) -> None:
    """A figure needs every answer: a failed LLM question ends the run (those answered stay cached)."""
    if failed:
        sys.exit(f"bench: error: {what}: {failed} LLM questions failed (faults: {faults}); no figure is "
                 "written without them: mend the server and rerun (the answers so far are cached)")


def source_pool(sources: list[fl.Sessions], embedder: router.TfidfEmbedder) -> distill.ExamplePool:
    """The retrieval pool FusionLog's distillation starts from (fl.example_pool), in this embedding."""
    return fl.example_pool(sources, [router.session_vectors(s.sequences, embedder.transform(s.templates))
                                     for s in sources])


def run_llm_only(args, cache, sources, test, tag: str) -> dict:
    """The LLM alone: one question per distinct template-set of the scored sessions, with the prompts and
    retrieval distillation's first round uses; every session of a set gets the set's answer."""
    t = time.perf_counter()
    dc = distill.DistillConfig()
    client = make_client(args, cache)
    embedder = router.TfidfEmbedder().fit([x for s in sources for x in s.templates] + list(test.templates))
    pool = source_pool(sources, embedder)
    group, first, _ = fl.group_by_template_set(test)  # the first session of each set is its question
    questions = [fl.templates_with_counts(test.templates, test.sequences[i]) for i in first]
    qvecs = router.session_vectors([test.sequences[i] for i in first], embedder.transform(test.templates))
    prompts = distill.prompts(list(range(len(questions))), questions, qvecs, pool)  # as distillation asks
    n_cached = sum(client.cached(m) is not None for m in prompts)
    say(f"{tag} llm_only: {len(prompts)} distinct template-sets, {n_cached} answers cached")

    results = distill.ask_all(client, list(enumerate(prompts)), dc.concurrency,  # distillation's asking
                              lambda msg: say(f"{tag} llm_only: {msg}"))
    answers = [results[i] for i in range(len(prompts))]
    failed = sum(not isinstance(a, distill.Answer) for a in answers)
    all_answered(f"{tag} llm_only", failed, dict(client.faults))
    set_label = np.array([a.label if isinstance(a, distill.Answer) else 0 for a in answers], dtype=np.int8)
    out = metrics(test.labels, set_label[group])
    out.update(seconds=round(time.perf_counter() - t, 3), llm_calls=len(prompts) - n_cached - failed,
               llm_cached=n_cached, llm_failed=failed, llm_faults=dict(client.faults),
               distinct_sets=len(prompts), sets_called_anomalous=int(set_label.sum()))
    return out


# ----------------------------------------------------------------------------------------------------
# unsupervised peers, loglizer style: event count vectors of the target's own templates


def count_matrix(s: fl.Sessions, columns: dict[str, int]) -> np.ndarray:
    """(sessions, events) occurrence counts; templates that are not a column are dropped, as loglizer's
    FeatureExtractor.transform drops events unseen in fitting (its default oov=False)."""
    col = np.array([columns.get(t, -1) for t in s.templates], dtype=np.int64)
    X = np.zeros((len(s), len(columns)))
    for i, q in enumerate(s.sequences):
        c = col[q]
        np.add.at(X[i], c[c >= 0], 1.0)
    return X


class LoglizerPCA:
    """loglizer's PCA detector (logpai/loglizer, models/PCA.py + preprocessing.FeatureExtractor with
    term_weighting='tf-idf', normalization='zero-mean'): project onto the residual of the principal
    components that keep 95% of the variance; a session is anomalous if its squared prediction error (SPE)
    exceeds the Q-statistic threshold (Jackson & Mudholkar) at c_alpha = 3.2905 (alpha = 0.001)."""

    def __init__(self, n_components: float = 0.95, c_alpha: float = 3.2905):
        self.n_components, self.c_alpha = n_components, c_alpha

    def fit(self, counts: np.ndarray) -> "LoglizerPCA":
        n, d = counts.shape
        df = (counts > 0).sum(axis=0)
        self.idf = np.log(n / (df + 1e-8))                      # loglizer's tf-idf (no smoothing)
        X = counts * self.idf
        self.mean = X.mean(axis=0)
        X = X - self.mean                                       # zero-mean
        cov = X.T @ X / float(n)                                # (d, d)
        U, sigma, _ = np.linalg.svd(cov)
        k = self.n_components
        if k < 1:                                               # smallest k reaching the variance share
            share = np.cumsum(sigma) / max(sigma.sum(), 1e-300)
            k = int(np.searchsorted(share, k) + 1) if sigma.sum() > 0 else d
        k = min(int(k), d)
        P = U[:, :k]
        self.k = k
        self.proj = np.eye(d) - P @ P.T                         # onto the residual subspace
        phi = [float(np.sum(sigma[k:] ** (i + 1))) for i in range(3)]
        if phi[0] <= 0 or phi[1] <= 0:                          # no residual variance: nothing can exceed it
            self.threshold = math.inf
        else:
            h0 = 1.0 - 2 * phi[0] * phi[2] / (3.0 * phi[1] * phi[1])
            self.threshold = phi[0] * np.power(self.c_alpha * np.sqrt(2 * phi[1] * h0 * h0) / phi[0]
                                               + 1.0 + phi[1] * h0 * (h0 - 1) / (phi[0] * phi[0]), 1.0 / h0)
            if not np.isfinite(self.threshold):
                self.threshold = math.inf
        return self

    def predict(self, counts: np.ndarray) -> np.ndarray:
        Y = (counts * self.idf - self.mean) @ self.proj.T       # residual of each session
        spe = np.einsum("ij,ij->i", Y, Y)
        return (spe > self.threshold).astype(np.int8)


def run_peer(system: str, fit: fl.Sessions, test: fl.Sessions, seed: int) -> dict:
    t = time.perf_counter()
    columns = {x: j for j, x in enumerate(dict.fromkeys(fit.templates[i] for q in fit.sequences
                                                         for i in np.unique(q).tolist()))}
    X_fit, X_test = count_matrix(fit, columns), count_matrix(test, columns)
    extra = {}
    if system == "isolation_forest":
        from sklearn.ensemble import IsolationForest  # the bench extra; never imported by the library
        model = IsolationForest(n_estimators=100, contamination=0.03, random_state=seed).fit(X_fit)
        pred = (model.predict(X_test) < 0).astype(np.int8)      # sklearn: -1 outlier, 1 inlier
    else:
        model = LoglizerPCA().fit(X_fit)
        pred = model.predict(X_test)
        extra = dict(components=model.k, spe_threshold=round(float(model.threshold), 4))
    out = metrics(test.labels, pred)
    out.update(seconds=round(time.perf_counter() - t, 3), events=len(columns), **extra)
    return out


RERUNS = ("other_seeds", "flips")  # m["llm_calls_<rerun>"]: the LLM questions a system's further runs asked


def count_calls(m: dict, runs: list[dict], rerun: str) -> None:
    """m gets the LLM questions (new and cached) its further runs `runs` asked, under llm_calls_<rerun>."""
    if "llm_calls" in m:
        m[f"llm_calls_{rerun}"] = sum(r.get("llm_calls", 0) for r in runs)
        m[f"llm_cached_{rerun}"] = sum(r.get("llm_cached", 0) for r in runs)


def spread_seeds(args, m: dict, run: Callable[[int], dict]) -> None:
    """Run a system again with each of --spread-seeds (run(seed) -> its metrics); m gets its F1 per seed
    (its own seed first) and the LLM questions those runs asked. One seed's F1 can be luck: the spread
    says how much."""
    runs = [run(seed) for seed in args.spread_seeds]
    m["f1_by_seed"] = {str(seed): r["f1"] for seed, r in zip([args.seed, *args.spread_seeds], [m, *runs])}
    count_calls(m, runs, "other_seeds")


def flip_answers(args, m: dict, keys, run: Callable[[frozenset], dict],
                 measure: Callable[[dict], float] = lambda r: r["f1"]) -> None:
    """Run a system again with k of its run's answers flipped (run(keys to flip) -> its metrics), for each k
    of --flips, --flip-trials times, the k drawn from `keys` (the questions it asked) at random, seeded by
    the seed, k and the trial; m gets the F1s (or `measure` of the metrics) by k and those runs' LLM
    questions. A teacher on another machine flips a few answers: the spread says how much F1 hangs on them."""
    keys, runs = sorted(keys), []
    m["flips"] = {}
    for k in (k for k in args.flips if k <= len(keys)):
        for trial in range(args.flip_trials):
            flip = np.random.default_rng([args.seed, k, trial]).choice(len(keys), size=k, replace=False)
            runs.append(run(frozenset(keys[i] for i in flip)))
            m["flips"].setdefault(str(k), []).append(measure(runs[-1]))
    count_calls(m, runs, "flips")


def f1_range(f1s: list[float], show: Callable[[float], str] = "{:.3f}".format) -> str:
    """'min-max' of F1s (or other values, as `show` prints them; '0.914' when they agree), '-' if none."""
    if not f1s:
        return "-"
    lo, hi = show(min(f1s)), show(max(f1s))
    return lo if lo == hi else f"{lo}–{hi}"


def spread(m: dict | None) -> str:
    """The range of a system's F1 over seeds, '-' when it was not run with several."""
    return f1_range(list((m or {}).get("f1_by_seed", {}).values()))


def flipped(m: dict | None, show: Callable[[float], str] = "{:.3f}".format) -> str:
    """The range of a system's F1 (or measure) over every run with answers flipped, '-' when it had none."""
    return f1_range([f for f1s in (m or {}).get("flips", {}).values() for f in f1s], show)


# ----------------------------------------------------------------------------------------------------
# one target (runs in its own process)


def run_target(args, target_name: str) -> dict:
    data = Path(args.data)
    use_llm = args.llm_url != "none"
    systems = [s for s in args.systems if use_llm or s not in LLM_SYSTEMS]
    cache = distill.AnswerCache(args.cache) if use_llm and args.cache != "none" else None
    t = time.perf_counter()
    source_names = [n for n in TARGETS if n != target_name]
    say(f"{target_name}: reading target and sources {', '.join(source_names)}")
    target = read(data, target_name)
    sources = [read(data, n) for n in source_names]
    read_seconds = round(time.perf_counter() - t, 3)
    n = len(target)
    fit = compact(target.subset(range(n // 2)))
    test = compact(target.subset(range(n // 2, n)))
    say(f"{target_name}: {n:,} sessions ({int((target.labels == 1).sum())} anomalous); fit on the first "
        f"{len(fit):,}, scored on the last {len(test):,} ({int((test.labels == 1).sum())} anomalous); "
        f"read+parse {read_seconds:.1f}s")
    src_labeled = [labeled(s) for s in sources]

    res = {"target": target_name, "library": library_version(), "sources": source_names, "sessions": n,
           "fit_sessions": len(fit),
           "test_sessions": len(test), "test_anomalous": int((test.labels == 1).sum()),
           "anomalous": int((target.labels == 1).sum()), "systems": {}, "transductive": {}}
    protocols = [("inductive", fit, test, res["systems"])]
    if args.transductive:
        protocols.append(("transductive", target, target, res["transductive"]))
    rss_fusionlog = None
    for protocol, fit_part, test_part, into in protocols:
        tag = f"{target_name} {protocol}"
        for system in systems:
            def run(seed: int, client=None, system=system, fit_part=fit_part, test_part=test_part, tag=tag,
                    protocol=protocol) -> dict:
                if system in ("isolation_forest", "pca"):
                    return run_peer(system, fit_part, test_part, seed)
                if system == "llm_only":  # (no seed)
                    return run_llm_only(args, cache, src_labeled, test_part, tag)
                shown = tag if seed == args.seed else f"{tag} seed {seed}"
                batches = protocol == "inductive" and system == "fusionlog" and seed == args.seed
                return run_fusionlog(system, args, cache, sources, fit_part, test_part, shown, seed=seed,
                                     batches=batches, client=client)
            say(f"{tag}: {system}")
            recorder = FlipClient(make_client(args, cache)) if system == "fusionlog" and args.flips else None
            m = into[system] = run(args.seed, client=recorder)
            if recorder is not None:
                flip_answers(args, m, recorder.asked, lambda flip, system=system, fit_part=fit_part,
                             test_part=test_part, tag=tag: run_fusionlog(
                                 system, args, cache, sources, fit_part, test_part, f"{tag} flipped",
                                 client=FlipClient(make_client(args, cache), flip)))
            if args.spread_seeds and system not in SEED_FREE:
                spread_seeds(args, m, run)
            seeds = f"seeds {', '.join(m['f1_by_seed'])}: {spread(m)}; " if "f1_by_seed" in m else ""
            seeds += f"answers flipped: {flipped(m)}; " if "flips" in m else ""
            say(f"{tag}: {system}: P {m['precision']:.3f} R {m['recall']:.3f} F1 {m['f1']:.3f} "
                f"({seeds}{m['seconds']:.1f}s" + (f", {m['oracle_answers']} oracle answers" if "oracle_answers" in m
                                                  else f", {m['llm_calls']} LLM calls, {m['llm_cached']} cached"
                                                  if "llm_calls" in m and system != "sm_only" else "") + ")")
            if protocol == "inductive" and system in ("fusionlog", "sm_only") and rss_fusionlog is None:
                rss_fusionlog = peak_rss_mb()  # before scikit-learn is imported for the peers

    main = res["systems"].get("fusionlog") or res["systems"].get("sm_only") or {}
    stages = main.get("stage_seconds", {})
    res["method_system"] = "fusionlog" if "fusionlog" in res["systems"] else "sm_only"
    res["llm_calls"] = main.get("llm_calls", 0)
    res["llm_cached"] = main.get("llm_cached", 0)
    res["distinct_proprietary_sets"] = main.get("distinct_proprietary_sets")
    res["seconds"] = {"read_parse": read_seconds, "embed_route": stages.get("embed_route"),
                      "meta_train": stages.get("meta_train"), "distill": stages.get("distill"),
                      "predict": main.get("predict_seconds")}
    for what in ("calls", "cached"):  # every run's questions: each system's own run and its reruns
        res[f"llm_{what}_all_systems"] = sum(m.get(f"llm_{what}{part}", 0)
                                             for p in (res["systems"], res["transductive"])
                                             for m in p.values() if "llm_calls" in m
                                             for part in ("", *(f"_{r}" for r in RERUNS)))
    res["peak_rss_mb"] = round(peak_rss_mb(), 1)
    res["peak_rss_mb_fusionlog"] = None if rss_fusionlog is None else round(rss_fusionlog, 1)
    return res


# ----------------------------------------------------------------------------------------------------
# the parent: machine, LLM, children, merge, markdown


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gb": ram, "os": platform.platform(),
            "python": platform.python_version(), "numpy": np.__version__}


def library_version() -> str:
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", *LIBRARY_FILES],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if not dirty:
        return head or "unknown"
    digest = hashlib.sha256(b"".join((ROOT / f).read_bytes() for f in LIBRARY_FILES)).hexdigest()[:8]
    return f"{head or 'unknown'} + uncommitted library changes (files sha256 {digest})"


def server_models(url: str, model: str, wait: float = 300.0) -> list[str]:
    """The server's model ids (GET /models). ChatClient.check() gives up after 10 s, but llama-cpp-python
    answers nothing, not even /models, while it generates for another client: wait for it longer."""
    client = distill.ChatClient(base_url=url, model=model)
    deadline = time.monotonic() + wait
    while True:
        try:
            return client.check()
        except distill.LLMUnavailable as e:
            if "did not answer" not in str(e) or time.monotonic() > deadline:
                raise
            say(f"{e}; busy? waiting")


LOCAL_ALIAS = "local"  # the model id `fusionlog llm start` serves


def describe_llm(args, fake: bool) -> dict:
    if args.llm_url == "none":
        return {"url": "none", "models": [], "model": "none (LLM systems skipped)"}
    if not any(s in LLM_SYSTEMS for s in args.systems):  # e.g. oracle_teacher, sm_only: no server needed
        return {"url": "none", "models": [], "model": "none (no LLM system in --systems)"}
    models = server_models(args.llm_url, args.llm_model)
    name = ("fake keyword-rule teacher of test_fusionlog.py (FakeLLM), not a real LLM" if fake
            else args.llm_name or ", ".join(models) or args.llm_model)
    if not fake and not args.llm_name and models == [LOCAL_ALIAS] and args.llm_url.rstrip("/") == fl.DEFAULT_LLM_URL:
        name = f"'{LOCAL_ALIAS}' as served by fusionlog llm start: {fl.MODEL_FILE} on llama-cpp-python"
    return {"url": "fake" if fake else args.llm_url, "models": models, "model": name,
            "logprobs": args.logprobs, "response_format": args.response_format}


def child_argv(args, target: str, out: str) -> list[str]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--target", target, "--child-json", out,
            "--data", args.data, "--llm-url", args.llm_url, "--llm-model", args.llm_model,
            "--response-format", args.response_format, "--cache", args.cache, "--seed", str(args.seed),
            "--llm-timeout", str(args.llm_timeout),
            "--spread-seeds", ",".join(map(str, args.spread_seeds)),
            "--flips", ",".join(map(str, args.flips)), "--flip-trials", str(args.flip_trials),
            "--systems", ",".join(args.systems),
            "--logprobs" if args.logprobs else "--no-logprobs",
            "--transductive" if args.transductive else "--no-transductive"]
    return argv


def fmt(x, digits=3) -> str:
    return "-" if x is None else (f"{x:.{digits}f}" if isinstance(x, float) else str(x))


SYSTEM_NOTES = {
    "fusionlog": "the full method: TF-IDF router, small MLP meta-learned by first-order MAML over the sources, "
                 "multi-round LLM <-> small-model distillation on the proprietary sessions",
    "sm_only": "the meta-learned small model alone, no LLM and no distillation",
    "llm_only": "the same LLM and prompts asked about every distinct template-set of the scored sessions; "
                "each session gets its set's answer (no small model)",
    "no_router": "FusionLog with every target session treated as proprietary (tau = 2, above any cosine)",
    "one_round": "FusionLog with a single distillation round",
    "oracle_teacher": "FusionLog with a perfect teacher: each question answered with the true majority label "
                      "of its template-set. A diagnostic ceiling (it reads target labels), not a peer: it tells "
                      "whether a shortfall is the teacher's or the pipeline's",
    "isolation_forest": "scikit-learn IsolationForest(n_estimators=100, contamination=0.03) on template "
                        "count vectors of the target, as in loglizer's demo",
    "pca": "loglizer's PCA detector (Xu et al., SOSP 2009) in numpy: tf-idf weighted, zero-mean count "
           "vectors, residual of the components keeping 95% of the variance, SPE above the Q-statistic "
           "threshold at c_alpha = 3.2905",
}


def batch_table(m: dict, n: int) -> list[str]:
    """Markdown lines: fusionlog's held-out half scored in batches, beside the one-batch result ([] if none)."""
    if "batches" not in m:
        return []
    lines = [f"Batch independence: {CONTRACT}, so scoring the held-out sessions in consecutive batches must "
             "give the one-batch result exactly.", "",
             "| batch size | flagged | F1 | max \\|Δscore\\| | identical |", "|---|---|---|---|---|"]
    lines += [f"| {b['batch']:,} | {b['flagged']:,} | {b['f1']:.3f} | {b['max_abs_score_diff']:.4g} | "
              f"{'yes' if b['identical'] else '**no**'} |" for b in m["batches"]]
    lines += [f"| all ({n:,}) | {fmt(m.get('flagged'))} | {m['f1']:.3f} | 0 | (the reference) |", ""]
    return lines


def flips_header(results: dict) -> str:
    """The flip columns' header, 'F1 with k = 1..3 answers flipped' ('' when the run flipped no answer)."""
    ks = flip_ks(r.get(p, {}).get("fusionlog") for r in results["targets"].values()
                 for p in ("systems", "transductive"))
    return f"F1 with k = {ks} answers flipped" if ks else ""


def flip_ks(ms) -> str:
    """The k's the runs `ms` (metrics dicts or None) flipped answers for: '1..3', '1,3', or ''."""
    ks = sorted({int(k) for m in ms for k in (m or {}).get("flips", {})})
    contiguous = len(ks) > 1 and ks == list(range(ks[0], ks[-1] + 1))
    return f"{ks[0]}..{ks[-1]}" if contiguous else ",".join(map(str, ks))


def table_columns(seeds: str, flips: str) -> list[tuple[str, Callable]]:
    """A target table's columns after precision and recall, as (header, cell(m, m transductive)); the seed and
    flip ranges only when the run has them."""
    cols = [("F1", lambda m, tr: f"{m['f1']:.3f}"), (flips, lambda m, tr: flipped(m)),
            (f"F1 seeds {seeds}", lambda m, tr: spread(m)),
            ("F1 transductive", lambda m, tr: fmt(tr["f1"]) if tr else "-"),
            (f"F1 transductive {flips[3:]}", lambda m, tr: flipped(tr)),
            (f"F1 transductive seeds {seeds}", lambda m, tr: spread(tr))]
    return [c for c, on in zip(cols, (True, flips, seeds, True, flips, seeds)) if on]


def render_md(results: dict) -> str:
    mc, llm, flips = results["machine"], results["llm"], flips_header(results)
    lines = [
        "# FusionLog benchmark",
        "",
        f"Generated by `{results['command']}` on {results['date']}; do not edit by hand.",
        "",
        f"- Machine: {mc['cpu']}, {mc['cores']} cores, {fmt(mc['ram_gb'], 1)} GB RAM; "
        f"Python {mc['python']}, numpy {mc['numpy']}",
        f"- LLM: {llm['model']}" + ("" if llm["url"] == "none" else
                                   ("" if llm["url"] == "fake" else f" at {llm['url']}")
                                   + f"; temperature 0, logprobs {'on' if llm.get('logprobs') else 'off'}, "
                                   f"response format {llm.get('response_format')}"),
        f"- Library: commit {results['library']}; seed {results['seed']}",
        "- Data: LogHub samples (HDFS 2% of blocks, BGL_2k in windows of 20 lines, OpenStack nova), "
        "see `../shared/data/README.md`",
        "",
        "**Protocol.** For each target, the other two systems are the labeled sources. The target's sessions "
        "are ordered by first appearance; FusionLog fits on the first half (routing, every LLM call, "
        "distillation) and every system is scored on the second half, which no LLM and no fit saw. The "
        "transductive column fits and scores on all of the target. Target labels are used only for scoring. "
        "Precision, recall and F1 are of the anomalous class."
        + (f" *{flips}* is fusionlog's F1 range (min–max) over its runs again with k random answers of its "
           "run's LLM flipped (several trials per k; questions a flip leads to go to the LLM): how much F1 "
           "hangs on a few answers that another machine's LLM gives the other way." if flips else ""),
        "",
    ]
    seeds = ",".join(next((m["f1_by_seed"] for r in results["targets"].values()
                           for m in r["systems"].values() if "f1_by_seed" in m), {}))
    if seeds:
        lines += [f"F1 is seed {results['seed']}'s; the columns *F1 seeds {seeds}* give the range (min–max) "
                  "of F1 when the seed-dependent systems run again with each of those seeds (meta-training, "
                  "replay sampling, Isolation Forest). Which sets the LLM is asked about depends on the seed, "
                  "so one seed's F1 can be luck.", ""]
    columns = table_columns(seeds, flips)
    for name, r in results["targets"].items():
        lines += [f"## {name} (sources: {', '.join(r['sources'])})", "",
                  f"{r['sessions']:,} sessions ({r['anomalous']:,} anomalous); fit on the first "
                  f"{r['fit_sessions']:,} ({r['anomalous'] - r['test_anomalous']:,} anomalous), scored on the "
                  f"last {r['test_sessions']:,} ({r['test_anomalous']:,} anomalous).", "",
                  "| system | precision | recall | " + " | ".join(c for c, _ in columns) + " |",
                  "|---|---|---" + "|---" * len(columns) + "|"]
        for system in SYSTEMS:
            m = r["systems"].get(system)
            if m is None:
                continue
            tr = r.get("transductive", {}).get(system)
            bold = "**" if system == "fusionlog" else ""
            shown = f"{system} (diagnostic)" if system in DIAGNOSTIC_SYSTEMS else system
            cells = [f(m, tr) for _, f in columns]
            cells[0] = f"{bold}{cells[0]}{bold}"
            lines.append(f"| {bold}{shown}{bold} | {m['precision']:.3f} | {m['recall']:.3f} | "
                         + " | ".join(cells) + " |")
        lines.append("")
        lines += batch_table(r["systems"].get("fusionlog", {}), r["test_sessions"])
    lines += ["## Costs", "",
              "LLM questions asked (of them, new calls this run; the rest came from the answer cache) by "
              f"`{next(iter(results['targets'].values()), {}).get('method_system', 'fusionlog')}` in the inductive "
              "fit, by `llm_only` (one per distinct template-set it labels) and by all systems of the run "
              "together (other seeds' and flipped-answer runs included); the number of distinct proprietary "
              "template-sets of the fit half (the ceiling on useful questions); the LLM's latency "
              "(`llm_only` wall time per new call); seconds per stage of the "
              "inductive FusionLog fit; peak RSS of the whole target run (all systems, scikit-learn included) "
              "and of FusionLog alone (before the peers ran).", "",
              "| target | FusionLog questions (new) | distinct proprietary sets | llm_only questions (new) | "
              "all systems' questions (new) | s per new call | read+parse s | embed+route s | meta-train s | "
              "distill s | predict s | peak RSS MB (FusionLog alone) |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results["targets"].items():
        s = r["seconds"]
        lo = r["systems"].get("llm_only")
        lines.append(f"| {name} | {r['llm_calls'] + r['llm_cached']} ({r['llm_calls']}) | "
                     f"{fmt(r['distinct_proprietary_sets'])} | "
                     + (f"{lo['llm_calls'] + lo['llm_cached']} ({lo['llm_calls']})" if lo else "-") + " | "
                     f"{r['llm_calls_all_systems'] + r['llm_cached_all_systems']} ({r['llm_calls_all_systems']}) | "
                     + (f"{lo['seconds'] / lo['llm_calls']:.1f}" if lo and lo["llm_calls"] else "-") + " | "
                     + " | ".join(fmt(s.get(k), 2) for k in STAGES)
                     + f" | {r['peak_rss_mb']:.0f} ({fmt(r['peak_rss_mb_fusionlog'], 0)}) |")
    if results.get("pending_targets"):
        lines += ["", f"**Partial**: not run yet: {', '.join(results['pending_targets'])}."]
    lines += ["", f"Wall time of this run: {results['wall_seconds'] / 60:.1f} min. A rerun answers repeated "
              "prompts from the LLM answer cache (`--cache`, named in the command above): its new calls and "
              "time can be lower, the questions and the detection numbers stay the same.", "",
              "## Systems", ""]
    lines += [f"- `{k}`: {v}." for k, v in SYSTEM_NOTES.items()]
    lines += ["", "The peers use the target's own templates (this library's regex masking, not Drain) as "
              "events: columns are the events seen in the fitted sessions; an event seen only in scored "
              "sessions is dropped, as loglizer's `FeatureExtractor` does by default. They see no source "
              "system and no label.", ""]
    return "\n".join(lines)


def splice_readme(readme: Path, md: str, md_path: str, script: str = "bench/bench.py") -> bool:
    """Replace README's text between the markers with the table, if README has the markers."""
    start, end = f"<!-- {md_path}: start -->", f"<!-- {md_path}: end -->"
    if not readme.exists():
        return False
    text = readme.read_text(encoding="utf-8")
    if start not in text or end not in text:
        return False
    body = md.split("\n", 2)[2] if md.startswith("# ") else md  # the README has its own heading
    above = [ln for ln in text[: text.index(start)].splitlines() if re.match(r"#+ ", ln)]
    shift = max(0, len(above[-1].split(" ", 1)[0]) - 1) if above else 0  # nest "## X" under README's last heading
    body = "\n".join("#" * shift + ln if re.match(r"#+ ", ln) else ln for ln in body.splitlines())
    new = text[: text.index(start) + len(start)] + f"\n<!-- generated from {md_path} by {script} -->\n" \
        + body.rstrip() + "\n" + text[text.index(end):]
    if new != text:
        readme.write_text(new, encoding="utf-8")
    return True


def llm_and_output_flags(p, name: str) -> None:
    """The LLM flags the bench scripts share (fusionlog's own, with bench defaults), and --readme for `name`."""
    fl.add_llm_flags(p, skip=("llm_key", "llm_retries", "llm_backoff"),
                     llm_url=dict(default=fl.DEFAULT_LLM_URL, help="OpenAI-compatible base URL; 'fake' = the test "
                                  "suite's fake server; 'none' = skip the LLM systems"),
                     llm_model=dict(default=None, help=f"model name sent to the server (default 'local', "
                                    f"'{FAKE_MODEL}' with --llm-url fake)"),
                     response_format=dict(help=None),
                     logprobs=dict(help="ask for token log-probabilities (p(anomalous) as the LLM's confidence in "
                                        "fusion); off, as in 'fusionlog run': on a 2-core CPU they make each call "
                                        "far slower"),
                     llm_timeout=dict(default=300.0, help="seconds per LLM request attempt (a busy CPU server "
                                                          "queues requests)"),
                     cache=dict(default=None, help="LLM answer cache, JSONL ('none' = off; default "
                                                   "bench/.cache/answers.jsonl, bench/.cache/fake-answers.jsonl "
                                                   "with --llm-url fake)"))
    p.add_argument("--llm-name", default=None, help=f"how {name} names the LLM (default: the server's "
                                                     "model ids from GET /models)")
    p.add_argument("--readme", default=str(ROOT / "README.md"),
                   help=f"README to refresh between '<!-- bench/{name}: start -->' and '... end -->' "
                        "markers, if it has them ('none' = never)")


def int_list(p, flag: str, text: str) -> list[int]:
    """The integers of a comma-separated flag, in order, each once (p.error otherwise)."""
    try:
        return list(dict.fromkeys(int(x) for x in text.split(",") if x.strip()))
    except ValueError:
        p.error(f"{flag}: not a comma-separated list of integers: {text!r}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data"), help="the shared LogHub samples")
    llm_and_output_flags(p, "RESULTS.md")
    p.add_argument("--targets", default=",".join(TARGETS), help="comma-separated targets")
    p.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated systems")
    p.add_argument("--out", default=str(ROOT / "bench" / "results.json"))
    p.add_argument("--md", default=str(ROOT / "bench" / "RESULTS.md"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--spread-seeds", default="1,2", metavar="SEEDS",
                   help="comma-separated further seeds: every seed-dependent system runs again with each, and "
                        "RESULTS.md gives its F1 range over all seeds ('' = none)")
    p.add_argument("--flips", default="1,2,3", metavar="KS",
                   help="comma-separated k: fusionlog runs again with k of the answers its run got flipped, "
                        "--flip-trials times per k, and RESULTS.md gives its F1 range ('' = none)")
    p.add_argument("--flip-trials", type=int, default=None, metavar="N",
                   help="runs per k of --flips (default 5; 1 with --llm-url fake, whose dry run checks the "
                        "harness)")
    p.add_argument("--transductive", action=argparse.BooleanOptionalAction, default=True,
                   help="also fit and score every system on all of the target")
    p.add_argument("--from-json", default=None, metavar="RESULTS_JSON",
                   help="run nothing: render an earlier run's results.json into --md (and README)")
    p.add_argument("--target", default=None, help=argparse.SUPPRESS)      # child: run one target
    p.add_argument("--child-json", default=None, help=argparse.SUPPRESS)  # child: write its result here
    args = p.parse_args(argv)
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    args.spread_seeds = int_list(p, "--spread-seeds", args.spread_seeds)
    args.flips = int_list(p, "--flips", args.flips)
    args.spread_seeds = [x for x in dict.fromkeys(args.spread_seeds) if x != args.seed]
    for s in args.systems:
        if s not in SYSTEMS:
            p.error(f"--systems: unknown system {s!r} (known: {', '.join(SYSTEMS)})")
    for t in args.targets + ([args.target] if args.target else []):
        if t not in TARGETS:
            p.error(f"--targets: unknown target {t!r} (known: {', '.join(TARGETS)})")
    fake = args.llm_url == "fake"
    if args.llm_model is None:
        args.llm_model = FAKE_MODEL if fake else "local"
    if args.cache is None:
        args.cache = str(ROOT / "bench" / ".cache" / ("fake-answers.jsonl" if fake else "answers.jsonl"))
    if args.flip_trials is None:
        args.flip_trials = 1 if fake else 5
    if any(k < 1 for k in args.flips) or args.flip_trials < 1:
        p.error("--flips and --flip-trials: counts of at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.from_json:  # re-render only
        results = json.loads(Path(args.from_json).read_text(encoding="utf-8"))
        md = render_md(results)
        Path(args.md).write_text(md, encoding="utf-8")
        spliced = args.readme != "none" and splice_readme(Path(args.readme), md, os.path.relpath(args.md, ROOT))
        say(f"rendered {args.from_json} into {args.md}" + (f" and {args.readme}" if spliced else ""))
        print(md)
        return 0
    if args.target:  # child
        res = run_target(args, args.target)
        with open(args.child_json, "w", encoding="utf-8") as f:
            json.dump(res, f)
        return 0

    missing = [str(Path(args.data) / FILES[t][0]) for t in TARGETS if not (Path(args.data) / FILES[t][0]).exists()]
    if missing:
        print(f"bench: error: data not found: {', '.join(missing)} (give --data, the folder of the LogHub "
              f"samples)", file=sys.stderr)
        return 2
    if "isolation_forest" in args.systems:
        try:
            import sklearn  # noqa: F401
        except ImportError:
            print("bench: error: the isolation_forest peer needs scikit-learn: pip install -e '.[bench]'",
                  file=sys.stderr)
            return 2
    command = shlex.join(["python", "bench/bench.py", *(argv if argv is not None else sys.argv[1:])])
    fake_server = None
    if args.llm_url == "fake":
        try:
            from test_fusionlog import FakeLLM  # needs the test extra (pytest)
        except ImportError as e:
            print(f"bench: error: --llm-url fake needs the test suite's FakeLLM ({e}); pip install -e '.[test]'",
                  file=sys.stderr)
            return 2
        fake_server = FakeLLM().start()
        args.llm_url = fake_server.url
    started = time.perf_counter()
    try:
        try:
            llm = describe_llm(args, fake_server is not None)
        except distill.LLMUnavailable as e:
            print(f"bench: error: {e}; start one with 'fusionlog llm start', or use --llm-url fake / none",
                  file=sys.stderr)
            return 2
        say(f"LLM: {llm['model']}")
        targets: dict = {}
        md = ""
        with tempfile.TemporaryDirectory(prefix="fusionlog-bench-") as tmp:
            for t in args.targets:
                out = os.path.join(tmp, f"{t}.json")
                rc = subprocess.run(child_argv(args, t, out)).returncode
                if rc != 0:
                    print(f"bench: error: the run for target {t} failed (exit {rc}); see its messages above",
                          file=sys.stderr)
                    return 1
                with open(out, encoding="utf-8") as f:
                    targets[t] = json.load(f)
                md = write_outputs(args, command, llm, targets, started)  # after each target: a long run that
                                                                          # is stopped keeps what it measured
    finally:
        if fake_server is not None:
            say(f"fake LLM served {fake_server.requests} chat requests")
            fake_server.stop()
    print(md)
    return 0


def write_outputs(args, command: str, llm: dict, targets: dict, started: float) -> str:
    """results.json and RESULTS.md for the targets done so far (README too, if it has the markers)."""
    pending = [t for t in args.targets if t not in targets]
    results = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "command": command,
               "machine": machine(), "llm": llm, "seed": args.seed,
               "library": "; ".join(dict.fromkeys(r["library"] for r in targets.values())) or library_version(),
               "protocol": "target sessions in first-appearance order; fit on the first half, scored on the "
                           "second half; transductive: fit and scored on all",
               "wall_seconds": round(time.perf_counter() - started, 1), "pending_targets": pending,
               "targets": targets}
    for path in (args.out, args.md):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
        f.write("\n")
    md = render_md(results)
    Path(args.md).write_text(md, encoding="utf-8")
    spliced = (not pending and args.readme != "none"
               and splice_readme(Path(args.readme), md, os.path.relpath(args.md, ROOT)))
    say(f"wrote {args.out} and {args.md}" + (f" (still to run: {', '.join(pending)})" if pending else "")
        + (f"; refreshed {args.readme}" if spliced else ""))
    return md


if __name__ == "__main__":
    sys.exit(main())
