"""Running an artifact: greedy generation, sequence log-likelihoods and perplexity.

Two backends share one interface so every artifact is measured the same way:

* :class:`HFBackend`: a Hugging Face model folder (the base and the baked model),
  float32, batched greedy generation with left padding.

Greedy generation may use the CTRL repetition penalty (Keskar et al. 2019,
https://arxiv.org/abs/1909.05858: a seen token's positive logit is divided by
the penalty, a negative one multiplied) in both backends, over the whole
context; small models otherwise loop under greedy decoding.
* :class:`LlamaCppBackend`: a GGUF file in llama.cpp (llama-cpp-python), where
  the quantised model is actually served; ``logits_all`` gives per-position
  scores for likelihoods and perplexity.

Both take token ids from the same HF tokenizer (GGUF tokenisation is checked
to be identical by the quantize stage), so numbers are comparable.

Decision scoring (:func:`score_decisions`): the model generates greedily until
it writes its ``判定:`` line (or hits the token budget, in which case the line is
appended); then each label ``L`` is scored by the log-likelihood of the tokens
of ``...判定: L`` after the longest common token prefix of the three
alternatives. The three log-likelihoods are the decision logits that
temperature scaling calibrates.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from so8t.schema import DECISION_PREFIX, DECISIONS

#: Progress callback: called with the number of items just finished.
Progress = Callable[[int], None]

#: Generation stops at the decision marker so the label can be scored, not sampled.
DECISION_MARKER = DECISION_PREFIX.strip()


@dataclass
class Generation:
    """One greedy generation.

    Attributes:
        text: generated text, cut before the first stop string.
        stop: the stop string that ended it, or ``None`` (end-of-turn token or budget).
        n_tokens: generated tokens.
        seconds: wall time attributed to this generation.
    """

    text: str
    stop: str | None
    n_tokens: int
    seconds: float


def _common_prefix_len(seqs: list[list[int]]) -> int:
    n = min(map(len, seqs))
    for i in range(n):
        if len({s[i] for s in seqs}) > 1:
            return i
    return n


def _cut_at_stop(text: str, stops: list[str]) -> tuple[str, str | None]:
    cut, hit = len(text), None
    for s in stops:
        i = text.find(s)
        if 0 <= i < cut:
            cut, hit = i, s
    return text[:cut], hit


class HFBackend:
    """A Hugging Face causal LM folder, float32 on CPU (or CUDA when present)."""

    kind = "hf"

    def __init__(
        self, model_dir: str | Path, tokenizer, batch_size: int = 12, repetition_penalty: float = 1.0
    ) -> None:
        from so8t.base_model import load_causal_lm

        self.repetition_penalty = repetition_penalty
        self.path = Path(model_dir)
        self.model = load_causal_lm(model_dir, torch.float32).eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.device = next(self.model.parameters()).device

    @torch.no_grad()
    def generate(
        self, prompts: list[list[int]], max_new_tokens: int, stops: list[str], on_progress: Progress | None = None
    ) -> list[Generation]:
        """Greedy continuations of token-id prompts, batched with left padding.

        ``on_progress(n)`` is called after each batch with the number of prompts done.
        """
        out: list[Generation] = []
        pad = self.tokenizer.pad_token_id
        for start in range(0, len(prompts), self.batch_size):
            batch = prompts[start : start + self.batch_size]
            width = max(map(len, batch))
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, p in enumerate(batch):
                ids[i, width - len(p) :] = torch.tensor(p)
                mask[i, width - len(p) :] = 1
            t0 = time.perf_counter()
            gen = self.model.generate(
                input_ids=ids.to(self.device),
                attention_mask=mask.to(self.device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                repetition_penalty=self.repetition_penalty,
                stop_strings=stops or None,
                tokenizer=self.tokenizer,
                pad_token_id=pad,
            )
            seconds = time.perf_counter() - t0
            new = gen[:, width:].cpu()
            eos_ids = self.model.generation_config.eos_token_id
            eos = {eos_ids} if isinstance(eos_ids, int) else set(eos_ids or [])
            lengths = []
            cuts = []
            for row in new.tolist():
                n = len(row)
                for j, t in enumerate(row):
                    if t in eos or t == pad:
                        n = j
                        break
                lengths.append(n)
                cuts.append(_cut_at_stop(self.tokenizer.decode(row[:n], skip_special_tokens=True), stops))
            # Batched decoding shares wall time; attribute it by token share.
            total = max(sum(lengths), 1)
            out += [Generation(t, hit, n, seconds * n / total) for (t, hit), n in zip(cuts, lengths)]
            if on_progress is not None:
                on_progress(len(batch))
        return out

    def close(self) -> None:
        """Drop the model (memory is freed by the garbage collector)."""
        self.model = None

    @torch.no_grad()
    def continuation_logprobs(self, prefix: list[int], suffixes: list[list[int]]) -> list[float]:
        """``sum_t log p(suffix[t] | prefix + suffix[:t])`` for each suffix (nats).

        The prefix is run once; each suffix continues from a copy of its KV cache,
        and the LM head is applied only to the positions that are scored.
        """
        import copy

        x = torch.tensor([prefix], device=self.device)
        out = self.model(input_ids=x, use_cache=True, logits_to_keep=1)
        first = torch.log_softmax(out.logits[0, -1].double(), -1)
        scores = []
        for suffix in suffixes:
            total = float(first[suffix[0]])
            if len(suffix) > 1:
                cache = copy.deepcopy(out.past_key_values)
                y = torch.tensor([suffix[:-1]], device=self.device)
                logits = self.model(input_ids=y, past_key_values=cache, use_cache=True).logits[0].double()
                lp = torch.log_softmax(logits, -1)
                total += float(lp.gather(1, torch.tensor(suffix[1:], device=self.device).unsqueeze(1)).sum())
            scores.append(total)
        return scores

    @torch.no_grad()
    def token_logprobs(self, ids: list[int]) -> np.ndarray:
        """``log p(ids[t] | ids[:t])`` for t = 1..n-1 as a float64 array of length n-1."""
        x = torch.tensor([ids], device=self.device)
        logits = self.model(input_ids=x, use_cache=False).logits[0, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="none")
        return (-nll).double().cpu().numpy()


class LlamaCppBackend:
    """A GGUF file in llama.cpp.

    Generation and label scoring use a context without ``logits_all`` (the LM
    head runs only where logits are read); perplexity opens a second context
    with ``logits_all`` over one window at a time. Both map the same file.
    """

    kind = "gguf"

    def __init__(
        self,
        gguf_path: str | Path,
        tokenizer,
        n_ctx: int = 1024,
        n_threads: int = 1,
        repetition_penalty: float = 1.0,
    ) -> None:
        from llama_cpp import Llama

        self.path = Path(gguf_path)
        self.tokenizer = tokenizer
        self.n_ctx = n_ctx
        self.n_threads = n_threads
        self.repetition_penalty = repetition_penalty
        # The penalty window spans the whole context, as Hugging Face's does.
        self.llm = Llama(
            str(gguf_path), n_ctx=n_ctx, n_threads=n_threads, last_n_tokens_size=n_ctx, verbose=False
        )
        self._scorer = None  # logits_all context, opened on first perplexity call

    def close(self) -> None:
        """Free the llama.cpp models and contexts now (not at interpreter shutdown)."""
        self.llm.close()
        if self._scorer is not None:
            self._scorer.close()

    def _eval_last_logits(self, tokens: list[int]) -> np.ndarray:
        """Evaluate ``tokens`` after the current context; float64 logits of the last one."""
        import llama_cpp

        self.llm.eval(tokens)
        ptr = llama_cpp.llama_get_logits_ith(self.llm.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.llm.n_vocab(),)).astype(np.float64)

    def continuation_logprobs(self, prefix: list[int], suffixes: list[list[int]]) -> list[float]:
        """As :meth:`HFBackend.continuation_logprobs`; the prefix's KV cache is kept and truncated back."""
        if len(prefix) + max(map(len, suffixes)) > self.n_ctx:
            raise ValueError(f"prefix + suffix exceed llama.cpp n_ctx={self.n_ctx}")
        self.llm.reset()
        first = _log_softmax(self._eval_last_logits(prefix)[None])[0]
        scores = []
        for suffix in suffixes:
            total = float(first[suffix[0]])
            self.llm.n_tokens = len(prefix)  # drop the previous suffix from the KV cache
            for prev, tok in zip(suffix[:-1], suffix[1:]):
                total += float(_log_softmax(self._eval_last_logits([prev])[None])[0][tok])
            scores.append(total)
        return scores

    def generate(
        self, prompts: list[list[int]], max_new_tokens: int, stops: list[str], on_progress: Progress | None = None
    ) -> list[Generation]:
        """Greedy continuations, streamed so the stop string that ended each one is known."""
        out = []
        for p in prompts:
            t0 = time.perf_counter()
            text, hit, n = "", None, 0
            stream = self.llm.create_completion(
                p, max_tokens=max_new_tokens, temperature=0.0, repeat_penalty=self.repetition_penalty, stream=True
            )
            for chunk in stream:
                text += chunk["choices"][0]["text"]
                n += 1
                text, hit = _cut_at_stop(text, stops)
                if hit is not None:
                    break
            out.append(Generation(text, hit, n, time.perf_counter() - t0))
            if on_progress is not None:
                on_progress(1)
        return out

    def token_logprobs(self, ids: list[int]) -> np.ndarray:
        """``log p(ids[t] | ids[:t])`` for t = 1..n-1 (float64), from llama.cpp's own logits."""
        from llama_cpp import Llama

        if len(ids) > self.n_ctx:
            raise ValueError(f"sequence of {len(ids)} tokens exceeds llama.cpp n_ctx={self.n_ctx}")
        if self._scorer is None:
            self._scorer = Llama(
                str(self.path), n_ctx=self.n_ctx, n_threads=self.n_threads, logits_all=True, verbose=False
            )
        self._scorer.reset()
        self._scorer.eval(ids)
        rows = self._scorer.scores[: len(ids) - 1]
        m = rows.max(-1, keepdims=True)
        lse = (m + np.log(np.exp(rows - m, dtype=np.float32).sum(-1, keepdims=True, dtype=np.float64)))[:, 0]
        return rows[np.arange(len(ids) - 1), ids[1:]].astype(np.float64) - lse


def _log_softmax(rows: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax of a ``(n, V)`` float64 array."""
    m = rows.max(-1, keepdims=True)
    return rows - (m + np.log(np.exp(rows - m).sum(-1, keepdims=True)))


Backend = HFBackend | LlamaCppBackend


def score_decisions(
    backend: Backend,
    examples: list[dict],
    max_new_tokens: int,
    stops: list[str],
    on_progress: Progress | None = None,
) -> list[dict]:
    """Decision log-likelihoods for formatted decision examples.

    Args:
        examples: think-format rows with ``prompt_text``, ``input_ids``/``labels``
            and ``decision``.
        stops: end-of-turn strings (generation also stops at ``判定:``).
        on_progress: called with the number of examples generated so far.

    Returns:
        One dict per example: ``id``, ``label`` (index into DECISIONS),
        ``logits`` (3 log-likelihoods, nats), ``pred``, ``format_ok`` (the model
        wrote a ``判定:`` line itself), ``generated``, ``gen_tokens``, ``gen_seconds``.
    """
    tok = backend.tokenizer
    prompts = [tok(ex["prompt_text"], add_special_tokens=False)["input_ids"] for ex in examples]
    gens = backend.generate(prompts, max_new_tokens, [DECISION_MARKER, *stops], on_progress)
    rows = []
    for ex, g in zip(examples, gens):
        reached = g.stop == DECISION_MARKER
        body = g.text if reached else g.text.rstrip() + "\n"
        context = ex["prompt_text"] + body
        fulls = [tok(context + DECISION_PREFIX + label, add_special_tokens=False)["input_ids"] for label in DECISIONS]
        start = _common_prefix_len(fulls)
        logits = backend.continuation_logprobs(fulls[0][:start], [f[start:] for f in fulls])
        rows.append(
            {
                "id": ex["id"],
                "label": DECISIONS.index(ex["decision"]),
                "logits": logits,
                "pred": int(np.argmax(logits)),
                "format_ok": bool(reached),
                "generated": g.text,
                "gen_tokens": g.n_tokens,
                "gen_seconds": g.seconds,
            }
        )
    return rows


def perplexity_windows(tokenizer, texts: list[str], max_tokens: int, window: int) -> list[list[int]]:
    """Token windows for perplexity: each text tokenised with BOS, cut into ``window``-token pieces.

    Stops once ``max_tokens`` tokens are collected; pieces shorter than 2 tokens are dropped.
    """
    windows: list[list[int]] = []
    total = 0
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        for i in range(0, len(ids), window):
            piece = ids[i : i + window]
            if len(piece) < 2:
                continue
            piece = piece[: max_tokens - total] if total + len(piece) > max_tokens else piece
            if len(piece) >= 2:
                windows.append(piece)
                total += len(piece)
            if total >= max_tokens:
                return windows
    return windows


def perplexity_of(backend: Backend, windows: list[list[int]]) -> dict[str, float]:
    """Perplexity ``exp(sum NLL / N)`` over all predicted tokens of the windows (Jelinek et al. 1977).

    The first token of every window is context only, so ``N = sum(len(w) - 1)``.
    """
    nll = 0.0
    n = 0
    t0 = time.perf_counter()
    for w in windows:
        lp = backend.token_logprobs(w)
        nll -= float(lp.sum())
        n += len(lp)
    return {
        "perplexity": math.exp(nll / n) if n else math.nan,
        "nll_per_token": nll / n if n else math.nan,
        "tokens": n,
        "seconds": time.perf_counter() - t0,
    }
