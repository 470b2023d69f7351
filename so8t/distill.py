"""Knowledge distillation from a GGUF teacher run by llama.cpp into a Hugging Face student.

The teacher exists only as a (quantised) GGUF file, so it is run where it is
served: llama.cpp through llama-cpp-python. It scores the think-formatted train
split once (stage ``distill-teacher``); the student then trains on those
stored targets (stage ``distill``) and is baked, exported to GGUF and compared
with the teacher and the base model.

**Teacher pass.** Each example is decoded with llama.cpp's batch API
(``llama_batch_init`` / ``llama_decode``), asking for logits only at the label
positions ``t`` (those whose next token ``labels[t + 1]`` is not ``-100``: the
assistant's answer), in chunks of :data:`CHUNK` tokens. Of each ``(V,)`` logit
row ``z`` the ``k`` largest entries are kept (``np.argpartition``) with their
full-vocabulary log-probabilities ``z_i - logsumexp(z)``.

**Storage** (one ``.npz`` per split, see :class:`TopK`): ``example_ids`` (str,
``E``), ``offsets`` (int64, ``E + 1``), ``positions`` (int32, ``N``), ``ids``
(int32, ``N x k``, most probable first) and ``logprobs`` (float16, ``N x k``);
about ``6 k`` bytes per label token.

**Loss** per label position (Hinton, Vinyals and Dean 2015, "Distilling the
Knowledge in a Neural Network", https://arxiv.org/abs/1503.02531)::

    loss = w * CE(z_s, y) + (1 - w) * T^2 * KL(p_T || q_T)
    p_T = softmax(teacher_logprobs[topk] / T)      renormalised over the k ids
    q_T = softmax(z_s[topk] / T)                   renormalised over the same ids

``T^2`` keeps the gradient scale of the soft term independent of ``T``
(Hinton et al., section 2). Renormalising both distributions over the teacher's
top-k ids makes the target exact for what is stored; the student's mass outside
those ids is left to the CE term. The loss is averaged over label tokens and
added to the usual PET penalty (:class:`so8t.train.SO8TTrainer`, whose
label-only LM head is reused).

**Students.** ``lora``: the base with LoRA + SO8T rotations, exactly as
``train`` builds it, baked afterwards (:mod:`so8t.bake`). ``layer_subset``: the
base with only some decoder layers kept (default every other layer from 0, plus
the last: its output is what the final norm and the LM head were trained on, and
in Gemma 3 it is a global-attention layer), every weight trained but, with
``freeze_embeddings`` (default), the (tied) embeddings; no SO8T.

**Agreement** on the test split, for the exported student and the base (both as
GGUF of the same type, in llama.cpp like the teacher): top-1 agreement (student
argmax over the full vocabulary equals the teacher's top-1) and the mean
``KL(p || q)`` at ``T = 1`` over the teacher's top-k, renormalised as in the loss.
"""

from __future__ import annotations

import math
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from so8t.io import DataError, atomic_dir, atomic_path, read_json, read_jsonl, sha256_file, write_json
from so8t.train import IGNORE_INDEX, SO8TTrainer, output_logits

#: Tokens per ``llama_decode`` call in the teacher pass (bounds llama.cpp's logits buffer to CHUNK x V floats).
CHUNK = 128

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

#: Files in ``data/distill``.
TEACHER_JSON = "teacher.json"
SPLIT_FILE = "{split}.npz"
#: Files in ``models/student``.
SUMMARY_JSON = "distill_summary.json"
HF_DIR = "hf"


class DistillError(ValueError):
    """Distillation cannot proceed (tokenizer mismatch, bad teacher file, misaligned targets)."""


# --------------------------------------------------------------------------- teacher and tokenizer


def resolve_teacher(spec: str, cache_dir: Path = Path(".cache/base")) -> Path:
    """The teacher GGUF for ``params.distill.teacher_gguf``: a path, or an embedded model name.

    Raises:
        DistillError: when it is neither an existing ``.gguf`` file nor an embedded name.
    """
    from so8t.base_model import EMBEDDED, resolve_source

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
    """The vocabulary of a loaded llama.cpp model, for :func:`check_same_tokenizer`."""

    def __init__(self, llm) -> None:
        import llama_cpp

        self.llm = llm
        self._vocab = llama_cpp.llama_model_get_vocab(llm.model)

    def n_vocab(self) -> int:
        return self.llm.n_vocab()

    def tokenize(self, text: str, add_bos: bool) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=False)

    def piece(self, token_id: int) -> str:
        """The token's string as stored in the vocabulary (``▁`` / ``Ġ`` spaces, ``<0x0A>`` bytes)."""
        import llama_cpp

        return llama_cpp.llama_vocab_get_text(self._vocab, token_id).decode("utf-8", "replace")


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


# --------------------------------------------------------------------------- llama.cpp at label positions


def open_scorer(path: str | Path, n_ctx: int, n_threads: int):
    """A llama.cpp context for :func:`iter_label_logits` (decode batches of :data:`CHUNK` tokens)."""
    from llama_cpp import Llama

    n_ctx = max(CHUNK, int(math.ceil(n_ctx / CHUNK)) * CHUNK)
    return Llama(
        str(path), n_ctx=n_ctx, n_batch=CHUNK, n_ubatch=CHUNK, n_threads=n_threads, n_threads_batch=n_threads,
        verbose=False,
    )


def iter_label_logits(llm, sequences: list[list[int]], positions: list[np.ndarray]) -> Iterator[np.ndarray]:
    """llama.cpp logits at chosen positions of each sequence, computed only there.

    Each sequence is decoded from an empty KV cache in chunks of :data:`CHUNK`
    tokens; the LM head runs only for rows whose ``logits`` flag is set.

    Args:
        llm: a ``llama_cpp.Llama`` from :func:`open_scorer`.
        sequences: token ids per example.
        positions: ascending int positions per example.

    Yields:
        ``(n, V)`` float32 logits of the requested positions of one chunk; over all
        steps, every requested position of every sequence in order. The array is a
        view of llama.cpp's buffer, valid until the next step.

    Raises:
        DistillError: a sequence longer than the context, or ``llama_decode`` failing.
    """
    import llama_cpp

    n_vocab = llm.n_vocab()
    batch = llama_cpp.llama_batch_init(CHUNK, 0, 1)
    memory = llama_cpp.llama_get_memory(llm.ctx)
    try:
        for e, (ids, pos) in enumerate(zip(sequences, positions)):
            if len(pos) == 0:
                continue
            if len(ids) > llm.n_ctx():
                raise DistillError(f"example {e}: {len(ids)} tokens exceed the llama.cpp context of {llm.n_ctx()}")
            want = np.zeros(len(ids), dtype=bool)
            want[pos] = True
            llama_cpp.llama_memory_clear(memory, True)
            last = int(pos[-1])
            for start in range(0, last + 1, CHUNK):
                piece = ids[start : min(start + CHUNK, last + 1)]
                flags = want[start : start + len(piece)]
                for j, tok in enumerate(piece):
                    batch.token[j] = tok
                    batch.pos[j] = start + j
                    batch.n_seq_id[j] = 1
                    batch.seq_id[j][0] = 0
                    batch.logits[j] = bool(flags[j])
                batch.n_tokens = len(piece)
                rc = llama_cpp.llama_decode(llm.ctx, batch)
                if rc != 0:
                    raise DistillError(f"llama_decode returned {rc} on example {e} (tokens {start}..)")
                n_out = int(flags.sum())
                if n_out:
                    # Requested rows are stored contiguously in batch order.
                    ptr = llama_cpp.llama_get_logits(llm.ctx)
                    yield np.ctypeslib.as_array(ptr, shape=(n_out, n_vocab))
    finally:
        llama_cpp.llama_batch_free(batch)


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


def teacher_topk(llm, rows: list[dict], k: int, on_progress: Callable[[int], None] | None = None) -> TopK:
    """Score think-format ``rows`` with the teacher; keep top-k log-probs at their label positions.

    Raises:
        DistillError: ``k`` larger than the vocabulary, or a decode failure.
    """
    if k > llm.n_vocab():
        raise DistillError(f"distill.top_k = {k} exceeds the teacher's vocabulary of {llm.n_vocab()} tokens")
    positions = [label_positions(r["labels"]) for r in rows]
    ids_parts, lp_parts = [], []
    for logits in iter_label_logits(llm, [r["input_ids"] for r in rows], positions):
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


# --------------------------------------------------------------------------- loss and agreement


def topk_kl(
    student_logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """``KL(p_T || q_T)`` per position over the teacher's top-k ids (Hinton et al. 2015).

    ``p_T = softmax(teacher_logprobs / T)`` and ``q_T = softmax(student_logits[teacher_ids] / T)``,
    both renormalised over the ``k`` ids.

    Args:
        student_logits: ``(N, V)`` float logits.
        teacher_ids: ``(N, k)`` long.
        teacher_logprobs: ``(N, k)`` float (any normalisation: only differences matter).

    Returns:
        ``(N,)`` float32 KL in nats (not multiplied by ``T^2``).
    """
    log_q = torch.log_softmax(student_logits.float().gather(1, teacher_ids.long()) / temperature, dim=-1)
    log_p = torch.log_softmax(teacher_logprobs.float() / temperature, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


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


def agreement_gguf(path: str | Path, rows: list[dict], topk: TopK, n_threads: int) -> Agreement:
    """:class:`Agreement` of a GGUF model with the stored teacher top-k, in llama.cpp.

    Raises:
        DistillError: when ``rows`` and ``topk`` do not hold the same examples.
    """
    if [r["id"] for r in rows] != topk.example_ids:
        raise DistillError("agreement: the test rows and the teacher's top-k do not hold the same examples")
    llm = open_scorer(path, max(len(r["input_ids"]) for r in rows), n_threads)
    hits, kl_sum, cursor = 0, 0.0, 0
    try:
        # Rows arrive in the stored order, so one cursor walks the flat teacher arrays.
        sequences = [r["input_ids"] for r in rows]
        for logits in iter_label_logits(llm, sequences, [topk.positions[topk.rows(e)] for e in range(len(topk))]):
            t_ids = topk.ids[cursor : cursor + len(logits)]
            t_lp = topk.logprobs[cursor : cursor + len(logits)]
            hits += int((logits.argmax(axis=1) == t_ids[:, 0]).sum())
            kl = topk_kl(torch.from_numpy(logits), torch.from_numpy(t_ids), torch.from_numpy(t_lp))
            kl_sum += float(kl.double().sum())
            cursor += len(logits)
    finally:
        llm.close()
    n = cursor
    return Agreement(hits / n if n else math.nan, kl_sum / n if n else math.nan, n)


# --------------------------------------------------------------------------- students


def default_keep_layers(n_layers: int) -> list[int]:
    """Every other decoder layer from 0, plus the last: ``[0, 2, ..., n - 1]``."""
    return sorted(set(range(0, n_layers, 2)) | {n_layers - 1})


def keep_decoder_layers(model: nn.Module, keep: list[int]) -> dict:
    """In place: keep only decoder layers ``keep`` (ascending) of a HF causal LM.

    Updates ``config.num_hidden_layers``, every per-layer list in the text config
    (a list with one entry per layer, e.g. Gemma 3's and Qwen 2's ``layer_types``)
    and each kept module's ``layer_idx`` (the KV-cache slot), so the model saves
    and reloads as an ordinary, shallower model of its architecture.

    Returns:
        ``{"layers_before", "layers_after", "kept", "per_layer_config_keys"}``.

    Raises:
        DistillError: indices out of range or repeated, or an unsupported architecture.
    """
    from so8t.attach import O_PROJ_PATHS

    config = model.config.get_text_config()
    n = config.num_hidden_layers
    keep = sorted(keep)
    if not keep or len(set(keep)) != len(keep) or keep[0] < 0 or keep[-1] >= n:
        raise DistillError(f"distill.keep_layers: {keep} must be distinct indices in 0..{n - 1}")
    try:
        layers_path = O_PROJ_PATHS[model.config.model_type].split(".{i}.")[0]
    except KeyError:
        raise DistillError(
            f"layer_subset does not support model_type {model.config.model_type!r}; supported: {sorted(O_PROJ_PATHS)}"
        ) from None
    parent_path, attr = layers_path.rsplit(".", 1)
    old = model.get_submodule(layers_path)
    new = nn.ModuleList([old[i] for i in keep])
    for new_idx, layer in enumerate(new):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_idx
    setattr(model.get_submodule(parent_path), attr, new)
    per_layer = [
        key for key, value in vars(config).items()
        if isinstance(value, list | tuple) and len(value) == n and key != "architectures"
    ]
    for key in per_layer:
        setattr(config, key, [getattr(config, key)[i] for i in keep])
    config.num_hidden_layers = len(keep)
    return {"layers_before": n, "layers_after": len(keep), "kept": keep, "per_layer_config_keys": per_layer}


#: llama.cpp's Gemma 3 loader does not read per-layer attention types from the GGUF: it assumes
#: layer ``i`` is global when ``i % 6 == 5`` and sliding-window otherwise (``set_swa_pattern(6)``
#: in llama.cpp's ``llama-model.cpp``; the converter writes only the window size).
LLAMA_CPP_GLOBAL_EVERY: dict[str, int] = {"gemma3": 6, "gemma3_text": 6}


def llama_cpp_attention_mismatch(config) -> list[int]:
    """Layers whose attention type (``config.layer_types``) llama.cpp would get wrong in GGUF.

    Only Gemma 3 is affected (:data:`LLAMA_CPP_GLOBAL_EVERY`): a layer subset that
    does not keep its global layers at indices ``5, 11, ...`` runs there with the
    other attention type. Outputs are still identical for contexts no longer than
    ``config.sliding_window`` tokens (a window that long masks nothing).

    Returns:
        Indices of the mismatched layers (empty when none or not applicable).
    """
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    every = LLAMA_CPP_GLOBAL_EVERY.get(getattr(text, "model_type", ""))
    types = getattr(text, "layer_types", None)
    if every is None or not types or not getattr(text, "sliding_window", None):
        return []
    return [
        i for i, t in enumerate(types)
        if (t == "full_attention") != (i % every == every - 1)
    ]


def build_student(base_dir: str | Path, params, seed: int) -> tuple[nn.Module, dict]:
    """The student of ``params.distill.student`` and a description of it.

    ``lora``: :func:`so8t.train.build_model` (LoRA + SO8T exactly as train).
    ``layer_subset``: the float32 base with :func:`keep_decoder_layers`; all
    weights trainable except, with ``freeze_embeddings``, the input and output
    embeddings.
    """
    from so8t.attach import num_layers
    from so8t.base_model import load_causal_lm
    from so8t.train import build_model, trainable_parameter_counts

    d = params.distill
    if d.student == "lora":
        model = build_model(base_dir, params.train, seed)
        info = {"student": "lora", "so8t": params.train.so8t.enabled, "layers": num_layers(model)}
    else:
        torch.manual_seed(seed)
        model = load_causal_lm(base_dir, torch.float32)
        n = num_layers(model)
        keep = d.keep_layers if d.keep_layers is not None else default_keep_layers(n)
        info = {"student": "layer_subset", "so8t": False} | keep_decoder_layers(model, keep)
        info["layers"] = info["layers_after"]
        mismatch = llama_cpp_attention_mismatch(model.config)
        if mismatch:
            text = model.config.get_text_config()
            info["llama_cpp_attention_mismatch"] = {
                "layers": mismatch,
                "global_every": LLAMA_CPP_GLOBAL_EVERY[text.model_type],
                "exact_up_to_tokens": text.sliding_window,
            }
        if d.freeze_embeddings:
            for emb in (model.get_input_embeddings(), model.get_output_embeddings()):
                if emb is not None:
                    emb.weight.requires_grad_(False)
    info["trainable_parameters"] = trainable_parameter_counts(model)
    info["parameters"] = sum(p.numel() for p in model.parameters())
    return model, info


# --------------------------------------------------------------------------- training


def distill_examples(rows: list[dict], topk: TopK, source: Path) -> list[dict]:
    """Training items: ``input_ids``, ``labels`` and the teacher rows of each example.

    Raises:
        DataError: an example missing from ``rows`` or whose label positions differ
            from the stored ones (the targets are stale: rerun distill-teacher).
    """
    by_id = {r["id"]: r for r in rows}
    out = []
    for e, ex_id in enumerate(topk.example_ids):
        row = by_id.get(ex_id)
        if row is None:
            raise DataError(f"{source}: example {ex_id!r} of the teacher targets is missing (rerun distill-teacher)")
        sl = topk.rows(e)
        if not np.array_equal(label_positions(row["labels"]), topk.positions[sl]):
            raise DataError(
                f"{source}: label positions of {ex_id!r} differ from the teacher targets (rerun distill-teacher)"
            )
        out.append(
            {
                "input_ids": row["input_ids"],
                "labels": row["labels"],
                "teacher_ids": topk.ids[sl],
                "teacher_logprobs": topk.logprobs[sl],
            }
        )
    return out


class DistillCollator:
    """Right-pads ``input_ids`` / ``labels`` and stacks the teacher rows of a batch.

    The teacher rows of the batch are concatenated in example order, which is the
    row-major order of the label mask ``labels[:, 1:] != -100``: row ``j`` of
    ``teacher_ids`` belongs to the ``j``-th label position of the batch.

    Returns (per batch): ``input_ids``, ``labels``, ``attention_mask`` ``(B, T)``
    long; ``teacher_ids`` ``(N, k)`` long; ``teacher_logprobs`` ``(N, k)`` float32.
    """

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full_like(ids, IGNORE_INDEX)
        mask = torch.zeros_like(ids)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            ids[i, :n] = torch.tensor(f["input_ids"])
            labels[i, :n] = torch.tensor(f["labels"])
            mask[i, :n] = 1
        return {
            "input_ids": ids,
            "labels": labels,
            "attention_mask": mask,
            "teacher_ids": torch.from_numpy(np.concatenate([f["teacher_ids"] for f in features])).long(),
            "teacher_logprobs": torch.from_numpy(
                np.concatenate([f["teacher_logprobs"] for f in features]).astype(np.float32)
            ),
        }


class DistillTrainer(SO8TTrainer):
    """:class:`~so8t.train.SO8TTrainer` whose CE is mixed with the top-k KD term.

    ``loss = ce_weight * CE + (1 - ce_weight) * T^2 * KL(p_T || q_T) + lambda * PET``,
    CE and KL averaged over label tokens; the LM head runs only at label positions.

    Args:
        temperature: ``T``.
        ce_weight: ``w`` in [0, 1].
        (other arguments as :class:`~so8t.train.SO8TTrainer`)
    """

    def __init__(self, *args, temperature: float = 2.0, ce_weight: float = 0.5, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.temperature = temperature
        self.ce_weight = ce_weight

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        from so8t.pet import pet_penalty

        labels, mask = inputs["labels"], inputs["attention_mask"]
        outputs = model(
            input_ids=inputs["input_ids"],
            attention_mask=mask,
            output_hidden_states=True,
            logits_to_keep=1,
            use_cache=False,
        )
        last = outputs.hidden_states[-1]
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        n_label = int(keep.sum())
        t_ids, t_lp = inputs["teacher_ids"], inputs["teacher_logprobs"]
        if t_ids.shape[0] != n_label:
            raise DistillError(f"batch has {n_label} label positions but {t_ids.shape[0]} teacher rows")
        if n_label:
            logits = output_logits(self.accelerator.unwrap_model(model), last[:, :-1][keep])
            ce_sum = nn.functional.cross_entropy(logits, targets[keep], reduction="sum")
            kd_sum = topk_kl(logits, t_ids, t_lp, self.temperature).sum()
        else:
            ce_sum = kd_sum = last.sum() * 0.0
        objective = self.ce_weight * ce_sum + (1.0 - self.ce_weight) * self.temperature**2 * kd_sum
        ga = self.current_gradient_accumulation_steps
        if num_items_in_batch is not None:
            loss = objective / num_items_in_batch
            if self.args.average_tokens_across_devices:
                loss = loss * self.accelerator.num_processes
        else:
            loss = objective / max(n_label, 1) / ga
        stats = {"ce": ce_sum.detach().item() / max(n_label, 1), "kd": kd_sum.detach().item() / max(n_label, 1)}
        if self.pet_schedule is not None:
            lam = self.pet_schedule(self.progress())
            pet = pet_penalty(outputs.hidden_states[self.pet_hidden_state_index], mask, self.pet_reduction)
            loss = loss + lam * pet / ga
            stats |= {"pet": pet.detach().item(), "pet_lambda": lam}
        for key, value in stats.items():
            self._acc[key] = self._acc.get(key, 0.0) + value
        self._acc_n += 1
        self._tokens += int(mask.sum())
        return (loss, outputs) if return_outputs else loss


def train_student(model: nn.Module, examples: list[dict], pad_token_id: int, params, work_dir: Path) -> dict:
    """Train ``model`` on ``examples`` (:func:`distill_examples`) with :class:`DistillTrainer`.

    Batch size, gradient accumulation, schedule, warm-up, clipping, weight decay,
    PET and the SO8T learning rate come from ``params.train``; steps and the
    learning rate from ``params.distill``.

    Returns:
        ``{"steps", "train_seconds", "seconds_per_step", "tokens_per_s", "final_loss",
        "final_ce", "final_kd", "history": [{"step", "loss", "ce", "kd"}, ...]}``.
    """
    from transformers import TrainingArguments
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from so8t.pet import PETSchedule
    from so8t.train import RichProgressCallback

    p, d = params.train, params.distill
    if p.num_threads:
        torch.set_num_threads(p.num_threads)
    args = TrainingArguments(
        output_dir=str(work_dir),
        max_steps=d.max_steps,
        per_device_train_batch_size=p.per_device_train_batch_size,
        gradient_accumulation_steps=p.gradient_accumulation_steps,
        learning_rate=d.learning_rate,
        weight_decay=p.weight_decay,
        warmup_steps=round(p.warmup_ratio * d.max_steps),
        lr_scheduler_type=p.lr_scheduler_type,
        max_grad_norm=p.max_grad_norm,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=params.seed,
        data_seed=params.seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
        remove_unused_columns=False,  # the teacher arrays are not forward() arguments
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = DistillTrainer(
        model=model,
        args=args,
        train_dataset=examples,
        data_collator=DistillCollator(pad_token_id),
        callbacks=[RichProgressCallback()],
        pet_schedule=PETSchedule(p.pet.phase_boundaries, p.pet.lambdas) if p.pet.enabled else None,
        pet_hidden_state_index=p.pet.hidden_state_index,
        pet_reduction=p.pet.reduction,
        so8t_learning_rate=p.so8t.learning_rate,
        temperature=d.temperature,
        ce_weight=d.ce_weight,
    )
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    start = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - start
    history = [
        {k: h[k] for k in ("step", "loss", "ce", "kd", "tokens_per_s") if k in h}
        for h in trainer.state.log_history
        if "kd" in h
    ]
    last = history[-1] if history else {}
    return {
        "steps": trainer.state.global_step,
        "train_seconds": round(seconds, 1),
        "seconds_per_step": round(seconds / max(trainer.state.global_step, 1), 3),
        "tokens_per_s": round(float(np.mean([h["tokens_per_s"] for h in history])), 2) if history else None,
        "final_loss": last.get("loss", result.training_loss),
        "final_ce": last.get("ce"),
        "final_kd": last.get("kd"),
        "history": history,
    }


# --------------------------------------------------------------------------- export and evaluation


def export_student(
    model: nn.Module, info: dict, base_dir: Path, out_dir: Path, verify_rows: list[dict], max_abs_diff: float
) -> dict:
    """Bake (``lora``: merge LoRA, fold rotations) and save the student as a plain HF folder; verify it.

    The saved folder is reloaded in float64 and its logits on ``verify_rows``
    compared with the in-memory student's (float64).

    Returns:
        The comparison (:class:`so8t.bake.LogitDiff` as a dict) and ``threshold``.

    Raises:
        DistillError: when the saved student differs by more than ``max_abs_diff``.
    """
    from so8t.bake import bake_model, compare_logits, model_logits
    from so8t.base_model import load_causal_lm, load_tokenizer

    width = max(len(r["input_ids"]) for r in verify_rows)
    ids = torch.zeros(len(verify_rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(verify_rows):
        ids[i, : len(r["input_ids"])] = torch.tensor(r["input_ids"])
        mask[i, : len(r["input_ids"])] = 1
    reference = model_logits(model.to(device="cpu", dtype=torch.float64), ids, mask)
    model = model.float()
    if info["student"] == "lora":
        model = bake_model(model, require_rotations=info["so8t"])
    model.save_pretrained(out_dir)
    load_tokenizer(base_dir).save_pretrained(out_dir)
    diff = compare_logits(reference, model_logits(load_causal_lm(out_dir, torch.float64), ids, mask))
    if diff.max_abs_diff > max_abs_diff:
        raise DistillError(
            f"the saved student's logits differ from the trained one by {diff.max_abs_diff:.3g} > "
            f"bake.max_abs_diff = {max_abs_diff:g}"
        )
    return diff.to_dict() | {"threshold": max_abs_diff}


def export_gguf(hf_dir: Path, out_path: Path, gguf_type: str, n_threads: int) -> Path:
    """HF folder -> F32 GGUF (temporary, next to ``out_path``) -> ``gguf_type`` at ``out_path``."""
    from so8t.quantize import convert_hf_to_gguf, quantize_gguf

    f32 = out_path.with_name(f".{out_path.stem}-f32.gguf")
    try:
        convert_hf_to_gguf(hf_dir, f32, "f32")
        quantize_gguf(f32, out_path, gguf_type, n_threads=n_threads)
    finally:
        f32.unlink(missing_ok=True)
    return out_path


def evaluate_gguf(
    path: Path,
    tokenizer,
    decisions: list[dict],
    windows: list[list[int]],
    n_threads: int,
    repetition_penalty: float,
    max_new_tokens: int,
) -> dict[str, float]:
    """Size, parameters, generation and prompt tokens/s, perplexity and decision metrics of a GGUF.

    Decisions are scored as in the evaluate stage (:func:`so8t.scoring.score_decisions`,
    uncalibrated); perplexity over ``windows`` (:func:`so8t.scoring.perplexity_of`).
    """
    import llama_cpp

    from so8t.metrics import classification_report
    from so8t.quantize import stop_strings
    from so8t.schema import DECISIONS
    from so8t.scoring import LlamaCppBackend, perplexity_of, score_decisions

    backend = LlamaCppBackend(path, tokenizer, n_ctx=1024, n_threads=n_threads, repetition_penalty=repetition_penalty)
    try:
        scored = score_decisions(backend, decisions, max_new_tokens, stop_strings(tokenizer)) if decisions else []
        ppl = perplexity_of(backend, windows)
        n_params = int(llama_cpp.llama_model_n_params(backend.llm.model))
    finally:
        backend.close()
    out = {
        "size_mb": path.stat().st_size / 1e6,
        "parameters": n_params,
        "perplexity": ppl["perplexity"],
        "prompt_tokens_per_s": ppl["tokens"] / max(ppl["seconds"], 1e-9),
    }
    if scored:
        report = classification_report([DECISIONS[r["label"]] for r in scored], [DECISIONS[r["pred"]] for r in scored])
        gen_tokens = sum(r["gen_tokens"] for r in scored)
        out |= {
            "tokens_per_s": gen_tokens / max(sum(r["gen_seconds"] for r in scored), 1e-9),
            "decision.accuracy": report["accuracy"],
            "decision.macro_f1": report["macro_f1"],
            "decision.format_rate": float(np.mean([r["format_ok"] for r in scored])),
        }
    return out


# --------------------------------------------------------------------------- the two stages


@dataclass
class DistillPaths:
    """Inputs and outputs of the two distillation stages."""

    base: Path = Path("models/base")
    train: Path = Path("data/formatted/train.jsonl")
    test: Path = Path("data/formatted/test.jsonl")
    heldout: Path = Path("data/synth/heldout_reference.jsonl")
    targets: Path = Path("data/distill")
    student: Path = Path("models/student")
    metrics: Path = Path("reports/distill.json")


def student_gguf_name(gguf_type: str) -> str:
    """``so8t-student-q8_0.gguf`` for ``Q8_0``."""
    from so8t.quantize import GGUF_TYPES

    return f"so8t-student-{GGUF_TYPES[gguf_type][1]}.gguf"


def _vocab_size(base: Path) -> int:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(base), local_files_only=True).get_text_config().vocab_size


def run_teacher_pass(params, paths: DistillPaths, n_threads: int, log=print) -> dict:
    """Stage distill-teacher: check tokenizers, score the train and test samples, write ``paths.targets``.

    Writes ``train.npz``, ``test.npz`` (:class:`TopK`) and ``teacher.json`` (teacher
    path, sha256, size, k, the tokenizer check, and per split: examples, label
    positions, tokens decoded, seconds, label tokens/s).

    Raises:
        DistillError: tokenizer mismatch, missing teacher, or a decode failure.
    """
    import llama_cpp

    from so8t.base_model import load_tokenizer
    from so8t.console import progress

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
    llm = open_scorer(teacher, n_ctx, n_threads)
    summary: dict = {"enabled": True, "teacher": str(teacher), "k": d.top_k, "threads": n_threads}
    try:
        summary["tokenizer_check"] = check_same_tokenizer(
            GGUFVocab(llm), tokenizer, _vocab_size(paths.base), str(teacher), str(paths.base)
        )
        log(f"distill-teacher: {teacher} shares the student's tokenizer {summary['tokenizer_check']}")
        results = {}
        with progress() as bar:
            for name, rows in splits.items():
                positions = [label_positions(r["labels"]) for r in rows]
                total = sum(map(len, positions))
                task = bar.add_task(f"distill-teacher: {name}", total=total, info=f"{len(rows)} examples")
                start = time.perf_counter()
                results[name] = teacher_topk(llm, rows, d.top_k, lambda n, t=task: bar.advance(t, n))
                seconds = time.perf_counter() - start
                n_pos = len(results[name].positions)
                summary[name] = {
                    "examples": len(rows),
                    "label_positions": n_pos,
                    # Decoding stops at the last label position of each example.
                    "tokens_decoded": int(sum(int(p[-1]) + 1 for p in positions if len(p))),
                    "seconds": round(seconds, 2),
                    "label_tokens_per_s": round(n_pos / max(seconds, 1e-9), 2),
                }
        summary["n_params"] = int(llama_cpp.llama_model_n_params(llm.model))
    finally:
        llm.close()
    summary |= {"size_bytes": teacher.stat().st_size, "sha256": sha256_file(teacher)}
    with atomic_dir(paths.targets) as tmp:
        for name, topk in results.items():
            save_topk(tmp / SPLIT_FILE.format(split=name), topk)
        write_json(tmp / TEACHER_JSON, summary)
    return summary


def run_distillation(params, paths: DistillPaths, n_threads: int, log=print) -> dict[str, float]:
    """Stage distill: train, bake and export the student, then compare teacher, student and base.

    Writes ``paths.student`` (``hf/``, the student GGUF, ``distill_summary.json``) and
    the flat metrics ``paths.metrics`` (``teacher.*``, ``student.*``, ``base.*``, ``distill.*``).

    Returns:
        The flat metrics.
    """
    from so8t.base_model import load_tokenizer
    from so8t.evaluation import balanced_decisions
    from so8t.scoring import perplexity_windows

    d, e = params.distill, params.evaluate
    meta = read_json(paths.targets / TEACHER_JSON)
    if not meta.get("enabled"):
        raise DataError(
            f"{paths.targets / TEACHER_JSON}: no teacher targets (distill.enabled was false when distill-teacher ran)"
        )
    teacher = Path(meta["teacher"])
    train_topk = load_topk(paths.targets / SPLIT_FILE.format(split="train"))
    test_topk = load_topk(paths.targets / SPLIT_FILE.format(split="test"))
    test_all = read_jsonl(paths.test)
    test_by_id = {r["id"]: r for r in test_all}
    examples = distill_examples(read_jsonl(paths.train), train_topk, paths.train)
    agreement_rows = [test_by_id[i] for i in test_topk.example_ids]
    tokenizer = load_tokenizer(paths.base)
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    model, info = build_student(paths.base, params, params.seed)
    log(f"distill: student {info}")
    if "llama_cpp_attention_mismatch" in info:
        mm = info["llama_cpp_attention_mismatch"]
        log(
            f"distill: warning: llama.cpp assumes Gemma 3's fixed global-attention pattern, so layers "
            f"{mm['layers']} of this layer subset run there with the other attention type; the GGUF student "
            f"matches the HF student for contexts up to {mm['exact_up_to_tokens']} tokens (choose "
            f"distill.keep_layers with a global layer at every index i % {mm['global_every']} == "
            f"{mm['global_every'] - 1} to lift this)"
        )
    paths.student.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".distill-", dir=paths.student.parent))
    try:
        training = train_student(model, examples, tokenizer.pad_token_id, params, work / "trainer")
        timings["train"] = time.perf_counter() - t0
        gguf_name = student_gguf_name(d.gguf_type)
        with atomic_dir(paths.student) as out:
            t1 = time.perf_counter()
            export = export_student(model, info, paths.base, out / HF_DIR, agreement_rows[:2], params.bake.max_abs_diff)
            del model
            student_gguf = export_gguf(out / HF_DIR, out / gguf_name, d.gguf_type, n_threads)
            vocab_check = _check_gguf_vocab(student_gguf, tokenizer, _vocab_size(out / HF_DIR))
            base_gguf = export_gguf(paths.base, work / f"base-{gguf_name}", d.gguf_type, n_threads)
            timings["export"] = time.perf_counter() - t1

            t2 = time.perf_counter()
            decisions = balanced_decisions(test_all, d.max_decision_examples)
            windows = perplexity_windows(
                tokenizer, [r["text"] for r in read_jsonl(paths.heldout)], e.perplexity_max_tokens, e.perplexity_window
            )
            models = {"teacher": teacher, "student": student_gguf, "base": base_gguf}
            flat: dict[str, float] = {"enabled": True}
            for name, path in models.items():
                log(f"distill: evaluating {name} ({path.name})")
                m = evaluate_gguf(
                    path, tokenizer, decisions, windows, n_threads, e.repetition_penalty, e.decision_max_new_tokens
                )
                if name != "teacher":
                    agree = agreement_gguf(path, agreement_rows, test_topk, n_threads)
                    m |= {"agreement.top1": agree.top1, "agreement.kl": agree.kl}
                flat |= {f"{name}.{k}": v for k, v in m.items()}
            timings["evaluate"] = time.perf_counter() - t2
            flat |= {
                "teacher.topk_mass": float(np.exp(test_topk.logprobs.astype(np.float64)).sum(1).mean()),
                "distill.top_k": d.top_k,
                "distill.temperature": d.temperature,
                "distill.ce_weight": d.ce_weight,
                "distill.train_positions": int(len(train_topk.positions)),
                "distill.test_positions": int(len(test_topk.positions)),
                "distill.teacher_label_tokens_per_s": meta["train"]["label_tokens_per_s"],
                "distill.teacher_seconds": meta["train"]["seconds"] + meta["test"]["seconds"],
                "distill.steps": training["steps"],
                "distill.train_seconds": training["train_seconds"],
                "distill.seconds_per_step": training["seconds_per_step"],
                "distill.final_ce": training["final_ce"],
                "distill.final_kd": training["final_kd"],
                "distill.student_layers": info["layers"],
            }
            summary = {
                "enabled": True,
                "teacher": {k: meta[k] for k in ("teacher", "sha256", "size_bytes", "k", "tokenizer_check")},
                "student": info | {"gguf": gguf_name, "gguf_type": d.gguf_type, "tokenizer_check": vocab_check},
                "training": training,
                "export": export,
                "timings_seconds": {k: round(v, 1) for k, v in timings.items()},
                "threads": n_threads,
            }
            write_json(out / SUMMARY_JSON, summary)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    flat = {k: (round(float(v), 6) if isinstance(v, float) else v) for k, v in flat.items()}
    write_json(paths.metrics, flat)
    return flat


def _check_gguf_vocab(path: Path, tokenizer, vocab_size: int) -> dict:
    """The exported GGUF's vocabulary is the HF tokenizer's (as :func:`check_same_tokenizer`)."""
    from llama_cpp import Llama

    llm = Llama(str(path), n_ctx=256, vocab_only=True, verbose=False)
    try:
        return check_same_tokenizer(GGUFVocab(llm), tokenizer, vocab_size, str(path), "its HF folder")
    finally:
        llm.close()


__all__ = [
    "Agreement",
    "CHUNK",
    "DistillCollator",
    "DistillError",
    "DistillPaths",
    "DistillTrainer",
    "GGUFVocab",
    "TopK",
    "agreement_gguf",
    "build_student",
    "check_same_tokenizer",
    "default_keep_layers",
    "distill_examples",
    "evaluate_gguf",
    "iter_label_logits",
    "keep_decoder_layers",
    "llama_cpp_attention_mismatch",
    "label_positions",
    "load_topk",
    "open_scorer",
    "resolve_teacher",
    "run_distillation",
    "run_teacher_pass",
    "sample_rows",
    "save_topk",
    "teacher_topk",
    "topk_kl",
    "topk_logprobs",
    "train_student",
]
