"""Does SO8T help? The ablation grid as DVC experiments, and its table.

Variants (each the whole pipeline, ``dvc exp run`` of every stage, so test decisions, held-out
perplexity and the GGUF quantisation loss are measured):

=============  ======================================================================
``lora``       LoRA alone: ``train.so8t.enabled=false train.pet.enabled=false``
``so8t``       LoRA + trained SO(8) rotations, no PET
``pet``        LoRA + PET, no rotations
``so8t_pet``   LoRA + SO8T + PET (the default)
``hadamard``   the default with a fixed 8x8 Hadamard rotation per block, not trained
``random``     the default with fixed Haar-random SO(8) blocks drawn from the seed, not trained
=============  ======================================================================

each with ``seed=S`` for every seed asked for. Queue them, run them, then tabulate::

    python benchmarks/so8t_ablation.py queue --seeds 1 2 3     # dvc exp run --queue -n abl-<variant>-s<S> ...
    dvc queue start -j 1                                        # ~1 h per run on 2 CPU cores
    python benchmarks/so8t_ablation.py record                  # finished runs -> reports/ablation/*.json
    python benchmarks/so8t_ablation.py table [--out F.json]    # the records and `dvc exp show --json`

DVC keeps an experiment in local git refs (``refs/exps``) and its outputs in the local cache, so a
grid that takes longer than one machine's session would be lost with the checkout. ``record`` writes
each finished ``abl-<variant>-s<seed>`` run to ``reports/ablation/abl-<variant>-s<seed>.json``, a
small file committed to git: its flat metrics, the params that name its variant, the revision it
came from, the CPU it was recorded on (an experiment is recorded where it ran; a workspace run may
have been made elsewhere), its train speed, and its test decisions (id, label, prediction of the baked
F16 GGUF, Q8_0 and Q4_K_M). ``record --workspace`` records the workspace's own committed run (the
default's ``dvc repro``) under the variant and seed its ``params.yaml`` names, once ``dvc status``
says it is up to date.

Per variant the table gives the mean over seeds with a 95 % t interval (n = seeds) of: test
decision macro-F1 of the baked model (``baked.decision.macro_f1``), its held-out perplexity
(``baked.perplexity``), the quantisation loss of Q8_0 and Q4_K_M (GGUF perplexity minus the F16
GGUF's, ``f16.parity.perplexity_hf * f16.parity.perplexity_ratio``), their decision agreement with
the F16 GGUF (share of every test decision given the same label, ``<q>.parity.decision``) and the
train wall time; then
the paired difference of each variant against ``lora`` with the same seed (same data, same batches),
mean and 95 % t interval over the seeds. A difference whose interval holds 0 is "no difference".
A fixed rotation (``hadamard``, ``random``) is also paired with the trained default ``so8t_pet``: the
two differ in the rotation only, so that difference answers "is a trained rotation better than a
fixed one?". An invariant one (``hadamard_invariant``, ``random_invariant``) is also paired with
``pet``, the same function unrotated: does the rotation change quantisation loss? The default itself
is also paired with ``pet`` (SO8T's effect with PET on) and with ``so8t`` (PET's effect with SO8T
on), the simple effects of the 2x2 factorial.

A t interval needs two seeds. Within one seed, where both runs have recorded decisions, the table
also gives the paired difference of test macro-F1 against ``lora`` and every other reference above
(:func:`references`) with a percentile bootstrap over the test decisions
(:func:`so8t.eval.comparisons.paired_gain`, Koehn 2004): that interval holds the noise of the test
sample only, not the spread between seeds.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

VARIANTS: dict[str, list[str]] = {
    "lora": ["train.so8t.enabled=false", "train.pet.enabled=false"],
    "so8t": ["train.so8t.enabled=true", "train.pet.enabled=false"],
    "pet": ["train.so8t.enabled=false", "train.pet.enabled=true"],
    "so8t_pet": ["train.so8t.enabled=true", "train.pet.enabled=true"],
    "hadamard": ["train.so8t.enabled=true", "train.pet.enabled=true", "train.so8t.rotation=hadamard"],
    "random": ["train.so8t.enabled=true", "train.pet.enabled=true", "train.so8t.rotation=random"],
    "hadamard_invariant": ["train.so8t.enabled=true", "train.pet.enabled=true",
                           "train.so8t.rotation=hadamard_invariant"],
    "random_invariant": ["train.so8t.enabled=true", "train.pet.enabled=true", "train.so8t.rotation=random_invariant"],
}
#: The trained default; a fixed rotation (``hadamard``, ``random`` and their ``_invariant`` kinds)
#: differs from it in the rotation only (same PET, same data), so each is also paired with it: is a
#: trained rotation better than a fixed one?
TRAINED = "so8t_pet"
#: Fixed rotations with their inverse folded into ``v_proj`` (QuaRot): the model computes what
#: ``pet`` (LoRA + PET, no rotation) computes, and only the weights that are quantised differ.
INVARIANT_ROTATIONS = ("hadamard_invariant", "random_invariant")
FIXED_ROTATIONS = ("hadamard", "random", *INVARIANT_ROTATIONS)
#: What an invariant rotation is also paired with: the same model without the rotation.
UNROTATED = "pet"
#: The default is a 2x2 factorial cell (SO8T on/off x PET on/off), so it is also paired with each
#: one-factor run: ``so8t_pet - pet`` is SO8T's effect with PET on (the default's own question:
#: does adding rotations help?) and ``so8t_pet - so8t`` is PET's effect with SO8T on; against the
#: ``so8t - lora`` and ``pet - lora`` columns they show whether an effect depends on the other factor.
FACTORIAL = ("pet", "so8t")
NAME = re.compile(r"^abl-(?P<variant>[a-z0-9_]+)-s(?P<seed>\d+)$")
#: Columns: (label, function of the flat metrics of one run -> value or None).
COLUMNS = {
    "test macro-F1": lambda m: m.get("baked.decision.macro_f1"),
    "perplexity": lambda m: m.get("baked.perplexity"),
    "Q8_0 loss": lambda m: _quant_loss(m, "q8_0"),
    "Q4_K_M loss": lambda m: _quant_loss(m, "q4_k_m"),
    "Q8_0 agreement": lambda m: m.get("q8_0.parity.decision"),
    "Q4_K_M agreement": lambda m: m.get("q4_k_m.parity.decision"),
    "train s": lambda m: m.get("train_seconds"),
}


def _quant_loss(m: dict, name: str) -> float | None:
    """Held-out perplexity of GGUF ``name`` minus that of the F16 GGUF (llama.cpp both)."""
    q, hf, ratio = m.get(f"{name}.perplexity"), m.get("f16.parity.perplexity_hf"), m.get("f16.parity.perplexity_ratio")
    return None if None in (q, hf, ratio) else q - hf * ratio


def queue_commands(seeds: list[int], variants: list[str]) -> list[list[str]]:
    """The ``dvc exp run --queue`` command of every (variant, seed), in seed-major order."""
    return [["dvc", "exp", "run", "--queue", "-n", f"abl-{v}-s{s}", "-S", f"seed={s}",
             *[a for o in VARIANTS[v] for a in ("-S", o)]] for s in seeds for v in variants]


def experiments_from_exp_show(data: list) -> dict[str, dict]:
    """Every ``abl-<variant>-s<seed>`` experiment of ``dvc exp show --json`` that has metrics.

    Args:
        data: the parsed output of ``dvc exp show --json`` (DVC 3: a list of baseline commits,
            each with ``experiments: [{"name", "revs": [{"rev", "name", "data": {"params",
            "metrics"}}]}]``).

    An experiment whose ``executor.state`` is not ``success`` (queued, running, failed) is left
    out: a running one shows the metrics its workspace copy started from, not its own.

    Returns:
        ``{name: {"rev", "baseline", "metrics", "performance", "params"}}``: ``metrics`` is the
        flat ``reports/metrics.json``, ``performance`` is ``reports/performance/train.json`` and
        ``params`` is the nested ``params.yaml`` of the run (``{}`` where DVC gave none).
    """
    found: dict[str, dict] = {}

    def visit(node, baseline: str | None) -> None:
        if isinstance(node, list):
            for x in node:
                visit(x, baseline)
            return
        if not isinstance(node, dict):
            return
        state = (node.get("executor") or {}).get("state")
        if state not in (None, "success"):  # queued, running, failed: the metrics are not the run's
            return
        name = str(node.get("name") or "")
        data = node.get("data")
        if NAME.match(name) and not node.get("error") and isinstance(data, dict) and data.get("metrics"):
            files = {path: (entry or {}).get("data") or {} for path, entry in data["metrics"].items()}
            found[name] = {
                "rev": node.get("rev"),
                "baseline": baseline,
                "metrics": next((v for k, v in files.items() if k.endswith("reports/metrics.json")), {}),
                "performance": next((v for k, v in files.items() if k.endswith("performance/train.json")), {}),
                "params": ((data.get("params") or {}).get("params.yaml") or {}).get("data") or {},
            }
        inner = node.get("rev") if node.get("experiments") else baseline
        for key in ("experiments", "revs"):
            visit(node.get(key), inner)

    visit(data, None)
    return found


def flat_run(metrics: dict, performance: dict) -> dict:
    """One run's flat metrics as the table reads them: ``reports/metrics.json`` plus ``train_seconds``."""
    return {**metrics, "train_seconds": (performance or {}).get("train_seconds")}


def runs_from_exp_show(data: list) -> dict[tuple[str, int], dict]:
    """``{(variant, seed): flat metrics}`` of the ``abl-<variant>-s<seed>`` experiments.

    Args:
        data: the parsed output of ``dvc exp show --json`` (see :func:`experiments_from_exp_show`).
            The metrics files' keys do not collide: ``reports/metrics.json`` is flat, the
            performance file adds ``train_seconds`` from ``reports/performance/train.json``.
    """
    runs: dict[tuple[str, int], dict] = {}
    for name, exp in experiments_from_exp_show(data).items():
        match = NAME.match(name)
        runs[(match["variant"], int(match["seed"]))] = flat_run(exp["metrics"], exp["performance"])
    return runs


# ---------------------------------------------------------------------------
# Records: finished runs kept in git, so the grid can span machines and sessions
# ---------------------------------------------------------------------------

RECORDS = Path("reports/ablation")
#: The params that tell the variants apart, at the values a variant that does not set them keeps.
VARIANT_KEYS = {"train.so8t.enabled": True, "train.pet.enabled": True, "train.so8t.rotation": "learned"}
#: The artifacts whose test decisions a record keeps (the F16 GGUF of the baked model, two quants).
ARTIFACTS = ("baked", "q8_0", "q4_k_m")
#: The fields of ``reports/performance/train.json`` a record keeps.
PERFORMANCE_KEYS = ("train_seconds", "seconds_per_step", "tokens_per_s", "threads", "peak_rss_bytes",
                    "steps_this_session", "resumed_from")


class RecordError(ValueError):
    """A run that cannot be recorded, or a record that cannot be read; the message names the run or file."""


def _get(params: dict, dotted: str, where: str):
    node = params
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            raise RecordError(f"{where}: params.yaml has no key {dotted}")
        node = node[part]
    return node


def variant_setting(variant: str) -> dict:
    """The ``VARIANT_KEYS`` values of ``variant``: its ``-S`` overrides over the default's."""
    setting = dict(VARIANT_KEYS)
    for override in VARIANTS[variant]:
        key, value = override.split("=", 1)
        setting[key] = yaml.safe_load(value)
    return setting


def variant_of(params: dict, where: str = "params.yaml") -> str:
    """The variant whose setting the nested ``params`` (``params.yaml``'s shape) has.

    The rotation kind counts only with ``train.so8t.enabled`` true (without rotations it has nothing
    to choose).

    Raises:
        RecordError: a key is missing, or the values match no variant (both named, with ``where``).
    """
    def key(setting: dict) -> tuple:
        on = bool(setting["train.so8t.enabled"])
        return on, bool(setting["train.pet.enabled"]), setting["train.so8t.rotation"] if on else None

    got = {k: _get(params, k, where) for k in VARIANT_KEYS}
    for v in VARIANTS:
        if key(variant_setting(v)) == key(got):
            return v
    raise RecordError(f"{where}: {got} is none of the ablation's variants ({', '.join(VARIANTS)})")


def decision_rows(details: dict, where: str) -> dict[str, list[list]]:
    """``{artifact: [[id, label, pred], ...]}`` of the test decisions in ``reports/eval/details.json``.

    ``label`` and ``pred`` are int indices into ``so8t.schema.DECISIONS`` (ALLOW, ESCALATION, DENY),
    one row per test decision, for each of ``ARTIFACTS``.

    Raises:
        RecordError: an artifact has no ``decision_rows`` (``where`` and the artifact named).
    """
    out = {}
    for a in ARTIFACTS:
        rows = ((details.get("artifacts") or {}).get(a) or {}).get("decision_rows")
        if not rows:
            raise RecordError(f"{where}: reports/eval/details.json has no artifacts.{a}.decision_rows")
        out[a] = [[str(r["id"]), int(r["label"]), int(r["pred"])] for r in rows]
    return out


def machine() -> dict:
    """The CPU model (``/proc/cpuinfo``'s ``model name``, else ``platform.processor()``) and its count."""
    cpu = ""
    try:
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), "")
    except OSError:
        pass
    return {"cpu": cpu or platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "platform": platform.platform()}


def make_record(name: str, metrics: dict, performance: dict, params: dict, details: dict, source: dict) -> dict:
    """One finished run as ``reports/ablation/<name>.json`` keeps it.

    Args:
        name: ``abl-<variant>-s<seed>``.
        metrics: the run's flat ``reports/metrics.json``.
        performance: its ``reports/performance/train.json``.
        params: its nested ``params.yaml``.
        details: its ``reports/eval/details.json`` (for the test decisions).
        source: where it came from, e.g. ``{"kind": "experiment", "rev": sha, "baseline": sha}``.

    Raises:
        RecordError: ``name`` is not ``abl-<variant>-s<seed>``, or the run's params name another
            variant or seed than ``name`` does, or the details lack the test decisions.
    """
    match = NAME.match(name)
    if not match or match["variant"] not in VARIANTS:
        raise RecordError(f"{name}: not an ablation run name "
                          f"(abl-<variant>-s<seed>, variant one of {', '.join(VARIANTS)})")
    variant, seed = match["variant"], int(match["seed"])
    got_variant, got_seed = variant_of(params, name), _get(params, "seed", name)
    if (got_variant, got_seed) != (variant, seed):
        raise RecordError(f"{name}: its params.yaml is variant {got_variant} with seed {got_seed}")
    if not metrics.get("baked.decision.macro_f1"):
        raise RecordError(f"{name}: reports/metrics.json has no baked.decision.macro_f1 (did evaluate run?)")
    return {
        "name": name,
        "variant": variant,
        "seed": seed,
        "params": {k: _get(params, k, name) for k in ("seed", *VARIANT_KEYS)},
        "source": source,
        "recorded_on": machine(),
        "recorded": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "performance": {k: (performance or {}).get(k) for k in PERFORMANCE_KEYS},
        "metrics": metrics,
        "decisions": decision_rows(details, name),
    }


def _read_record(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise RecordError(f"{path}: not a readable record ({e})") from e


def read_records(directory: Path) -> dict[tuple[str, int], dict]:
    """``{(variant, seed): record}`` of every ``abl-*.json`` in ``directory`` (none if it is absent).

    Raises:
        RecordError: a file is not valid JSON, or its name disagrees with its variant and seed.
    """
    records: dict[tuple[str, int], dict] = {}
    for path in sorted(Path(directory).glob("abl-*.json")):
        rec = _read_record(path)
        if path.stem != f"abl-{rec.get('variant')}-s{rec.get('seed')}":
            raise RecordError(f"{path}: holds variant {rec.get('variant')!r} seed {rec.get('seed')!r}")
        records[(rec["variant"], int(rec["seed"]))] = rec
    return records


def per_seed_gains(records: dict[tuple[str, int], dict], confidence: float, n_resamples: int,
                   reference: str = "lora", variants: tuple[str, ...] | None = None) -> dict[str, list[dict]]:
    """Within each seed, each variant's test macro-F1 minus ``reference``'s, paired by decision id.

    Args:
        records: ``{(variant, seed): record}`` (:func:`read_records`); runs without ``decisions``
            are skipped.
        reference: the variant each run is paired with (same seed).
        variants: pair only these variants (default: every one but ``reference``).
        confidence, n_resamples: of the percentile bootstrap over the test decisions
            (:func:`so8t.eval.comparisons.paired_gain`, Koehn 2004); the interval holds the noise of
            the test sample, not the spread between seeds.

    Returns:
        ``{variant: [{"seed", "n", "<artifact>": {"gain", "ci_low", "ci_high"}, ...,
        "same_decision": share of test decisions where the baked models agree}]}``.

    Raises:
        RecordError: two runs of one seed hold different test decisions (ids or labels): they did not
            see the same data, so they cannot be paired.
    """
    from types import SimpleNamespace

    from so8t.eval.comparisons import paired_gain

    m = SimpleNamespace(confidence=confidence, bootstrap_resamples=n_resamples)
    out: dict[str, list[dict]] = {}
    for (v, s), rec in sorted(records.items()):
        ref = records.get((reference, s))
        if (v == reference or (variants is not None and v not in variants) or not ref
                or not rec.get("decisions") or not ref.get("decisions")):
            continue
        row: dict = {"seed": s}
        for a in ARTIFACTS:
            mine = {i: (label, pred) for i, label, pred in rec["decisions"][a]}
            theirs = {i: (label, pred) for i, label, pred in ref["decisions"][a]}
            if mine.keys() != theirs.keys() or any(mine[i][0] != theirs[i][0] for i in mine):
                raise RecordError(f"abl-{v}-s{s} and abl-{reference}-s{s}: different {a} test decisions; not paired")
            ids = sorted(mine)
            labels = np.array([mine[i][0] for i in ids])
            row["n"] = len(ids)
            row[a] = paired_gain(labels, np.array([mine[i][1] for i in ids]), np.array([theirs[i][1] for i in ids]), m)
            if a == "baked":
                row["same_decision"] = float(np.mean([mine[i][1] == theirs[i][1] for i in ids]))
        out.setdefault(v, []).append(row)
    return out


def mean_interval(values: list[float]) -> tuple[float, float, float] | None:
    """Mean and 95 % Student-t interval (``scipy.stats.t``), or None below 2 values."""
    from scipy.stats import t

    if len(values) < 2:
        return None
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t.ppf(0.975, n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def verdict(ci: tuple[float, float, float] | None) -> str | None:
    """The verdict on a difference's interval ``(mean, low, high)``: "no difference" when it holds 0,
    else "higher" / "lower"; ``None`` without an interval."""
    if ci is None:
        return None
    return "no difference" if ci[1] <= 0 <= ci[2] else "higher" if ci[1] > 0 else "lower"


def references(variant: str) -> list[str]:
    """The variants ``variant`` is paired with: ``lora``; for a fixed rotation also :data:`TRAINED`;
    for an invariant one also :data:`UNROTATED` (does the rotation change quantisation loss?); for
    the default :data:`TRAINED` also each of its one-factor halves (:data:`FACTORIAL`)."""
    refs = ["lora", *([TRAINED] if variant in FIXED_ROTATIONS else []),
            *([UNROTATED] if variant in INVARIANT_ROTATIONS else []),
            *(FACTORIAL if variant == TRAINED else ())]
    return [r for r in refs if r != variant]


def table(runs: dict[tuple[str, int], dict]) -> dict:
    """Per variant and column: the mean with its interval, and the paired difference to each of its
    :func:`references` (``diff_vs_<reference>``: per-seed values, mean and 95 % t interval, verdict)."""
    variants = [v for v in VARIANTS if any(k[0] == v for k in runs)]
    out: dict = {}
    for v in variants:
        seeds = sorted(s for (w, s) in runs if w == v)
        row: dict = {"seeds": seeds}
        for col, get in COLUMNS.items():
            values = [x for s in seeds if (x := get(runs[(v, s)])) is not None]
            row[col] = {"n": len(values), "values": values, "mean_ci95": mean_interval(values)}
            for reference in references(v):
                pairs = [(a, b) for s in seeds if (v, s) in runs and (reference, s) in runs
                         and (a := get(runs[(v, s)])) is not None and (b := get(runs[(reference, s)])) is not None]
                diff = [a - b for a, b in pairs]
                ci = mean_interval(diff)
                row[col]["diff_vs_" + reference] = {
                    "n": len(diff), "values": diff, "mean_ci95": ci,
                    "verdict": verdict(ci),
                }
        out[v] = row
    return out


def _fmt(ci, digits: int = 3) -> str:
    return "-" if ci is None else f"{ci[0]:.{digits}f} [{ci[1]:.{digits}f}, {ci[2]:.{digits}f}]"


def _fmt_diff(d: dict | None, digits: int) -> str:
    """One ``diff_vs_<reference>`` cell: mean [interval] and verdict, or the single seed's difference."""
    if not d:
        return "-"
    if d["mean_ci95"]:
        return f"{_fmt(d['mean_ci95'], digits)} {d['verdict']}"
    if d["values"]:
        return " ".join(f"{x:+.{digits}f}" for x in d["values"]) + " (1 seed: no interval)"
    return "no pair"


def baselines(exp_list: str) -> list[str]:
    """The baselines named by ``dvc exp list --all-commits``: its unindented lines ``<rev>:``, each
    followed by that baseline's experiments. DVC names a commit by its short sha, or by its branch
    (``main:``) where it is a branch's head, so any revision git resolves is taken."""
    return [line.rstrip()[:-1] for line in exp_list.splitlines() if re.fullmatch(r"\S+:", line.rstrip())]


def _exp_show(saved: Path | None) -> list:
    """Parsed ``dvc exp show --json``: from ``saved``, else by running it.

    ``dvc exp show`` alone shows the experiments of ``HEAD`` only; a commit made after the grid was
    queued would hide it. So it is run with ``--rev`` for every commit that has experiments
    (``dvc exp list --all-commits``).
    """
    if saved:
        return json.loads(saved.read_text(encoding="utf-8"))
    listed = _dvc("exp", "list", "--all-commits")
    revs = [a for rev in baselines(listed) for a in ("--rev", rev)]
    return json.loads(_dvc("exp", "show", "--json", *revs))


def _dvc(*args: str) -> str:
    """stdout of ``dvc <args>``, run as this interpreter's module (the venv's DVC, whatever ``PATH`` says)."""
    return subprocess.run([sys.executable, "-m", "dvc", *args], check=True, capture_output=True, text=True).stdout


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], check=True, capture_output=True, text=True).stdout.strip()


def record_workspace() -> dict:
    """The workspace's own run (the committed ``dvc repro``) as a record, named by its params.

    Raises:
        RecordError: ``dvc status`` lists a stale stage, or ``dvc.lock`` / ``params.yaml`` differ
            from ``HEAD`` (the record names ``HEAD`` as its revision).
    """
    status = _dvc("status", "--json")
    stale = json.loads(status or "{}")
    if stale:
        raise RecordError(f"workspace: dvc status lists {', '.join(sorted(stale))}; run dvc repro first")
    if _git("status", "--porcelain", "--", "dvc.lock", "params.yaml"):
        raise RecordError("workspace: dvc.lock or params.yaml differ from HEAD; commit the run first")
    params = yaml.safe_load(Path("params.yaml").read_text(encoding="utf-8"))
    name = f"abl-{variant_of(params)}-s{_get(params, 'seed', 'params.yaml')}"
    read = lambda p: json.loads(Path(p).read_text(encoding="utf-8"))
    return make_record(name, read("reports/metrics.json"), read("reports/performance/train.json"), params,
                       read("reports/eval/details.json"), {"kind": "workspace", "rev": _git("rev-parse", "HEAD")})


def record_experiments(data: list) -> list[dict]:
    """Every finished ``abl-*`` experiment of ``dvc exp show --json`` as a record.

    The test decisions come from the experiment's own ``reports/eval/details.json``, read from the
    DVC cache at its revision (``dvc.api.read``).
    """
    import dvc.api

    out = []
    for name, exp in sorted(experiments_from_exp_show(data).items()):
        details = json.loads(dvc.api.read("reports/eval/details.json", rev=exp["rev"]))
        out.append(make_record(name, exp["metrics"], exp["performance"], exp["params"], details,
                               {"kind": "experiment", "rev": exp["rev"], "baseline": exp["baseline"]}))
    return out


def save_records(records: list[dict], directory: Path, force: bool = False) -> list[str]:
    """Write each record to ``directory / <name>.json`` atomically; returns what it did, a line each.

    A record already there from another revision is kept unless ``force`` (two runs of one name are
    two different runs: the second must not silently replace the first).

    Raises:
        RecordError: a record already there is not readable JSON (its path named).
    """
    from so8t.io import write_json

    said = []
    for rec in records:
        path = Path(directory) / f"{rec['name']}.json"
        if path.exists():
            old = _read_record(path)
            if old.get("source", {}).get("rev") == rec["source"]["rev"]:
                said.append(f"{path}: already recorded")
                continue
            if not force:
                said.append(f"{path}: kept (it holds rev {old.get('source', {}).get('rev')}; --force replaces it)")
                continue
        write_json(path, rec)
        said.append(f"{path}: recorded {rec['source']['kind']} {rec['source']['rev']}")
    return said


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("queue", help="queue the grid as DVC experiments")
    q.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    q.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    q.add_argument("--dry-run", action="store_true", help="print the commands only")
    r = sub.add_parser("record", help="keep finished runs in reports/ablation/ (committed to git)")
    r.add_argument("--json", type=Path, help="a saved `dvc exp show --json` (default: run it)")
    r.add_argument("--dir", type=Path, default=RECORDS)
    r.add_argument("--workspace", action="store_true", help="record the workspace's committed run instead")
    r.add_argument("--force", action="store_true", help="replace a record from another revision")
    t = sub.add_parser("table", help="tabulate the recorded runs and the finished experiments")
    t.add_argument("--json", type=Path, help="a saved `dvc exp show --json` (default: run it)")
    t.add_argument("--records", type=Path, default=RECORDS, help="recorded runs (default: %(default)s)")
    t.add_argument("--out", type=Path, help="also write the table as JSON here")
    args = ap.parse_args()
    if args.cmd == "queue":
        for cmd in queue_commands(args.seeds, args.variants):
            print(" ".join(cmd))
            if not args.dry_run:
                subprocess.run(cmd, check=True)
        return
    try:
        if args.cmd == "record":
            records = [record_workspace()] if args.workspace else record_experiments(_exp_show(args.json))
            if not records:
                sys.exit("so8t_ablation: no finished experiment named abl-<variant>-s<seed> to record")
            print("\n".join(save_records(records, args.dir, args.force)))
            return
        tabulate(args)
    except RecordError as e:
        sys.exit(f"so8t_ablation: {e}")


def tabulate(args) -> None:
    """The ``table`` command: records first, then experiments not yet recorded."""
    from rich.console import Console
    from rich.table import Table

    from so8t.io import write_json
    from so8t.params import load_params

    records = read_records(args.records)
    runs = {k: flat_run(rec["metrics"], rec["performance"]) for k, rec in records.items()}
    for key, flat in runs_from_exp_show(_exp_show(args.json)).items():
        runs.setdefault(key, flat)
    if not runs:
        sys.exit("so8t_ablation: no finished experiment named abl-<variant>-s<seed> and no record in "
                 f"{args.records}; queue the grid first")
    result = table(runs)
    m = load_params().metrics
    refs = list(dict.fromkeys(r for v in result for r in references(v)))  # the diff_vs_* columns present
    paired = {r: per_seed_gains(records, m.confidence, m.bootstrap_resamples, r,
                                None if r == "lora" else tuple(v for v in VARIANTS if r in references(v)))
              for r in dict.fromkeys(["lora", TRAINED, *refs])}
    console = Console()
    grid = Table(title="SO8T ablation: per seed, mean over seeds [95 % t interval], and the paired difference "
                       "against lora (a fixed rotation: also against the trained one, so8t_pet; an invariant one: "
                       "also against pet, the same function unrotated; the default so8t_pet: also against pet "
                       "and so8t, each one factor off) at the same seed "
                       "(mean [95 % t interval] over seeds)")
    for col in ("variant", "metric", "per seed", "mean [95 % CI]", *(f"vs {r}" for r in refs)):
        grid.add_column(col)
    for v, row in result.items():
        for i, col in enumerate(COLUMNS):
            digits = 0 if col == "train s" else 3
            per_seed = ", ".join(f"s{s}: {x:.{digits}f}" for s, x in zip(row["seeds"], row[col]["values"]))
            grid.add_row(v if i == 0 else "", col, per_seed or "-", _fmt(row[col]["mean_ci95"], digits),
                         *(_fmt_diff(row[col].get(f"diff_vs_{r}"), digits) for r in refs),
                         end_section=i == len(COLUMNS) - 1)
    console.print(grid)
    for reference, gains in paired.items():
        if not gains:
            continue
        within = Table(title=f"Within one seed: test macro-F1 minus {reference}'s, paired bootstrap over the test "
                             "decisions (test-sample noise only, not the spread between seeds)")
        for col in ("variant", "seed", "n", *(f"{a} gain" for a in ARTIFACTS), "same baked decision"):
            within.add_column(col)
        for v, rows in gains.items():
            for row in rows:
                within.add_row(v, str(row["seed"]), str(row["n"]),
                               *(_fmt((row[a]["gain"], row[a]["ci_low"], row[a]["ci_high"])) for a in ARTIFACTS),
                               f"{row['same_decision']:.3f}")
        console.print(within)
    if args.out:
        write_json(args.out, {"by_variant": result, "per_seed": paired["lora"],
                              **{f"per_seed_vs_{r}": g for r, g in paired.items() if r != "lora"},
                              "runs": {rec["name"]: {"source": rec["source"], "recorded_on": rec["recorded_on"]}
                                       for rec in records.values()}})


if __name__ == "__main__":
    main()
