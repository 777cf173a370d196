"""
The small model (SM) of FusionLog and its system-agnostic meta-learning.

Paper: Zhao et al., "FusionLog: Cross-System Log-based Anomaly Detection via Fusion of General and
Proprietary Knowledge" (arXiv 2511.05878): the small model (SM) of the general-log branch, trained by
"system-agnostic representation meta-learning" over the labeled source systems so that it serves the
target's general logs directly; the proprietary branch (distill.py) later fine-tunes it on pseudo-labels
with `fine_tune`.

What is here:
- `session_features`: the SM's input, a session's semantic TF-IDF vector beside a few structural features;
- a hand-written numpy MLP: `init_params`, pure `forward(x, params)`, `loss_and_grads` (weighted BCE on
  logits with a hand-derived backward pass), `predict_proba`, and `Adam`;
- `maml_train`: first-order MAML with each source system (or pseudo-domain) as one task;
- `pseudo_domains`: tasks for a single source system, made by clustering its templates;
- `fine_tune`: minibatch Adam on confidence-weighted pseudo-labels;
- `save` / `load`: one .npz file, no pickle.

Departures from the paper:
- First-order MAML (the query gradient is taken at the adapted weights and applied to the meta-weights,
  ignoring second derivatives), not second-order MAML: much cheaper and, for small MLPs, about as good.
- The paper's small model sees semantics only. Here a few structural features (length, rarity of the
  session's template-set, missing common steps, ...) sit beside the semantic vector, because many
  anomalies are structural (an HDFS block with only two lines, a VM that stops after "Creating image"),
  and these features, measured relative to each system's own unlabeled sessions, transfer across systems.
- With a single source system there is nothing to meta-learn across, so pseudo-domains are made by
  clustering that system's templates; sessions are grouped by the cluster holding most of their templates.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy.cluster.vq import kmeans2
from scipy.sparse.linalg import svds
from scipy.special import expit

FORMAT, VERSION = "fusionlog-model", 2  # 2: the target's Reference is saved

# -----------------------------------------------------------------------------
# input features

STRUCTURAL_NAMES = (
    "log_lines",          # log1p(#lines) / log1p(the reference's max #lines), at most 1
    "log_distinct",       # log1p(#distinct templates) / log1p(the reference's max of it), at most 1
    "set_rarity",         # -log(share of reference sessions with exactly this template-set) / log(#reference sessions)
    "mean_tmpl_rarity",   # mean over the session's templates of -log(share of reference sessions holding it) / log(n)
    "max_tmpl_rarity",    # max of the same
    "missing_common",     # fraction of the reference's common templates (in >= 50% of its sessions) the session lacks
    "length_z",           # robust z-score of log1p(#lines) vs the reference's median, clipped to +-3, mapped to [0, 1]
)

# Weight of the structural block beside the L2-normalised semantic block (README: departures).
STRUCTURAL_WEIGHT = 1.0


def incidence(sequences: list[np.ndarray], n_templates: int) -> sp.csr_matrix:
    """Binary sessions x templates matrix: 1 where the session contains the template."""
    lengths = np.array([len(s) for s in sequences], dtype=np.int64)
    ids = np.concatenate([np.asarray(s, dtype=np.int64) for s in sequences]) if len(sequences) else np.zeros(0, np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= n_templates):
        raise ValueError(f"template ids must lie in [0, {n_templates}), got [{ids.min()}, {ids.max()}]")
    rows = np.repeat(np.arange(len(sequences)), lengths)
    B = sp.csr_matrix((np.ones(ids.size), (rows, ids)), shape=(len(sequences), n_templates))
    B.sum_duplicates()           # canonical: sorted column indices per row, no duplicates
    B.data[:] = 1.0
    return B


@dataclass
class Reference:
    """What a system's structural features are relative to: statistics of its unlabeled sessions, measured
    once (at fit time) and keyed by template text, so that a session's features depend on it alone."""
    templates: list             # the reference's templates; index = reference id
    share: np.ndarray           # (R,) share of the reference sessions holding each template
    set_counts: dict            # "3,5,9" (sorted reference ids) -> sessions with exactly that template-set
    n: int                      # number of reference sessions
    max_lines: float            # the longest reference session, in lines
    max_distinct: float         # ... and in distinct templates
    length_median: float        # median of log1p(#lines)
    length_scale: float         # its robust spread (MAD, else std, else 1)

    @classmethod
    def measure(cls, templates: list[str], sequences: list[np.ndarray]) -> "Reference":
        """The statistics of these sessions (all of a system's unlabeled sessions)."""
        n = len(sequences)
        if n == 0:
            raise ValueError("a reference needs at least one session")
        B = incidence(sequences, len(templates))                        # (n, T) binary
        counts: dict[str, int] = {}
        for i in range(n):
            key = _set_key(B.indices[B.indptr[i]:B.indptr[i + 1]])
            counts[key] = counts.get(key, 0) + 1
        ll = np.log1p([len(s) for s in sequences])
        med = float(np.median(ll))
        scale = 1.4826 * float(np.median(np.abs(ll - med)))
        if scale < 1e-9:                                                # most sessions equally long: std
            scale = float(ll.std()) if ll.std() > 1e-9 else 1.0
        return cls(list(templates), np.asarray(B.sum(axis=0)).ravel() / n, counts, n,
                   float(max(len(s) for s in sequences)), float(np.diff(B.indptr).max()), med, scale)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["share"] = self.share.tolist()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Reference":
        d = dict(d)
        d["share"] = np.asarray(d["share"], dtype=np.float64)
        return cls(**d)


def _set_key(reference_ids) -> str:
    """A template-set as sorted reference ids, the key of Reference.set_counts."""
    return ",".join(map(str, sorted(reference_ids)))


def structural_features(templates: list[str], sequences: list[np.ndarray], ref: Reference) -> np.ndarray:
    """(n, F) structural features of sessions, each in [0, 1], relative to a Reference: row i depends on
    session i and the reference only. A template the reference never saw is as rare as can be."""
    n = len(sequences)
    if n == 0:
        return np.zeros((0, len(STRUCTURAL_NAMES)))
    ref_id = {t: i for i, t in enumerate(ref.templates)}
    to_ref = np.array([ref_id.get(t, -1) for t in templates], dtype=np.int64)   # (T,) -1 = never seen
    B = incidence(sequences, len(templates))                        # (n, T) binary
    lines = np.array([len(s) for s in sequences], dtype=np.float64)  # (n,)
    distinct = np.diff(B.indptr).astype(np.float64)                 # (n,)
    log_n = np.log(ref.n) if ref.n > 1 else 1.0                     # rarity scale: -log(1/n) / log(n) = 1

    def scaled_log(v, top):  # log1p(v) / log1p(top), at most 1
        return np.minimum(np.log1p(v) / np.log1p(top), 1.0) if top > 0 else np.zeros(n)

    # template rarity: -log(share of reference sessions holding it) / log(n); 0 = in all, 1 = in one or none
    share = np.where(to_ref >= 0, ref.share[np.maximum(to_ref, 0)], 0.0) if len(ref.share) else np.zeros(len(to_ref))
    rarity = np.clip(-np.log(np.maximum(share, 1.0 / ref.n)) / log_n, 0.0, 1.0)   # (T,)
    mean_rarity = (B @ rarity) / np.maximum(distinct, 1.0)          # (n,), 0 for an empty session
    max_rarity = B.multiply(rarity[None, :]).tocsr().max(axis=1).toarray().ravel()

    # template-set rarity: how many reference sessions have exactly this set of distinct templates
    set_count = np.zeros(n)
    for i in range(n):
        ids = to_ref[B.indices[B.indptr[i]:B.indptr[i + 1]]]
        set_count[i] = 0 if (ids < 0).any() else ref.set_counts.get(_set_key(ids), 0)
    set_rarity = np.clip(-np.log(np.maximum(set_count, 1.0) / ref.n) / log_n, 0.0, 1.0)

    # missing steps: the share of the reference's common templates (in >= 50% of its sessions) it lacks
    common = np.flatnonzero(ref.share >= 0.5)                       # reference ids
    held = np.isin(to_ref, common).astype(np.float64)               # (T,) this template is a common one
    missing = (len(common) - B @ held) / len(common) if len(common) else np.zeros(n)

    # length: robust z-score of log1p(#lines) vs the reference's median, clipped to +-3, -> [0, 1]
    length_z = (np.clip((np.log1p(lines) - ref.length_median) / ref.length_scale, -3.0, 3.0) + 3.0) / 6.0

    cols = [scaled_log(lines, ref.max_lines), scaled_log(distinct, ref.max_distinct), set_rarity,
            mean_rarity, max_rarity, missing, length_z]
    return np.column_stack(cols)                                    # order = STRUCTURAL_NAMES


def session_features(sem: sp.csr_matrix, templates: list[str], sequences: list[np.ndarray],
                     ref: Reference) -> sp.csr_matrix:
    """The small model's input: semantic session vectors (n, V) beside structural features -> (n, V + F)."""
    if sem.shape[0] != len(sequences):
        raise ValueError(f"sem has {sem.shape[0]} rows but there are {len(sequences)} sessions")
    struct = STRUCTURAL_WEIGHT * structural_features(templates, sequences, ref)   # (n, F) dense, small
    return sp.hstack([sp.csr_matrix(sem, dtype=np.float64), sp.csr_matrix(struct)], format="csr")


# -----------------------------------------------------------------------------
# the MLP: params in a dict, forward(x, params) pure, backward by hand

@dataclass
class MetaConfig:
    hidden: tuple = (64, 32)    # two small ReLU layers: enough to mix structure and words, fast on 2 cores
    inner_lr: float = 0.1       # SGD step of the inner (task) adaptation; 0.3 derailed meta-training in probes
    meta_lr: float = 1e-3       # Adam step on the meta-weights; gentle, so the source's own words are not over-fit
    inner_steps: int = 1        # first-order MAML with one step: as good as 3 in probes, and cheapest
    meta_iters: int = 300       # ~1-3 s for 1k-12k sessions; the source query loss is flat well before
    support_size: int = 32      # class-stratified: half anomalies when there are enough
    query_size: int = 64        # disjoint from the support set, also stratified
    finetune_lr: float = 1e-3   # gentle: pseudo-labels are noisy, keep close to the meta-learned start
    finetune_epochs: int = 5    # a second or two on ~10k sessions
    finetune_min_steps: int = 100  # ... but at least this many minibatch steps: on a small target (BGL's 50
                                #     windows) 5 epochs are 5 steps, too few for the teacher to move the SM
                                #     at all (BGL held-out F1 0.507 -> 0.60 over 3 seeds; HDFS, with 200+ steps
                                #     anyway, unchanged)
    batch_size: int = 128       # minibatch for fine-tuning
    l2: float = 1e-4            # weight decay on weight matrices (not biases), against memorising rare words
    seed: int = 0               # every random choice (init, task sampling, batches) flows from it

    @classmethod
    def from_dict(cls, d: dict) -> "MetaConfig":
        """Rebuild from a JSON-loaded dict (lists back to tuples; unknown keys ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        if "hidden" in kw:
            kw["hidden"] = tuple(int(h) for h in kw["hidden"])
        return cls(**kw)


def layer_names(params: dict) -> list[tuple[str, str]]:
    """[(W1, b1), (W2, b2), ..., (Wout, bout)] in forward order."""
    n_hidden = sum(1 for k in params if k.startswith("W") and k[1:].isdigit())
    return [(f"W{i}", f"b{i}") for i in range(1, n_hidden + 1)] + [("Wout", "bout")]


def init_params(n_in: int, hidden: tuple, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """He-initialised weights for n_in -> hidden... -> 1 logit; biases zero."""
    sizes = [n_in, *hidden]
    params = {}
    for i in range(len(hidden)):
        params[f"W{i + 1}"] = rng.standard_normal((sizes[i], sizes[i + 1])) * np.sqrt(2.0 / sizes[i])
        params[f"b{i + 1}"] = np.zeros(sizes[i + 1])
    params["Wout"] = rng.standard_normal(sizes[-1]) * np.sqrt(1.0 / sizes[-1])   # (h_last,)
    params["bout"] = np.zeros(1)                                                 # (1,)
    return params


def _forward(x, params):
    """Logits plus the activations the backward pass needs: acts[0] = x, acts[i] = ReLU output of layer i."""
    acts = [x]
    h = x
    for W, b in layer_names(params)[:-1]:
        h = np.maximum(h @ params[W] + params[b], 0.0)   # (n, h_i); for csr x this is a sparse product
        acts.append(h)
    logits = h @ params["Wout"] + params["bout"]         # (n,)
    return np.asarray(logits).ravel(), acts


def forward(x, params: dict) -> np.ndarray:
    """Logits (n,) of the MLP; x is (n, n_in) csr or dense. Pure: params are not modified."""
    return _forward(x, params)[0]


def predict_proba(X, params: dict) -> np.ndarray:
    """P(anomalous) per session, (n,) in [0, 1]."""
    return expit(forward(X, params))


def loss_and_grads(x, y, w, params: dict, l2: float = 0.0) -> tuple[float, dict]:
    """Mean of w_i * BCE(logit_i, y_i) + l2/2 * sum ||W||^2, and its gradient w.r.t. every param."""
    y = np.asarray(y, dtype=np.float64)
    w = np.asarray(w, dtype=np.float64)
    n = max(len(y), 1)
    z, acts = _forward(x, params)
    # stable BCE on logits: max(z, 0) - z*y + log(1 + exp(-|z|))
    bce = np.maximum(z, 0.0) - z * y + np.log1p(np.exp(-np.abs(z)))
    weights = [W for W, _ in layer_names(params)]
    # (np.square().sum(), not np.vdot: vdot wakes OpenBLAS's threads on every call, 10x slower on 2 cores)
    loss = float(np.sum(w * bce) / n + 0.5 * l2 * sum(np.square(params[W]).sum() for W in weights))

    # backward: dL/dz = w * (sigmoid(z) - y) / n, then chain through the layers
    delta = w * (expit(z) - y) / n                          # (n,)
    names = layer_names(params)
    grads = {"Wout": acts[-1].T @ delta, "bout": np.array([delta.sum()])}
    delta = np.outer(delta, params["Wout"])                 # (n, h_last): dL/d(ReLU output)
    for i in range(len(names) - 2, -1, -1):
        W, b = names[i]
        delta = delta * (acts[i + 1] > 0)                   # through the ReLU
        grads[W] = np.asarray(acts[i].T @ delta)            # (n_in_i, h_i); x.T @ delta stays sparse-friendly
        grads[b] = delta.sum(axis=0)
        if i > 0:
            delta = delta @ params[W].T                     # (n, h_{i-1})
    if l2:
        for W in weights:
            grads[W] += l2 * params[W]                      # grads[W] is a fresh array: safe in place
    return loss, grads


def class_weights(y, w=None) -> np.ndarray:
    """Per-sample factors giving each present class the same total weight (mean factor 1)."""
    y = np.asarray(y).astype(int)
    w = np.ones(len(y)) if w is None else np.asarray(w, dtype=np.float64)
    total = w.sum()
    classes = [c for c in (0, 1) if w[y == c].sum() > 0]
    out = np.ones(len(y))
    for c in classes:
        out[y == c] = total / (len(classes) * w[y == c].sum())
    return out


class Adam:
    """Adam optimiser; state (moments, step count) lives in the object, params are never mutated."""

    def __init__(self, lr: float, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8):
        self.lr, self.beta1, self.beta2, self.eps = lr, beta1, beta2, eps
        self.m: dict[str, np.ndarray] = {}
        self.v: dict[str, np.ndarray] = {}
        self.t = 0

    def step(self, params: dict, grads: dict) -> dict:
        self.t += 1
        new = {}
        for k, p in params.items():
            g = grads[k]
            if k not in self.m:
                self.m[k], self.v[k] = np.zeros_like(p), np.zeros_like(p)
            m, v = self.m[k], self.v[k]                      # our own state: updated in place (it is large)
            m *= self.beta1                                  # m = beta1 m + (1 - beta1) g
            m += (1 - self.beta1) * g
            v *= self.beta2                                  # v = beta2 v + (1 - beta2) g^2
            v += (1 - self.beta2) * np.square(g)
            # p - lr * m_hat / (sqrt(v_hat) + eps), with m_hat, v_hat the bias-corrected moments
            denom = np.sqrt(v / (1 - self.beta2 ** self.t))
            denom += self.eps
            new[k] = p - (self.lr / (1 - self.beta1 ** self.t)) * m / denom
        return new


# -----------------------------------------------------------------------------
# tasks and meta-learning

def pseudo_domains(template_vecs: sp.csr_matrix, sequences: list[np.ndarray], labels, k: int, seed: int) -> list[np.ndarray]:
    """Split one source system's sessions into <= k pseudo-domains that differ in templates, each with both classes.

    Sessions of one system often share most templates, so after merging there may be fewer than k domains
    (even one: then maml_train degenerates to plain training with a one-step look-ahead)."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels).astype(int)
    T, V = template_vecs.shape
    k = max(1, min(k, T))
    # 1) embed templates densely (or via truncated SVD when T x V is large) and cluster them
    if T * V <= 4_000_000:
        Z = template_vecs.toarray()
    else:
        r = min(32, min(T, V) - 1)
        U, s, _ = svds(sp.csr_matrix(template_vecs, dtype=np.float64), k=r, v0=rng.standard_normal(min(T, V)))
        Z = U * s                                                        # (T, r)
    uniq = np.unique(Z, axis=0)
    k = min(k, len(uniq))
    init = uniq[rng.choice(len(uniq), size=k, replace=False)]            # distinct starting centroids
    with warnings.catch_warnings():                                      # empty clusters are dropped below
        warnings.simplefilter("ignore")
        _, tmpl_cluster = kmeans2(Z, init, minit="matrix")               # (T,) cluster of each template
    # 2) each session goes to the cluster holding most of its distinct templates (empty session -> 0)
    B = incidence(sequences, T)                                          # (n, T)
    onehot = sp.csr_matrix((np.ones(T), (np.arange(T), tmpl_cluster)), shape=(T, k))
    votes = (B @ onehot).toarray()                                       # (n, k)
    sess_cluster = votes.argmax(axis=1)
    # 3) domains = non-empty clusters; merge any lacking a class into its nearest neighbour (by centroid)
    domains = {c: np.flatnonzero(sess_cluster == c) for c in range(k) if np.any(sess_cluster == c)}
    members = {c: np.flatnonzero(tmpl_cluster == c) for c in domains}    # templates behind each domain

    def both(idx):
        return np.any(labels[idx] == 1) and np.any(labels[idx] == 0)

    def centre(d):
        return Z[members[d]].mean(axis=0) if len(members[d]) else np.zeros(Z.shape[1])

    while len(domains) > 1:
        bad = [c for c in domains if not both(domains[c])]
        if not bad:
            break
        c = min(bad, key=lambda c: (len(domains[c]), c))                 # smallest offender first
        others = [d for d in domains if d != c]
        near = min(others, key=lambda d: (np.sum((centre(d) - centre(c)) ** 2), d))
        domains[near] = np.sort(np.concatenate([domains[near], domains.pop(c)]))
        members[near] = np.concatenate([members[near], members.pop(c)])
    return [domains[c] for c in sorted(domains)]


def _stratified_split(by_class: list[np.ndarray], support_size: int, query_size: int, rng: np.random.Generator):
    """Disjoint support/query index sets, each about half anomalies when the task has enough of them."""
    support, query = [], []
    for idx in by_class:                                 # indices of the normal, then the anomalous sessions
        if len(idx) == 0:
            continue
        idx = rng.permutation(idx)
        s = min(support_size // 2, max(1, len(idx) // 2))
        q = min(query_size // 2, len(idx) - s)
        support.append(idx[:s])
        query.append(idx[s:s + q])
    return np.concatenate(support), np.concatenate(query)


def maml_train(domains: list[tuple], config: MetaConfig, progress=None) -> dict:
    """First-order MAML over tasks [(X csr (n_d, D), y (n_d,)), ...]; returns the meta-learned params."""
    rng = np.random.default_rng(config.seed)
    n_in = domains[0][0].shape[1]
    if any(X.shape[1] != n_in for X, _ in domains):
        raise ValueError("all domains must have the same number of features")
    tasks = [(X, y, [np.flatnonzero(y == 0), np.flatnonzero(y == 1)])
             for X, y in ((X, np.asarray(y).astype(int)) for X, y in domains) if len(y) >= 2]
    if not tasks:
        raise ValueError("maml_train needs at least one domain with two or more sessions")
    params = init_params(n_in, config.hidden, rng)
    opt = Adam(config.meta_lr)
    every = max(1, config.meta_iters // 10)
    for it in range(config.meta_iters):
        meta_grads = {k: np.zeros_like(v) for k, v in params.items()}
        query_loss = 0.0
        for X, y, by_class in tasks:
            support, query = _stratified_split(by_class, config.support_size, config.query_size, rng)
            Xs, ys, Xq, yq = X[support], y[support], X[query], y[query]
            # inner loop: adapt to the task's support set, building new fast_params each step
            fast_params = params
            for _ in range(config.inner_steps):
                _, g = loss_and_grads(Xs, ys, class_weights(ys), fast_params, config.l2)
                fast_params = {k: fast_params[k] - config.inner_lr * g[k] for k in fast_params}
            # outer: query gradient at the adapted weights (first-order: applied to the meta-weights as is)
            loss, g = loss_and_grads(Xq, yq, class_weights(yq), fast_params, config.l2)
            query_loss += loss / len(tasks)
            for k in meta_grads:
                meta_grads[k] += g[k]
        meta_grads = {k: g / len(tasks) for k, g in meta_grads.items()}
        params = opt.step(params, meta_grads)
        if progress is not None and ((it + 1) % every == 0 or it + 1 == config.meta_iters):
            progress(f"meta-iter {it + 1}/{config.meta_iters}: query loss {query_loss:.4f}")
    return params


def fine_tune(params: dict, X, y, w, config: MetaConfig, seed: int | None = None) -> dict:
    """Minibatch Adam on BCE weighted by w (pseudo-label confidences) times class balancing, for
    finetune_epochs passes or finetune_min_steps minibatches, whichever is more; returns new params."""
    rng = np.random.default_rng(config.seed if seed is None else seed)
    y = np.asarray(y).astype(int)
    w = np.asarray(w, dtype=np.float64)
    w = w * class_weights(y, w)                       # zero-weight samples count for nothing, not even here
    opt = Adam(config.finetune_lr)
    steps_per_epoch = -(-len(y) // config.batch_size)  # ceil
    epochs = max(config.finetune_epochs, -(-config.finetune_min_steps // max(steps_per_epoch, 1)))
    for _ in range(epochs):
        order = rng.permutation(len(y))
        for start in range(0, len(y), config.batch_size):
            batch = order[start:start + config.batch_size]
            _, g = loss_and_grads(X[batch], y[batch], w[batch], params, config.l2)
            params = opt.step(params, g)
    return params


# -----------------------------------------------------------------------------
# persistence: one .npz, arrays + a JSON header, never pickle

def _digest(params: dict, config: dict | None = None) -> str:
    """sha256 of the arrays (names, shapes, bytes) and of the config's canonical JSON: an edit anywhere shows."""
    h = hashlib.sha256()
    for k in sorted(params):
        a = np.ascontiguousarray(params[k], dtype=np.float64)
        h.update(f"{k}:{a.shape};".encode())
        h.update(a.tobytes())
    if config is not None:
        h.update(json.dumps(config, sort_keys=True).encode())
    return h.hexdigest()


def save(path, params: dict, config: dict) -> None:
    """Write params and config (JSON-able dict) to one .npz at exactly `path` (atomically)."""
    header = {"format": FORMAT, "version": VERSION, "sha256": _digest(params, config), "config": config}
    arrays = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
    arrays["__config__"] = np.array(json.dumps(header, sort_keys=True))   # 0-d unicode array
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:                   # a file object: numpy must not append ".npz"
            np.savez(f, **arrays)
        os.replace(tmp, path)                        # readers never see a half-written model
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load(path) -> tuple[dict, dict]:
    """Read (params, config) written by `save`; raises ValueError naming the file if it is not a valid model."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        header = json.loads(str(arrays.pop("__config__")[()]))
    except Exception as e:  # OSError, zipfile.BadZipFile, EOFError, JSON errors... from a bad file
        raise ValueError(f"{path}: not a readable fusionlog model ({type(e).__name__}: {e})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ValueError(f"{path}: not a fusionlog model (wrong format field)")
    if header.get("version") != VERSION:
        raise ValueError(f"{path}: a model of format version {header.get('version')!r}; this fusionlog reads "
                         f"version {VERSION} only: fit it again with 'fusionlog run'")
    if not isinstance(header.get("config"), dict) or any(a.dtype.kind != "f" for a in arrays.values()):
        raise ValueError(f"{path}: malformed model (config not a dict or non-float arrays)")
    if header.get("sha256") != _digest(arrays, header["config"]):
        raise ValueError(f"{path}: model does not match its checksum (file damaged or edited)")
    params = {k: a.astype(np.float64) for k, a in arrays.items()}
    _check_params(params, path)
    return params, header["config"]


def _check_params(params: dict, path) -> None:
    """Shapes must chain W1 -> ... -> Wout; everything finite."""
    names = layer_names(params)
    expected = {n for pair in names for n in pair}
    if set(params) != expected:
        raise ValueError(f"{path}: unexpected parameter names {sorted(params)}")
    width = params[names[0][0]].shape[0] if names[0][0] != "Wout" else params["Wout"].shape[0]
    for W, b in names[:-1]:
        if params[W].ndim != 2 or params[W].shape[0] != width or params[b].shape != (params[W].shape[1],):
            raise ValueError(f"{path}: inconsistent shapes at {W}/{b}")
        width = params[W].shape[1]
    if params["Wout"].shape != (width,) or params["bout"].shape != (1,):
        raise ValueError(f"{path}: inconsistent shapes at Wout/bout")
    if not all(np.all(np.isfinite(v)) for v in params.values()):
        raise ValueError(f"{path}: non-finite parameters")
