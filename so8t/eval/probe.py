"""The linear-probe baseline: logistic regression on the frozen base model's hidden states.

What a fine-tune adds over the base model's own representation of a request: each decision's
prompt, exactly as the label is scored (:func:`so8t.inference.scoring.label_requests`: the rendered
prompt and ``判定:`` up to the first token in which the labels differ), goes once through the base
model's decoder (no LM head, float32, no gradients); the hidden states of a few layers
(:func:`probe_layers`) are pooled two ways (``last``: the last prompt position, where the model
decides; ``mean``: the mean over the prompt positions) and a multinomial logistic regression
(scikit-learn ``LogisticRegression``, lbfgs, ``class_weight="balanced"``, on features standardised
with a ``StandardScaler`` fitted on train) is fitted on the train decisions for every
``(layer, pooling, C)`` of the grid (Alain and Bengio 2016, "Understanding intermediate layers using
linear classifier probes", https://arxiv.org/abs/1610.01644). The point with the highest val
macro-F1 scores every test decision; macro-F1 and accuracy get 95% percentile bootstrap intervals
(:func:`so8t.eval.metrics.bootstrap_interval`).

The splits are think-format's, grouped by template (``group``): a test template is never in the
data the probe is fitted or selected on (:func:`check_templates` refuses otherwise). The probe
reads only ``models/base`` and ``data/formatted``, so training runs never recompute it; the
evaluate stage pairs its test predictions with every row's (``<row>.decision.probe_gain``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from so8t.eval.metrics import bootstrap_interval, classification_report, macro_f1_indices
from so8t.inference import HFBackend, InferenceError, label_requests
from so8t.io import DataError
from so8t.schema import DECISIONS, Task

#: Pooling of a prompt's hidden states: the last prompt position, or the mean over the prompt positions.
POOLINGS: tuple[str, ...] = ("last", "mean")

#: lbfgs iterations per fit (standardised features converge in a few hundred; a fit that does not
#: is marked ``converged: false`` in the grid).
MAX_ITER = 5000
#: Most ``C`` values :func:`select` tries beyond each end of ``probe.c_grid`` to bracket the best one.
MAX_C_EXTENSIONS = 3

#: Fields every decision row of ``data/formatted/*.jsonl`` needs here.
REQUIRED_FIELDS: tuple[str, ...] = ("id", "prompt_text", "decision", "group")

Progress = Callable[[int], None]


# --------------------------------------------------------------------------- data


def decision_rows(rows: list[dict], path: str | Path) -> list[dict]:
    """The decision examples (``task == "decision"``) of one formatted split, sorted by id.

    Args:
        rows: the split's rows (``data/formatted/<split>.jsonl``).
        path: the file they came from (named in errors).

    Raises:
        DataError: a decision row lacks ``id``, ``prompt_text``, ``decision`` or ``group``, or its
            ``decision`` is not one of ALLOW / ESCALATION / DENY.
    """
    out = []
    for i, r in enumerate(rows, start=1):
        if r.get("task") != Task.DECISION.value:
            continue
        missing = [f for f in REQUIRED_FIELDS if not r.get(f)]
        if missing:
            raise DataError(f"{path}:{i}: decision row {r.get('id')!r} has no {missing} (rerun think-format)")
        if r["decision"] not in DECISIONS:
            raise DataError(f"{path}:{i}: decision row {r['id']!r}: label {r['decision']!r} is not one of {list(DECISIONS)}")
        out.append(r)
    return sorted(out, key=lambda r: r["id"])


def check_templates(splits: dict[str, list[dict]]) -> dict[str, int]:
    """Refuse splits that share a template (``group``): the probe is fitted on ``train``, selected on
    ``val`` and scored on ``test``, so no test template may be in train or val (nor a val one in train).

    Returns:
        ``{split: number of templates}``.

    Raises:
        DataError: a template in two splits (naming a few of them).
    """
    groups = {s: {r["group"] for r in rows} for s, rows in splits.items()}
    for a, b in (("train", "test"), ("val", "test"), ("train", "val")):
        shared = sorted(groups.get(a, set()) & groups.get(b, set()))
        if shared:
            raise DataError(
                f"data/formatted: {len(shared)} template(s) in both {a} and {b} (e.g. {shared[:3]}); "
                "the splits must be grouped by template (rerun think-format)"
            )
    return {s: len(g) for s, g in groups.items()}


def prompt_ids(backend, rows: list[dict], max_length: int | None = None) -> list[list[int]]:
    """Token ids the model sees before it emits a decision label, one list per row.

    The shared token prefix of ``prompt_text + "判定: " + L`` over the labels ``L``, as
    :func:`so8t.inference.scoring.label_requests` builds it for scoring: the rendered prompt and the
    ``判定:`` prefix (with the following space where the tokenizer keeps it apart from the labels).

    Args:
        backend: anything with ``tokenize(text) -> list[int]`` (an :class:`HFBackend`).
        max_length: the longest allowed prompt (tokens), or ``None``.

    Raises:
        DataError: a prompt longer than ``max_length`` (naming the row and ``probe.max_length``).
    """
    prefixes = [prefix for prefix, _ in label_requests(backend, [r["prompt_text"] for r in rows])]
    for r, p in zip(rows, prefixes):
        if max_length is not None and len(p) > max_length:
            raise DataError(
                f"decision {r['id']!r}: its prompt has {len(p)} tokens, more than probe.max_length = {max_length}"
            )
    return prefixes


# --------------------------------------------------------------------------- features


def probe_layers(n_layers: int, stride: int) -> list[int]:
    """Hidden-state indices probed: every ``stride``-th decoder layer and the last one.

    Indices follow Hugging Face's ``hidden_states`` (0 = the embeddings, ``i`` = the output of
    decoder layer ``i``, ``n_layers`` = the final, normalised state):
    ``probe_layers(18, 4) == [4, 8, 12, 16, 18]``.

    Raises:
        ValueError: ``n_layers`` or ``stride`` below 1.
    """
    if n_layers < 1 or stride < 1:
        raise ValueError(f"probe_layers: n_layers and stride must be >= 1, got {n_layers}, {stride}")
    return sorted(set(range(stride, n_layers + 1, stride)) | {n_layers})


@torch.no_grad()
def hidden_features(
    model,
    prompts: Sequence[Sequence[int]],
    layers: Sequence[int],
    poolings: Sequence[str] = POOLINGS,
    batch_size: int = 16,
    pad_id: int = 0,
    on_progress: Progress | None = None,
) -> dict[tuple[int, str], np.ndarray]:
    """Pooled hidden states of the frozen decoder over each prompt.

    Only the decoder runs (``model.get_decoder()``, no LM head), in float32 without gradients, on
    batches of prompts of similar length (sorted by length, right padding, an attention mask; a
    causal model's states at real positions do not depend on the padding after them).

    Args:
        model: a Hugging Face causal LM (its parameters' device and dtype are used as they are).
        prompts: token ids per prompt (non-empty).
        layers: ``hidden_states`` indices (:func:`probe_layers`).
        poolings: ``last`` (the state at the last prompt position) and / or ``mean`` (the mean over
            the prompt positions, padding excluded).
        batch_size: prompts per forward pass.
        pad_id: the id written at padded positions (masked out).
        on_progress: called with the number of prompts done after each batch.

    Returns:
        ``{(layer, pooling): (N, H) float32 array}``, rows in the order of ``prompts``.

    Raises:
        ValueError: an empty prompt, an unknown pooling or a layer outside the model's hidden states.
    """
    bad = [p for p in poolings if p not in POOLINGS]
    if bad:
        raise ValueError(f"hidden_features: unknown pooling(s) {bad}; choose from {list(POOLINGS)}")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("hidden_features: empty prompt")
    decoder = model.get_decoder()
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    out: dict[tuple[int, str], np.ndarray] = {}
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(idx):
            ids[row, : len(prompts[i])] = torch.as_tensor(list(prompts[i]))
            mask[row, : len(prompts[i])] = 1
        ids, mask = ids.to(device), mask.to(device)
        states = decoder(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False).hidden_states
        lengths = mask.sum(1)
        for layer in layers:
            if not 0 <= layer < len(states):
                raise ValueError(f"hidden_features: layer {layer} outside the model's {len(states)} hidden states")
            h = states[layer].float()
            for pooling in poolings:
                if pooling == "last":
                    pooled = h[torch.arange(len(idx), device=device), lengths - 1]
                else:
                    m = mask[..., None].to(h.dtype)
                    pooled = (h * m).sum(1) / lengths[:, None].to(h.dtype)
                arr = out.setdefault((layer, pooling), np.zeros((len(prompts), h.shape[-1]), dtype=np.float32))
                arr[idx] = pooled.cpu().numpy()
        if on_progress is not None:
            on_progress(len(idx))
    return out


# --------------------------------------------------------------------------- the probe


def _classifier(c: float):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    # lbfgs fits the multinomial (softmax) model for 3 classes.
    return make_pipeline(StandardScaler(), LogisticRegression(C=c, class_weight="balanced", max_iter=MAX_ITER))


def _fit(x: np.ndarray, y: np.ndarray, c: float):
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    clf = _classifier(c)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # reported per grid point instead
        clf.fit(x, y)
    return clf


def _macro_f1(y: np.ndarray, pred: np.ndarray) -> float:
    return macro_f1_indices(y, pred)(np.arange(len(y)))


def select(
    train: dict[tuple[int, str], np.ndarray],
    y_train: np.ndarray,
    val: dict[tuple[int, str], np.ndarray],
    y_val: np.ndarray,
    c_grid: Sequence[float],
    max_extensions: int = MAX_C_EXTENSIONS,
) -> tuple[list[dict], dict]:
    """Fit every ``(layer, pooling, C)`` on train and score it on val, then bracket the best ``C``.

    A best ``C`` on the edge of the values tried is not a fit, only a bound: while the best
    point's ``C`` is the smallest (largest) tried at its layer and pooling, ``C / 10`` (``C * 10``)
    is fitted there too, at most ``max_extensions`` times per side. An extension replaces the
    best only when its val macro-F1 is strictly higher (a tie keeps the ``C`` inside the bracket).

    Args:
        train, val: :func:`hidden_features` of the train / val decisions (same keys).
        y_train, y_val: ``(N,)`` int label indices into ``DECISIONS``.
        c_grid: inverse regularisation strengths ``C`` (scikit-learn), each > 0.
        max_extensions: most extra ``C`` values fitted beyond each end of the grid.

    Returns:
        ``(grid, best)``: one row per point (``layer``, ``pooling``, ``C``, ``val_macro_f1``,
        ``val_accuracy``, ``converged``, ``extension``: fitted to bracket the best ``C``) and the
        best row: the highest val macro-F1, ties going to the smaller ``C``, then the earlier layer
        and pooling; with ``C_at_bound``: its ``C`` is still the smallest or largest tried at its
        layer and pooling after the extensions (the selection failed to bracket it).

    Raises:
        ValueError: an empty ``c_grid`` or a ``C`` that is not > 0.
    """
    if not c_grid or min(c_grid) <= 0:
        raise ValueError(f"probe.c_grid: needs values > 0, got {list(c_grid)}")

    def point(layer: int, pooling: str, c: float, extension: bool) -> dict:
        clf = _fit(train[(layer, pooling)], y_train, c)
        pred = clf.predict(val[(layer, pooling)])
        return {
            "layer": layer,
            "pooling": pooling,
            "C": float(c),
            "val_macro_f1": _macro_f1(y_val, pred),
            "val_accuracy": float(np.mean(pred == y_val)),
            "converged": int(np.max(clf[-1].n_iter_)) < MAX_ITER,
            "extension": extension,
        }

    grid, best = [], None
    for layer, pooling in sorted(train, key=lambda k: (k[0], POOLINGS.index(k[1]))):
        for c in sorted(c_grid):
            row = point(layer, pooling, c, False)
            grid.append(row)
            if best is None or row["val_macro_f1"] > best["val_macro_f1"] + 1e-12:
                best = row
    tried = sorted(float(c) for c in c_grid)
    for side, factor in ((0, 0.1), (-1, 10.0)):
        for _ in range(max_extensions):
            if best["C"] != tried[side]:
                break
            row = point(best["layer"], best["pooling"], tried[side] * factor, True)
            grid.append(row)
            tried = sorted(tried + [row["C"]])
            if row["val_macro_f1"] > best["val_macro_f1"] + 1e-12:
                best = row
    best = dict(best, C_at_bound=best["C"] in (tried[0], tried[-1]))
    return grid, best


def decision_scores(y: np.ndarray, pred: np.ndarray, confidence: float, n_resamples: int) -> dict:
    """Macro-F1 and accuracy of ``pred`` against ``y`` with percentile bootstrap intervals over examples.

    Returns:
        ``{"n", "macro_f1", "macro_f1_ci_low", "macro_f1_ci_high", "accuracy", "accuracy_ci_low",
        "accuracy_ci_high", "per_class", "confusion_matrix"}`` (as
        :func:`so8t.eval.task_metrics.decision_metrics` computes them for the rows; seed 0 resamples, so
        the same examples are resampled as for a row's intervals).
    """
    report = classification_report([DECISIONS[i] for i in y], [DECISIONS[i] for i in pred])
    f1_lo, f1_hi = bootstrap_interval(macro_f1_indices(y, pred), len(y), confidence, n_resamples)
    acc_lo, acc_hi = bootstrap_interval(lambda idx: float(np.mean(y[idx] == pred[idx])), len(y), confidence, n_resamples)
    return {
        "n": len(y),
        "macro_f1": report["macro_f1"],
        "macro_f1_ci_low": f1_lo,
        "macro_f1_ci_high": f1_hi,
        "accuracy": report["accuracy"],
        "accuracy_ci_low": acc_lo,
        "accuracy_ci_high": acc_hi,
        "per_class": report["per_class"],
        "confusion_matrix": report["confusion_matrix"],
    }


def run_probe(
    model,
    tokenizer,
    splits: dict[str, list[dict]],
    p,
    m,
    on_progress: Progress | None = None,
) -> dict:
    """The whole probe: features of every train, val and test decision, the grid on val, the test scores.

    Args:
        model: the frozen base model (Hugging Face causal LM; put in eval mode here).
        tokenizer: its tokenizer.
        splits: ``{"train", "val", "test"}`` decision rows (:func:`decision_rows`).
        p: the ``probe`` params section (``layer_stride``, ``poolings``, ``c_grid``, ``batch_size``,
            ``max_length``).
        m: the ``metrics`` params section (``confidence``, ``bootstrap_resamples``).
        on_progress: called with the number of prompts whose features are done.

    Returns:
        The content of ``reports/probe.json``: ``enabled``, ``probe.decision`` (test ``n``,
        ``macro_f1``, ``accuracy`` and their ``*_ci_low`` / ``*_ci_high``, per-class scores, the
        confusion matrix), the chosen ``layer`` / ``pooling`` / ``C`` and its ``val_macro_f1``, ``C_at_bound``
        (:func:`select` could not bracket ``C``),
        ``n_train`` / ``n_val`` / ``n_test``, ``templates`` per split, ``layers``, the ``grid``
        and ``predictions``: one ``{"id", "label", "pred", "probs" (ALLOW, ESCALATION, DENY)}`` per test
        decision, by id (a list: ``dvc metrics show`` lists a file's numbers and strings but not its
        lists, so the per-example rows stay out of it; :func:`so8t.eval.comparisons.load_probe` keys them).

    Raises:
        DataError: a split without decisions, a label missing from train, a template in two splits,
            or a prompt longer than ``probe.max_length``.
    """
    for name in ("train", "val", "test"):
        if not splits.get(name):
            raise DataError(f"data/formatted/{name}.jsonl: no decision examples for the probe")
    templates = check_templates(splits)
    y = {s: np.array([DECISIONS.index(r["decision"]) for r in rows], dtype=np.int64) for s, rows in splits.items()}
    absent = [DECISIONS[k] for k in range(len(DECISIONS)) if k not in set(y["train"].tolist())]
    if absent:
        raise DataError(f"data/formatted/train.jsonl: no train decision labelled {absent}; the probe needs every label")
    model.eval()
    backend = HFBackend.from_model(model, tokenizer)
    names = ("train", "val", "test")
    rows = [r for s in names for r in splits[s]]
    prompts = prompt_ids(backend, rows, p.max_length)
    layers = probe_layers(_n_layers(model), p.layer_stride)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    feats = hidden_features(model, prompts, layers, list(p.poolings), p.batch_size, pad, on_progress)
    bounds = np.cumsum([0] + [len(splits[s]) for s in names])
    part = {s: {k: v[bounds[i] : bounds[i + 1]] for k, v in feats.items()} for i, s in enumerate(names)}
    grid, best = select(part["train"], y["train"], part["val"], y["val"], p.c_grid)
    key = (best["layer"], best["pooling"])
    clf = _fit(part["train"][key], y["train"], best["C"])
    probs = clf.predict_proba(part["test"][key])
    probs = probs[:, np.argsort(clf.classes_)]  # columns in DECISIONS order (every label is in train)
    pred = probs.argmax(1)
    scores = decision_scores(y["test"], pred, m.confidence, m.bootstrap_resamples)
    return {
        "enabled": True,
        "probe": {"decision": scores},
        "layer": best["layer"],
        "pooling": best["pooling"],
        "C": best["C"],
        "C_at_bound": best["C_at_bound"],
        "val_macro_f1": best["val_macro_f1"],
        "n_train": len(splits["train"]),
        "n_val": len(splits["val"]),
        "n_test": len(splits["test"]),
        "templates": templates,
        "layers": layers,
        "interval": {"confidence": m.confidence, "n_resamples": m.bootstrap_resamples},
        "grid": grid,
        "predictions": [
            {"id": r["id"], "label": r["decision"], "pred": DECISIONS[int(k)], "probs": [round(float(v), 6) for v in pr]}
            for r, k, pr in zip(splits["test"], pred, probs)
        ],
    }


def _n_layers(model) -> int:
    """Decoder layers of a Hugging Face causal LM (its text config's ``num_hidden_layers``)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    n = getattr(config, "num_hidden_layers", None)
    if not n:
        raise InferenceError(f"{type(model).__name__}: its config has no num_hidden_layers to probe")
    return int(n)


def summary_line(result: dict) -> str:
    """One console line of :func:`run_probe`'s result."""
    d = result["probe"]["decision"]
    fmt = lambda v: "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"  # noqa: E731
    return (
        f"probe: layer {result['layer']}, {result['pooling']} pooling, C={result['C']:g}"
        f"{' (on the edge of the C values tried)' if result.get('C_at_bound') else ''} (val macro-F1 "
        f"{fmt(result['val_macro_f1'])}); test macro-F1 {fmt(d['macro_f1'])} [{fmt(d['macro_f1_ci_low'])}, "
        f"{fmt(d['macro_f1_ci_high'])}], accuracy {fmt(d['accuracy'])} (n={d['n']}; train {result['n_train']}, "
        f"val {result['n_val']})"
    )


__all__ = [
    "MAX_C_EXTENSIONS",
    "MAX_ITER",
    "POOLINGS",
    "check_templates",
    "decision_rows",
    "decision_scores",
    "hidden_features",
    "probe_layers",
    "prompt_ids",
    "run_probe",
    "select",
    "summary_line",
]
