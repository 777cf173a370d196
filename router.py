"""Semantic router: TF-IDF embedding and the training-free general/proprietary split (paper Sec. 3.2).

The first stage of FusionLog (Zhao et al., arXiv 2511.05878): each unlabeled target session goes to the
*general* branch if its events look like events of the labeled source systems (the meta-learned small model
scores it directly), else to the *proprietary* one (LLM <-> small-model distillation). No labels, no training.

    raw content --mask--> template --tokenize--> words --TfidfEmbedder--> template vector (T, V)
    sessions --session_vectors--> mean of distinct template vectors (n, V)
    template_scores: for each target template, max cosine to any source template        (T,)
    route_scores:    for each target session, min of that over the session's templates   (n,)
    route:           general = score >= TAU

Departures from the paper:
- Templates come from one regex pass (`mask`), not from a log parser such as Drain.
- The embedding is TF-IDF over camelCase/snake_case-split words (scikit-learn's smooth idf), not a
  pre-trained language model: numpy + scipy only, deterministic.
- A session's score is the min over its templates of the max cosine to a source template: one event with
  no close counterpart in any source makes it proprietary (so does a template with no words left).
- TAU = 0.5, not tuned: the shared words carry at least half the weight of both texts.
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

def l2_normalize_rows(m) -> sp.csr_matrix:
    """The rows of m (sparse or dense) scaled to unit L2 norm, as float64 csr; zero rows stay zero."""
    m = sp.csr_matrix(m, dtype=np.float64)
    norms = np.sqrt(np.asarray(m.multiply(m).sum(axis=1)).ravel())  # (n,)
    return sp.csr_matrix(sp.diags(np.divide(1.0, norms, out=np.zeros_like(norms), where=norms > 0)) @ m)


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
        return l2_normalize_rows(sp.csr_matrix(counts @ sp.diags(self.idf_)))

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
        emb.vocabulary_, emb.idf_ = {w: j for j, w in enumerate(words)}, idf
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


def incidence(sequences: list[np.ndarray], n_templates: int) -> sp.csr_matrix:
    """Binary sessions x templates matrix (n, T): 1 where the session holds the template."""
    flat, lengths = _concat(sequences, n_templates)
    B = sp.csr_matrix((np.ones(flat.size), (np.repeat(np.arange(len(sequences)), lengths), flat)),
                      shape=(len(sequences), n_templates))
    B.sum_duplicates()  # canonical: sorted column indices per row, no duplicates
    B.data[:] = 1.0  # distinct templates: a template counts once however often it repeats
    return B


def session_vectors(sequences: list[np.ndarray], template_vecs: sp.csr_matrix) -> sp.csr_matrix:
    """Each session = mean of the vectors of its DISTINCT templates, L2-normalised. -> csr (n, V)"""
    B = incidence(sequences, template_vecs.shape[0])  # (n, T)
    mean = sp.diags(1.0 / np.maximum(np.diff(B.indptr), 1)) @ B @ template_vecs  # (n, T) @ (T, V) -> (n, V)
    return l2_normalize_rows(sp.csr_matrix(mean))


# ----------------------------------------------------------------------------------------------------
# the router

TAU = 0.5  # route threshold: a template has a close counterpart in the sources at cosine >= TAU


def most_similar(queries, keys, k: int, chunk_cells: int = 1 << 22) -> tuple[np.ndarray, np.ndarray]:
    """For each query row, the k key rows of largest dot product (the cosine, for unit rows), best first,
    ties to the lower index: indices and scores, (q, min(k, p)) each; chunk_cells bounds the dense block."""
    if queries.shape[1] != keys.shape[1]:
        raise ValueError(f"query vectors have {queries.shape[1]} columns, key vectors {keys.shape[1]}")
    k = max(0, min(int(k), keys.shape[0]))
    idx, scores = np.zeros((queries.shape[0], k), dtype=np.int64), np.zeros((queries.shape[0], k))
    if k == 0:
        return idx, scores
    Q, K_t = sp.csr_matrix(queries), sp.csr_matrix(keys).T.tocsc()
    rows = max(1, chunk_cells // keys.shape[0])
    for a in range(0, Q.shape[0], rows):
        sims = (Q[a:a + rows] @ K_t).toarray()  # (rows, p)
        order = sims.argmax(axis=1)[:, None] if k == 1 else np.argsort(-sims, axis=1, kind="stable")[:, :k]
        idx[a:a + rows], scores[a:a + rows] = order, np.take_along_axis(sims, order, axis=1)
    return idx, scores


def template_scores(target_template_vecs: sp.csr_matrix, source_template_vecs: sp.csr_matrix,
                    chunk_cells: int = 1 << 22) -> np.ndarray:
    """Max cosine of each target template to any source template (0.0 when there are no sources). -> (T,)"""
    _, best = most_similar(target_template_vecs, source_template_vecs, 1, chunk_cells)
    scores = best[:, 0] if best.shape[1] else np.zeros(target_template_vecs.shape[0])
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
