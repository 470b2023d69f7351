"""Knowledge distillation (so8t/distill/, stages/distill_teacher.py, stages/distill.py).

Unit tests run on tiny random models with the character tokenizer of tests/tiny.py;
the end-to-end test uses tiny random Gemma 3 models with the real Gemma 3 tokenizer,
a teacher converted to GGUF and run by llama.cpp, as the pipeline does.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, TrainingArguments

from so8t.distill.pipeline import DistillPaths, export_student, run_distillation
from so8t.distill.student import build_student, default_keep_layers, keep_decoder_layers
from so8t.distill.teacher import (
    DistillError,
    TeacherPaths,
    TopK,
    check_same_tokenizer,
    label_positions,
    load_topk,
    resolve_teacher,
    run_teacher_pass,
    save_topk,
    topk_logprobs,
)
from so8t.distill.trainer import DistillCollator, DistillTrainer, distill_examples, topk_kl, train_student
from so8t.io import DataError, read_jsonl
from so8t.params import Params
from so8t.model.trainer import SO8TTrainer
from tiny import TINY_CONFIGS, tiny_base_dir, tiny_tokenizer, tiny_train_jsonl

REPO = Path(__file__).resolve().parents[2]


def _params(**sections) -> Params:
    return Params.model_validate(sections)


# --------------------------------------------------------------------------- loss


def test_topk_kl_matches_a_hand_computation():
    student = torch.tensor([[1.0, 2.0, 0.5, -1.0, 3.0], [0.0, -2.0, 1.0, 4.0, 0.0]])
    ids = torch.tensor([[4, 1, 0], [3, 2, 0]])
    teacher = torch.tensor([[-0.5, -1.5, -2.0], [-0.2, -2.2, -3.0]])
    t = 2.0
    expected = []
    for s_row, i_row, t_row in zip(student.tolist(), ids.tolist(), teacher.tolist()):
        zs = [s_row[i] / t for i in i_row]
        zt = [v / t for v in t_row]
        q = [math.exp(z) / sum(math.exp(x) for x in zs) for z in zs]
        p = [math.exp(z) / sum(math.exp(x) for x in zt) for z in zt]
        expected.append(sum(pi * math.log(pi / qi) for pi, qi in zip(p, q)))
    got = topk_kl(student, ids, teacher, temperature=t)
    assert got.shape == (2,)
    assert torch.allclose(got, torch.tensor(expected), atol=1e-6)


def test_topk_kl_is_zero_when_the_student_matches_the_teacher():
    torch.manual_seed(0)
    teacher_logits = torch.randn(6, 50) * 3
    ids = torch.topk(teacher_logits, 8, dim=1).indices
    teacher_lp = torch.log_softmax(teacher_logits, -1).gather(1, ids)
    # Same logits up to a per-row shift, anything outside the top-k: same renormalised distribution.
    student = teacher_logits + torch.arange(6.0)[:, None]
    student.scatter_(1, torch.topk(-teacher_logits, 5, dim=1).indices, 100.0)
    for t in (1.0, 2.0, 5.0):
        assert topk_kl(student, ids, teacher_lp, t).abs().max() < 1e-5
    assert topk_kl(torch.zeros(6, 50), ids, teacher_lp, 1.0).min() > 1e-3


def test_topk_logprobs_are_the_full_vocabulary_log_softmax():
    rng = np.random.default_rng(0)
    rows = (rng.standard_normal((5, 300)) * 4).astype(np.float32)
    ids, lp = topk_logprobs(rows, 7)
    ref = torch.log_softmax(torch.from_numpy(rows).double(), -1)
    ref_lp, ref_ids = torch.topk(ref, 7, dim=1)
    assert (ids == ref_ids.numpy()).all() and ids.dtype == np.int32
    assert np.allclose(lp, ref_lp.numpy(), atol=1e-5)
    assert (np.diff(lp, axis=1) <= 0).all()


# --------------------------------------------------------------------------- storage


def _random_topk(seed: int, lengths=(3, 0, 5), k: int = 4, vocab: int = 100) -> TopK:
    rng = np.random.default_rng(seed)
    n = sum(lengths)
    lp = -np.sort(rng.random((n, k)) * 10, axis=1)
    return TopK(
        example_ids=[f"ex{i}" for i in range(len(lengths))],
        offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        positions=np.concatenate([np.arange(3, 3 + m) for m in lengths]).astype(np.int32),
        ids=rng.integers(0, vocab, (n, k)).astype(np.int32),
        logprobs=lp.astype(np.float16),
    )


def test_topk_storage_round_trip(tmp_path):
    topk = _random_topk(0)
    save_topk(tmp_path / "train.npz", topk)
    back = load_topk(tmp_path / "train.npz")
    assert back.example_ids == topk.example_ids and back.k == 4 and len(back) == 3
    for name in ("offsets", "positions", "ids", "logprobs"):
        a, b = getattr(topk, name), getattr(back, name)
        assert a.dtype == b.dtype and np.array_equal(a, b), name
    assert back.rows(1) == slice(3, 3) and back.rows(2) == slice(3, 8)
    assert not list(tmp_path.glob(".*tmp"))  # written atomically, nothing left behind


def test_topk_storage_rejects_inconsistent_files(tmp_path):
    topk = _random_topk(0)
    topk.offsets = topk.offsets[:-1]
    save_topk(tmp_path / "bad.npz", topk)
    with pytest.raises(DataError, match="bad.npz"):
        load_topk(tmp_path / "bad.npz")
    with pytest.raises(DataError, match="distill-teacher"):
        load_topk(tmp_path / "missing.npz")


def test_training_items_must_match_the_stored_label_positions(tmp_path):
    rows = [{"id": "a", "input_ids": [5, 6, 7, 8, 9], "labels": [-100, -100, 7, 8, 9]}]
    good = TopK(["a"], np.array([0, 3]), np.array([1, 2, 3], np.int32), np.zeros((3, 2), np.int32),
                np.zeros((3, 2), np.float16))
    assert label_positions(rows[0]["labels"]).tolist() == [1, 2, 3]
    items = distill_examples(rows, good, tmp_path / "train.jsonl")
    assert items[0]["teacher_ids"].shape == (3, 2)
    stale = TopK(["a"], np.array([0, 2]), np.array([2, 3], np.int32), np.zeros((2, 2), np.int32),
                 np.zeros((2, 2), np.float16))
    with pytest.raises(DataError, match="rerun distill-teacher"):
        distill_examples(rows, stale, tmp_path / "train.jsonl")


# --------------------------------------------------------------------------- tokenizer check


class _FakeVocab:
    """A teacher vocabulary made from a HF tokenizer, optionally with one token changed."""

    def __init__(self, tokenizer, changed: dict[int, str] | None = None, n_vocab: int | None = None):
        self.tok, self.changed, self._n = tokenizer, changed or {}, n_vocab

    def n_vocab(self) -> int:
        return self._n or len(self.tok)

    def piece(self, i: int) -> str:
        return self.changed.get(i, self.tok.convert_ids_to_tokens(i))

    def tokenize(self, text: str, add_bos: bool) -> list[int]:
        return self.tok(text)["input_ids"]


def test_tokenizer_check_passes_for_the_same_tokenizer_and_names_both_models_otherwise():
    tok = tiny_tokenizer()
    info = check_same_tokenizer(_FakeVocab(tok), tok, len(tok), "teacher.gguf", "models/base")
    assert info["n_vocab"] == len(tok) and info["ids_compared"] == len(tok)
    with pytest.raises(DistillError) as err:
        check_same_tokenizer(_FakeVocab(tok, n_vocab=262144), tok, len(tok), "teacher.gguf", "models/base")
    assert "teacher.gguf" in str(err.value) and "models/base" in str(err.value) and "262,144" in str(err.value)
    with pytest.raises(DistillError, match="token id 20 is 'X' in the teacher"):
        check_same_tokenizer(_FakeVocab(tok, {20: "X"}), tok, len(tok), "teacher.gguf", "models/base")


def test_missing_teacher_names_the_param(tmp_path):
    with pytest.raises(DistillError, match="distill.teacher_gguf"):
        resolve_teacher(str(tmp_path / "nope.gguf"))


# --------------------------------------------------------------------------- students


def _deep_base(path: Path, arch: str, n_layers: int) -> Path:
    """A tiny random ``arch`` model with ``n_layers`` layers and the character tokenizer."""
    tok = tiny_tokenizer()
    kwargs = TINY_CONFIGS[arch]().to_dict() | {"num_hidden_layers": n_layers, "vocab_size": len(tok)}
    if "layer_types" in kwargs:
        kwargs["layer_types"] = ["full_attention" if i % 3 == 2 else "sliding_attention" for i in range(n_layers)]
    config = AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_default_keep_layers_keeps_every_other_layer_and_the_last():
    assert default_keep_layers(18) == [0, 2, 4, 6, 8, 10, 12, 14, 16, 17]
    assert default_keep_layers(5) == [0, 2, 4]
    assert default_keep_layers(2) == [0, 1]


@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
def test_layer_subset_student_is_a_valid_smaller_model(tmp_path, arch):
    base = _deep_base(tmp_path / "base", arch, 5)
    params = _params(distill={"student": "layer_subset"})
    model, info = build_student(base, params, seed=0)
    assert info["kept"] == [0, 2, 4] and info["layers"] == 3 and model.config.num_hidden_layers == 3
    if arch == "gemma3_text":
        assert info["per_layer_config_keys"] == ["layer_types"]
        assert model.config.layer_types == ["sliding_attention", "full_attention", "sliding_attention"]
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2]
    assert not model.get_input_embeddings().weight.requires_grad
    assert info["trainable_parameters"]["other"] > 0 and info["parameters"] < 10**6
    model.eval()
    ids = torch.randint(6, 100, (1, 12))
    with torch.no_grad():
        full = model(input_ids=ids).logits
        # Step-by-step decoding with the KV cache: each kept layer must use its own cache slot.
        out = model(input_ids=ids[:, :8], use_cache=True)
        step = model(input_ids=ids[:, 8:], past_key_values=out.past_key_values, use_cache=True).logits
    assert torch.isfinite(full).all()
    assert torch.allclose(full[:, 8:], step, atol=1e-5)
    model.save_pretrained(tmp_path / "student")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "student", dtype=torch.float32).eval()
    assert reloaded.config.num_hidden_layers == 3
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, full)


def test_llama_cpp_attention_pattern_mismatch_is_reported_for_gemma3_subsets():
    from transformers import AutoConfig

    from so8t.distill.student import llama_cpp_attention_mismatch

    def gemma(types):
        return AutoConfig.for_model("gemma3_text", num_hidden_layers=len(types), layer_types=types,
                                    sliding_window=512)

    full = ["full_attention" if i % 6 == 5 else "sliding_attention" for i in range(18)]
    assert llama_cpp_attention_mismatch(gemma(full)) == []
    subset = [full[i] for i in default_keep_layers(18)]  # keeps only global layer 17, at index 9
    assert llama_cpp_attention_mismatch(gemma(subset)) == [5, 9]
    kept = [0, 3, 6, 9, 13, 17]  # 5 sliding layers, then a global one at index 5
    assert llama_cpp_attention_mismatch(gemma([full[i] for i in kept])) == []
    llama = AutoConfig.for_model("llama", num_hidden_layers=2)
    assert llama_cpp_attention_mismatch(llama) == []


def test_layer_subset_rejects_bad_indices(tmp_path):
    model = AutoModelForCausalLM.from_pretrained(_deep_base(tmp_path / "b", "llama", 4))
    with pytest.raises(DistillError, match="distill.keep_layers"):
        keep_decoder_layers(model, [0, 4])


# --------------------------------------------------------------------------- training


def _teacher_topk(teacher, rows: list[dict], k: int) -> TopK:
    """Top-k log-probs of a HF ``teacher`` at the label positions of ``rows`` (as llama.cpp would give)."""
    ids_parts, lp_parts, positions = [], [], []
    with torch.no_grad():
        for r in rows:
            pos = label_positions(r["labels"])
            logits = teacher(input_ids=torch.tensor([r["input_ids"]])).logits[0, pos].numpy()
            ids, lp = topk_logprobs(logits, k)
            ids_parts.append(ids)
            lp_parts.append(lp)
            positions.append(pos)
    return TopK([r["id"] for r in rows], np.concatenate([[0], np.cumsum([len(p) for p in positions])]),
                np.concatenate(positions), np.concatenate(ids_parts), np.concatenate(lp_parts).astype(np.float16))


def _mean_kl_and_top1(model, items: list[dict]) -> tuple[float, float]:
    batch = DistillCollator(0)(items)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    logits = logits[batch["labels"][:, 1:] != -100]
    kl = topk_kl(logits, batch["teacher_ids"], batch["teacher_logprobs"]).mean().item()
    top1 = (logits.argmax(-1) == batch["teacher_ids"][:, 0]).float().mean().item()
    return kl, top1


@pytest.fixture
def tiny_setup(tmp_path):
    base = tiny_base_dir(tmp_path / "base", "llama", seed=0)
    data = tmp_path / "train.jsonl"
    tiny_train_jsonl(data, n=16, seed=0)
    rows = read_jsonl(data)
    teacher = AutoModelForCausalLM.from_pretrained(tiny_base_dir(tmp_path / "teacher", "llama", seed=1)).eval()
    with torch.no_grad():  # a peaked teacher: its top-1 is a real preference
        teacher.lm_head.weight.mul_(30.0)
    items = distill_examples(rows, _teacher_topk(teacher, rows, 8), data)
    return base, rows, items, tmp_path


def test_ce_only_distillation_loss_equals_the_train_loss(tiny_setup):
    base, _, items, tmp_path = tiny_setup
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    args = TrainingArguments(
        output_dir=str(tmp_path / "t"), report_to="none", use_cpu=True, remove_unused_columns=False
    )
    batch = DistillCollator(0)(items[:4])
    distill = DistillTrainer(model=model, args=args, ce_weight=1.0, temperature=3.0)
    train = SO8TTrainer(model=model, args=args)
    distill.current_gradient_accumulation_steps = train.current_gradient_accumulation_steps = 1  # set by train()
    with torch.no_grad():
        a = distill.compute_loss(model, batch)
        b = train.compute_loss(model, {k: batch[k] for k in ("input_ids", "labels", "attention_mask")})
    assert torch.allclose(a, b, atol=1e-6)
    mixer = DistillTrainer(model=model, args=args, ce_weight=0.25, temperature=2.0)
    mixer.current_gradient_accumulation_steps = 1
    with torch.no_grad():
        mixed = mixer.compute_loss(model, batch)
    assert math.isfinite(mixed.item()) and mixed.item() != pytest.approx(a.item())
    bad = dict(batch, teacher_ids=batch["teacher_ids"][:-1], teacher_logprobs=batch["teacher_logprobs"][:-1])
    with pytest.raises(DistillError, match="teacher rows"):
        distill.compute_loss(model, bad)


def test_distillation_moves_the_student_towards_the_teacher(tiny_setup):
    base, _, items, tmp_path = tiny_setup
    params = _params(
        seed=0,
        train={"per_device_train_batch_size": 4, "warmup_ratio": 0.0, "lr_scheduler_type": "constant",
               "pet": {"enabled": False}},
        distill={"student": "layer_subset", "keep_layers": [0, 1], "freeze_embeddings": False, "ce_weight": 0.0,
                 "temperature": 1.0, "max_steps": 40, "learning_rate": 3e-3},
    )
    model, _ = build_student(base, params, seed=0)
    before = _mean_kl_and_top1(model.eval(), items)
    summary = train_student(model, items, 0, params, tmp_path / "work")
    after = _mean_kl_and_top1(model.eval(), items)
    assert summary["steps"] == 40 and all(math.isfinite(h["loss"]) for h in summary["history"])
    assert summary["final_ce"] is not None and summary["final_kd"] < summary["history"][0]["kd"]
    assert after[0] < 0.5 * before[0], (before, after)
    assert after[1] > before[1], (before, after)


def test_lora_student_trains_and_bakes_into_a_plain_model(tiny_setup):
    base, rows, items, tmp_path = tiny_setup
    params = _params(seed=0, train={"per_device_train_batch_size": 2, "lora_r": 4, "lora_alpha": 8,
                                    "so8t": {"init_scale": 0.1}},
                     distill={"student": "lora", "max_steps": 2, "learning_rate": 1e-3})
    model, info = build_student(base, params, seed=0)
    assert info["student"] == "lora" and info["so8t"] and info["trainable_parameters"]["so8t"] > 0
    summary = train_student(model, items, 0, params, tmp_path / "work")
    assert summary["steps"] == 2 and math.isfinite(summary["final_loss"])
    diff = export_student(model, info, base, tmp_path / "student", rows[:2], 1e-4)
    assert diff["max_abs_diff"] < 1e-4
    config = json.loads((tmp_path / "student" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_hidden_layers"] == 2
    assert not (tmp_path / "student" / "adapter_config.json").exists()


# --------------------------------------------------------------------------- stages, disabled


def test_disabled_stages_only_write_markers_quickly(tmp_path):
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    probe = "import runpy, sys; runpy.run_path(sys.argv[1], run_name='__main__'); print('torch', 'torch' in sys.modules)"
    for script in ("stages/distill_teacher.py", "stages/distill.py"):
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-c", probe, str(REPO / script)], cwd=tmp_path, env=env, capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "torch False" in proc.stdout  # nothing heavy is imported when disabled
        assert time.perf_counter() - start < 15
    assert json.loads((tmp_path / "data/distill/teacher.json").read_text()) == {"enabled": False}
    assert json.loads((tmp_path / "models/student/distill_summary.json").read_text()) == {"enabled": False}
    assert json.loads((tmp_path / "reports/distill.json").read_text()) == {"enabled": False}


# --------------------------------------------------------------------------- end to end with a GGUF teacher


def _tiny_gemma_pair(root: Path, tokenizer) -> tuple[Path, Path, object]:
    """Two random 3-layer Gemma 3 models with the real Gemma 3 tokenizer: the base and a peaked teacher."""
    from tiny import tiny_gemma_dir

    base = tiny_gemma_dir(root / "base", tokenizer, layers=3, seed=0)
    teacher = tiny_gemma_dir(root / "teacher", tokenizer, layers=3, seed=1)
    model = AutoModelForCausalLM.from_pretrained(teacher)
    with torch.no_grad():
        model.model.norm.weight.fill_(20.0)  # Gemma's RMSNorm scales by (1 + w): sharper logits
    model.save_pretrained(teacher)
    return base, teacher, tokenizer


def _formatted(tokenizer, n: int, prefix: str) -> list[dict]:
    from so8t.schema import DECISIONS, Record
    from so8t.data.think_format import FormatStats, format_record

    records = [
        Record(id=f"{prefix}{i}", task="decision", domain="defense", group=f"{prefix}{i}", source="test",
               prompt=f"質問{i}: 防衛装備品の部品を海外へ送る手続きを教えてください。",
               thinking="輸出管理の対象か確認します。" * (1 + i % 3), response="担当部署の確認が必要です。",
               decision=DECISIONS[i % 3])
        for i in range(n)
    ]
    return [format_record(r, tokenizer, "markdown", 256, FormatStats()) for r in records]


@pytest.fixture(scope="module")
def gguf_run(tmp_path_factory, gemma_tok):
    from so8t.io import write_jsonl
    from so8t.model.quantize import convert_hf_to_gguf

    root = tmp_path_factory.mktemp("distill-e2e")
    base, teacher_dir, tokenizer = _tiny_gemma_pair(root, gemma_tok)
    teacher = convert_hf_to_gguf(teacher_dir, root / "teacher.gguf", "f16")
    paths = DistillPaths(base=base, train=root / "train.jsonl", test=root / "test.jsonl",
                         heldout=root / "heldout.jsonl", targets=root / "data/distill",
                         student=root / "models/student", metrics=root / "reports/distill.json",
                         performance=root / "reports/performance/distill.json")
    teacher_paths = TeacherPaths(base=base, train=paths.train, test=paths.test, targets=paths.targets,
                                 performance=root / "reports/performance/distill_teacher.json")
    write_jsonl(paths.train, _formatted(tokenizer, 10, "tr"))
    write_jsonl(paths.test, _formatted(tokenizer, 6, "te"))
    write_jsonl(paths.heldout, [{"text": "日本の首都は東京です。Debian のパッケージ管理について説明します。" * 3}])
    params = _params(
        seed=0,
        train={"per_device_train_batch_size": 2},
        metrics={"perplexity_max_tokens": 64, "perplexity_window": 32},
        distill={"enabled": True, "teacher_gguf": str(teacher), "top_k": 8, "max_train_examples": 8,
                 "max_test_examples": 4, "max_steps": 3, "learning_rate": 1e-3, "max_decision_examples": 3},
    )
    start = time.perf_counter()
    teacher_summary = run_teacher_pass(params, teacher_paths, 1, log=lambda *_: None)
    teacher_seconds = time.perf_counter() - start
    metrics = run_distillation(params, paths, 1, log=lambda *_: None)
    return paths, teacher, tokenizer, teacher_summary, metrics, teacher_seconds


@pytest.mark.slow
def test_teacher_pass_stores_top_k_at_label_positions(gguf_run):
    paths, teacher, _, summary, _, _ = gguf_run
    assert summary["k"] == 8 and summary["tokenizer_check"]["n_vocab"] == 262144
    assert summary["train"]["examples"] == 8 and summary["test"]["examples"] == 4
    topk = load_topk(paths.targets / "train.npz")
    rows = {r["id"]: r for r in read_jsonl(paths.train)}
    assert len(topk) == 8 and topk.k == 8 and summary["train"]["label_positions"] == len(topk.positions)
    for e, ex_id in enumerate(topk.example_ids):
        assert np.array_equal(topk.positions[topk.rows(e)], label_positions(rows[ex_id]["labels"]))
    assert ((topk.ids >= 0) & (topk.ids < 262144)).all()
    assert (topk.logprobs <= 0).all() and (np.diff(topk.logprobs.astype(np.float32), axis=1) <= 0).all()
    # A peaked teacher: its top-8 hold far more than the 8 / 262,144 of a uniform distribution.
    assert np.exp(topk.logprobs.astype(np.float64)).sum(1).mean() > 0.05
    assert json.loads((paths.targets / "teacher.json").read_text())["sha256"] == summary["sha256"]


@pytest.mark.slow
def test_student_flows_through_bake_gguf_and_evaluation(gguf_run):
    paths, _, _, _, m, _ = gguf_run
    assert m["enabled"] is True
    for name in ("teacher", "student", "base"):
        assert m[f"{name}.size_mb"] > 0 and m[f"{name}.parameters"] > 0
        assert m[f"{name}.perplexity"] > 1.0
        assert 0.0 <= m[f"{name}.decision.macro_f1"] <= 1.0
    for name in ("student", "base"):
        assert 0.0 <= m[f"{name}.agreement.top1"] <= 1.0 and m[f"{name}.agreement.kl"] >= 0.0
    assert m["student.parameters"] < m["base.parameters"] and m["distill.student_layers"] == 2
    assert 0.0 < m["teacher.topk_mass"] <= 1.0 + 1e-3 and m["distill.steps"] == 3
    assert math.isfinite(m["distill.final_kd"]) and math.isfinite(m["distill.final_ce"])
    config = json.loads((paths.student / "hf" / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 and len(config["layer_types"]) == 2
    assert (paths.student / "so8t-student-q8_0.gguf").stat().st_size > 0
    summary = json.loads((paths.student / "distill_summary.json").read_text())
    assert summary["student"]["kept"] == [0, 2] and summary["export"]["max_abs_diff"] < 1e-4
    assert summary["student"]["tokenizer_check"]["n_vocab"] == 262144
    assert json.loads(paths.metrics.read_text()) == m
    assert not [p for p in paths.student.parent.iterdir() if p.name.startswith(".")]  # temporary files removed
    speed = json.loads(paths.performance.read_text())
    assert all(speed[f"{name}.tokens_per_s"] > 0 for name in ("teacher", "student", "base"))


@pytest.mark.slow
def test_gguf_teacher_with_another_tokenizer_is_refused(gguf_run):
    from so8t.distill.teacher import GGUFVocab
    from so8t.inference import LlamaCppBackend

    _, teacher, _, _, _, _ = gguf_run
    backend = LlamaCppBackend(teacher, n_ctx=256, n_threads=1, batch_size=1)
    try:
        tok = tiny_tokenizer()
        with pytest.raises(DistillError) as err:
            check_same_tokenizer(GGUFVocab(backend.model), tok, len(tok), str(teacher), "tiny-char-student")
    finally:
        backend.close()
    assert str(teacher) in str(err.value) and "tiny-char-student" in str(err.value)
    assert "262,144" in str(err.value)
