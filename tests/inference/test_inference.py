"""The inference layer on a tiny random Gemma 3 (real Gemma 3 tokenizer) and its float32 GGUF in llama.cpp.

Batching must not change a result, and the two runtimes must decode greedily under the same rules.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from so8t.decision import DECISION_MARKER_TEXT
from so8t.inference import (
    HFBackend,
    LlamaCppBackend,
    cut_at_stop,
    label_requests,
    penalize,
    score_decisions,
    score_labels,
    stop_strings,
)
from so8t.inference.decoding import _Sequence
from tiny import tiny_gemma_dir

QUESTIONS = [
    "Debian でパッケージを入れるには？",
    "こんにちは",
    "輸出管理について教えてください。少し長い質問です。",
    "判定を下してください",
    "五番目の質問",
]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def backends(tmp_path_factory, gemma_tok):
    """``(hf, llama, prompt texts)``: the same tiny weights in transformers (float32) and llama.cpp (F32 GGUF)."""
    pytest.importorskip("llama_cpp")
    from so8t.model.quantize import convert_hf_to_gguf

    root = tmp_path_factory.mktemp("inference")
    hf_dir = tiny_gemma_dir(root / "hf", gemma_tok)
    gguf = convert_hf_to_gguf(hf_dir, root / "tiny-f32.gguf", "f32")
    hf = HFBackend(hf_dir, batch_size=3)
    ll = LlamaCppBackend(gguf, n_ctx=512, n_threads=1, batch_size=3)
    texts = [
        gemma_tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in QUESTIONS
    ]
    yield hf, ll, texts
    ll.close()


def test_both_backends_tokenise_rendered_prompts_alike(backends):
    hf, ll, texts = backends
    assert [hf.tokenize(t) for t in texts] == [ll.tokenize(t) for t in texts]
    assert stop_strings(hf) == stop_strings(ll) == ["<end_of_turn>"]


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_hf_and_llama_cpp_generate_the_same_greedy_text(backends, penalty):
    """Same weights, same rule (CTRL penalty over prompt and generated tokens): the same tokens."""
    hf, ll, texts = backends
    prompts = [hf.tokenize(t) for t in texts]
    a = hf.generate(prompts, 16, [DECISION_MARKER_TEXT], penalty)
    b = ll.generate(prompts, 16, [DECISION_MARKER_TEXT], penalty)
    assert [g.text for g in a] == [g.text for g in b]
    assert [g.n_tokens for g in a] == [g.n_tokens for g in b]


@pytest.mark.parametrize("which", ["hf", "llama"])
def test_batched_generation_equals_one_prompt_at_a_time(backends, which):
    hf, ll, texts = backends
    backend = hf if which == "hf" else ll
    prompts = [backend.tokenize(t) for t in texts]
    batched = [g.text for g in backend.generate(prompts, 12, [], 1.15)]
    single = [backend.generate([p], 12, [], 1.15)[0].text for p in prompts]
    assert batched == single


def test_stream_joins_to_the_generation(backends):
    _, ll, texts = backends
    prompt = ll.tokenize(texts[0])
    (g,) = ll.generate([prompt], 12, [], 1.15)
    assert "".join(ll.stream(prompt, 12, [], 1.15)) == g.text


@pytest.mark.parametrize("which", ["hf", "llama"])
def test_batched_scoring_equals_unbatched(backends, which):
    hf, ll, texts = backends
    backend = hf if which == "hf" else ll
    batched = score_labels(backend, texts)
    single = np.array([score_labels(backend, [t])[0] for t in texts])
    assert batched.shape == (len(texts), 3)
    assert np.abs(batched - single).max() < 1e-4


def test_scores_are_log_likelihoods_of_the_label_tokens(backends):
    """The continuation scores equal a plain forward pass over prefix + label (HF, float64 softmax)."""
    hf, _, texts = backends
    (prefix, suffixes), *_ = label_requests(hf, texts[:1])
    ours = hf.score([(prefix, suffixes)])[0]
    for suffix, score in zip(suffixes, ours):
        ids = torch.tensor([prefix + suffix])
        with torch.no_grad():
            lp = torch.log_softmax(hf.model(input_ids=ids).logits[0].double(), -1)
        ref = sum(float(lp[len(prefix) - 1 + j, t]) for j, t in enumerate(suffix))
        assert score == pytest.approx(ref, abs=1e-6)


def test_hf_and_llama_cpp_scores_agree(backends):
    hf, ll, texts = backends
    assert np.abs(score_labels(hf, texts) - score_labels(ll, texts)).max() < 2e-3


def test_perplexity_logprobs_agree_and_need_no_full_logits_copy(backends):
    hf, ll, texts = backends
    ids = hf.tokenize(texts[2] + texts[3]) * 3
    a, b = hf.token_logprobs(ids), ll.token_logprobs(ids)
    assert a.shape == b.shape == (len(ids) - 1,)
    assert np.abs(a - b).max() < 2e-3


def test_score_decisions_rows(backends):
    hf, _, texts = backends
    rows = score_decisions(hf, [{"id": str(i), "decision": "DENY", "prompt_text": t} for i, t in enumerate(texts)])
    assert [r["label"] for r in rows] == [2] * len(texts)
    assert all(len(r["logits"]) == 3 and r["pred"] == int(np.argmax(r["logits"])) for r in rows)


# --------------------------------------------------------------------------- units, no model


def test_penalty_is_hugging_faces():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    rng = np.random.default_rng(0)
    logits = rng.normal(size=50).astype(np.float32)
    seen = np.array([1, 3, 7, 7, 20])
    ours = penalize(logits.copy(), np.unique(seen), 1.3)
    theirs = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([seen]), torch.tensor(logits[None]))[0].numpy()
    assert np.allclose(ours, theirs)


def test_stop_strings_are_held_back_until_decided():
    """A stop string split over tokens never leaks its first part into the stream."""
    seq = _Sequence([1, 2], ["判定:"], 50)
    pieces = [seq.push(t, p.encode(), False) for t, p in enumerate(["理由です。", "\n判", "定", ":", " ALLOW"], 10)]
    assert "".join(pieces) == "理由です。\n" and seq.stop == "判定:" and seq.done
    seq = _Sequence([1], ["判定:"], 50)
    pieces = [seq.push(t, p.encode(), False) for t, p in enumerate(["判", "断します"], 10)]
    assert pieces == ["", "判断します"]


def test_split_utf8_characters_wait_for_their_last_byte():
    seq = _Sequence([1], [], 10)
    raw = "東".encode()
    assert seq.push(5, raw[:1], False) == ""
    assert seq.push(6, raw[1:], False) == "東"


def test_cut_at_stop_takes_the_earliest():
    assert cut_at_stop("abc判定: X<end_of_turn>", ["<end_of_turn>", "判定:"]) == ("abc", "判定:")
    assert cut_at_stop("abc", ["x"]) == ("abc", None)


def test_continuous_batching_refills_and_compacts_slots(backends):
    """Sequences that end early (a full context) free their slot for the next prompt, and the last
    ones move down to the lowest free slots: every text is still the one-prompt-at-a-time text."""
    _, ll, texts = backends
    long_prompt = ll.tokenize(texts[0]) * 40
    long_prompt = long_prompt[: ll.n_ctx - 8]  # ends 8 tokens in, at the context limit
    prompts = [ll.tokenize(t) for t in texts[:2]] + [long_prompt] + [ll.tokenize(t) for t in texts[2:]]
    done: list[int] = []
    batched = ll.generate(prompts, 20, [], 1.15, on_progress=done.append)
    single = [ll.generate([p], 20, [], 1.15)[0] for p in prompts]
    assert [g.text for g in batched] == [g.text for g in single]
    assert [g.n_tokens for g in batched] == [g.n_tokens for g in single]
    assert batched[2].n_tokens == 8 and all(g.n_tokens == 20 for i, g in enumerate(batched) if i != 2)
    assert sum(done) == len(prompts)


def test_scoring_chunks_hold_a_token_budget(backends):
    from so8t.inference import SCORE_TOKENS

    _, ll, _ = backends
    requests = [([1] * 300, [[2]]), ([1] * 300, [[2]]), ([1] * 10, [[2]]), ([1] * 600, [[2]]), ([1] * 5, [[2]])]
    chunks = list(ll._score_chunks(requests))
    assert [len(c) for c in chunks] == [1, 2, 1, 1]
    assert all(sum(len(p) for p, _ in c) <= SCORE_TOKENS for c in chunks if len(c) > 1)
    assert [r for c in chunks for r in c] == requests
