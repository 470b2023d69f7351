"""The teacher side of distillation: which GGUF, does it share the student's tokenizer, and its targets.

The teacher exists only as a (quantised) GGUF file, so it is run where it is
served: llama.cpp. It scores the think-formatted train split once (stage
``distill-teacher``), asking for logits only at the label positions ``t`` (those
whose next token ``labels[t + 1]`` is not ``-100``: the assistant's answer;
:meth:`so8t.inference.LlamaCppBackend.logits_at`). Of each ``(V,)`` logit row
``z`` the ``k`` largest entries are kept (``np.argpartition``) with their
full-vocabulary log-probabilities ``z_i - logsumexp(z)``.

**Storage** (one ``.npz`` per split, see :class:`TopK`): ``example_ids`` (str,
``E``), ``offsets`` (int64, ``E + 1``), ``positions`` (int32, ``N``), ``ids``
(int32, ``N x k``, most probable first) and ``logprobs`` (float16, ``N x k``);
about ``6 k`` bytes per label token.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from so8t.errors import So8tError
from so8t.io import DataError, atomic_dir, atomic_path, read_jsonl, sha256_file, write_json
from so8t.schema import IGNORE_INDEX

#: Files in ``data/distill``.
TEACHER_JSON = "teacher.json"
SPLIT_FILE = "{split}.npz"

#: Japanese text both tokenizers must split identically.
JA_SAMPLES: tuple[str, ...] = (
    "日本の首都は東京です。",
    "Debian のパッケージ管理について説明してください。",
    "# 思考ステップ\n輸出管理の確認が必要です。\n# 最終回答\n判定: ESCALATION",
    "ｶﾀｶﾅと全角ＡＢＣ、１２３。",
)

#: Vocabulary ids whose token strings are compared: all ids below this, plus an even spread.
_LOW_IDS = 256
_SPREAD_IDS = 512


class DistillError(So8tError, ValueError):
    """Distillation cannot proceed (tokenizer mismatch, bad teacher file, misaligned targets)."""



def resolve_teacher(spec: str, cache_dir: Path = Path(".cache/base")) -> Path:
    """The teacher GGUF for ``params.distill.teacher_gguf``: a path, or an embedded model name.

    Raises:
        DistillError: when it is neither an existing ``.gguf`` file nor an embedded name.
    """
    from so8t.model.base_model import EMBEDDED, resolve_source

    if spec in EMBEDDED:
        return resolve_source(spec, cache_dir).path
    path = Path(spec).expanduser()
    if path.suffix != ".gguf" or not path.is_file():
        raise DistillError(
            f"distill.teacher_gguf: {spec!r} is not an existing .gguf file (the default, "
            f"models/gguf/so8t-q8_0.gguf, is written by the quantize stage when quantize.types has Q8_0) "
            f"nor one of {sorted(EMBEDDED)}"
        )
    return path


class GGUFVocab:
    """The vocabulary of a llama.cpp model (a :class:`so8t.inference.LlamaCppBackend`'s), for
    :func:`check_same_tokenizer`."""

    def __init__(self, model) -> None:
        self.model = model

    def n_vocab(self) -> int:
        return self.model.n_vocab()

    def tokenize(self, text: str, add_bos: bool) -> list[int]:
        return self.model.tokenize(text.encode("utf-8"), add_bos=add_bos, special=False)

    def piece(self, token_id: int) -> str:
        """The token's string as stored in the vocabulary (``▁`` / ``Ġ`` spaces, ``<0x0A>`` bytes)."""
        import llama_cpp

        return llama_cpp.llama_vocab_get_text(self.model.vocab, token_id).decode("utf-8", "replace")


def check_same_tokenizer(
    teacher,
    tokenizer,
    student_vocab_size: int,
    teacher_name: str,
    student_name: str,
    samples: tuple[str, ...] = JA_SAMPLES,
) -> dict:
    """Fail unless the teacher and the student share one tokenizer.

    Compares (1) the teacher's vocabulary size with the width of the student's
    LM head, (2) the token strings of ids ``0..255`` and 512 ids spread over the
    vocabulary, (3) the tokenisation of ``samples`` (BOS as the HF tokenizer adds it).

    Args:
        teacher: a :class:`GGUFVocab` (or anything with ``n_vocab()``, ``piece(id)``,
            ``tokenize(text, add_bos)``).
        tokenizer: the student's Hugging Face tokenizer.
        student_vocab_size: the student's ``config.vocab_size`` (logit width).

    Returns:
        What was compared: ``{"n_vocab", "ids_compared", "samples_compared"}``.

    Raises:
        DistillError: naming both models and the first difference.
    """
    fix = (
        "Distillation compares next-token distributions id by id, so both must use one vocabulary: "
        "pick a teacher GGUF of the student's model family (e.g. this pipeline's models/gguf/so8t-q8_0.gguf) "
        "or set base_model.source to the teacher's family."
    )
    head = f"teacher {teacher_name} and student {student_name} do not share a tokenizer"
    n_vocab = teacher.n_vocab()
    if n_vocab != student_vocab_size:
        raise DistillError(
            f"{head}: the teacher has {n_vocab:,} tokens, the student's LM head {student_vocab_size:,}. {fix}"
        )
    known = min(n_vocab, len(tokenizer))
    ids = sorted(set(range(min(_LOW_IDS, known))) | set(np.linspace(0, known - 1, _SPREAD_IDS).astype(int).tolist()))
    hf_pieces = tokenizer.convert_ids_to_tokens(ids)
    for i, hf_piece in zip(ids, hf_pieces):
        piece = teacher.piece(i)
        if piece != hf_piece:
            raise DistillError(
                f"{head}: token id {i} is {piece!r} in the teacher and {hf_piece!r} in the student. {fix}"
            )
    for text in samples:
        hf = tokenizer(text)["input_ids"]
        add_bos = bool(hf) and hf[0] == tokenizer.bos_token_id
        ll = teacher.tokenize(text, add_bos)
        if ll != hf:
            first = next((j for j, (a, b) in enumerate(zip(ll, hf)) if a != b), min(len(ll), len(hf)))
            raise DistillError(
                f"{head}: {text!r} tokenises differently from token {first} on: "
                f"teacher {ll[first : first + 8]}, student {hf[first : first + 8]}. {fix}"
            )
    return {"n_vocab": n_vocab, "ids_compared": len(ids), "samples_compared": len(samples)}


# --------------------------------------------------------------------------- top-k storage


@dataclass
class TopK:
    """Teacher top-k next-token log-probabilities at the label positions of a split.

    Attributes:
        example_ids: ``E`` example ids, in the order of the rows below.
        offsets: ``(E + 1,)`` int64; example ``e`` owns rows ``offsets[e]:offsets[e + 1]``.
        positions: ``(N,)`` int32 position ``t`` in its example (row ``t`` predicts token ``t + 1``).
        ids: ``(N, k)`` int32 token ids, most probable first.
        logprobs: ``(N, k)`` float16 full-vocabulary log-probabilities (nats) of ``ids``.
    """

    example_ids: list[str]
    offsets: np.ndarray
    positions: np.ndarray
    ids: np.ndarray
    logprobs: np.ndarray

    @property
    def k(self) -> int:
        return int(self.ids.shape[1])

    def __len__(self) -> int:
        return len(self.example_ids)

    def rows(self, e: int) -> slice:
        """Row slice of example ``e``."""
        return slice(int(self.offsets[e]), int(self.offsets[e + 1]))


def save_topk(path: str | Path, topk: TopK) -> None:
    """Write ``topk`` as an uncompressed ``.npz`` (atomic; loads without pickle)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(
            fh,
            example_ids=np.asarray(topk.example_ids, dtype=str),
            offsets=topk.offsets.astype(np.int64),
            positions=topk.positions.astype(np.int32),
            ids=topk.ids.astype(np.int32),
            logprobs=topk.logprobs.astype(np.float16),
        )


def load_topk(path: str | Path) -> TopK:
    """Read a file written by :func:`save_topk`.

    Raises:
        DataError: a missing file or inconsistent array shapes, naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found (run the distill-teacher stage)")
    with np.load(path, allow_pickle=False) as z:
        topk = TopK([str(s) for s in z["example_ids"]], z["offsets"], z["positions"], z["ids"], z["logprobs"])
    n = topk.positions.shape[0]
    if (
        topk.offsets.shape != (len(topk.example_ids) + 1,)
        or int(topk.offsets[-1]) != n
        or topk.ids.shape != topk.logprobs.shape
        or topk.ids.shape[0] != n
    ):
        raise DataError(f"{path}: inconsistent teacher top-k arrays (rerun the distill-teacher stage)")
    return topk


def label_positions(labels: list[int]) -> np.ndarray:
    """Positions ``t`` whose next label ``labels[t + 1]`` is not ``-100``, as int32."""
    lab = np.asarray(labels)
    return (np.nonzero(lab[1:] != IGNORE_INDEX)[0]).astype(np.int32)


def sample_rows(rows: list[dict], n: int | None, seed: int) -> list[dict]:
    """``n`` rows drawn with ``seed`` (kept in file order), or all rows when ``n`` is ``None`` or larger."""
    if n is None or n >= len(rows):
        return list(rows)
    keep = sorted(random.Random(seed).sample(range(len(rows)), n))
    return [rows[i] for i in keep]


# --------------------------------------------------------------------------- top-k of the teacher's logits


def topk_logprobs(rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` most probable ids of each logit row and their full-vocabulary log-probabilities.

    Args:
        rows: ``(n, V)`` float32 logits.

    Returns:
        ``(ids, logprobs)``: ``(n, k)`` int32 sorted most probable first, ``(n, k)`` float32 nats.
    """
    rows = np.asarray(rows, dtype=np.float32)
    m = rows.max(axis=1, keepdims=True)
    lse = m[:, 0].astype(np.float64) + np.log(np.exp(rows - m).sum(axis=1, dtype=np.float64))
    idx = np.argpartition(rows, -k, axis=1)[:, -k:]
    val = np.take_along_axis(rows, idx, axis=1)
    order = np.argsort(-val, axis=1, kind="stable")
    idx = np.take_along_axis(idx, order, axis=1)
    val = np.take_along_axis(val, order, axis=1)
    return idx.astype(np.int32), (val - lse[:, None]).astype(np.float32)


def teacher_topk(backend, rows: list[dict], k: int, on_progress: Callable[[int], None] | None = None) -> TopK:
    """Score think-format ``rows`` with the teacher; keep top-k log-probs at their label positions.

    Args:
        backend: the teacher, a :class:`so8t.inference.LlamaCppBackend` (logits only at
            the label positions, :meth:`~so8t.inference.LlamaCppBackend.logits_at`).

    Raises:
        DistillError: ``k`` larger than the vocabulary.
    """
    if k > backend.n_vocab:
        raise DistillError(f"distill.top_k = {k} exceeds the teacher's vocabulary of {backend.n_vocab} tokens")
    positions = [label_positions(r["labels"]) for r in rows]
    ids_parts, lp_parts = [], []
    for logits in backend.logits_at([r["input_ids"] for r in rows], positions):
        ids, lp = topk_logprobs(logits, k)
        ids_parts.append(ids)
        lp_parts.append(np.maximum(lp, -6.0e4))  # float16 holds down to -65504
        if on_progress is not None:
            on_progress(len(ids))
    counts = [len(p) for p in positions]
    return TopK(
        example_ids=[r["id"] for r in rows],
        offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        positions=np.concatenate(positions or [np.zeros(0, np.int32)]).astype(np.int32),
        ids=np.concatenate(ids_parts) if ids_parts else np.zeros((0, k), np.int32),
        logprobs=(np.concatenate(lp_parts) if lp_parts else np.zeros((0, k), np.float32)).astype(np.float16),
    )


# --------------------------------------------------------------------------- the distill-teacher stage


@dataclass
class TeacherPaths:
    """Inputs and output of the distill-teacher stage."""

    base: Path = Path("models/base")
    train: Path = Path("data/formatted/train.jsonl")
    test: Path = Path("data/formatted/test.jsonl")
    targets: Path = Path("data/distill")
    performance: Path = Path("reports/performance/distill_teacher.json")


def vocab_size(base: Path) -> int:
    """The logit width (``vocab_size``) of a Hugging Face model folder's text config."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(base), local_files_only=True).get_text_config().vocab_size


def run_teacher_pass(params, paths: TeacherPaths, n_threads: int, log=print) -> dict:
    """Stage distill-teacher: check tokenizers, score the train and test samples, write ``paths.targets``.

    Writes ``train.npz``, ``test.npz`` (:class:`TopK`) and ``teacher.json`` (teacher path,
    sha256, size, k, the tokenizer check, and per split: examples, label positions, tokens
    decoded). Seconds and label tokens/s go to ``paths.performance``.

    Raises:
        DistillError: tokenizer mismatch, missing teacher, or a decode failure.
    """
    from so8t.console import progress
    from so8t.inference import LlamaCppBackend
    from so8t.inference.hf import load_tokenizer

    d = params.distill
    teacher = resolve_teacher(d.teacher_gguf)
    tokenizer = load_tokenizer(paths.base)
    splits = {
        "train": sample_rows(read_jsonl(paths.train), d.max_train_examples, params.seed),
        "test": sample_rows(read_jsonl(paths.test), d.max_test_examples, params.seed),
    }
    for name, rows in splits.items():
        if not rows:
            raise DataError(f"{paths.train if name == 'train' else paths.test}: no examples to distil")
    n_ctx = max(len(r["input_ids"]) for rows in splits.values() for r in rows)
    backend = LlamaCppBackend(teacher, n_ctx=n_ctx, n_threads=n_threads, batch_size=1)
    summary: dict = {"enabled": True, "teacher": str(teacher), "k": d.top_k}
    timing: dict = {"threads": n_threads}
    try:
        summary["tokenizer_check"] = check_same_tokenizer(
            GGUFVocab(backend.model), tokenizer, vocab_size(paths.base), str(teacher), str(paths.base)
        )
        log(f"distill-teacher: {teacher} shares the student's tokenizer {summary['tokenizer_check']}")
        results = {}
        with progress() as bar:
            for name, rows in splits.items():
                positions = [label_positions(r["labels"]) for r in rows]
                task = bar.add_task(f"distill-teacher: {name}", total=sum(map(len, positions)), info=f"{len(rows)} examples")
                start = time.perf_counter()
                results[name] = teacher_topk(backend, rows, d.top_k, lambda n, t=task: bar.advance(t, n))
                seconds = time.perf_counter() - start
                n_pos = len(results[name].positions)
                summary[name] = {
                    "examples": len(rows),
                    "label_positions": n_pos,
                    # Decoding stops at the last label position of each example.
                    "tokens_decoded": int(sum(int(p[-1]) + 1 for p in positions if len(p))),
                }
                timing[name] = {"seconds": round(seconds, 2), "label_tokens_per_s": round(n_pos / max(seconds, 1e-9), 2)}
        summary["n_params"] = backend.n_params()
    finally:
        backend.close()
    summary |= {"size_bytes": teacher.stat().st_size, "sha256": sha256_file(teacher)}
    with atomic_dir(paths.targets) as tmp:
        for name, topk in results.items():
            save_topk(tmp / SPLIT_FILE.format(split=name), topk)
        write_json(tmp / TEACHER_JSON, summary)
    write_json(paths.performance, timing)
    return summary | {"timing": timing}
