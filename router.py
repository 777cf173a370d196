"""Semantic router: template extraction, TF-IDF embedding and the training-free general/proprietary split.

This is the first stage of FusionLog (Zhao et al., arXiv 2511.05878), its training-free semantic router,
together with the template extraction and text embedding it needs. Before any
model sees the target system, every unlabeled target session is routed either to the *general* branch
(its log events look like events the labeled source systems also produce, so the meta-learned small
model can score it directly) or to the *proprietary* branch (it contains at least one event the sources
have nothing like, so the LLM <-> small-model distillation has to label it). The router only compares
texts: no labels, no training.

The pipeline, one function each:
    raw content --mask--> template --tokenize--> words --TfidfEmbedder--> template vector (T, V)
    sessions --session_vectors--> mean of distinct template vectors (n, V)
    template_scores: for each target template, max cosine to any source template        (T,)
    route_scores:    for each target session, min of that over the session's templates   (n,)
    route:           general = score >= tau

Departures from the paper:
- Templates come from one regex pass (`mask`) that replaces variables by `<*>`, not from a full log
  parser such as Drain. On HDFS / BGL / OpenStack this already collapses lines to a few dozen to a few
  hundred templates; a parser would merge a few more (e.g. free-text fields).
- The semantic embedding is TF-IDF over camelCase/snake_case-split words (scikit-learn's smooth idf),
  not a pre-trained language model, so the package stays numpy + scipy and is deterministic. Cosine of
  L2-normalised TF-IDF rows plays the role of the paper's embedding similarity.
- The session score is a min over its templates of the max cosine to a source template: a session is
  "general" only if EVERY one of its events has a close counterpart in some source system. One unknown
  event is enough to make a session proprietary, since that event is exactly what the source-trained
  model cannot judge.
- A template with no words left after masking (e.g. a line that is only numbers) has a zero vector and
  scores 0, so it makes its session proprietary.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

# ----------------------------------------------------------------------------------------------------
# template extraction: one compiled regex, one `sub` pass per line

_HEX = r"[0-9a-fA-F]"
# a full UUID 8-4-4-4-12 (even one whose first group has no digit, as in dcbdffbf-c57a-...), or a
# truncated one: 8 hex (with a digit) then dash groups, as in tapd1e2a3b4-af
_UUID = (rf"{_HEX}{{8}}(?:-{_HEX}{{4}}){{3}}-{_HEX}{{12}}(?!\w)"
         rf"|{_HEX}(?:(?<=\d)|(?={_HEX}{{0,6}}\d)){_HEX}{{7}}(?:-{_HEX}{{1,4}}){{1,3}}(?:-{_HEX}{{1,12}})?")
# Every alternative is one kind of variable. Order matters (the first alternative that matches at a
# position wins), so specific shapes come before the catch-all digit run. Every digit is consumed by
# some alternative, so a template has no digits left; and a lookbehind that refuses to start a variable
# after a word character also refuses after `>` (the end of a `<*>`), so a second pass finds no start
# the first pass did not. Together: mask is idempotent, mask(mask(x)) == mask(x).
# Speed: each alternative starts with a plain character or character class (lookbehinds come after the
# first character), so the regex engine rejects most positions after one character test.
_VARIABLE = "|".join([
    r"<\*>",                                                        # already masked
    _UUID,                                                          # UUID, also truncated
    r"blk_-?\d+",                                                   # HDFS block id
    rf"{_HEX}{_HEX}(?::{_HEX}{{2}}){{5}}",                            # MAC address fa:16:3e:0a:1b:2c
    r"\d\d{0,2}(?:\.\d{1,3}){3}(?::\d+)?",                          # IPv4 with optional :port
    r"/(?<![^\W\d]/)(?<![/>]/)[\w.\-]+(?:/[\w.\-]*)+",               # path /a/b, /a//b/ (not in a/b/c)
    rf"0[xX]{_HEX}+",                                               # 0x1f
    rf"{_HEX}(?<![\w>]{_HEX})(?:(?<=\d)|(?={_HEX}*\d)){_HEX}{{7,}}(?!\w)",  # standalone hex run >= 8
    r"[-+](?<![\w>][-+])\d+(?:\.\d+)*",                              # signed number (sign not after a word)
    r"\d+(?:\.\d+)*",                                                # number, also glued: part-00081, R02
])
# `(?:...)+` swallows glued variables in the same match, so `<*><*>` and `0x1f<*>` become one `<*>`;
# variables separated by anything else (a space, `-`, `:`) stay separate, keeping the token count.
# The leading lookahead is a cheap pre-check: every variable starts with one of these characters.
# No alternative matches a space or a newline, and no lookaround tells them from the edge of the string:
# mask_many relies on both (test_mask_many_equals_mask_per_message checks it).
_MASK_RE = re.compile(rf"(?=[<0-9a-fA-F/+\-])(?:{_VARIABLE})+")

_CAMEL_RE = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|\d+")  # HTTPServer -> HTTP, Server


def mask(text: str) -> str:
    """Replace the variable parts of one log message by `<*>`; the result is the message's template."""
    return _MASK_RE.sub("<*>", text)


def mask_many(messages: list[str]) -> list[str]:
    """[mask(m) for m in messages], the same list, masking each message's *digit key* once: the message
    with every ASCII digit turned into 1. _MASK_RE asks of a digit only whether it is one, never which,
    except for the 0 of `0[xX]`, so a key masks as its message unless a digit stands before an x or X."""
    text = "\n".join(messages).translate(_DIGITS_TO_ONE)  # all keys in one pass
    keys = text.split("\n")
    if len(keys) != len(messages) or "1x" in text or "1X" in text:  # a newline inside, or inexact keys
        keys = [m if "\n" in m or "1x" in k or "1X" in k else k
                for m, k in zip(messages, (m.translate(_DIGITS_TO_ONE) for m in messages))]
    masked = {k: mask(k) for k in dict.fromkeys(keys)}
    return list(map(masked.__getitem__, keys))


_DIGITS_TO_ONE = str.maketrans("0123456789", "1111111111")


def tokenize(text: str) -> list[str]:
    """Split a template into lowercase words: camelCase, snake_case and punctuation split; `<*>`,
    numbers and 1-character tokens dropped. ASCII letters only (non-ASCII characters act as separators)."""
    words = _CAMEL_RE.findall(text.replace("<*>", " "))
    return [w.lower() for w in words if len(w) > 1 and not w.isdigit()]


# ----------------------------------------------------------------------------------------------------
# TF-IDF embedding

def _l2_normalize_rows(m: sp.csr_matrix) -> sp.csr_matrix:
    """Scale every row to unit L2 norm; all-zero rows stay zero."""
    norms = np.sqrt(np.asarray(m.multiply(m).sum(axis=1)).ravel())  # (n,)
    inv = np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)
    return sp.csr_matrix(sp.diags(inv) @ m)


class TfidfEmbedder:
    """Bag-of-words TF-IDF with scikit-learn's smooth idf and L2-normalised rows."""

    def __init__(self) -> None:
        self.vocabulary_: dict[str, int] = {}
        self.idf_: np.ndarray = np.zeros(0)

    def fit(self, docs: list[str]) -> TfidfEmbedder:
        token_lists = [tokenize(d) for d in docs]
        # sorted vocabulary: the column order does not depend on the order of the documents
        self.vocabulary_ = {w: j for j, w in enumerate(sorted({w for ws in token_lists for w in ws}))}
        df = np.zeros(len(self.vocabulary_))  # (V,) number of documents containing each word
        for ws in token_lists:
            df[[self.vocabulary_[w] for w in set(ws)]] += 1
        # smooth idf: as if one extra document contained every word once; never zero, never infinite
        self.idf_ = np.log((1.0 + len(docs)) / (1.0 + df)) + 1.0
        return self

    def transform(self, docs: list[str]) -> sp.csr_matrix:
        if len(self.idf_) != len(self.vocabulary_):
            raise ValueError("TfidfEmbedder: not fitted (vocabulary and idf differ in length)")
        rows, cols = [], []
        for i, d in enumerate(docs):
            js = [self.vocabulary_[w] for w in tokenize(d) if w in self.vocabulary_]  # unknown words ignored
            rows.extend([i] * len(js))
            cols.extend(js)
        counts = sp.csr_matrix((np.ones(len(rows)), (rows, cols)),
                               shape=(len(docs), len(self.vocabulary_)), dtype=np.float64)  # (n, V)
        counts.sum_duplicates()  # raw term counts
        return _l2_normalize_rows(sp.csr_matrix(counts @ sp.diags(self.idf_)))

    def fit_transform(self, docs: list[str]) -> sp.csr_matrix:
        return self.fit(docs).transform(docs)

    def to_dict(self) -> dict:
        words = [""] * len(self.vocabulary_)
        for w, j in self.vocabulary_.items():
            words[j] = w
        return {"vocabulary": words, "idf": [float(x) for x in self.idf_]}

    @classmethod
    def from_dict(cls, d: dict) -> TfidfEmbedder:
        try:
            words, idf = list(d["vocabulary"]), np.asarray(d["idf"], dtype=np.float64)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"TfidfEmbedder.from_dict: bad content ({e})") from None
        if idf.ndim != 1 or len(words) != len(idf) or len(set(words)) != len(words):
            raise ValueError("TfidfEmbedder.from_dict: vocabulary and idf must be equal-length, words unique")
        if not all(isinstance(w, str) for w in words) or not np.all(np.isfinite(idf)):
            raise ValueError("TfidfEmbedder.from_dict: words must be strings and idf finite")
        emb = cls()
        emb.vocabulary_ = {w: j for j, w in enumerate(words)}
        emb.idf_ = idf
        return emb


# ----------------------------------------------------------------------------------------------------
# sessions

def _concat(sequences: list[np.ndarray], n_templates: int) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated template ids (N,) and per-session lengths (n,), with ids checked against n_templates."""
    lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
    flat = (np.concatenate([np.asarray(s, dtype=np.int64).ravel() for s in sequences])
            if len(sequences) else np.zeros(0, dtype=np.int64))
    if flat.size and (flat.min() < 0 or flat.max() >= n_templates):
        raise ValueError(f"template id out of range [0, {n_templates}) in sequences")
    return flat, lengths


def session_vectors(sequences: list[np.ndarray], template_vecs: sp.csr_matrix) -> sp.csr_matrix:
    """Each session = mean of the vectors of its DISTINCT templates, L2-normalised. -> csr (n, V)"""
    n_templates = template_vecs.shape[0]
    flat, lengths = _concat(sequences, n_templates)
    session_of = np.repeat(np.arange(len(sequences)), lengths)  # (N,) session index of every line
    incidence = sp.csr_matrix((np.ones(flat.size), (session_of, flat)),
                              shape=(len(sequences), n_templates))  # (n, T); duplicates summed below
    incidence.sum_duplicates()
    incidence.data[:] = 1.0  # distinct templates: a template counts once however often it repeats
    n_distinct = np.maximum(np.diff(incidence.indptr), 1)  # (n,)
    mean = sp.diags(1.0 / n_distinct) @ incidence @ template_vecs  # (n, T) @ (T, V) -> (n, V)
    return _l2_normalize_rows(sp.csr_matrix(mean))


# ----------------------------------------------------------------------------------------------------
# the router

def template_scores(target_template_vecs: sp.csr_matrix, source_template_vecs: sp.csr_matrix,
                    chunk_cells: int = 1 << 22) -> np.ndarray:
    """Max cosine of each target template to any source template (0.0 when there are no sources). -> (T,)

    Rows are L2-normalised, so the sparse product is the cosine. The (T, S) similarity matrix is built
    `chunk_cells` cells at a time so memory stays bounded however many templates there are."""
    if target_template_vecs.shape[1] != source_template_vecs.shape[1]:
        raise ValueError("target and source template vectors have different vocabularies")
    n_target, n_source = target_template_vecs.shape[0], source_template_vecs.shape[0]
    scores = np.zeros(n_target)
    if n_source == 0:
        return scores
    tgt, src_t = sp.csr_matrix(target_template_vecs), sp.csr_matrix(source_template_vecs).T.tocsc()
    rows = max(1, chunk_cells // n_source)
    for a in range(0, n_target, rows):
        sims = (tgt[a:a + rows] @ src_t).toarray()  # (rows, S) dense, bounded by chunk_cells
        scores[a:a + rows] = sims.max(axis=1)
    return np.clip(scores, 0.0, 1.0)  # TF-IDF is non-negative; clip float round-off above 1


def route_scores(sequences: list[np.ndarray], tmpl_scores: np.ndarray) -> np.ndarray:
    """Session score = MIN over its templates of the template score; empty session -> 0.0. -> (n,)"""
    tmpl_scores = np.asarray(tmpl_scores, dtype=np.float64)
    flat, lengths = _concat(sequences, len(tmpl_scores))
    scores = np.zeros(len(sequences))
    nonempty = lengths > 0
    if nonempty.any():
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])  # (n,) offset of each session in flat
        scores[nonempty] = np.minimum.reduceat(tmpl_scores[flat], starts[nonempty])
    return scores


@dataclass
class RouterConfig:
    # Cosine level meaning "this template has a close counterpart in the sources". For L2-normalised
    # TF-IDF, 0.5 = the shared words carry at least half of the weight of both texts (e.g. two templates
    # sharing 2 of 3 equally weighted words score 0.67, sharing 1 of 3 score 0.33). Below it, overlap is a
    # stray common word ("block", "error"); above it, the events describe the same thing. Not tuned to
    # data: on HDFS / BGL / OpenStack (each the target, the other two the sources) the best template
    # match is ~0.5 and no session scores above 0.16, so every session routes proprietary at any tau
    # that still means "close counterpart" -- these three systems share hardly any events.
    tau: float = 0.5


def route(target_sequences: list[np.ndarray], target_template_vecs: sp.csr_matrix,
          source_template_vecs: sp.csr_matrix, tau: float) -> tuple[np.ndarray, np.ndarray]:
    """Training-free routing: (scores (n,), is_general (n,) bool) with is_general = scores >= tau."""
    if not math.isfinite(tau):
        raise ValueError(f"tau must be a finite number, got {tau!r}")
    scores = route_scores(target_sequences, template_scores(target_template_vecs, source_template_vecs))
    return scores, scores >= tau


def split_summary(is_general: np.ndarray) -> str:
    """One line, e.g. 'general 1234 (10.7%), proprietary 10267 (89.3%)'."""
    is_general = np.asarray(is_general, dtype=bool)
    n, g = is_general.size, int(is_general.sum())
    pct = (lambda k: 100.0 * k / n) if n else (lambda k: 0.0)
    return f"general {g} ({pct(g):.1f}%), proprietary {n - g} ({pct(n - g):.1f}%)"
