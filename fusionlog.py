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
  model, so `fusionlog predict` needs no LLM; the route is reported beside each label.
- Templates come from a regex masker (router.mask), not a trained parser such as Drain.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import glob
import gzip
import io
import json
import os
import re
import sys
import time
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
    threshold: float = 0.5  # final label: anomalous iff the small model's p >= this (class-balanced loss)
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
        self.agreed: dict[tuple[str, ...], float] = {}  # set key -> its score where LLM and SM agree on it
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
        tgt = self.features(target, self.reference)
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

    def features(self, s: Sessions, ref: metamodel.Reference) -> Features:
        """A system's sessions in the embedding, the structural part relative to `ref`."""
        tvecs = self.embedder.transform(s.templates)
        svecs = router.session_vectors(s.sequences, tvecs)
        return Features(tvecs, svecs, metamodel.session_features(svecs, s.templates, s.sequences, ref))

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
        # where the LLM and the distilled small model agree on a set, that set's sessions share one verdict
        p = np.bincount(group, metamodel.predict_proba(tgt.X[index], result.params)) / np.bincount(group)
        self.agreed = {keys[g]: float(p[g]) for g, a in result.answers.items() if a.label == int(p[g] >= 0.5)}
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
        f = self.features(s, self.reference)
        route_scores, general = self.route(s, f.template_vecs)
        scores = metamodel.predict_proba(f.X, self.params)
        keys = [template_set_key(s.templates, seq) for seq in s.sequences]
        scores = np.array([self.agreed.get(k, p) for k, p in zip(keys, scores)])  # (n,) one verdict a set
        reasons = [self.llm_reasons.get(k) for k in keys]
        return Predictions(list(s.ids), (scores >= self.config.threshold).astype(np.int8), scores, general,
                           route_scores, reasons)

    def save(self, path: str | os.PathLike) -> None:
        """One .npz: the small model's weights plus a JSON state (embedder, reference, LLM reasons)."""
        state = {"config": self.config.to_dict(), "embedder": self.embedder.to_dict(),
                 "source_templates": self.source_templates, "reference": self.reference.to_dict(),
                 "llm_reasons": [[list(k), r] for k, r in self.llm_reasons.items()],
                 "agreed": [[list(k), p] for k, p in self.agreed.items()]}
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
            model.agreed = {tuple(k): float(p) for k, p in state.get("agreed", [])}
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: not a fusionlog model file ({e})") from None
        model.params = params
        return model


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
                pattern += rf"(?P<{name}>\S*?)"  # every split of it among the fields (minutes a line)
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

    def __init__(self, spec: SystemSpec, name: str, idle: int = 0):
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
        self.stats = dict(lines=0, records=0, blank=0, unmatched=0, continuation=0, unsessioned=0,
                          replaced_chars=0)
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
            raise ValueError(f"the log format {self.spec.log_format!r} matches no line; "
                             f"first line: {(self.first_line or '')[:200]!r}")
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


def read_batches(path: str | os.PathLike, max_bytes: int = 1 << 20) -> Iterator[list[str]]:
    """A log's whole lines (file, .gz or '-' = stdin) in batches as they come; bad bytes read as U+FFFD."""
    f, rest, bom = _open_binary(path), b"", "\ufeff"
    try:
        while True:
            try:
                data = f.read1(max_bytes)
            except (OSError, EOFError, zlib.error) as e:  # a damaged or truncated gzip file
                raise ValueError(f"{path}: cannot be read ({type(e).__name__}: {e})") from None
            # at the end, what is left is a last line without its newline
            head, sep, rest = (rest + data).rpartition(b"\n") if data else (rest, rest, b"")
            if sep:
                yield head.decode("utf-8", errors="replace").removeprefix(bom).split("\n")
                bom = ""
            if not data:
                break
    finally:
        if f is not sys.stdin.buffer:
            f.close()


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
    try:
        yield from sessions_of_lines(read_batches(path), spec, name, idle, progress, str(path))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def sessions_of_lines(batches: Iterable[list[str]], spec: SystemSpec, name: str, idle: int = 0,
                      progress: Callable | None = None, where: str = "", strict: bool = True
                      ) -> Iterator[Sessions]:
    """The per-partition step: raw line batches -> completed sessions (template ids + the template list);
    `strict=False` (one block of a larger input) skips the end-of-input checks."""
    reader = SessionReader(spec, name, idle)
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
    if len(paths) == 1 or spec.session_regex is not None:
        batches = (lines for p in paths for lines in read_batches(p))
        where = paths[0] if len(paths) == 1 else f"{paths[0]} (+{len(paths) - 1} files)"
        try:
            yield from sessions_of_lines(batches, spec, name, idle, progress, where)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        return
    for path in paths:
        for s in stream_sessions(path, spec, name, idle, progress):
            s.ids = [window_id(path, sid, len(paths)) for sid in s.ids]
            yield s


def window_id(path: str, sid: str, n_files: int) -> str:
    """A window's id: 'records a-b', after its file's name when the input is several files."""
    return sid if n_files == 1 else f"{Path(path).name} {sid}"


def read_block(path: str, start: int, end: int, max_lines: int = 20_000) -> Iterator[list[str]]:
    """The whole lines that start in bytes [start, end) of an uncompressed file, in batches."""
    with open(path, "rb") as f:
        if start:  # the line that began before `start` belongs to the block before
            f.seek(start - 1)
            f.readline()
        data = f.read(max(end - f.tell(), 0))
        if not data:  # no line starts in the block
            return
        if not data.endswith(b"\n"):
            data += f.readline()  # the last line that starts in the block, whole
    text = data.decode("utf-8", errors="replace")
    lines = (text.removeprefix("\ufeff") if start == 0 else text).split("\n")
    if text.endswith("\n"):
        lines.pop()
    for i in range(0, len(lines), max_lines):
        yield lines[i:i + max_lines]


def read_system(path: str | os.PathLike, spec: SystemSpec, name: str = "",
                progress: Callable | None = None) -> Sessions:
    """A whole log as Sessions (see SessionReader)."""
    batches = list(stream_sessions(path, spec, name or Path(path).stem, 0, progress))
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

DEFAULT_LLM_URL = "http://127.0.0.1:8080/v1"  # where bench/local_llm.sh serves the local model

HELP = """\
FusionLog: find the anomalous sessions of a new system's logs with zero labels from it, using labeled
logs of other systems (sources), a training-free router, a meta-learned small model and an LLM teacher.

A system is named NAME=PATH. NAME is a preset (HDFS, BGL, OpenStack, Thunderbird, Hadoop, Spark,
Zookeeper) or your own name described with --format/--session/--window/--label-field NAME=... .

Example (the shared LogHub samples; an LLM from bench/local_llm.sh start):
  fusionlog run \\
    --source BGL=../shared/data/BGL/BGL_2k.log \\
    --source OpenStack=../shared/data/OpenStack/openstack_nova.log \\
    --labels OpenStack=../shared/data/OpenStack/anomaly_label.csv \\
    --target HDFS=../shared/data/HDFS/HDFS_2pct.log \\
    --labels HDFS=../shared/data/HDFS/anomaly_label.csv \\
    --out predictions.csv --model-out model.npz
  fusionlog predict --model model.npz --input HDFS=../shared/data/HDFS/HDFS_2pct.log --out again.csv
"""


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
               ("replaced_chars", "undecodable bytes replaced"),
               ("unlabeled_sessions", "sessions not in the label file"),
               ("label_ids_not_in_log", "label ids not in the log")]


def _load_systems(args, pairs: list[str], flag: str, progress) -> list[Sessions]:
    systems = list(_keyed(pairs, flag).items())
    specs = _system_specs(args, systems)
    label_files = _keyed(args.labels, "--labels")
    out = []
    for name, path in systems:
        s = read_system(path, specs[name], name, progress)
        if name in label_files:
            attach_labels(s, read_labels(label_files[name]), label_files[name])
        line = f"{name}: {s.stats['lines']:,} lines, {len(s):,} sessions, {len(s.templates):,} templates"
        for key, text in _READ_NOTES:
            line += f", {s.stats[key]:,} {text}" if s.stats.get(key) else ""
        progress(line)
        out.append(s)
    return out


class PredictionWriter:
    """Prediction rows to CSV, JSON lines (.jsonl) or stdout ('-'), flushed after every batch."""
    FIELDS = ["session", "label", "score", "route", "route_score", "reason"]

    def __init__(self, path: str):
        self.f = sys.stdout if path == "-" else open(path, "w", encoding="utf-8", newline="")
        self.csv = None if path.endswith(".jsonl") else csv.DictWriter(self.f, self.FIELDS,
                                                                       lineterminator="\n")
        if self.csv:
            self.csv.writeheader()
        self.counts = dict(sessions=0, flagged=0, general=0)

    def write(self, pred: Predictions) -> None:
        for r in pred.rows():
            self.csv.writerow(r) if self.csv else self.f.write(json.dumps(r) + "\n")
        self.f.flush()
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


def _client(args) -> distill.ChatClient | None:
    if args.llm_url == "none":
        return None
    cache = distill.AnswerCache(args.cache) if args.cache != "none" else None
    client = distill.ChatClient(base_url=args.llm_url, model=args.llm_model, api_key=args.llm_key,
                                response_format=args.response_format, cache=cache, logprobs=args.logprobs,
                                timeout=args.llm_timeout, max_retries=args.llm_retries,
                                backoff=args.llm_backoff)
    client.check()  # fail fast, in one line, before reading anything
    return client


def cmd_run(args, progress) -> int:
    if len(args.target) != 1:
        raise ValueError("--target: give exactly one target system")
    config = FusionLogConfig(tau=args.tau)
    config.meta.seed = config.distill.seed = args.seed
    for knob in ("rounds", "budget", "concurrency", "margin", "budget_share"):
        setattr(config.distill, knob, getattr(args, knob))
    client = _client(args)
    sources = _load_systems(args, args.source, "--source", progress)
    (target,) = _load_systems(args, args.target, "--target", progress)
    model = FusionLog(config, client, progress)
    report = model.fit(sources, target)
    pred = model.predict(target)
    with PredictionWriter(args.out) as out:
        out.write(pred)
    if args.model_out:
        model.save(args.model_out)
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
    if metrics := _say_metrics(target.labels, pred.labels):
        report["metrics"] = metrics
    report["inputs"] = {s.name: dict(s.stats) for s in sources + [target]}  # what reading saw, per system
    if args.report:
        with open(args.report, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    return 0


def input_files(path: str) -> list[str]:
    """An --input PATH as its files: those a glob matches, sorted, or the one file (or '-')."""
    if not glob.has_magic(path):
        return [path]
    files = sorted(glob.glob(path))
    if not files:
        raise ValueError(f"{path}: no file matches")
    return files


def predict_batch(model: FusionLog, s: Sessions, labels: dict[str, int] | None) -> Predictions:
    """The prediction step of every engine: complete sessions (labels from a label file if any) -> labels."""
    if labels is not None:
        s.labels = np.array([labels.get(sid, -1) for sid in s.ids], dtype=np.int8)
    return model.predict(s)


def cmd_predict(args, progress) -> int:
    """Label a log's sessions as they complete, in bounded memory: the model alone decides each one."""
    inputs = _keyed(args.input, "--input")
    if len(inputs) != 1:
        raise ValueError(f"--input: give exactly one system to label (got {len(inputs)})")
    (name, path), = inputs.items()
    spec, files = _system_specs(args, [(name, path)])[name], input_files(path)
    label_file = _keyed(args.labels, "--labels").get(name)
    labels = read_labels(label_file) if label_file else None
    say = print if args.out != "-" else lambda m: print(m, file=sys.stderr)
    if args.dask and "-" in files:
        raise ValueError("--dask reads files (each worker opens its own blocks), not standard input")
    if args.dask:
        counts, y_true, y_pred = predict_on_dask(args.dask, args.model, files, spec, name, labels, args.out,
                                                 args.block_mb << 20)
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
    with PredictionWriter(args.out) as out:
        for batch in stream_files(files, spec, name, args.idle, progress):
            pred = predict_batch(model, batch, labels)
            out.write(pred)
            if batch.labels is not None:
                y_true.append(batch.labels)
                y_pred.append(pred.labels)
    return out.counts, y_true, y_pred


# The Dask engine (the optional extra fusionlog[dask]; dask is imported only inside predict_on_dask): each
# partition reads a block of a file into sessions (sessions_of_lines), a shuffle on the session id joins a
# session's fragments from every block and file in input order, then predict_batch labels each partition.


def dask_blocks(files: list[str], spec: SystemSpec, block_bytes: int) -> list[tuple[int, str, int, int]]:
    """The partitions (file index, path, start, end): byte blocks of uncompressed files when sessions are by
    id; a whole file (end -1) when gzipped or cut in windows (the windows of a file stay in order)."""
    blocks = []
    for i, path in enumerate(files):
        _open_binary(path).close()  # a clear error for a missing or empty file, before the cluster starts
        with open(path, "rb") as f:
            whole = spec.session_regex is None or f.read(2) == b"\x1f\x8b"
        size = os.path.getsize(path)
        starts = [0] if whole else range(0, size, block_bytes)
        blocks += [(i, path, a, -1 if whole else min(a + block_bytes, size)) for a in starts]
    return blocks


def block_fragments(block: tuple[int, str, int, int], spec: SystemSpec, name: str, n_files: int) -> list:
    """One partition's sessions as fragments (id, (file, offset), template texts, anomalous) to shuffle."""
    i, path, start, end = block
    batches = read_batches(path) if end < 0 else read_block(path, start, end)
    out = []
    try:
        for s in sessions_of_lines(batches, spec, name, strict=False):
            flags = np.zeros(len(s), np.int8) if s.labels is None else s.labels
            for sid, seq, a in zip(s.ids, s.sequences, flags):
                sid = sid if spec.session_regex else window_id(path, sid, n_files)
                out.append((sid, (i, start), [s.templates[t] for t in seq], bool(a)))
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return out


def sessions_of_fragments(name: str, groups: Iterable[tuple[str, list]], labeled: bool) -> Sessions:
    """Shuffled fragments grouped by id as complete sessions, each one's fragments in input order."""
    templates, ids, seqs, flags = {}, [], [], []
    for sid, frags in sorted(groups, key=lambda g: min(f[1] for f in g[1])):
        frags = sorted(frags, key=lambda f: f[1])
        ids.append(sid)
        seqs.append(np.array([templates.setdefault(t, len(templates)) for f in frags for t in f[2]],
                             dtype=np.int64))
        flags.append(any(f[3] for f in frags))
    return Sessions(name, list(templates), ids, seqs, np.array(flags, np.int8) if labeled else None)


@functools.lru_cache(maxsize=2)
def _model_of(data: bytes) -> FusionLog:
    """A model from its file's bytes, loaded once per worker (the bytes are scattered once to each)."""
    return FusionLog.load(io.BytesIO(data))


def predict_partition(groups: list, model: bytes, labels: dict | None, name: str, labeled: bool,
                      path: str) -> tuple[dict, np.ndarray | None, np.ndarray]:
    """One partition's sessions labeled and written to its own CSV; its counts (and labels) back."""
    s = sessions_of_fragments(name, groups, labeled or labels is not None)
    with PredictionWriter(path) as out:
        pred = predict_batch(_model_of(model), s, labels) if len(s) else None
        if pred is not None:
            out.write(pred)
    empty = np.zeros(0, np.int8)
    return out.counts, s.labels, empty if pred is None else pred.labels


def _alone(fragment: tuple) -> tuple[str, list]:
    """A window as its own group: it is complete in its partition."""
    return fragment[0], [fragment]


def _session_of(fragment: tuple) -> str:
    return fragment[0]


def predict_on_dask(address: str, model_path: str, files: list[str], spec: SystemSpec, name: str,
                    labels: dict | None, out_dir: str, block_bytes: int = 64 << 20
                    ) -> tuple[dict, list, list]:
    """`predict` on a Dask cluster: 'local:N' (a LocalCluster of N worker processes on 127.0.0.1) or a
    scheduler's address; one CSV a partition in `out_dir`; the summed counts and the labels back."""
    from distributed import Client, LocalCluster
    with contextlib.ExitStack() as stack:
        if address.startswith("local:"):
            address = stack.enter_context(LocalCluster(n_workers=int(address[6:]), threads_per_worker=1,
                                                       host="127.0.0.1", dashboard_address=None))
        client = stack.enter_context(Client(address))
        return predict_on_client(client, model_path, files, spec, name, labels, out_dir, block_bytes)


def predict_on_client(client, model_path: str, files: list[str], spec: SystemSpec, name: str,
                      labels: dict | None, out_dir: str, block_bytes: int = 64 << 20
                      ) -> tuple[dict, list, list]:
    """The Dask graph: blocks -> fragments -> shuffle on the session id -> one labeled CSV a partition."""
    import dask
    import dask.bag as db
    blocks = dask_blocks(files, spec, block_bytes)
    model = client.scatter(Path(model_path).read_bytes(), broadcast=True)  # once to each worker
    # (in a list: a dict given alone would be scattered as one future per key)
    shared_labels = None if labels is None else client.scatter([labels], broadcast=True)[0]
    frags = db.from_sequence(blocks, npartitions=len(blocks)).map(block_fragments, spec, name, len(files))
    frags = frags.flatten()
    groups = (frags.groupby(_session_of, npartitions=len(blocks), shuffle="tasks") if spec.session_regex
              else frags.map(_alone))
    os.makedirs(out_dir, exist_ok=True)
    labeled = bool(spec.label_field)
    parts = [dask.delayed(predict_partition)(part, model, shared_labels, name, labeled,
                                             os.path.join(out_dir, f"part-{i:05d}.csv"))
             for i, part in enumerate(groups.to_delayed())]
    results = dask.compute(*parts)
    counts = {k: sum(r[0][k] for r in results) for k in results[0][0]}
    y_true = [r[1] for r in results if r[1] is not None and len(r[1])]
    return counts, y_true, [r[2] for r in results if r[1] is not None and len(r[1])]


def cmd_presets(args, progress) -> int:
    for name, spec in PRESETS.items():
        grouping = f"session {spec.session_regex}" if spec.session_regex else f"windows of {spec.window}"
        label = (f"; inline label {spec.label_field} ('{spec.normal_value}' = normal)"
                 if spec.label_field else "")
        print(f"{name:12} {spec.log_format}\n{'':12} {grouping}{label}")
    return 0


def _add_system_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("describing a log that is not a preset (repeat per system, keyed by NAME)")
    g.add_argument("--labels", action="append", metavar="NAME=CSV", help="label file 'Id,Label' "
                   "(Normal/Anomaly or 0/1); for the target, used only to report precision/recall/F1")
    g.add_argument("--format", action="append", metavar="NAME=FORMAT",
                   help="LogHub format string, e.g. '<Date> <Time> <Level> <Component>: <Content>'")
    g.add_argument("--session", action="append", metavar="NAME=REGEX",
                   help="session id regex (group 1 if any); a line belongs to every id it names")
    g.add_argument("--window", action="append", metavar="NAME=SIZE[,STEP]",
                   help="group records into fixed windows instead of ids")
    g.add_argument("--label-field", action="append", metavar="NAME=FIELD[,NORMAL]", help="inline label "
                   "field: a session is anomalous if a line's value is not NORMAL (default '-')")


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
                      help="confidence from the label token's log-probability, far better than a stated one "
                           "(0.9 on every answer); off: llama-cpp-python is then ~3x slower"),
        llm_timeout=dict(type=float, default=120.0, help="seconds to wait for one answer"),
        llm_retries=dict(type=int, default=3, help="retries of a failed request (timeout, connection, "
                         "HTTP 429/5xx); then the question is left to the small model"),
        llm_backoff=dict(type=float, default=1.0, help="first wait before a retry, doubled each time "
                         "(a server's Retry-After wins)"),
        cache=dict(default=str(Path.home() / ".cache" / "fusionlog" / "answers.jsonl"),
                   help="LLM answer cache (JSONL; 'none' = off); an answered prompt is never asked again"))
    for dest, kw in flags.items():
        if dest not in skip:
            p.add_argument("--" + dest.replace("_", "-"), **{**kw, **changes.get(dest, {})})


def _run_parser(sub) -> None:
    run = sub.add_parser("run", help="fit on sources + target, write predictions for the target, save the "
                         "small model",
                         description="Fit FusionLog on labeled source logs and an unlabeled target log, "
                         "write one prediction per target session, save the distilled small model.",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    run.set_defaults(cmd=cmd_run)
    run.add_argument("--source", action="append", required=True, metavar="NAME=PATH",
                     help="a labeled source system (repeat for several)")
    run.add_argument("--target", action="append", required=True, metavar="NAME=PATH",
                     help="the new, unlabeled system to label")
    _add_system_flags(run)
    run.add_argument("--out", default="predictions.csv", help="predictions file (.csv or .jsonl)")
    run.add_argument("--model-out", default="fusionlog-model.npz",
                     help="where to save the small model ('' = don't)")
    run.add_argument("--report", default=None, help="also write the run report as JSON here")
    add_llm_flags(run.add_argument_group("the LLM teacher (any OpenAI-compatible server)"))
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
    pr = sub.add_parser("predict", help="label sessions with a saved model (no LLM)",
                        description="Label the sessions of a log with a model saved by 'fusionlog run'.",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    pr.set_defaults(cmd=cmd_predict)
    pr.add_argument("--model", required=True, help="model file from 'fusionlog run --model-out'")
    pr.add_argument("--input", action="append", required=True, metavar="NAME=PATH",
                    help="the log to label: a file, a .gz file, '-' for standard input, or a "
                    "quoted glob ('logs/*.log.gz': several files of one system, in sorted order)")
    _add_system_flags(pr)
    pr.add_argument("--out", default="predictions.csv", help="predictions file (.csv, .jsonl; '-' = stdout)")
    pr.add_argument("--idle", type=int, default=100_000, metavar="N", help="a session by id is complete "
                    "N lines after its last (and at the end of input; 0 = only then); windows when full. "
                    "Not with --dask: there a session is complete at the end of the input")
    pr.add_argument("--dask", default=None, metavar="ADDRESS", help="run on Dask (pip install "
                    "'fusionlog[dask]'): local:N = N local worker processes, or a scheduler's "
                    "tcp://HOST:8786; --out is then a directory of part-NNNNN.csv files, a session by id is "
                    "grouped across all files and blocks, windows are cut per file")
    pr.add_argument("--block-mb", type=int, default=64, metavar="MB", help="with --dask: the block size an "
                    "uncompressed file is split into (a gzipped file is one block)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fusionlog", description=HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress messages on stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _run_parser(sub)
    _predict_parser(sub)
    sub.add_parser("presets", help="list the built-in log formats").set_defaults(cmd=cmd_presets)
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
        print(f"fusionlog: error: {e}; start the local one with 'bench/local_llm.sh start', or point "
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
