"""Does the default run compute the same bytes here as elsewhere? Hashes of every step, per machine class.

Runs a short version of the default pipeline on ``params.yaml``, with the stages' own functions:

1. **base**: ``models/base`` when present (``--base`` names another), else
   :func:`so8t.model.base_model.prepare_base` of ``base_model.source`` into a temporary folder;
2. **train**: :func:`so8t.model.train.run_training` for ``--steps`` optimiser steps (``train.max_steps``;
   ``train.eval_steps`` off; checkpoints in a temporary folder, never resumed) on
   ``<data>/train.jsonl``. The batches are the default run's first ones (the sampler does not depend on
   ``max_steps``), so step 1's loss is the full run's step 1 loss; later steps differ from the full run's
   (a shorter schedule) but not between machines;
3. **bake**: :func:`so8t.model.bake.bake_adapter` with ``bake.*`` and the first val rows;
4. **export**: :func:`so8t.eval.gguf_check.export_and_check`: one float32 GGUF, then each of
   ``quantize.types`` (F16, Q8_0, Q4_K_M) through llama.cpp's quantiser, each loaded and checked;
5. **score**: ``--decisions`` test decisions (label-balanced, file order) scored in llama.cpp by each
   GGUF (:func:`so8t.inference.scoring.score_decisions` via :func:`so8t.inference.scoring.open_backend`).

It prints and writes (atomically, :func:`so8t.io.write_json`) one record,
``reports/determinism/<machine class>[.<knobs>][.<tag>].json`` by default, holding the SHA-256 of:
the base weights, the exact train loss and gradient norm at each step (float64 bytes of the float32
values), each adapter file, the baked weights (``*.safetensors``), each GGUF, and each GGUF's decision
logits (``(N, 3)`` float64, row-major); the values behind the small hashes (losses, logits) so a
difference can be sized; the wall time of each part; and the machine: CPU model, family / model /
stepping, instruction-set flags (AVX2, AVX-512 F/BW/VNNI/BF16, AMX), torch version and
``torch.backends.cpu.get_cpu_capability()``, MKL and oneDNN (``torch.__config__.show()`` excerpt, and
the code path and CNR mode MKL itself reports under ``MKL_VERBOSE``), thread count and the
environment knobs in effect (``MKL_CBWR``, ``ATEN_CPU_CAPABILITY``, ``OMP_NUM_THREADS``, ...).

The **machine class** (:func:`machine_class`) names what decides which kernels run:
vendor, product line, CPU family and model, and the widest vector ISA (``avx2``, ``avx512``, ``amx``),
e.g. ``amd-epyc-f25-m17-avx512``.

``--env KEY=VALUE`` (repeatable) runs the measurement in a child process with those variables set
before torch is imported (MKL reads ``MKL_CBWR`` and ATen ``ATEN_CPU_CAPABILITY`` once, at load);
``--also-default`` first runs the default environment (those keys removed) the same way, then
compares the two::

    .venv/bin/python benchmarks/determinism.py                          # default environment
    .venv/bin/python benchmarks/determinism.py --env MKL_CBWR=COMPATIBLE --env ATEN_CPU_CAPABILITY=avx2
    .venv/bin/python benchmarks/determinism.py --also-default --env MKL_CBWR=COMPATIBLE --env ATEN_CPU_CAPABILITY=avx2
    .venv/bin/python benchmarks/determinism.py --compare reports/determinism/A.json reports/determinism/B.json

``--compare`` prints each hash of two records side by side in pipeline order, and the first that
differs (exit status 1 when a hash both records hold differs, as ``diff``). ``--until train`` (or
``bake``, ``export``) stops early: a quick look at which setting changes the training steps. ``--table R1 R2 ...``
prints, per hash, a letter per record (the same letter: the same bytes)::

    .venv/bin/python benchmarks/determinism.py --table reports/determinism/*.json Run from the repository root after the
``think_format`` stage (``data/formatted``; ``--data`` names another folder). ~1.5 minutes on 2 idle
cores at 3 steps (train ~10 s of it; bake ~25 s, export ~30 s), ~25 s with ``--until train``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = Path("reports/determinism")
#: Set in the child process of ``--env``: measure, do not re-execute again.
CHILD_FLAG = "SO8T_DETERMINISM_CHILD"
#: The child's requested ``--env`` settings (JSON), for its record.
REQUESTED = "SO8T_DETERMINISM_ENV"
#: Environment variables that change which kernels torch, MKL, oneDNN and OpenMP run, recorded when set.
KNOBS = (
    "MKL_CBWR",
    "ATEN_CPU_CAPABILITY",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "MKL_DYNAMIC",
    "MKL_ENABLE_INSTRUCTIONS",
    "MKL_DEBUG_CPU_TYPE",
    "ONEDNN_MAX_CPU_ISA",
    "DNNL_MAX_CPU_ISA",
    "ONEDNN_DEFAULT_FPMATH_MODE",
    "KMP_DETERMINISTIC_REDUCTION",
    "TORCH_MKLDNN_MATMUL_MIN_DIM",
)
#: Short names of knobs in a record's file name.
KNOB_SLUGS = {"MKL_CBWR": "cbwr", "ATEN_CPU_CAPABILITY": "aten", "OMP_NUM_THREADS": "omp"}
#: ``/proc/cpuinfo`` flags recorded (those that pick kernels in MKL, oneDNN, ATen and ggml).
ISA_FLAGS = (
    "sse4_2",
    "avx",
    "f16c",
    "fma",
    "avx2",
    "avx_vnni",
    "avx512f",
    "avx512dq",
    "avx512cd",
    "avx512bw",
    "avx512vl",
    "avx512ifma",
    "avx512vbmi",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
)
#: Vendor ids of ``/proc/cpuinfo`` -> the class name's first word.
VENDORS = {"AuthenticAMD": "amd", "GenuineIntel": "intel", "HygonGenuine": "hygon", "CentaurHauls": "centaur"}
#: Words of a ``model name`` that say nothing about the product line.
_NOISE = {"amd", "intel", "r", "tm", "cpu", "processor", "genuine", "gen", "with", "radeon", "graphics"}


class RecordError(ValueError):
    """A determinism record lacks what is compared."""


# --------------------------------------------------------------------------- the machine


def parse_cpuinfo(text: str) -> dict:
    """The first processor of a ``/proc/cpuinfo`` text: vendor, model name, family/model/stepping, ISA flags.

    Returns:
        ``{"vendor", "model_name", "family", "model", "stepping", "microcode", "logical_cpus",
        "isa": {flag: bool for each of ISA_FLAGS}}``; a field the text lacks is ``None``
        (``isa`` all false without a ``flags`` line).
    """
    first: dict[str, str] = {}
    processors = 0
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key = key.strip()
        if key == "processor":
            processors += 1
        if processors <= 1 and key not in first:
            first[key] = value.strip()

    def number(key: str) -> int | None:
        try:
            return int(first[key], 0)
        except (KeyError, ValueError):
            return None

    flags = set(first.get("flags", "").split())
    return {
        "vendor": first.get("vendor_id"),
        "model_name": first.get("model name"),
        "family": number("cpu family"),
        "model": number("model"),
        "stepping": number("stepping"),
        "microcode": first.get("microcode"),
        "logical_cpus": processors or None,
        "isa": {f: f in flags for f in ISA_FLAGS},
    }


def isa_level(isa: dict[str, bool]) -> str:
    """The widest vector instruction set the kernels can use: ``amx``, ``avx512``, ``avx2``, ``avx`` or ``sse``."""
    if isa.get("amx_tile"):
        return "amx"
    if isa.get("avx512f"):
        return "avx512"
    if isa.get("avx2"):
        return "avx2"
    if isa.get("avx"):
        return "avx"
    return "sse"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def product_line(model_name: str | None) -> str:
    """The product line of a ``model name``: ``AMD EPYC 9R14 96-Core Processor`` -> ``epyc``,
    ``Intel(R) Xeon(R) Platinum 8488C`` -> ``xeon``, ``Intel(R) Core(TM) i7-1185G7`` -> ``core``;
    ``cpu`` when no word is left."""
    words = re.sub(r"\((r|tm)\)", " ", (model_name or "").lower()).split()
    for word in words:
        word = _slug(word)
        if word and word not in _NOISE and word.isalpha():
            return word
    return "cpu"


def machine_class(cpu: dict) -> str:
    """``<vendor>-<line>-f<family>-m<model>-<isa level>`` of :func:`parse_cpuinfo`'s dict.

    Family and model pick the microarchitecture (AMD family 25 is Zen 3 / Zen 4: model 1 Milan,
    AVX2 only; model 17 Genoa, AVX-512), the ISA level the kernels MKL, oneDNN and ATen dispatch to.
    A virtual machine may hide flags, so the level is read from the flags, not from the model.
    """
    vendor = VENDORS.get(cpu.get("vendor") or "", _slug(cpu.get("vendor") or "") or "unknown")
    parts = [vendor, product_line(cpu.get("model_name"))]
    if cpu.get("family") is not None:
        parts.append(f"f{cpu['family']}")
    if cpu.get("model") is not None:
        parts.append(f"m{cpu['model']}")
    parts.append(isa_level(cpu.get("isa") or {}))
    return "-".join(parts)


def knobs_in_effect(environ=None) -> dict[str, str]:
    """The :data:`KNOBS` set in ``environ`` (default: this process's)."""
    environ = os.environ if environ is None else environ
    return {k: environ[k] for k in KNOBS if k in environ}


def knob_slug(knobs: dict[str, str]) -> str:
    """File-name part for the knobs in effect: ``{"MKL_CBWR": "COMPATIBLE", "ATEN_CPU_CAPABILITY": "avx2"}``
    -> ``cbwr-compatible.aten-avx2`` (knobs in :data:`KNOBS` order); ``""`` for none."""
    parts = []
    for key in KNOBS:
        if key in knobs:
            name = KNOB_SLUGS.get(key, key.lower())
            parts.append(f"{name}-{_slug(str(knobs[key]))}" if _slug(str(knobs[key])) else name)
    return ".".join(parts)


def default_out(cls: str, knobs: dict[str, str], tag: str | None = None) -> Path:
    """``reports/determinism/<class>[.<knobs>][.<tag>].json``."""
    name = ".".join(p for p in (cls, knob_slug(knobs), _slug(tag) if tag else "") if p)
    return OUT_DIR / f"{name}.json"


def _cpuinfo_text() -> str:
    try:
        return Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def _library_probe() -> dict:
    """MKL's and oneDNN's own report of the code path they chose, from a tiny child process.

    ``MKL_VERBOSE=1`` makes MKL print its build and the instruction set it runs
    (``... for Intel(R) 64 architecture Intel(R) AVX-512 ... enabled processors``) and, per call, the
    CNR mode (``CNR:OFF`` / ``CNR:COMPATIBLE``); ``ONEDNN_VERBOSE=1`` makes oneDNN print its ISA.
    The child inherits this process's environment, so the knobs in effect are the ones reported.
    """
    code = (
        "import torch\n"
        "a = torch.ones(64, 64)\n"
        "a @ a\n"
        "torch.ones(64, 64).to_mkldnn()\n"
    )
    env = os.environ | {"MKL_VERBOSE": "1", "ONEDNN_VERBOSE": "1", CHILD_FLAG: "probe"}
    try:
        out = subprocess.run([sys.executable, "-c", code], check=False, env=env, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"error": str(e)}
    lines = (out.stdout + out.stderr).splitlines()
    mkl = [ln for ln in lines if ln.startswith("MKL_VERBOSE")]
    call = next((ln for ln in mkl if "GEMM" in ln), "")
    cnr = re.search(r"CNR:(\S+)", call)
    nthr = re.search(r"NThr:(\d+)", call)
    onednn = [ln.split(",info,cpu,", 1)[1] for ln in lines if ln.startswith("onednn_verbose") and ",info,cpu," in ln]
    return {
        "mkl": next((ln.removeprefix("MKL_VERBOSE ").strip() for ln in mkl if "GEMM" not in ln), None),
        "mkl_cnr": cnr.group(1) if cnr else None,
        "mkl_threads": int(nthr.group(1)) if nthr else None,
        "onednn": onednn or None,
    }


def machine_info(probe: bool = True) -> dict:
    """The machine a record was made on (imports torch: call in the measuring process)."""
    import torch

    cpu = parse_cpuinfo(_cpuinfo_text())
    config = torch.__config__.show()
    excerpt = [ln.strip(" -") for ln in config.splitlines()
               if re.search(r"Math Kernel|MKL-DNN|oneDNN|OpenMP|CPU capability|LAPACK", ln)
               and "Build settings" not in ln]
    excerpt += re.findall(r"\b(?:BLAS_INFO|LAPACK_INFO|USE_MKL|USE_MKLDNN|USE_OPENMP)=\w+", config)
    blas = re.search(r"BLAS_INFO=(\w+)", config)
    versions = {}
    for dist in ("transformers", "peft", "accelerate", "llama_cpp_python", "numpy", "safetensors", "gguf"):
        try:
            from importlib.metadata import version

            versions[dist] = version(dist.replace("_", "-"))
        except Exception:  # noqa: BLE001 - a missing package is recorded as such
            versions[dist] = None
    return {
        "class": machine_class(cpu),
        "cpu": cpu,
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "torch": {
            "version": torch.__version__,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "mkl": torch.backends.mkl.is_available(),
            "mkldnn": torch.backends.mkldnn.is_available(),
            "blas": blas.group(1) if blas else None,
            "config": excerpt,
            "threads": torch.get_num_threads(),
            "interop_threads": torch.get_num_interop_threads(),
            "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
            "float32_matmul_precision": torch.get_float32_matmul_precision(),
        },
        "libraries": _library_probe() if probe else None,
        "packages": versions,
        "env": knobs_in_effect(),
    }


# --------------------------------------------------------------------------- hashes


def sha256_floats(values) -> str:
    """SHA-256 of the values as little-endian float64 bytes (a nested list is flattened row-major)."""
    flat: list[float] = []

    def walk(v):
        if isinstance(v, (list, tuple)):
            for x in v:
                walk(x)
        else:
            flat.append(float(v))

    walk(values)
    return hashlib.sha256(struct.pack(f"<{len(flat)}d", *flat)).hexdigest()


def hash_files(folder: Path, pattern: str = "*") -> dict[str, str]:
    """``{file name: sha256}`` of the files in ``folder`` matching ``pattern``, sorted by name."""
    from so8t.io import sha256_file

    return {p.name: sha256_file(p) for p in sorted(Path(folder).glob(pattern)) if p.is_file()}


#: Decision labels in the order :func:`balanced_decisions` takes them.
LABEL_ORDER = ("ALLOW", "ESCALATION", "DENY")
#: Parts of a record, in pipeline order (what :func:`ordered_hashes` walks).
PARTS = ("base", "train", "adapter", "baked", "gguf", "logits")


def ordered_hashes(record: dict) -> list[tuple[str, str]]:
    """``[(key, sha256), ...]`` of a record in pipeline order: ``base/<file>``, ``train/step<i>/loss``
    (and ``/grad_norm``), ``adapter/<file>``, ``baked/<file>``, ``gguf/<artifact>``, ``logits/<artifact>``.

    Raises:
        RecordError: the record has no ``hashes``.
    """
    hashes = record.get("hashes")
    if not isinstance(hashes, dict):
        raise RecordError("not a determinism record: no 'hashes'")
    out: list[tuple[str, str]] = []
    for part in PARTS:
        section = hashes.get(part) or {}
        if part == "train":
            for step in sorted(section, key=lambda s: int(re.sub(r"\D", "", s) or 0)):
                for what, h in section[step].items():
                    out.append((f"train/{step}/{what}", h))
        else:
            out.extend((f"{part}/{name}", h) for name, h in section.items())
    return out


def compare(a: dict, b: dict) -> dict:
    """Each hash of two records side by side, in pipeline order.

    Returns:
        ``{"rows": [(key, hash a or None, hash b or None, "same" | "differs" | "only a" | "only b")],
        "first_difference": the first key both hold with different hashes (None: none),
        "same": no shared hash differs, "only_one": keys only one record holds}``. A record that stopped
        early (``--until``) lacks the later parts; they are listed, not counted as differences.
    """
    ha, hb = ordered_hashes(a), ordered_hashes(b)
    db, seen = dict(hb), set()
    rows = []
    for key, h in ha:
        other = db.get(key)
        status = "only a" if other is None else ("same" if other == h else "differs")
        rows.append((key, h, other, status))
        seen.add(key)
    for key, h in hb:
        if key not in seen:
            rows.append((key, None, h, "only b"))
    first = next((r[0] for r in rows if r[3] == "differs"), None)
    only = sum(r[3].startswith("only") for r in rows)
    return {"rows": rows, "first_difference": first, "same": first is None, "only_one": only}


def _describe(record: dict) -> str:
    m = record.get("machine") or {}
    torch_ = m.get("torch") or {}
    env = m.get("env") or {}
    knobs = " ".join(f"{k}={v}" for k, v in env.items()) or "default env"
    return (f"{m.get('class', '?')} | torch {torch_.get('version', '?')} {torch_.get('cpu_capability', '?')}, "
            f"{torch_.get('threads', '?')} threads | {knobs}")


def _value_note(a: dict, b: dict, key: str) -> str:
    """The size of a difference where the record holds the values (train steps, logits)."""
    va, vb = a.get("values") or {}, b.get("values") or {}
    parts = key.split("/")
    if parts[0] == "train" and len(parts) == 3:
        sa = next((s for s in va.get("train", []) if f"step{s.get('step')}" == parts[1]), None)
        sb = next((s for s in vb.get("train", []) if f"step{s.get('step')}" == parts[1]), None)
        if sa and sb and sa.get(parts[2]) is not None and sb.get(parts[2]) is not None:
            x, y = float(sa[parts[2]]), float(sb[parts[2]])
            return f"{x!r} vs {y!r} (diff {y - x:+.3g})"
    if parts[0] == "logits" and len(parts) == 2:
        la, lb = (va.get("logits") or {}).get(parts[1]), (vb.get("logits") or {}).get(parts[1])
        if la and lb and len(la) == len(lb):
            diffs = [abs(float(x) - float(y)) for ra, rb in zip(la, lb) for x, y in zip(ra, rb)]
            pa = [max(range(len(r)), key=r.__getitem__) for r in la]
            pb = [max(range(len(r)), key=r.__getitem__) for r in lb]
            flips = sum(x != y for x, y in zip(pa, pb))
            return f"max |diff| {max(diffs, default=0.0):.3g} nats, {flips}/{len(pa)} predictions differ"
    return ""


def format_compare(a: dict, b: dict, names: tuple[str, str] = ("A", "B")) -> str:
    """The text ``--compare`` prints: both machines, one line per hash, the first difference."""
    result = compare(a, b)
    lines = [f"{names[0]}: {_describe(a)}", f"{names[1]}: {_describe(b)}", ""]
    width = max((len(r[0]) for r in result["rows"]), default=10)
    for key, x, y, status in result["rows"]:
        note = _value_note(a, b, key) if status == "differs" else ""
        lines.append(f"{key:<{width}}  {(x or '-')[:12]:<12}  {(y or '-')[:12]:<12}  {status}"
                     + (f"  {note}" if note else ""))
    lines.append("")
    shared = len(result["rows"]) - result["only_one"]
    extra = f"; {result['only_one']} in one record only" if result["only_one"] else ""
    if result["same"]:
        lines.append(f"identical: all {shared} shared hashes match{extra}")
    else:
        differing = sum(r[3] == "differs" for r in result["rows"])
        lines.append(f"first difference: {result['first_difference']} ({differing} of {shared} shared hashes differ"
                     f"{extra})")
    return "\n".join(lines)


def agreement(records: list[dict]) -> list[tuple[str, list[str | None]]]:
    """Per hash key (pipeline order, first record's keys first), a letter per record: the same letter
    where the hashes are the same (``a`` for the first record's value, then ``b``, ...), ``None`` where
    a record lacks the key."""
    keys: list[str] = []
    tables = [dict(ordered_hashes(r)) for r in records]
    for r in records:
        keys += [k for k, _ in ordered_hashes(r) if k not in keys]
    out = []
    for key in keys:
        letters: dict[str, str] = {}
        row = []
        for table in tables:
            h = table.get(key)
            if h is None:
                row.append(None)
                continue
            row.append(letters.setdefault(h, "abcdefghijklmnopqrstuvwxyz"[len(letters) % 26]))
        out.append((key, row))
    return out


def format_table(records: list[dict], names: list[str]) -> str:
    """The text ``--table`` prints: the records, then one line per hash key with a letter per record."""
    lines = [f"{i + 1}: {name}: {_describe(r)}" for i, (name, r) in enumerate(zip(names, records))]
    rows = agreement(records)
    width = max((len(k) for k, _ in rows), default=10)
    lines.append(f"{'':<{width}}  " + " ".join(f"{i + 1:>2}" for i in range(len(records))))
    for key, row in rows:
        cells = " ".join(f"{c or '-':>2}" for c in row)
        present = {c for c in row if c}
        lines.append(f"{key:<{width}}  {cells}  {'same' if len(present) == 1 else 'differs'}")
    return "\n".join(lines)


def format_record(record: dict) -> str:
    """The text a measurement prints: the machine, each hash, the wall times."""
    lines = [_describe(record)]
    for key, h in ordered_hashes(record):
        lines.append(f"  {key:<44} {h[:16]}")
    sec = record.get("seconds") or {}
    lines.append("  seconds: " + ", ".join(f"{k} {v}" for k, v in sec.items() if not isinstance(v, list)))
    return "\n".join(lines)


# --------------------------------------------------------------------------- the measurement


def balanced_decisions(rows: list[dict], n: int) -> list[dict]:
    """``n`` decision rows with a ``prompt_text``, round-robin over the labels in file order (ALLOW,
    ESCALATION, DENY, ...), so every label is scored."""
    by_label: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("task") == "decision" and r.get("prompt_text") and r.get("decision"):
            by_label.setdefault(r["decision"], []).append(r)
    order = sorted(by_label, key=lambda label: (LABEL_ORDER.index(label) if label in LABEL_ORDER else 99, label))
    out: list[dict] = []
    i = 0
    while len(out) < n and any(i < len(v) for v in by_label.values()):
        for label in order:
            if i < len(by_label[label]) and len(out) < n:
                out.append(by_label[label][i])
        i += 1
    return out


def _short_params(path: Path, steps: int, work: Path):
    """``params.yaml`` with ``train.max_steps = steps``, no evaluations, checkpoints in ``work``, no resume."""
    import yaml

    from so8t.params import Params

    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    raw.setdefault("train", {})["max_steps"] = steps
    raw["train"]["eval_steps"] = 0
    ck = raw.setdefault("checkpoint", {})
    ck.update({"dir": str(work / "checkpoints"), "resume": False, "steps": 0})
    return Params.model_validate(raw)


def _recording_trainer(steps: list[dict]):
    """:class:`so8t.model.trainer.SO8TTrainer` that also keeps each step's exact loss, CE, PET and
    gradient norm (the logged ones are rounded) and its wall time in ``steps``."""
    from so8t.model.trainer import SO8TTrainer

    class RecordingTrainer(SO8TTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if model.training:
                loss = out[0] if return_outputs else out
                self.__dict__.setdefault("_micro_losses", []).append(float(loss.detach().double()))
            return out

        def log(self, logs, start_time=None):
            if self._acc_n and "loss" in logs:
                now = time.perf_counter()
                last = self.__dict__.get("_step_clock", now)
                micro = self.__dict__.pop("_micro_losses", [])
                entry = {"step": self.state.global_step, "loss": float(sum(micro)) if micro else None}
                entry |= {k: v / self._acc_n for k, v in self._acc.items() if k in ("ce", "pet")}
                grad = logs.get("grad_norm")
                entry["grad_norm"] = float(grad) if grad is not None else None
                entry["seconds"] = round(now - last, 3)
                self._step_clock = now
                steps.append(entry)
            super().log(logs, start_time)

        def training_step(self, *args, **kwargs):
            self.__dict__.setdefault("_step_clock", time.perf_counter())
            return super().training_step(*args, **kwargs)

    return RecordingTrainer


def _train(params, base: Path, data: Path, work: Path) -> tuple[list[dict], dict]:
    import so8t.model.train as train_module

    steps: list[dict] = []
    original = train_module.SO8TTrainer
    train_module.SO8TTrainer = _recording_trainer(steps)
    try:
        paths = train_module.TrainPaths(base=base, data=data / "train.jsonl", out=work / "adapter",
                                        live_dir=work / "dvclive", performance=work / "train_performance.json")
        summary = train_module.run_training(params, paths)
    finally:
        train_module.SO8TTrainer = original
    if summary.get("exit_code") is not None:
        raise SystemExit(summary["exit_code"])
    return steps, summary


#: Parts of the run, in order (``--until`` stops after one).
PHASES = ("train", "bake", "export", "score")


def _phases(args, work: Path, params, base: Path, data: Path, decisions: list[dict], val_rows: list[dict],
            threads: int, hashes: dict, values: dict, seconds: dict) -> None:
    """Train, bake, export and score up to ``args.until``, filling ``hashes``, ``values`` and ``seconds``."""
    from so8t.console import console

    def reach(phase: str) -> bool:
        return PHASES.index(phase) <= PHASES.index(args.until)

    t0 = time.perf_counter()
    steps, summary = _train(params, base, data, work)
    seconds["train_call"] = round(time.perf_counter() - t0, 1)
    seconds["train"] = summary.get("train_seconds")
    seconds["train_steps"] = [s["seconds"] for s in steps]
    values["train"] = steps
    hashes["train"] = {
        f"step{s['step']}": {"loss": sha256_floats([s["loss"]]), "grad_norm": sha256_floats([s["grad_norm"]])}
        for s in steps if s["loss"] is not None and s["grad_norm"] is not None
    }
    adapter = work / "adapter"
    hashes["adapter"] = {n: h for n, h in hash_files(adapter).items() if n != "train_summary.json"}
    if not reach("bake"):
        return

    t0 = time.perf_counter()
    from so8t.model.bake import bake_adapter

    b = params.bake
    rows = [r["input_ids"] for r in val_rows[: b.verify_examples]]
    report = bake_adapter(base, adapter, work / "baked", rows, b.max_abs_diff, b.verify_dtype,
                          b.max_abs_diff_float32, b.spot_check_layers)
    seconds["bake"] = round(time.perf_counter() - t0, 1)
    hashes["baked"] = hash_files(work / "baked", "*.safetensors")
    values["bake_max_abs_diff"] = report["max_abs_diff"]
    if not reach("export"):
        return

    t0 = time.perf_counter()
    from so8t.data.think_format import render
    from so8t.eval.gguf_check import export_and_check
    from so8t.inference.hf import load_tokenizer
    from so8t.model.quantize import artifact_name, gguf_filename

    q, types = params.quantize, args.types
    tokenizer = load_tokenizer(work / "baked")
    _, performance = export_and_check(
        work / "baked", work / "gguf", types, tokenizer, q.check_text, render(tokenizer, q.check_text, None),
        q.check_max_tokens, threads, log=console.print,
    )
    seconds["export"] = round(time.perf_counter() - t0, 1)
    hashes["gguf"] = {artifact_name(t): hash_files(work / "gguf", gguf_filename(t))[gguf_filename(t)] for t in types}
    values["check_generation"] = {k: v.get("sample_generation") for k, v in performance["files"].items()}
    if not reach("score"):
        return

    t0 = time.perf_counter()
    from so8t.inference import open_backend, score_decisions

    hashes["logits"], values["logits"], values["decision_ids"] = {}, {}, [d["id"] for d in decisions]
    for t in types:
        backend = open_backend(work / "gguf" / gguf_filename(t), n_ctx=1024, n_threads=threads,
                               batch_size=params.generation.batch_size, n_gpu_layers=0)
        try:
            scored = score_decisions(backend, decisions)
        finally:
            backend.close()
        logits = [r["logits"] for r in scored]
        hashes["logits"][artifact_name(t)] = sha256_floats(logits)
        values["logits"][artifact_name(t)] = logits
    seconds["score"] = round(time.perf_counter() - t0, 1)


def measure(args) -> dict:
    """The whole measurement in this process; returns the record (see the module docstring)."""
    import shutil

    import torch

    from so8t.console import console
    from so8t.io import read_jsonl

    start_all = time.perf_counter()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    machine = machine_info(probe=not args.no_probe)
    console.print(f"determinism: machine class [bold]{machine['class']}[/], torch {machine['torch']['version']} "
                  f"{machine['torch']['cpu_capability']}, {machine['torch']['threads']} threads, env {machine['env']}")
    data = Path(args.data)
    decisions = balanced_decisions(read_jsonl(data / "test.jsonl"), args.decisions)
    val_rows = read_jsonl(data / "val.jsonl")
    seconds: dict = {}
    hashes: dict = {}
    values: dict = {}
    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="so8t-determinism-", dir=args.workdir))
    try:
        params = _short_params(Path(args.params), args.steps, work)
        args.types = args.types or list(params.quantize.types)
        threads = torch.get_num_threads()
        t0 = time.perf_counter()
        base = Path(args.base) if args.base else Path("models/base")
        if not (base / "config.json").is_file():
            if args.base:
                raise SystemExit(f"--base {base}: no config.json")
            from so8t.model.base_model import prepare_base

            base = work / "base"
            console.print(f"determinism: preparing {params.base_model.source} -> {base}")
            prepare_base(params.base_model.source, base, params.base_model.chat_template, cache_dir=Path(".cache/base"))
            seconds["base_prepare"] = round(time.perf_counter() - t0, 1)
        hashes["base"] = hash_files(base, "*.safetensors")
        _phases(args, work, params, base, data, decisions, val_rows, threads, hashes, values, seconds)
    finally:
        if args.keep:
            console.print(f"determinism: kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    seconds["total"] = round(time.perf_counter() - start_all, 1)
    return {
        "schema": 1,
        "machine_class": machine["class"],
        "made": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "revision": _revision(),
        "settings": {"steps": args.steps, "until": args.until, "decisions": len(decisions), "types": args.types,
                     "seed": params.seed, "threads": threads, "env_requested": _requested(args),
                     "params": str(args.params), "data": str(data), "base": str(base)},
        "machine": machine,
        "hashes": hashes,
        "values": values,
        "seconds": seconds,
    }


def _requested(args) -> dict[str, str]:
    """The ``--env`` settings this measurement was asked to run under (a child reads its parent's)."""
    if REQUESTED in os.environ:
        return json.loads(os.environ[REQUESTED])
    return dict(_parse_env(args.env or []))


def _revision() -> dict | None:
    """The checkout's commit and whether its tracked files differ from it (read-only git)."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], check=False, cwd=ROOT, capture_output=True, text=True, timeout=30)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], check=False, cwd=ROOT,
                               capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if sha.returncode:
        return None
    return {"commit": sha.stdout.strip(), "modified": bool(dirty.stdout.strip())}


# --------------------------------------------------------------------------- the command line


def _parse_env(items: list[str]) -> list[tuple[str, str]]:
    out = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise SystemExit(f"--env {item!r}: expected KEY=VALUE")
        out.append((key, value))
    return out


def child_argv(argv: list[str]) -> list[str]:
    """``argv`` without ``--env`` / ``--also-default`` (the child measures once, in the environment it is given)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in ("--env",):
            skip = True
            continue
        if arg.startswith("--env=") or arg == "--also-default":
            continue
        out.append(arg)
    return out


def child_env(base: dict[str, str], env: list[tuple[str, str]], default: bool) -> dict[str, str]:
    """The child's environment: ``base`` with ``env`` set, or, for the default run of ``--also-default``,
    with ``env``'s keys removed."""
    out = dict(base)
    for key, value in env:
        if default:
            out.pop(key, None)
        else:
            out[key] = value
    out[CHILD_FLAG] = "1"
    out[REQUESTED] = json.dumps({} if default else dict(env))
    return out


def _run_child(argv: list[str], env: dict[str, str], out: Path) -> dict:
    rest = child_argv(argv)
    if "--out" not in rest and not any(a.startswith("--out=") for a in rest):
        rest += ["--out", str(out)]
    cmd = [sys.executable, str(Path(__file__).resolve()), *rest]
    shown = " ".join(f"{k}={v}" for k, v in env.items() if k in KNOBS) or "(default environment)"
    print(f"determinism: {shown} {' '.join(cmd[1:])}", flush=True)
    rc = subprocess.run(cmd, check=False, env=env).returncode
    if rc:
        raise SystemExit(rc)
    return json.loads(out.read_text(encoding="utf-8"))


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--steps", type=int, default=3, help="optimiser steps (train.max_steps)")
    ap.add_argument("--decisions", type=int, default=12, help="test decisions scored per GGUF")
    ap.add_argument("--types", nargs="+", default=None, help="GGUF types (default: quantize.types)")
    ap.add_argument("--until", choices=PHASES, default="score", help="stop after this part (default: all)")
    ap.add_argument("--out", type=Path, default=None,
                    help="record file (default reports/determinism/<class>[.<knobs>][.<tag>].json)")
    ap.add_argument("--tag", default=None, help="suffix of the default record name (e.g. rerun)")
    ap.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                    help="run in a child process with this variable set before torch loads (repeatable)")
    ap.add_argument("--also-default", action="store_true",
                    help="with --env: first run the default environment too, then compare")
    ap.add_argument("--compare", nargs=2, type=Path, metavar=("A", "B"), help="compare two records and exit")
    ap.add_argument("--table", nargs="+", type=Path, metavar="RECORD",
                    help="which records agree at each hash (same letter: same bytes) and exit")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--data", type=Path, default=Path("data/formatted"), help="folder with train/val/test.jsonl")
    ap.add_argument("--base", type=Path, default=None, help="base model folder (default models/base, else prepared)")
    ap.add_argument("--workdir", type=Path, default=None, help="where the temporary folder goes")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (adapter, baked, GGUFs)")
    ap.add_argument("--no-probe", action="store_true", help="skip the MKL/oneDNN verbose probe")
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser().parse_args(argv)
    if args.compare:
        a, b = (json.loads(p.read_text(encoding="utf-8")) for p in args.compare)
        print(format_compare(a, b, (str(args.compare[0]), str(args.compare[1]))))
        return 0 if compare(a, b)["same"] else 1
    if args.table:
        records = [json.loads(p.read_text(encoding="utf-8")) for p in args.table]
        print(format_table(records, [p.name for p in args.table]))
        return 0
    env = _parse_env(args.env)
    if args.also_default and not env:
        raise SystemExit("--also-default compares against --env settings: give at least one --env")
    if args.also_default and args.out:
        raise SystemExit("--also-default writes two records: name them with --tag, not --out")
    if env and os.environ.get(CHILD_FLAG) != "1":
        cls = machine_class(parse_cpuinfo(_cpuinfo_text()))
        records = []
        if args.also_default:
            default_env = child_env(dict(os.environ), env, default=True)
            out = default_out(cls, knobs_in_effect(default_env), args.tag)
            records.append((out, _run_child(argv, default_env, out)))
        set_env = child_env(dict(os.environ), env, default=False)
        out = args.out or default_out(cls, knobs_in_effect(set_env), args.tag)
        records.append((out, _run_child(argv, set_env, out)))
        if len(records) == 2:
            print()
            print(format_compare(records[0][1], records[1][1], (str(records[0][0]), str(records[1][0]))))
        return 0
    record = measure(args)
    out = args.out or default_out(record["machine_class"], knobs_in_effect(), args.tag)
    from so8t.io import write_json

    write_json(out, record)
    print(format_record(record))
    print(f"determinism: wrote {out}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
