"""The small model (SM) of FusionLog and its system-agnostic meta-learning (Zhao et al., arXiv 2511.05878,
Sec. 3.3): an MLP meta-learned by MAML with each labeled source system as one task, so that it serves the
target's general logs directly; the proprietary branch (distill.py) later fine-tunes it with `fine_tune`.

Departures (README): first-order MAML, not second-order; a few structural features (length, rarity, missing
common steps), measured against the session's own system (the target's rarity Good-Turing smoothed, its
windows missing no step), sit beside the paper's semantic vector; with a single source system the tasks are
pseudo-domains made by clustering its templates.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
from collections import Counter

import numpy as np
import scipy.sparse as sp
from scipy.cluster.vq import kmeans2
from scipy.sparse.linalg import svds
from scipy.special import expit

import router

# --------------------------------------------------------------------------------------------------
# input features: a session's semantic vector beside structural features relative to its system

STRUCTURAL_NAMES = ("log_lines", "log_distinct", "set_rarity", "mean_tmpl_rarity", "max_tmpl_rarity",
                    "missing_common", "length_z")   # the columns of structural_features
STRUCTURAL_WEIGHT = 1.0   # weight of the structural block beside the L2-normalised semantic block

def _set_key(reference_ids) -> str:
    """A template-set as sorted reference ids, the key of Reference.set_counts."""
    return ",".join(map(str, sorted(reference_ids)))

@dataclasses.dataclass
class Reference:
    """A system's unlabeled-session statistics, measured once and keyed by template text."""
    templates: list             # the reference's templates; index = reference id
    share: np.ndarray           # (R,) share of the reference sessions holding each template
    set_counts: dict            # "3,5,9" (sorted reference ids) -> sessions with exactly that template-set
    n: int                      # number of reference sessions
    max_lines: float            # the longest reference session, in lines
    max_distinct: float         # ... and in distinct templates
    length_median: float        # median of log1p(#lines)
    length_scale: float         # its robust spread (MAD, else std, else 1)
    windows: bool = False       # every session equally long: fixed windows, cut by count, not by operation

    @classmethod
    def measure(cls, templates: list[str], sequences: list[np.ndarray]) -> "Reference":
        """The statistics of these sessions (all of a system's unlabeled sessions)."""
        n = len(sequences)
        if n == 0:
            raise ValueError("a reference needs at least one session")
        B = router.incidence(sequences, len(templates))                        # (n, T) binary
        rows = np.split(B.indices, B.indptr[1:-1])                      # each session's distinct templates
        counts = dict(Counter(_set_key(row) for row in rows))           # template-set -> sessions
        ll = np.log1p([len(s) for s in sequences])
        med = float(np.median(ll))
        scale = 1.4826 * float(np.median(np.abs(ll - med)))
        if scale < 1e-9:                                                # most sessions equally long: std
            scale = float(ll.std()) if ll.std() > 1e-9 else 1.0
        return cls(list(templates), np.asarray(B.sum(axis=0)).ravel() / n, counts, n,
                   float(max(len(s) for s in sequences)), float(np.diff(B.indptr).max()), med, scale,
                   len({len(s) for s in sequences}) == 1)

    def to_dict(self) -> dict:
        """JSON-able form (the model file keeps the target's reference)."""
        return dict(dataclasses.asdict(self), share=self.share.tolist())

    @classmethod
    def from_dict(cls, d: dict) -> "Reference":
        """Inverse of to_dict."""
        return cls(**dict(d, share=np.asarray(d["share"], dtype=np.float64)))

def structural_features(templates: list[str], sequences: list[np.ndarray], ref: Reference,
                        smooth: bool = False) -> np.ndarray:
    """(n, F) features in [0, 1]; row i depends on session i and the reference only (unseen = rarest, or
    with `smooth`, Good-Turing: a template or set held by at most one session is as common as all such)."""
    n = len(sequences)
    if n == 0:
        return np.zeros((0, len(STRUCTURAL_NAMES)))
    ref_id = {t: i for i, t in enumerate(ref.templates)}
    to_ref = np.array([ref_id.get(t, -1) for t in templates], dtype=np.int64)   # (T,) -1 = never seen
    B = router.incidence(sequences, len(templates))                        # (n, T) binary
    lines = np.array([len(s) for s in sequences], dtype=np.float64)  # (n,)
    distinct = np.diff(B.indptr).astype(np.float64)                 # (n,)
    log_n = np.log(ref.n) if ref.n > 1 else 1.0                     # rarity scale: -log(1/n) / log(n) = 1

    def scaled_log(v, top):  # log1p(v) / log1p(top), at most 1: log_lines, log_distinct
        return np.minimum(np.log1p(v) / np.log1p(top), 1.0) if top > 0 else np.zeros(n)

    # template rarity: -log(share of reference sessions holding it) / log(n); 0 = in all, 1 = in one or none
    share = (np.where(to_ref >= 0, ref.share[np.maximum(to_ref, 0)], 0.0) if len(ref.share)
             else np.zeros(len(to_ref)))                             # (T,)
    if smooth:  # Good-Turing's unseen mass: templates held by one session, over the sessions
        once = max(np.sum(np.abs(ref.share * ref.n - 1) < 0.5), 1) / ref.n
        share = np.where(share * ref.n < 1.5, once, share)
    rarity = np.clip(-np.log(np.maximum(share, 1.0 / ref.n)) / log_n, 0.0, 1.0)   # (T,)
    mean_rarity = (B @ rarity) / np.maximum(distinct, 1.0)          # (n,) over its templates; 0 if empty
    max_rarity = B.multiply(rarity[None, :]).tocsr().max(axis=1).toarray().ravel()   # (n,)
    # set_rarity: the same for the reference sessions holding exactly this set of distinct templates
    sets = [to_ref[row] for row in np.split(B.indices, B.indptr[1:-1])]   # each session's reference ids
    set_count = np.array([0 if (ids < 0).any() else ref.set_counts.get(_set_key(ids), 0) for ids in sets],
                         dtype=np.float64)                          # (n,)
    if smooth:  # ... and likewise for template-sets held by at most one session
        set_count = np.where(set_count <= 1, max(sum(c == 1 for c in ref.set_counts.values()), 1), set_count)
    set_rarity = np.clip(-np.log(np.maximum(set_count, 1.0) / ref.n) / log_n, 0.0, 1.0)
    # missing_common: the share of the reference's common templates (in >= 50% of its sessions) it lacks
    common = [] if smooth and ref.windows else np.flatnonzero(ref.share >= 0.5)   # target windows miss none
    held = np.isin(to_ref, common).astype(np.float64)               # (T,) this template is a common one
    missing = (len(common) - B @ held) / len(common) if len(common) else np.zeros(n)
    # length_z: robust z-score of log1p(#lines) vs the reference's median, clipped to +-3, -> [0, 1]
    length_z = (np.clip((np.log1p(lines) - ref.length_median) / ref.length_scale, -3.0, 3.0) + 3.0) / 6.0
    return np.column_stack([scaled_log(lines, ref.max_lines), scaled_log(distinct, ref.max_distinct),
                            set_rarity, mean_rarity, max_rarity, missing, length_z])   # (n, F)

def session_features(sem: sp.csr_matrix, templates: list[str], sequences: list[np.ndarray],
                     ref: Reference, smooth: bool = False) -> sp.csr_matrix:
    """The small model's input: semantic session vectors (n, V) beside structural features -> (n, V + F)."""
    if sem.shape[0] != len(sequences):
        raise ValueError(f"sem has {sem.shape[0]} rows but there are {len(sequences)} sessions")
    struct = STRUCTURAL_WEIGHT * structural_features(templates, sequences, ref, smooth)   # (n, F)
    return sp.hstack([sp.csr_matrix(sem, dtype=np.float64), sp.csr_matrix(struct)], format="csr")


# --------------------------------------------------------------------------------------------------
# the MLP: params in a dict, forward(x, params) pure, backward by hand

def layer_names(params: dict) -> list[tuple[str, str]]:
    """[(W1, b1), (W2, b2), ..., (Wout, bout)] in forward order."""
    n_hidden = sum(1 for k in params if k.startswith("W") and k[1:].isdigit())
    return [(f"W{i}", f"b{i}") for i in range(1, n_hidden + 1)] + [("Wout", "bout")]

def init_params(n_in: int, hidden: tuple, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """He-initialised weights for n_in -> hidden... -> 1 logit; biases zero."""
    sizes, params = [n_in, *hidden], {}
    for i in range(len(hidden)):
        params[f"W{i + 1}"] = rng.standard_normal((sizes[i], sizes[i + 1])) * np.sqrt(2.0 / sizes[i])
        params[f"b{i + 1}"] = np.zeros(sizes[i + 1])
    params["Wout"] = rng.standard_normal(sizes[-1]) * np.sqrt(1.0 / sizes[-1])   # (h_last,)
    params["bout"] = np.zeros(1)                                                 # (1,)
    return params

def _forward(x, params):
    """Logits plus the activations the backward pass needs: acts[0] = x, acts[i] = ReLU output of layer i."""
    h, acts = x, [x]
    for W, b in layer_names(params)[:-1]:
        h = np.maximum(h @ params[W] + params[b], 0.0)   # (n, h_i); for csr x this is a sparse product
        acts.append(h)
    return np.asarray(h @ params["Wout"] + params["bout"]).ravel(), acts   # logits (n,)

def forward(x, params: dict) -> np.ndarray:
    """Logits (n,) of the MLP; x is (n, n_in) csr or dense. Pure: params are not modified."""
    return _forward(x, params)[0]

def predict_proba(X, params: dict) -> np.ndarray:
    """P(anomalous) per session, (n,) in [0, 1]."""
    return expit(forward(X, params))

def loss_and_grads(x, y, w, params: dict, l2: float = 0.0) -> tuple[float, dict]:
    """Mean of w_i * BCE(logit_i, y_i) + l2/2 * sum ||W||^2, and its gradient w.r.t. every param."""
    y, w = np.asarray(y, dtype=np.float64), np.asarray(w, dtype=np.float64)
    n = max(len(y), 1)
    z, acts = _forward(x, params)
    bce = np.maximum(z, 0.0) - z * y + np.log1p(np.exp(-np.abs(z)))   # stable BCE on logits
    names = layer_names(params)
    loss = float(np.sum(w * bce) / n + 0.5 * l2 * sum(np.square(params[W]).sum() for W, _ in names))
    # backward: dL/dz = w * (sigmoid(z) - y) / n, then chain through the layers
    delta = w * (expit(z) - y) / n                          # (n,)
    grads = {"Wout": acts[-1].T @ delta, "bout": np.array([delta.sum()])}
    delta = np.outer(delta, params["Wout"])                 # (n, h_last): dL/d(ReLU output)
    for i in range(len(names) - 2, -1, -1):
        W, b = names[i]
        delta = delta * (acts[i + 1] > 0)                   # through the ReLU
        grads[W] = np.asarray(acts[i].T @ delta)            # (n_in_i, h_i); x.T @ delta stays sparse-friendly
        grads[b] = delta.sum(axis=0)                        # (h_i,)
        if i > 0:
            delta = delta @ params[W].T                     # (n, h_{i-1})
    if l2:
        for W, _ in names:
            grads[W] += l2 * params[W]                      # grads[W] is a fresh array: safe in place
    return loss, grads

def class_weights(y) -> np.ndarray:
    """Per-sample factors giving each present class the same total weight (mean factor 1)."""
    y = np.asarray(y).astype(int)
    classes = [c for c in (0, 1) if (y == c).any()]
    out = np.ones(len(y))
    for c in classes:
        out[y == c] = len(y) / (len(classes) * (y == c).sum())
    return out

class Adam:
    """Adam optimiser; state (moments, step count) lives in the object, params are never mutated."""

    def __init__(self, lr: float, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8):
        self.lr, self.beta1, self.beta2, self.eps = lr, beta1, beta2, eps
        self.m, self.v, self.t = {}, {}, 0              # first and second moments per param, steps taken

    def step(self, params: dict, grads: dict) -> dict:
        """One update: new params from these gradients."""
        self.t, new = self.t + 1, {}
        if self.t == 1:                                      # the moments start at zero
            self.m, self.v = ({k: np.zeros_like(p) for k, p in params.items()} for _ in range(2))
        for k, p in params.items():
            m, v = self.m[k], self.v[k]                      # our own state: updated in place
            m *= self.beta1                                  # m = beta1 m + (1 - beta1) g
            m += (1 - self.beta1) * grads[k]
            v *= self.beta2                                  # v = beta2 v + (1 - beta2) g^2
            v += (1 - self.beta2) * np.square(grads[k])
            # p - lr * m_hat / (sqrt(v_hat) + eps), with m_hat, v_hat the bias-corrected moments
            denom = np.sqrt(v / (1 - self.beta2 ** self.t))
            denom += self.eps
            new[k] = p - (self.lr / (1 - self.beta1 ** self.t)) * m / denom
        return new


# --------------------------------------------------------------------------------------------------
# meta-learning: tasks, first-order MAML over them, then fine-tuning on pseudo-labels

@dataclasses.dataclass
class MetaConfig:
    """What a user may change about the small model and its training."""
    hidden: tuple = (64, 32)    # widths of the ReLU layers
    inner_lr: float = 0.1       # alpha: SGD step of the inner (task) adaptation
    meta_lr: float = 1e-3       # beta: Adam step on the meta-weights
    inner_steps: int = 1        # SGD steps of the inner adaptation
    meta_iters: int = 300       # meta-updates, each over every task
    finetune_lr: float = 1e-3   # Adam step of fine-tuning on pseudo-labels
    finetune_epochs: int = 5    # passes over the pseudo-labeled sessions (at least FINETUNE_MIN_STEPS steps)
    seed: int = 0               # every random choice (init, task sampling, batches) flows from it

    @classmethod
    def from_dict(cls, d: dict) -> "MetaConfig":
        """From a JSON-loaded dict: unknown keys ignored, lists back to tuples."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in known})

SUPPORT_SIZE, QUERY_SIZE = 32, 64   # sessions in a task's support and query sets
FINETUNE_MIN_STEPS, BATCH_SIZE = 100, 128   # fine-tuning: at least this many steps, of minibatches this big
L2 = 1e-4                           # weight decay on the weight matrices (not the biases)

def pseudo_domains(template_vecs: sp.csr_matrix, sequences: list[np.ndarray], labels, k: int,
                   seed: int) -> list[np.ndarray]:
    """Up to k tasks of one system: its sessions grouped by template cluster, each with both classes."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels).astype(int)
    T, V = template_vecs.shape
    k = max(1, min(k, T))
    # 1) embed the templates densely (by truncated SVD when T x V is large) and cluster them
    if T * V <= 4_000_000:
        Z = template_vecs.toarray()                                      # (T, V)
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
    onehot = sp.csr_matrix((np.ones(T), (np.arange(T), tmpl_cluster)), shape=(T, k))   # (T, k)
    sess_cluster = (router.incidence(sequences, T) @ onehot).toarray().argmax(axis=1)  # (n,) most votes
    # 3) a cluster lacking a class merges into its nearest by centroid (so fewer than k may remain, even one)
    domains = {c: np.flatnonzero(sess_cluster == c) for c in range(k) if np.any(sess_cluster == c)}
    members = {c: np.flatnonzero(tmpl_cluster == c) for c in domains}    # templates behind each domain
    def centre(d):  # the mean vector of the domain's templates
        return Z[members[d]].mean(axis=0) if len(members[d]) else np.zeros(Z.shape[1])
    while len(domains) > 1:
        bad = [c for c, idx in domains.items() if not (np.any(labels[idx] == 1) and np.any(labels[idx] == 0))]
        if not bad:
            break
        c = min(bad, key=lambda c: (len(domains[c]), c))                 # smallest offender first
        near = min((d for d in domains if d != c), key=lambda d: (np.sum((centre(d) - centre(c)) ** 2), d))
        domains[near] = np.sort(np.concatenate([domains[near], domains.pop(c)]))
        members[near] = np.concatenate([members[near], members.pop(c)])
    return [domains[c] for c in sorted(domains)]

def support_query(X, y, by_class: list[np.ndarray], rng: np.random.Generator) -> tuple[tuple, tuple]:
    """A task's disjoint support and query sets (X, y), each about half anomalies when it has enough."""
    support, query = [], []
    for idx in by_class:                                 # indices of the normal, then the anomalous sessions
        if len(idx) == 0:
            continue
        idx = rng.permutation(idx)
        s = min(SUPPORT_SIZE // 2, max(1, len(idx) // 2))  # half the class, at least one
        q = min(QUERY_SIZE // 2, len(idx) - s)
        support.append(idx[:s])
        query.append(idx[s:s + q])
    support, query = np.concatenate(support), np.concatenate(query)
    return (X[support], y[support]), (X[query], y[query])

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
    params = init_params(n_in, config.hidden, rng)       # theta, the meta-weights
    opt = Adam(config.meta_lr)
    every = max(1, config.meta_iters // 10)
    for it in range(config.meta_iters):
        meta_grads = {k: np.zeros_like(v) for k, v in params.items()}
        query_loss = 0.0
        for X, y, by_class in tasks:
            (Xs, ys), (Xq, yq) = support_query(X, y, by_class, rng)
            # inner loop: theta' = theta' - inner_lr * grad L_support(theta'), from theta' = theta
            fast_params = params
            for _ in range(config.inner_steps):
                _, g = loss_and_grads(Xs, ys, class_weights(ys), fast_params, L2)
                fast_params = {k: fast_params[k] - config.inner_lr * g[k] for k in fast_params}
            # outer: the query gradient at theta' (first order: applied to theta as it is)
            loss, g = loss_and_grads(Xq, yq, class_weights(yq), fast_params, L2)
            query_loss += loss / len(tasks)
            for k in meta_grads:
                meta_grads[k] += g[k]
        params = opt.step(params, {k: g / len(tasks) for k, g in meta_grads.items()})  # mean over tasks
        if progress is not None and ((it + 1) % every == 0 or it + 1 == config.meta_iters):
            progress(f"meta-iter {it + 1}/{config.meta_iters}: query loss {query_loss:.4f}")
    return params

def fine_tune(params: dict, X, y, w, config: MetaConfig) -> dict:
    """Minibatch Adam on BCE weighted by w (pseudo-label confidences), not class-balanced: the SM takes the
    pseudo-labels' share of anomalies as its prior, which its 0.5 threshold then respects. New params."""
    rng = np.random.default_rng(config.seed)
    y, w = np.asarray(y).astype(int), np.asarray(w, dtype=np.float64)
    opt = Adam(config.finetune_lr)
    epochs = max(config.finetune_epochs, -(-FINETUNE_MIN_STEPS // max(-(-len(y) // BATCH_SIZE), 1)))  # ceil
    for _ in range(epochs):
        order = rng.permutation(len(y))
        for start in range(0, len(y), BATCH_SIZE):
            batch = order[start:start + BATCH_SIZE]
            _, g = loss_and_grads(X[batch], y[batch], w[batch], params, L2)
            params = opt.step(params, g)
    return params


# --------------------------------------------------------------------------------------------------
# persistence: one .npz of float arrays and a JSON header with a digest, never pickle

FORMAT, VERSION = "fusionlog-model", 2  # 2: the target's Reference is saved

def _digest(params: dict, config: dict) -> str:
    """sha256 of the arrays (names, shapes, bytes) and the config's canonical JSON: an edit anywhere shows."""
    h = hashlib.sha256()
    for k in sorted(params):
        a = np.ascontiguousarray(params[k], dtype=np.float64)
        h.update(f"{k}:{a.shape};".encode() + a.tobytes())
    h.update(json.dumps(config, sort_keys=True).encode())
    return h.hexdigest()

def save(path, params: dict, config: dict) -> None:
    """Write params and config (JSON-able dict) to one .npz at exactly `path` (atomically)."""
    header = {"format": FORMAT, "version": VERSION, "sha256": _digest(params, config), "config": config}
    arrays = {**{k: np.asarray(v, dtype=np.float64) for k, v in params.items()},
              "__config__": np.array(json.dumps(header, sort_keys=True))}   # a 0-d unicode array
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:                   # a file object: numpy must not append ".npz"
            np.savez(f, **arrays)
        os.replace(tmp, path)                        # readers never see a half-written model
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)

def load(path) -> tuple[dict, dict]:
    """Read (params, config) written by `save`; a ValueError naming the file if it is not a valid model."""
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
    names = layer_names(params)           # names and shapes as init_params makes them, every value finite
    widths = [params[W].shape[0] if W in params and params[W].ndim else -1 for W, _ in names]  # n_in, h1..
    want = {k: s for (W, b), n, h in zip(names, widths, widths[1:]) for k, s in ((W, (n, h)), (b, (h,)))}
    want.update(Wout=(widths[-1],), bout=(1,))
    shapes = {k: a.shape for k, a in params.items()}
    if shapes != want or not all(np.isfinite(a).all() for a in params.values()):
        raise ValueError(f"{path}: malformed model (parameter names or shapes do not chain, or not finite)")
    return params, header["config"]
