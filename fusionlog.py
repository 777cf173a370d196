"""FusionLog end to end: read logs, route, meta-train, distill, predict — and the command line.

This file ties the paper's components together (Zhao et al., "FusionLog: Cross-System Log-based Anomaly
Detection via Fusion of General and Proprietary Knowledge", arXiv 2511.05878, Fig. 2 / Sec. 3):

    raw logs ──read_system──▶ Sessions (template ids per session)
      router.py     training-free semantic router: general vs proprietary target sessions   (Sec. 3.2)
      metamodel.py  small model meta-learned over the source systems (general knowledge)    (Sec. 3.3)
      distill.py    LLM <-> small model collaborative distillation (proprietary knowledge)   (Sec. 3.4)
    ──▶ one small model that labels every target session, no LLM at prediction time.

It also holds the plumbing the algorithm modules stay free of: LogHub-style log reading and session
grouping, label files, metrics, model files and the `fusionlog` CLI.

Departures from the paper (see README for the full list):
- The final labels of *all* target sessions (general and proprietary) come from the one distilled small
  model, so `fusionlog predict` needs no LLM; the route is reported beside each label.
- Templates come from a regex masker (router.mask), not a trained parser such as Drain.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import scipy.sparse as sp

import distill
import metamodel
import router

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
    "BGL": SystemSpec("<Label> <Timestamp> <Date> <Node> <Time> <NodeRepeat> <Type> <Component> <Level> <Content>",
                      window=20, label_field="Label"),
    "OpenStack": SystemSpec("<Level> <Component> <Content>", session_regex=r"\[instance: ([0-9a-f-]{36})\]"),
    "Thunderbird": SystemSpec(r"<Label> <Timestamp> <Date> <User> <Month> <Day> <Time> <Location> <Component>(\[<PID>\])?: <Content>",
                              window=20, label_field="Label"),
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


def compile_format(log_format: str, tokens: bool = False) -> re.Pattern | None:
    r"""Turn a LogHub format string into a regex with one named group per <Field> (LogHub's rule:
    literal text between fields is regex, runs of spaces match any whitespace, and a field is the
    shortest text that lets the line match, `.*?`). A field that ends the line takes the rest of it,
    `.*`: the same match, without a lazy step per character.

    tokens=True: the fast variant read_system tries first (~1.4x faster on HDFS), or None where there is
    none. It exists when the literal text is plain characters and spaces, no regex syntax but escaped
    punctuation like `\[`, and a space follows every field but the last (HDFS's `<Component>: <Content>`,
    Hadoop's `[<Process>] `, BGL, OpenStack). Each such field becomes one whitespace-free token `\S*`,
    each run of spaces takes all the whitespace there is (`\s+(?!\s)`). A field can then end at one place
    only (where its plain text meets whitespace), so the fast pattern has one way to match, and it is
    the first way the LogHub pattern tries: where the fast pattern matches, every field is the same;
    where it does not (say, a field with a space inside), the LogHub pattern decides."""
    parts = re.split(r"(<[^<>]+>)", log_format)  # literal, <field>, literal, <field>, ..., literal
    names, pattern, has_fast_form = [], "", True
    plain = r"(?:[^\s\\.^$*+?{}\[\]()|<>]|\\[^\w\s]| )*"  # characters that match themselves, \], spaces
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
            elif tokens:
                has_fast_form &= " " in parts[i + 1]
                pattern += rf"(?P<{name}>\S*)"
            elif parts[i + 1].startswith(" "):
                # Departure from LogHub: a field followed by a space is one token. With `.*?` a line that is
                # not a record (a traceback line) makes the engine try every split of it among the fields:
                # minutes for a 400-character line. Here each such field can end at one place only.
                pattern += rf"(?P<{name}>\S*?)"
            else:
                pattern += f"(?P<{name}>.*?)"
        else:
            has_fast_form &= re.fullmatch(plain, part) is not None
            pattern += re.sub(" +", r"\\s+(?!\\s)" if tokens else r"\\s+", part)
    if "Content" not in names:
        raise ValueError(f"log format {log_format!r}: it needs a <Content> field")
    if tokens and not has_fast_form:
        return None
    try:
        # (?:...) and the conditional: a '|' in the format's literal text must not let a line match without <Content>
        return re.compile("^(?:" + pattern + ")$(?(Content)|(?!))")
    except re.error as e:
        raise ValueError(f"log format {log_format!r}: not a valid pattern ({e})") from None


def _open_text(path: str | os.PathLike) -> Iterable[str]:
    """Lines of a text file, decoding bad bytes as U+FFFD; clear errors for what is not a readable file."""
    p = Path(path)
    if not p.exists():
        raise ValueError(f"{p}: no such file")
    if p.is_dir():
        raise ValueError(f"{p}: is a directory, not a file")
    if not p.is_file():
        raise ValueError(f"{p}: is not a regular file")  # a FIFO or a device (/dev/zero never ends)
    try:
        if p.stat().st_size == 0:
            raise ValueError(f"{p}: file is empty")
        return open(p, encoding="utf-8-sig", errors="replace", newline=None)  # -sig: drop a leading BOM
    except OSError as e:  # permissions and the like
        raise ValueError(f"{p}: cannot be read ({e.strerror or type(e).__name__})") from None


_CHUNK_CHARS = 1 << 20  # read_system takes the file ~1 MB of text at a time: memory stays bounded
_KEY_MEMO_CHARS = 1 << 24  # read_system's fast path remembers line keys up to this many characters in all


def _digit_blind(regex: str) -> bool:
    """Whether a regex cannot tell one ASCII digit from another, so that it matches a line and the line
    with all its digits turned into 1 at the same places: no digit in it but in repeat counts {m,n} and
    in the class range 0-9, no backreference (?P=name) and no named character \\N{...}."""
    def rest(piece: re.Match) -> str:  # what is left of an escape, a class or a repeat count
        s = piece[0]
        return "" if s[0] == "{" else re.sub(r"(?<!-)0-9", "", s) if s[0] == "[" else s
    left = re.sub(r"\\.|\[\^?\]?(?:\\.|[^\]\\])*\]|\{\d*,?\d*\}", rest, regex)
    return re.search(r"[0-9]|\\N|\(\?P=", left) is None


class _Numbering(dict):
    """A dict that numbers keys 0, 1, 2, ... in the order they are first looked up: d[new key] adds it."""

    def __missing__(self, key) -> int:
        self[key] = number = len(self)
        return number


class _LogReader:
    """read_system's state while it reads one log: the template dictionary, the sessions so far and the
    previous record, which a continuation line joins. `line_by_line` is the reading rule; `whole_chunk`
    gives the same result, with a few operations over the whole chunk, where every line is a record."""

    def __init__(self, spec: SystemSpec, line_re: re.Pattern, fast_re: re.Pattern | None, id_re: re.Pattern | None):
        self.spec, self.line_re, self.id_re = spec, line_re, id_re
        self.fast_match = (fast_re or line_re).match
        # whole_chunk parses line keys with the fast variant of the format (it needs one, with no digit in its
        # literal text) and finds session ids at their key's places where the session regex is digit-blind
        # (otherwise with one findall per line)
        self.by_keys = fast_re is not None and not re.search(r"[0-9]", re.sub(r"<[^<>]+>", "", spec.log_format))
        self.ids_by_key = id_re is not None and _digit_blind(spec.session_regex)
        self.template_ids = _Numbering()  # the template dictionary, built once while reading
        self.session_index = _Numbering()  # session id -> index, in order of first appearance
        self._forget_keys()
        # What the records add, one array per chunk. Sessions by id: a (session index, template id) pair
        # per line and session it names, in line order, and the indices of sessions an anomalous line names
        # (int32, half the memory). Windows: a template id and an anomalous flag per record.
        self.pair_sessions: list[np.ndarray] = []
        self.pair_templates: list[np.ndarray] = []
        self.anomalous: list[np.ndarray] = []
        self.record_templates: list[np.ndarray] = []
        self.record_flags: list[np.ndarray] = []
        self.stats = dict(lines=0, records=0, blank=0, unmatched=0, continuation=0, unsessioned=0, replaced_chars=0)
        self.first_line: str | None = None
        self.prev_ids: list[str] = []
        self.prev_anomalous = False

    def _forget_keys(self) -> None:
        """Empty whole_chunk's memo of line keys: key -> number; per number (a key_table row) its template
        id, whether it is anomalous, how many session ids it names and where their spans start in
        span_table, which holds (start, end) of each id in the line."""
        self.key_number: dict[str, int] = {}
        self.key_chars = 0  # (their length in all)
        self.key_table = np.zeros((0, 4), dtype=np.int64)
        self.span_table = np.zeros((0, 2), dtype=np.int64)

    def line_by_line(self, chunk: list[str]) -> None:
        """Read lines one at a time: parse each with the format (its fast variant first, the LogHub
        pattern where that fails), mask its content (all contents together, router.mask_many), and add
        its template to the session(s) its id regex names, or to the records for windows."""
        lines = [raw.strip() for raw in chunk]
        matches = [(self.fast_match(line) or self.line_re.match(line)) if line else None for line in lines]
        # a line that matches no format is its own content (see below)
        templates = router.mask_many([m["Content"] if m else line for m, line in zip(matches, lines)])
        self.stats["blank"] += lines.count("")
        label_field, id_re, stats = self.spec.label_field, self.id_re, self.stats
        pair_sessions, pair_templates, anomalous, record_templates, record_flags = [], [], [], [], []
        for line, m, template in zip(lines, matches, templates):
            if not line:
                continue
            if self.first_line is None:
                self.first_line = line
            if m is None:
                # A line that matches no format continues the previous record (a traceback, say): it joins
                # that record's session(s) as an event of its own, so multi-line faults stay visible.
                if not self.prev_ids if id_re is not None else stats["records"] == 0:  # nothing to join
                    stats["unmatched"] += 1
                    continue
                stats["continuation"] += 1
                is_anomalous, ids = self.prev_anomalous, self.prev_ids
            else:
                stats["records"] += 1
                is_anomalous = bool(label_field) and m[label_field] != self.spec.normal_value
                if id_re is not None:
                    ids = id_re.findall(line)  # strings; tuples (group 1 first) when it has several groups
                    if id_re.groups > 1:
                        ids = [g[0] for g in ids]
                    if len(ids) > 1:
                        ids = list(dict.fromkeys(ids))  # each id once, in order
                    if not ids:
                        stats["unsessioned"] += 1
                else:
                    ids = []
            tid = self.template_ids[template]
            if id_re is None:
                record_templates.append(tid)
                record_flags.append(is_anomalous)
            for sid in ids:
                s = self.session_index[sid]
                pair_sessions.append(s)
                pair_templates.append(tid)
                if is_anomalous:
                    anomalous.append(s)
            self.prev_ids, self.prev_anomalous = ids, is_anomalous
        self.pair_sessions.append(np.array(pair_sessions, dtype=np.int32))
        self.pair_templates.append(np.array(pair_templates, dtype=np.int32))
        self.anomalous.append(np.array(anomalous, dtype=np.int32))
        self.record_templates.append(np.array(record_templates, dtype=np.int64))
        self.record_flags.append(np.array(record_flags, dtype=bool))

    def whole_chunk(self, text: str, n: int) -> bool:
        """Read the n lines of `text` exactly as line_by_line would, if every one of them is a record that
        the fast variant of the format parses as it stands (no blank, unmatched or space-padded line, see
        below); otherwise read nothing and return False. Instead of line_by_line's loop over the lines
        (match, mask, look the template up, find the ids, add the template to each id's session): a few
        calls over the whole chunk, each a loop in C, and Python work only per line key not seen before.

        A line's key is the line with every ASCII digit turned into 1 (router.digit_key; HDFS_2pct: 222k
        lines, 1.7k keys). The fast variant of the format asks of a digit only that it is no whitespace,
        so it parses a line and its key alike, the key's Content is the digit key of the line's Content,
        which masks alike where router.exact_key says so, and a label without digits is its own key. A
        digit-blind session regex finds its ids at the same places in a line and in its key. So each new
        key is parsed, masked and searched once; a line is then its key's template and flag, and its ids
        are the text at its key's id spans. A blank or padded line, a key that does not parse, an inexact
        Content or a label with a digit sends the chunk to line_by_line (so does a big chunk of mostly new
        keys, where keys would save nothing)."""
        if not self.by_keys or "\n\n" in text or text[0] == "\n":  # (a blank line: no need to look further)
            return False
        keys = router.digit_key(text).split("\n")
        if len(keys) > n:
            keys.pop()  # (the empty piece after the last line break)
        if self.key_chars + len(text) > _KEY_MEMO_CHARS:  # (memory stays bounded)
            self._forget_keys()
        distinct = dict.fromkeys(keys)
        new, parsed = [k for k in distinct if k not in self.key_number], []  # (in order of first appearance)
        if any(not k or k[0].isspace() or k[-1].isspace() for k in new):  # blank, or padded: strip() would
            return False  # change it (checked before parsing any key: no parsing is wasted on such a chunk)
        if len(new) > max(n // 2, 1000):  # most lines of a big chunk are new keys (free text, as in OpenStack):
            return False  # parsing key by key would save nothing over line_by_line
        for key in new:
            p = self._parse_key(key)
            if p is None:
                return False
            parsed.append(p)
        if new:
            rows, spans = [], []
            for key, template, (_, flag, key_spans) in zip(new, router.mask_many([p[0] for p in parsed]), parsed):
                self.key_number[key] = len(self.key_table) + len(rows)
                # (a new template gets the next id here, in order of first appearance, as line by line)
                rows.append((self.template_ids[template], flag, len(key_spans), len(self.span_table) + len(spans)))
                spans += key_spans
                self.key_chars += len(key)
            self.key_table = np.concatenate([self.key_table, np.array(rows, dtype=np.int64)])
            self.span_table = np.concatenate([self.span_table, np.array(spans, dtype=np.int64).reshape(-1, 2)])
        key_of = self.key_table[np.fromiter(map(self.key_number.__getitem__, keys), dtype=np.int64, count=n)]
        tids, is_anomalous = key_of[:, 0], key_of[:, 1].astype(bool)  # per line
        self.stats["records"] += n
        self.prev_anomalous = bool(is_anomalous[-1])
        if self.id_re is None:
            self.record_templates.append(tids)
            self.record_flags.append(is_anomalous)
            return True
        if self.ids_by_key:
            ids, line = self._ids_at_key_spans(text, keys, key_of[:, 2], key_of[:, 3])
        else:  # one findall per line (the lines are unpadded: each is its own stripped line)
            found = list(map(self.id_re.findall, text.split("\n")[:n]))
            if self.id_re.groups > 1:
                found = [[g[0] for g in line_ids] for line_ids in found]
            ids, line = [sid for line_ids in found for sid in line_ids], np.repeat(np.arange(n), list(map(len, found)))
        sessions = np.fromiter(map(self.session_index.__getitem__, ids), dtype=np.int64, count=len(ids))
        self.prev_ids = list(dict.fromkeys(ids[np.searchsorted(line, n - 1):]))  # the last line's ids
        # Each session once per line, in order (line_by_line: dict.fromkeys of the line's ids). First drop
        # an id that repeats the one before it on its line (HDFS: "Deleting block blk_1 file .../blk_1");
        # a line that still names more than one goes through the general rule, np.unique of (line, session).
        same_line = line[1:] == line[:-1]
        if same_line.any():
            keep = np.concatenate([[True], ~(same_line & (sessions[1:] == sessions[:-1]))])
            line, sessions = line[keep], sessions[keep]
            if (line[1:] == line[:-1]).any():
                _, first = np.unique(line * len(self.session_index) + sessions, return_index=True)
                keep = np.sort(first)
                line, sessions = line[keep], sessions[keep]
        self.pair_sessions.append(sessions.astype(np.int32))
        self.pair_templates.append(tids[line].astype(np.int32))
        self.anomalous.append(sessions[is_anomalous[line]].astype(np.int32))
        self.stats["unsessioned"] += n - int(np.count_nonzero(np.diff(line, prepend=-1)))  # lines naming none
        return True

    def _parse_key(self, key: str) -> tuple[str, bool, list[tuple[int, int]]] | None:
        """line_by_line's parsing, of a line key (not blank, not padded): its Content, whether it is anomalous,
        and where its session ids are (findall's group 1, or the whole match); None where whole_chunk cannot
        stand in for line_by_line (see there)."""
        m, label_field = self.fast_match(key), self.spec.label_field
        if m is None or not router.exact_key(m["Content"]) or (label_field and "1" in m[label_field]):
            return None
        is_anomalous = bool(label_field) and m[label_field] != self.spec.normal_value
        group = 1 if self.id_re is not None and self.id_re.groups else 0
        spans = [found.span(group) if found.start(group) >= 0 else (0, 0)  # (an unmatched group 1: findall's "")
                 for found in (self.id_re.finditer(key) if self.ids_by_key else ())]
        return m["Content"], is_anomalous, spans

    def _ids_at_key_spans(self, text: str, keys: list[str], count: np.ndarray, first: np.ndarray
                          ) -> tuple[list[str], np.ndarray]:
        """The session ids of the lines of `text`, in order, and the line of each: the text at the id spans
        of each line's key (count[i] spans, from span_table[first[i]] on). The same as id_re.findall(line)
        line by line, for a digit-blind regex."""
        line = np.repeat(np.arange(len(keys)), count)  # the line of each id
        span = np.repeat(first - (np.cumsum(count) - count), count) + np.arange(len(line))  # its span_table row
        lengths = np.fromiter(map(len, keys), dtype=np.int64, count=len(keys))  # (a key is as long as its line)
        offset = (np.cumsum(lengths + 1) - (lengths + 1))[line]  # where the line of each id starts in the text
        starts, ends = (offset + self.span_table[span, 0]).tolist(), (offset + self.span_table[span, 1]).tolist()
        return list(map(text.__getitem__, map(slice, starts, ends))), line


def read_system(path: str | os.PathLike, spec: SystemSpec, name: str = "", progress: Callable | None = None) -> Sessions:
    """Read a raw log into Sessions: parse each line with the format, mask its content into a template,
    and add it to the session(s) its id regex names, or to fixed windows.

    The rule is _LogReader.line_by_line. Speed (the same Sessions; on HDFS_2pct 2-2.5x faster than it):
    the file is taken in chunks of whole lines, ~1 MB of text each, and a chunk whose lines are all plain
    records goes through _LogReader.whole_chunk: a few calls over the whole chunk, with Python work only
    per distinct line up to its digits, instead of a loop over the lines (HDFS: every chunk). Any other
    chunk (a blank, unmatched, continuation or space-padded line in it, a format without a fast variant,
    a hex number such as 0x1f) goes line by line. The sessions are grouped once, at the end."""
    try:
        line_re = compile_format(spec.log_format)
        fast_re = compile_format(spec.log_format, tokens=True)  # None when the format has no fast variant
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    if spec.session_regex is None and spec.window <= 0:
        raise ValueError(f"{path}: give a session regex or a window size > 0")
    try:
        id_re = re.compile(spec.session_regex) if spec.session_regex else None
    except re.error as e:
        raise ValueError(f"{path}: session regex {spec.session_regex!r}: not a valid regex ({e})") from None
    if spec.label_field and spec.label_field not in line_re.groupindex:
        raise ValueError(f"{path}: label field {spec.label_field!r} is not a field of the log format {spec.log_format!r}")

    reader = _LogReader(spec, line_re, fast_re, id_re)
    stats = reader.stats
    with _open_text(path) as f:
        while text := f.read(_CHUNK_CHARS):
            if not text.endswith("\n"):
                text += f.readline()  # whole lines only
            n = text.count("\n") + (not text.endswith("\n"))
            if not reader.whole_chunk(text, n):
                reader.line_by_line(text.split("\n")[:n])
            stats["replaced_chars"] += text.count("\ufffd")
            stats["lines"] += n
            if progress and stats["lines"] // 200_000 > (stats["lines"] - n) // 200_000:
                progress(f"{path}: {stats['lines']:,} lines read")
    if stats["records"] == 0:
        raise ValueError(f"{path}: the log format {spec.log_format!r} matches no line; "
                         f"first line: {(reader.first_line or '')[:200]!r}")

    if id_re is not None:
        if not reader.session_index:
            raise ValueError(f"{path}: the session regex {spec.session_regex!r} matches no line")
        ids = list(reader.session_index)
        # every session's template ids in line order: the pairs, stably sorted by session, cut per session
        sessions, tids = np.concatenate(reader.pair_sessions), np.concatenate(reader.pair_templates)
        tids = tids[np.argsort(sessions, kind="stable")].astype(np.int64)
        ends = np.cumsum(np.bincount(sessions, minlength=len(ids))).tolist()
        sequences = [tids[a:b] for a, b in zip([0] + ends[:-1], ends)]
        labels = None
        if spec.label_field:
            labels = np.zeros(len(ids), dtype=np.int8)
            labels[np.concatenate(reader.anomalous)] = 1
    else:
        step = spec.step or spec.window
        tids, flags = np.concatenate(reader.record_templates), np.concatenate(reader.record_flags)
        n = len(tids)
        if n < spec.window:
            raise ValueError(f"{path}: window size {spec.window} is larger than the log ({n} records)")
        starts = range(0, max(n - spec.window, 0) + 1, step)
        ids = [f"records {s + 1}-{min(s + spec.window, n)}" for s in starts]
        sequences = [tids[s:s + spec.window] for s in starts]
        labels = np.array([flags[s:s + spec.window].any() for s in starts], dtype=np.int8) if spec.label_field else None
    templates = list(reader.template_ids)
    return Sessions(name or Path(path).stem, templates, ids, sequences, labels, stats)


_LABEL_VALUES = {"normal": 0, "0": 0, "anomaly": 1, "anomalous": 1, "abnormal": 1, "1": 1}


def _shown(value, n: int = 80) -> str:
    """repr() of a value cut to one short line, for error messages."""
    s = repr(value)
    return s if len(s) <= n else s[: n - 3] + "..."


def read_labels(path: str | os.PathLike) -> dict[str, int]:
    """A label file `Id,Label` (LogHub: Normal/Anomaly, or 0/1) with a header row -> {id: 0|1}.
    An id listed twice with the same label is fine; with both labels it is an error."""
    labels: dict[str, int] = {}
    with _open_text(path) as f:
        rows = csv.reader(f)
        try:
            header = next(rows, None)
            if header is None or len(header) < 2:
                raise ValueError(f"{path}:1: expected a header row 'Id,Label'")
            if header[1].strip().lower() in _LABEL_VALUES:
                raise ValueError(f"{path}:1: no header row (expected 'Id,Label', got {_shown(','.join(header))})")
            for row in rows:
                if not row:
                    continue
                if len(row) < 2:
                    raise ValueError(f"{path}:{rows.line_num}: expected 'id,label', got {_shown(','.join(row))}")
                sid, value = row[0].strip(), row[1].strip().lower()
                if value not in _LABEL_VALUES:
                    raise ValueError(f"{path}:{rows.line_num}: unknown label {_shown(row[1])} "
                                     f"(use Normal/Anomaly or 0/1)")
                if labels.get(sid, _LABEL_VALUES[value]) != _LABEL_VALUES[value]:
                    raise ValueError(f"{path}:{rows.line_num}: id {_shown(sid)} is labeled both normal and anomalous")
                labels[sid] = _LABEL_VALUES[value]
        except csv.Error as e:  # a NUL byte, a field over the csv module's size limit, ...
            raise ValueError(f"{path}:{rows.line_num}: not a CSV label file ({e})") from None
    if not labels:
        raise ValueError(f"{path}: no labels after the header")
    return labels


def attach_labels(sessions: Sessions, labels: dict[str, int], source: str | os.PathLike = "labels") -> Sessions:
    """Set session labels from an id -> label map; sessions it does not name get -1 (unknown).
    Label ids that name no session are counted (stats["label_ids_not_in_log"]); if not one id names a
    session, the label file belongs to another log: an error naming `source` (the label file)."""
    sessions.labels = np.array([labels.get(s, -1) for s in sessions.ids], dtype=np.int8)
    sessions.stats["unlabeled_sessions"] = int((sessions.labels < 0).sum())
    sessions.stats["label_ids_not_in_log"] = len(set(labels) - set(sessions.ids))
    if labels and len(sessions) and not (sessions.labels >= 0).any():
        raise ValueError(f"{source}: none of its {len(labels):,} ids is a session of {sessions.name} "
                         f"(its ids look like {_shown(next(iter(labels)), 40)}, the sessions' like "
                         f"{_shown(sessions.ids[0], 40)})")
    return sessions


# ----------------------------------------------------------------------------------------------------
# Metrics


def evaluate(y_true: np.ndarray, y_pred: np.ndarray) -> dict:
    """Precision, recall, F1 of the anomalous class, with the confusion counts (unknown labels skipped)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    known = y_true >= 0
    t, p = y_true[known] == 1, y_pred[known] == 1
    tp, fp = int((t & p).sum()), int((~t & p).sum())
    fn, tn = int((t & ~p).sum()), int((~t & ~p).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return dict(precision=precision, recall=recall, f1=f1, tp=tp, fp=fp, tn=tn, fn=fn)


# ----------------------------------------------------------------------------------------------------
# The method


@dataclass
class FusionLogConfig:
    """Knobs of the whole method; each part's own config carries its defaults and reasons."""
    tau: float = router.TAU  # route threshold: general iff every template has a source twin this close
    threshold: float = 0.5  # final label: anomalous iff the small model's probability >= this (class-balanced loss)
    pseudo_domains: int = 4  # with a single source system, split it into this many pseudo-domains for MAML
    meta: metamodel.MetaConfig = field(default_factory=metamodel.MetaConfig)
    distill: distill.DistillConfig = field(default_factory=distill.DistillConfig)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "FusionLogConfig":
        d = dict(d)
        meta = _dataclass_from(metamodel.MetaConfig, d.pop("meta", {}))
        dist = _dataclass_from(distill.DistillConfig, d.pop("distill", {}))
        return cls(meta=meta, distill=dist, **{k: v for k, v in d.items() if k in {f.name for f in fields(cls)}})


def _dataclass_from(cls, d: dict):
    known = {f.name for f in fields(cls)}
    return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in known})


@dataclass
class Predictions:
    """Per-session output: label, the small model's score, the route and, where the LLM was asked, its reason."""
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


class _Stopwatch:
    """Seconds per named stage, for the run report."""

    def __init__(self):
        self.laps: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = round(now - self._t, 3)
        self._t = now


def template_set_key(templates: list[str], sequence: np.ndarray) -> tuple[str, ...]:
    """A session's distinct templates as sorted strings: the key of one LLM question."""
    return tuple(sorted({templates[t] for t in sequence.tolist()}))


def templates_with_counts(templates: list[str], sequence: np.ndarray) -> list[tuple[str, int]]:
    """A session's distinct templates in first-appearance order, each with how often it occurs."""
    uniq, first, counts = np.unique(sequence, return_index=True, return_counts=True)
    order = np.argsort(first)
    return [(templates[uniq[i]], int(counts[i])) for i in order]


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


class FusionLog:
    """Fit on labeled source systems + an unlabeled target; predict with the distilled small model."""

    def __init__(self, config: FusionLogConfig | None = None, client: distill.ChatClient | None = None,
                 progress: Callable[[str], None] | None = None):
        self.config = config or FusionLogConfig()
        self.client = client  # None: no LLM, the proprietary branch keeps the meta-learned model (sm_only)
        self.progress = progress or (lambda msg: None)
        self.params: dict | None = None
        self.embedder: router.TfidfEmbedder | None = None
        self.source_templates: list[str] = []
        self.llm_reasons: dict[tuple[str, ...], str] = {}  # template-set key -> the LLM's reason
        self.report: dict = {}

    # -- the steps of Fig. 2 ------------------------------------------------------------------------

    def embed(self, systems: list[Sessions]) -> None:
        """Fit one TF-IDF space over every system's templates (unsupervised; target included)."""
        self.embedder = router.TfidfEmbedder().fit([t for s in systems for t in s.templates])

    def features(self, s: Sessions) -> tuple[sp.csr_matrix, sp.csr_matrix, sp.csr_matrix]:
        """Template vectors (T, V), session vectors (n, V) and the small model's input (n, V + F)."""
        tvecs = self.embedder.transform(s.templates)
        svecs = router.session_vectors(s.sequences, tvecs)
        return tvecs, svecs, metamodel.session_features(svecs, s.sequences, len(s.templates))

    def route(self, s: Sessions, tvecs: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
        """Training-free router: session score = min over its templates of the max cosine to the source."""
        source_vecs = self.embedder.transform(self.source_templates)
        return router.route(s.sequences, tvecs, source_vecs, self.config.tau)

    def meta_train(self, sources: list[Sessions], source_feats: list[tuple]) -> dict:
        """General branch: first-order MAML with each source system as a domain (Sec. 3.3)."""
        domains = []
        for s, (tvecs, _, X) in zip(sources, source_feats):
            y = s.labels.astype(np.int64)
            if len(sources) == 1:  # one source: pseudo-domains whose templates differ
                for idx in metamodel.pseudo_domains(tvecs, s.sequences, y, self.config.pseudo_domains,
                                                    self.config.meta.seed):
                    domains.append((X[idx], y[idx]))
            else:
                domains.append((X, y))
        return metamodel.maml_train(domains, self.config.meta, progress=self.progress)

    def fit(self, sources: list[Sessions], target: Sessions) -> dict:
        """Run the whole method. Target labels, if any, are never read here."""
        clock = _Stopwatch()
        sources = [self._labeled_part(s) for s in sources]
        self.progress(f"embedding templates of {len(sources)} source(s) and target {target.name}")
        self.embed(sources + [target])
        self.source_templates = [t for s in sources for t in s.templates]
        source_feats = [self.features(s) for s in sources]
        t_tvecs, t_svecs, t_X = self.features(target)

        route_scores, general = self.route(target, t_tvecs)
        self.progress(f"routing: {router.split_summary(general)}")
        clock.lap("embed_route")

        self.progress("meta-training the small model over the source systems")
        params = self.meta_train(sources, source_feats)
        clock.lap("meta_train")

        rounds: list[dict] = []
        prop = np.flatnonzero(~general)
        group, first, keys = group_by_template_set(target, prop)  # one LLM question per distinct set
        if self.client is not None and len(prop):
            params, rounds = self._distill(params, sources, source_feats, target, t_svecs, t_X, prop,
                                           group, first, keys)
        clock.lap("distill")
        self.params = params
        self.report = {"target": target.name, "sessions": len(target), "general": int(general.sum()),
                       "proprietary": int(len(prop)), "tau": self.config.tau, "rounds": rounds,
                       "distinct_proprietary_sets": len(keys),
                       "llm_calls": sum(r.get("asked", 0) - r.get("cached", 0) for r in rounds),
                       "llm_cached": sum(r.get("cached", 0) for r in rounds),
                       "llm_faults": dict(self.client.faults) if self.client is not None else {},
                       "seconds": clock.laps}
        return self.report

    def _distill(self, params, sources, source_feats, target, t_svecs, t_X, prop, group, first, keys):
        """Proprietary branch: one LLM question per distinct template-set of the proprietary sessions."""
        questions = [templates_with_counts(target.templates, target.sequences[i]) for i in first]
        self.progress(f"distillation: {len(prop)} proprietary sessions in {len(keys)} distinct template-sets")
        pool = example_pool(sources, [f[1] for f in source_feats])
        replay = (sp.vstack([f[2] for f in source_feats]).tocsr(),
                  np.concatenate([s.labels.astype(np.int64) for s in sources]))

        meta_cfg = self.config.meta
        result = distill.distill(
            params, t_X[prop], group, questions, t_svecs[first], pool, replay, self.client,
            self.config.distill,
            predict_proba=metamodel.predict_proba,
            fine_tune=lambda p, X, y, w: metamodel.fine_tune(p, X, y, w, meta_cfg),
            progress=self.progress)
        self.llm_reasons = {keys[g]: a.reason for g, a in result.answers.items()}
        return result.params, result.rounds

    def predict(self, s: Sessions) -> Predictions:
        """Label sessions with the small model alone (no LLM): score, label, route, and the LLM's reason
        where this model's fit asked the LLM about the same template-set."""
        if self.params is None:
            raise ValueError("the model is not fitted: call fit() or load() first")
        tvecs, _, X = self.features(s)
        route_scores, general = self.route(s, tvecs)
        scores = metamodel.predict_proba(X, self.params)
        reasons = [self.llm_reasons.get(template_set_key(s.templates, seq)) for seq in s.sequences]
        return Predictions(list(s.ids), (scores >= self.config.threshold).astype(np.int8), scores, general,
                           route_scores, reasons)

    # -- model files ------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        """One .npz: the small model's weights plus a JSON config (embedder, source templates, LLM reasons)."""
        state = {"config": self.config.to_dict(), "embedder": self.embedder.to_dict(),
                 "source_templates": self.source_templates,
                 "llm_reasons": [[list(k), r] for k, r in self.llm_reasons.items()]}
        metamodel.save(path, self.params, state)

    @classmethod
    def load(cls, path: str | os.PathLike, progress: Callable | None = None) -> "FusionLog":
        params, state = metamodel.load(path)
        try:
            model = cls(FusionLogConfig.from_dict(state["config"]), progress=progress)
            model.embedder = router.TfidfEmbedder.from_dict(state["embedder"])
            model.source_templates = list(state["source_templates"])
            model.llm_reasons = {tuple(k): r for k, r in state.get("llm_reasons", [])}
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: not a fusionlog model file ({e})") from None
        model.params = params
        return model

    @staticmethod
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
# Command line

DEFAULT_LLM_URL = "http://127.0.0.1:8080/v1"  # where bench/local_llm.sh serves the local model

HELP = """\
FusionLog: find the anomalous sessions of a new system's logs with zero labels from it, using labeled
logs of other systems (sources), a training-free router, a meta-learned small model and an LLM teacher.

  fusionlog run      fit on sources + target, write predictions for the target, save the small model
  fusionlog predict  label sessions with a saved model (no LLM)
  fusionlog presets  list the built-in log formats

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
            raise ValueError(f"system {name!r} ({path}) is not a preset: describe it with --format {name}=... "
                             f"and --session {name}=REGEX or --window {name}=SIZE")
        spec = SystemSpec(**asdict(base)) if base else SystemSpec(formats[name])
        if name in formats:
            spec.log_format = formats[name]
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


def _load_systems(args, pairs: list[str], flag: str, progress) -> list[Sessions]:
    systems = [(name, path) for name, path in _keyed(pairs, flag).items()]
    specs = _system_specs(args, systems)
    label_files = _keyed(args.labels, "--labels")
    out = []
    for name, path in systems:
        s = read_system(path, specs[name], name, progress)
        if name in label_files:
            attach_labels(s, read_labels(label_files[name]), label_files[name])
        st = s.stats
        progress(f"{name}: {st['lines']:,} lines, {len(s):,} sessions, {len(s.templates):,} templates"
                 + (f", {st['continuation']:,} continuation lines" if st["continuation"] else "")
                 + (f", {st['unmatched']:,} unmatched lines" if st["unmatched"] else "")
                 + (f", {st['replaced_chars']:,} undecodable bytes replaced" if st["replaced_chars"] else "")
                 + (f", {st['unlabeled_sessions']:,} sessions not in the label file" if st.get("unlabeled_sessions") else "")
                 + (f", {st['label_ids_not_in_log']:,} label ids not in the log" if st.get("label_ids_not_in_log") else ""))
        out.append(s)
    return out


def write_predictions(pred: Predictions, path: str) -> None:
    """CSV (default) or JSONL (path ending .jsonl), one row per session."""
    rows = list(pred.rows())
    with open(path, "w", encoding="utf-8", newline="") as f:
        if path.endswith(".jsonl"):
            for r in rows:
                f.write(json.dumps(r) + "\n")
        else:
            w = csv.DictWriter(f, fieldnames=["session", "label", "score", "route", "route_score", "reason"])
            w.writeheader()
            w.writerows(rows)


def _metrics_line(target: Sessions, pred: Predictions) -> str | None:
    if target.labels is None or not (target.labels >= 0).any():
        return None
    m = evaluate(target.labels, pred.labels)
    return (f"evaluation (target labels, used for nothing else): precision {m['precision']:.3f} recall "
            f"{m['recall']:.3f} F1 {m['f1']:.3f} (TP {m['tp']} FP {m['fp']} TN {m['tn']} FN {m['fn']})")


def cmd_run(args, progress) -> int:
    config = FusionLogConfig()
    if args.tau is not None:
        config.tau = args.tau
    config.meta.seed = config.distill.seed = args.seed
    if args.rounds is not None:
        config.distill.rounds = args.rounds
    if args.budget is not None:
        config.distill.budget = args.budget
    if args.concurrency is not None:
        config.distill.concurrency = args.concurrency
    if args.margin is not None:
        config.distill.margin = args.margin
    if args.budget_share is not None:
        config.distill.budget_share = args.budget_share
    client = None
    if args.llm_url != "none":
        cache = distill.AnswerCache(args.cache) if args.cache != "none" else None
        client = distill.ChatClient(base_url=args.llm_url, model=args.llm_model, api_key=args.llm_key,
                                    response_format=args.response_format, cache=cache, logprobs=args.logprobs,
                                    timeout=args.llm_timeout, max_retries=args.llm_retries,
                                    backoff=args.llm_backoff)
        client.check()  # fail fast, in one line, before reading anything
    sources = _load_systems(args, args.source, "--source", progress)
    (target,) = _load_systems(args, args.target, "--target", progress)
    model = FusionLog(config, client, progress)
    report = model.fit(sources, target)
    pred = model.predict(target)
    write_predictions(pred, args.out)
    if args.model_out:
        model.save(args.model_out)
    print(f"target {target.name}: {len(target):,} sessions; routing (tau={config.tau}): "
          f"{router.split_summary(pred.general)}")
    for r in report["rounds"]:
        print("round {round}: asked {asked} (cached {cached}), agreed {agreed}, disputed {disputed}, "
              "flipped {flipped}, pseudo-labeled {pseudo_labeled}".format(**{k: r.get(k, 0) for k in
              ("round", "asked", "cached", "agreed", "disputed", "flipped", "pseudo_labeled")}))
    faults = ", ".join(f"{k} {v}" for k, v in sorted(report["llm_faults"].items())) or "none"
    failed = sum(r.get("failed", 0) for r in report["rounds"])
    print(f"LLM calls: {report['llm_calls']} new, {report['llm_cached']} from cache; faults: {faults}"
          + (f"; {failed} questions failed and were left to the small model" if failed else ""))
    print(f"predicted anomalous: {int(pred.labels.sum()):,} of {len(pred.ids):,} sessions -> {args.out}"
          + (f"; model -> {args.model_out}" if args.model_out else ""))
    line = _metrics_line(target, pred)
    if line:
        print(line)
        report["metrics"] = evaluate(target.labels, pred.labels)
    report["inputs"] = {s.name: dict(s.stats) for s in sources + [target]}  # what reading saw, per system
    if args.report:
        with open(args.report, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    return 0


def cmd_predict(args, progress) -> int:
    model = FusionLog.load(args.model, progress)
    (sessions,) = _load_systems(args, args.input, "--input", progress)
    pred = model.predict(sessions)
    write_predictions(pred, args.out)
    print(f"{sessions.name}: {len(sessions):,} sessions; routing: {router.split_summary(pred.general)}")
    print(f"predicted anomalous: {int(pred.labels.sum()):,} of {len(pred.ids):,} sessions -> {args.out}")
    line = _metrics_line(sessions, pred)
    if line:
        print(line)
    return 0


def _add_system_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("describing a log that is not a preset (repeat per system, keyed by NAME)")
    g.add_argument("--labels", action="append", metavar="NAME=CSV",
                   help="label file 'Id,Label' (Normal/Anomaly or 0/1) for system NAME; for the target it is "
                        "used only to report precision/recall/F1")
    g.add_argument("--format", action="append", metavar="NAME=FORMAT",
                   help="LogHub format string, e.g. '<Date> <Time> <Level> <Component>: <Content>'")
    g.add_argument("--session", action="append", metavar="NAME=REGEX",
                   help="session id regex (group 1 if any); a line belongs to every id it names")
    g.add_argument("--window", action="append", metavar="NAME=SIZE[,STEP]",
                   help="group records into fixed windows instead of ids")
    g.add_argument("--label-field", action="append", metavar="NAME=FIELD[,NORMAL]",
                   help="inline label field (a session is anomalous if any line's value is not NORMAL, default '-')")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fusionlog", description=HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress messages on stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="fit on sources + target and label the target",
                         description="Fit FusionLog on labeled source logs and an unlabeled target log, write "
                                     "one prediction per target session, save the distilled small model.",
                         formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    run.add_argument("--source", action="append", required=True, metavar="NAME=PATH",
                     help="a labeled source system (repeat for several)")
    run.add_argument("--target", action="append", required=True, metavar="NAME=PATH",
                     help="the new, unlabeled system to label")
    _add_system_flags(run)
    run.add_argument("--out", default="predictions.csv", help="predictions file (.csv or .jsonl)")
    run.add_argument("--model-out", default="fusionlog-model.npz", help="where to save the small model ('' = don't)")
    run.add_argument("--report", default=None, help="also write the run report as JSON here")
    llm = run.add_argument_group("the LLM teacher (any OpenAI-compatible server)")
    llm.add_argument("--llm-url", default=os.environ.get("OPENAI_BASE_URL", DEFAULT_LLM_URL),
                     help="base URL ($OPENAI_BASE_URL); 'none' = no LLM (the meta-learned model alone)")
    llm.add_argument("--llm-model", default=os.environ.get("OPENAI_MODEL", "local"), help="model name ($OPENAI_MODEL)")
    llm.add_argument("--llm-key", default=None, help="API key (prefer $OPENAI_API_KEY; never printed or stored)")
    llm.add_argument("--response-format", default="json_object_schema",
                     choices=["json_object_schema", "json_schema", "none"],
                     help="llama.cpp: json_object_schema; OpenAI/vLLM: json_schema; none: parse free text")
    llm.add_argument("--logprobs", action=argparse.BooleanOptionalAction, default=False,
                     help="ask for token log-probabilities: p(anomalous) of the label token is a far better "
                          "confidence than the one a small model states (0.9 on every answer); off by default "
                          "because llama-cpp-python then takes ~3x longer per call; servers without them still work")
    llm.add_argument("--llm-timeout", type=float, default=120.0, help="seconds to wait for one answer")
    llm.add_argument("--llm-retries", type=int, default=3,
                     help="retries of a failed request (timeout, connection, HTTP 429/5xx); then that "
                          "question is left to the small model")
    llm.add_argument("--llm-backoff", type=float, default=1.0,
                     help="first wait before a retry, doubled each time (a server's Retry-After wins)")
    llm.add_argument("--cache", default=str(Path.home() / ".cache" / "fusionlog" / "answers.jsonl"),
                     help="LLM answer cache (JSONL; 'none' = off); an answered prompt is never asked again")
    alg = run.add_argument_group("the method")
    alg.add_argument("--tau", type=float, default=None, help=f"router threshold (default {router.TAU})")
    alg.add_argument("--rounds", type=int, default=None, help="max distillation rounds")
    alg.add_argument("--budget", type=int, default=None, help="max LLM questions in this run")
    alg.add_argument("--concurrency", type=int, default=None, help="LLM requests in flight")
    alg.add_argument("--margin", type=float, default=None,
                     help=f"the small model is sure of a set when its score is at least this far from 0.5; only "
                          f"then may it pseudo-label a set the LLM was not asked about (default "
                          f"{distill.DistillConfig.margin})")
    alg.add_argument("--budget-share", type=float, default=None,
                     help=f"ask the LLM about at most this share of the distinct proprietary template-sets, "
                          f"least sure first (default {distill.DistillConfig.budget_share}; 1 = every set)")
    alg.add_argument("--seed", type=int, default=0, help="seed of every random choice")

    pr = sub.add_parser("predict", help="label sessions with a saved model (no LLM)",
                        description="Label the sessions of a log with a model saved by 'fusionlog run'.",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    pr.add_argument("--model", required=True, help="model file from 'fusionlog run --model-out'")
    pr.add_argument("--input", action="append", required=True, metavar="NAME=PATH", help="the log to label")
    _add_system_flags(pr)
    pr.add_argument("--out", default="predictions.csv", help="predictions file (.csv or .jsonl)")

    sub.add_parser("presets", help="list the built-in log formats")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    progress = (lambda msg: None) if args.quiet else (lambda msg: print(f"fusionlog: {msg}", file=sys.stderr))
    try:
        if args.command == "run":
            if len(args.target) != 1:
                raise ValueError("--target: give exactly one target system")
            return cmd_run(args, progress)
        if args.command == "predict":
            return cmd_predict(args, progress)
        if args.command == "presets":
            for name, spec in PRESETS.items():
                grouping = f"session {spec.session_regex}" if spec.session_regex else f"windows of {spec.window}"
                print(f"{name:12} {spec.log_format}\n{'':12} {grouping}"
                      + (f"; inline label {spec.label_field} ('{spec.normal_value}' = normal)" if spec.label_field else ""))
            return 0
        parser.print_help()
        return 2
    except distill.LLMUnavailable as e:  # no LLM there: say where to get one, in the same single line
        print(f"fusionlog: error: {e}; start the local one with 'bench/local_llm.sh start', or point --llm-url "
              f"(or OPENAI_BASE_URL) at any OpenAI-compatible server, or use --llm-url none", file=sys.stderr)
        return 2
    except ValueError as e:  # bad input: one line naming the file (and line), no traceback
        print(f"fusionlog: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # an output that cannot be written (a directory, no permission, disk full, ...)
        print(f"fusionlog: error: {e.filename or ''}{': ' if e.filename else ''}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fusionlog: interrupted (answers so far are in the cache)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
