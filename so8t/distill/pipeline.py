"""The two distillation stages: the teacher pass, then train, bake, export and compare the student.

``distill-teacher`` (:func:`run_teacher_pass`) checks that teacher and student
share a tokenizer and stores the teacher's top-k at every label position
(:mod:`so8t.distill.teacher`). ``distill`` (:func:`run_distillation`) builds the
student (:mod:`so8t.distill.student`), trains it (:mod:`so8t.distill.trainer`),
bakes and exports it to GGUF and compares teacher, student and base, all as
GGUF in llama.cpp, on size, speed, held-out perplexity, decisions and
**agreement** with the teacher on the test split: top-1 agreement (the model's
argmax over the full vocabulary equals the teacher's top-1) and the mean
``KL(p || q)`` at ``T = 1`` over the teacher's top-k, renormalised as in the loss.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from so8t.distill.student import build_student
from so8t.distill.teacher import (
    SPLIT_FILE,
    TEACHER_JSON,
    DistillError,
    GGUFVocab,
    TeacherPaths,
    TopK,
    check_same_tokenizer,
    load_topk,
    vocab_size,
)
from so8t.distill.trainer import distill_examples, topk_kl, train_student
from so8t.io import DataError, atomic_dir, read_json, read_jsonl, write_json

#: Files in ``models/student``.
SUMMARY_JSON = "distill_summary.json"
HF_DIR = "hf"


@dataclass
class Agreement:
    """Agreement of a model with the teacher at the test label positions.

    Attributes:
        top1: share of positions where the model's argmax is the teacher's top-1 id.
        kl: mean ``KL(p || q)`` at ``T = 1`` over the teacher's top-k ids (nats).
        positions: positions compared.
    """

    top1: float
    kl: float
    positions: int


def agreement_gguf(backend, rows: list[dict], topk: TopK) -> Agreement:
    """:class:`Agreement` of a GGUF model (a :class:`so8t.inference.LlamaCppBackend`) with the
    stored teacher top-k.

    Raises:
        DistillError: when ``rows`` and ``topk`` do not hold the same examples.
    """
    if [r["id"] for r in rows] != topk.example_ids:
        raise DistillError("agreement: the test rows and the teacher's top-k do not hold the same examples")
    hits, kl_sum, cursor = 0, 0.0, 0
    # Rows arrive in the stored order, so one cursor walks the flat teacher arrays.
    sequences = [r["input_ids"] for r in rows]
    for logits in backend.logits_at(sequences, [topk.positions[topk.rows(e)] for e in range(len(topk))]):
        t_ids = topk.ids[cursor : cursor + len(logits)]
        t_lp = topk.logprobs[cursor : cursor + len(logits)]
        hits += int((logits.argmax(axis=1) == t_ids[:, 0]).sum())
        kl = topk_kl(torch.from_numpy(logits), torch.from_numpy(t_ids), torch.from_numpy(t_lp))
        kl_sum += float(kl.double().sum())
        cursor += len(logits)
    n = cursor
    return Agreement(hits / n if n else math.nan, kl_sum / n if n else math.nan, n)


# --------------------------------------------------------------------------- export and evaluation


def export_student(
    model: nn.Module, info: dict, base_dir: Path, out_dir: Path, verify_rows: list[dict], max_abs_diff: float
) -> dict:
    """Bake (``lora``: merge LoRA, fold rotations) and save the student as a plain HF folder; verify it.

    The saved folder is reloaded in float64 and its logits on ``verify_rows``
    compared with the in-memory student's (float64).

    Returns:
        The comparison (:class:`so8t.model.bake.LogitDiff` as a dict) and ``threshold``.

    Raises:
        DistillError: when the saved student differs by more than ``max_abs_diff``.
    """
    from so8t.model.bake import bake_model, compare_logits, model_logits, padded_batch
    from so8t.inference.hf import load_causal_lm, load_tokenizer
    from so8t.model.base_model import copy_tokenizer_files

    ids, mask = padded_batch([r["input_ids"] for r in verify_rows])
    reference = model_logits(model.to(device="cpu", dtype=torch.float64), ids, mask)
    model = model.float()
    if info["student"] == "lora":
        model = bake_model(model, require_rotations=info["so8t"])
    model.save_pretrained(out_dir)
    load_tokenizer(base_dir).save_pretrained(out_dir)
    copy_tokenizer_files(base_dir, out_dir)
    diff = compare_logits(reference, model_logits(load_causal_lm(out_dir, torch.float64), ids, mask))
    if diff.max_abs_diff > max_abs_diff:
        raise DistillError(
            f"the saved student's logits differ from the trained one by {diff.max_abs_diff:.3g} > "
            f"distill.max_abs_diff = {max_abs_diff:g}"
        )
    return diff.to_dict() | {"threshold": max_abs_diff}


def evaluate_gguf(
    path: Path, decisions: list[dict], windows: list[list[int]], n_threads: int, params
) -> tuple[dict[str, float], dict[str, float], object]:
    """Size, parameters, perplexity and decision metrics of a GGUF (and its speed), in llama.cpp.

    Decisions are scored as in the evaluate stage (:func:`so8t.inference.score_decisions`,
    uncalibrated); perplexity over ``windows`` (:func:`so8t.inference.perplexity_of`);
    generation speed from ``distill.speed_new_tokens`` greedy tokens of one batch of decision prompts.

    Returns:
        (metrics, speed: ``tokens_per_s`` and ``prompt_tokens_per_s``, the open backend for
        agreement; close it when done).
    """
    from so8t.eval import keys
    from so8t.inference import LlamaCppBackend, perplexity_of, score_decisions
    from so8t.eval.metrics import classification_report
    from so8t.schema import DECISIONS

    g = params.generation
    backend = LlamaCppBackend(path, n_ctx=1024, n_threads=n_threads, batch_size=g.batch_size)
    scored = score_decisions(backend, decisions) if decisions else []
    ppl = perplexity_of(backend, windows)
    if decisions:  # generation speed: one batch of greedy continuations (the scoring above generates nothing)
        prompts = [backend.tokenize(ex["prompt_text"]) for ex in decisions[: g.batch_size]]
        backend.generate(prompts, params.distill.speed_new_tokens, repetition_penalty=g.repetition_penalty)
    out = {keys.SIZE_MB: path.stat().st_size / 1e6, keys.PARAMETERS: backend.n_params(), keys.PERPLEXITY: ppl["perplexity"]}
    if scored:
        report = classification_report([DECISIONS[r["label"]] for r in scored], [DECISIONS[r["pred"]] for r in scored])
        out |= {
            keys.DECISION_ACCURACY: report["accuracy"],
            keys.DECISION_MACRO_F1: report["macro_f1"],
        }
    rates = backend.stats.rates()
    speed = {keys.TOKENS_PER_S: rates["tokens_per_s"], keys.PROMPT_TOKENS_PER_S: rates["prompt_tokens_per_s"]}
    return out, speed, backend


# --------------------------------------------------------------------------- the two stages


@dataclass
class DistillPaths(TeacherPaths):
    """Inputs and outputs of the distill stage (the teacher's targets are an input here)."""

    heldout: Path = Path("data/synth/heldout_reference.jsonl")
    student: Path = Path("models/student")
    metrics: Path = Path("reports/distill.json")
    performance: Path = Path("reports/performance/distill.json")


def student_gguf_name(gguf_type: str) -> str:
    """``so8t-student-q8_0.gguf`` for ``Q8_0``."""
    from so8t.model.quantize import GGUF_PREFIX, gguf_filename

    return gguf_filename(gguf_type, prefix=f"{GGUF_PREFIX}student-")


def _export(model, info: dict, params, paths: DistillPaths, out: Path, work: Path, rows: list[dict], n_threads: int):
    """Bake and save the student to ``out/hf``, export it and the base to GGUF; returns their paths and checks."""
    from so8t.inference.hf import load_tokenizer
    from so8t.model.quantize import export_gguf

    d = params.distill
    gguf_name = student_gguf_name(d.gguf_type)
    export = export_student(model, info, paths.base, out / HF_DIR, rows, d.max_abs_diff)
    student_gguf = export_gguf(out / HF_DIR, out / gguf_name, d.gguf_type, n_threads)
    vocab_check = _check_gguf_vocab(student_gguf, load_tokenizer(paths.base), vocab_size(out / HF_DIR))
    base_gguf = export_gguf(paths.base, work / f"base-{gguf_name}", d.gguf_type, n_threads)
    return student_gguf, base_gguf, export, vocab_check


def _compare(params, paths: DistillPaths, models: dict[str, Path], agreement_rows, test_topk, n_threads, log):
    """Flat metrics of teacher, student and base (all GGUF, llama.cpp) on the test split, and their speed."""
    from so8t.eval import keys
    from so8t.eval.evalsets import balanced_decisions
    from so8t.inference import perplexity_windows
    from so8t.inference.hf import load_tokenizer

    m = params.metrics
    decisions = balanced_decisions(read_jsonl(paths.test), params.distill.max_decision_examples)
    windows = perplexity_windows(
        load_tokenizer(paths.base), [r["text"] for r in read_jsonl(paths.heldout)], m.perplexity_max_tokens,
        m.perplexity_window,
    )
    flat: dict[str, float] = {"enabled": True}
    speed: dict[str, float] = {}
    for name, path in models.items():
        log(f"distill: evaluating {name} ({path.name})")
        metrics, rates, backend = evaluate_gguf(path, decisions, windows, n_threads, params)
        try:
            if name != "teacher":
                agree = agreement_gguf(backend, agreement_rows, test_topk)
                metrics |= {keys.AGREEMENT_TOP1: agree.top1, keys.AGREEMENT_KL: agree.kl}
        finally:
            backend.close()
        flat |= {keys.key(name, k): v for k, v in metrics.items()}
        speed |= {keys.key(name, k): v for k, v in rates.items()}
    return flat, speed


def run_distillation(params, paths: DistillPaths, n_threads: int, log=print) -> dict[str, float]:
    """Stage distill: train, bake and export the student, then compare teacher, student and base.

    Writes ``paths.student`` (``hf/``, the student GGUF, ``distill_summary.json``), the flat
    metrics ``paths.metrics`` (``teacher.*``, ``student.*``, ``base.*``, ``distill.*``) and the
    run's timings and speeds ``paths.performance``.

    Returns:
        The flat metrics.
    """
    from so8t.inference.hf import load_tokenizer

    d = params.distill
    meta = read_json(paths.targets / TEACHER_JSON)
    if not meta.get("enabled"):
        raise DataError(
            f"{paths.targets / TEACHER_JSON}: no teacher targets (distill.enabled was false when distill-teacher ran)"
        )
    train_topk = load_topk(paths.targets / SPLIT_FILE.format(split="train"))
    test_topk = load_topk(paths.targets / SPLIT_FILE.format(split="test"))
    test_by_id = {r["id"]: r for r in read_jsonl(paths.test)}
    agreement_rows = [test_by_id[i] for i in test_topk.example_ids]
    examples = distill_examples(read_jsonl(paths.train), train_topk, paths.train)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    model, info = build_student(paths.base, params, params.seed)
    log(f"distill: student {info}")
    _warn_attention_mismatch(info, log)
    paths.student.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".distill-", dir=paths.student.parent))
    try:
        training = train_student(model, examples, load_tokenizer(paths.base).pad_token_id, params, work / "trainer")
        timings["train"] = time.perf_counter() - t0
        with atomic_dir(paths.student) as out:
            t1 = time.perf_counter()
            student_gguf, base_gguf, export, vocab_check = _export(
                model, info, params, paths, out, work, agreement_rows[:2], n_threads
            )
            del model
            timings["export"] = time.perf_counter() - t1
            t2 = time.perf_counter()
            models = {"teacher": Path(meta["teacher"]), "student": student_gguf, "base": base_gguf}
            flat, speed = _compare(params, paths, models, agreement_rows, test_topk, n_threads, log)
            timings["evaluate"] = time.perf_counter() - t2
            flat |= {
                "teacher.topk_mass": float(np.exp(test_topk.logprobs.astype(np.float64)).sum(1).mean()),
                "distill.top_k": d.top_k,
                "distill.temperature": d.temperature,
                "distill.ce_weight": d.ce_weight,
                "distill.train_positions": int(len(train_topk.positions)),
                "distill.test_positions": int(len(test_topk.positions)),
                "distill.steps": training["steps"],
                "distill.final_ce": training["final_ce"],
                "distill.final_kd": training["final_kd"],
                "distill.student_layers": info["layers"],
            }
            summary = {
                "enabled": True,
                "teacher": {k: meta[k] for k in ("teacher", "sha256", "size_bytes", "k", "tokenizer_check")},
                "student": info | {"gguf": student_gguf.name, "gguf_type": d.gguf_type, "tokenizer_check": vocab_check},
                "training": {k: v for k, v in training.items() if k not in ("train_seconds", "seconds_per_step", "tokens_per_s")},
                "export": export,
            }
            write_json(out / SUMMARY_JSON, summary)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    flat = {k: (round(float(v), 6) if isinstance(v, float) else v) for k, v in flat.items()}
    write_json(paths.metrics, flat)
    write_json(
        paths.performance,
        speed | {f"distill.{k}_seconds": round(v, 1) for k, v in timings.items()}
        | {k: training[k] for k in ("train_seconds", "seconds_per_step", "tokens_per_s")} | {"threads": n_threads},
    )
    return flat


def _warn_attention_mismatch(info: dict, log) -> None:
    """Say when llama.cpp will run some of a layer-subset student's layers with the other attention type."""
    mm = info.get("llama_cpp_attention_mismatch")
    if mm:
        log(
            f"distill: warning: llama.cpp assumes Gemma 3's fixed global-attention pattern, so layers "
            f"{mm['layers']} of this layer subset run there with the other attention type; the GGUF student "
            f"matches the HF student for contexts up to {mm['exact_up_to_tokens']} tokens (choose "
            f"distill.keep_layers with a global layer at every index i % {mm['global_every']} == "
            f"{mm['global_every'] - 1} to lift this)"
        )


def _check_gguf_vocab(path: Path, tokenizer, vocab_size: int) -> dict:
    """The exported GGUF's vocabulary is the HF tokenizer's (as :func:`check_same_tokenizer`)."""
    import llama_cpp
    from llama_cpp._internals import LlamaModel

    mparams = llama_cpp.llama_model_default_params()
    mparams.vocab_only = True
    model = LlamaModel(path_model=str(path), params=mparams, verbose=False)
    try:
        return check_same_tokenizer(GGUFVocab(model), tokenizer, vocab_size, str(path), "its HF folder")
    finally:
        model.close()


__all__ = [
    "Agreement",
    "DistillPaths",
    "agreement_gguf",
    "evaluate_gguf",
    "export_student",
    "run_distillation",
    "student_gguf_name",
]
