"""A Hugging Face model folder (the base and the baked model) in transformers: :class:`HFBackend`.

Float32, batched with left padding and a KV cache. Generation is ``model.generate`` with
greedy decoding and Hugging Face's ``RepetitionPenaltyLogitsProcessor``, which implements the
CTRL penalty of :mod:`so8t.inference.decoding` over ``input_ids``; scoring evaluates each
prefix once and repeats its cache along the batch for the continuations.

The folder is read by :func:`load_tokenizer` and :func:`load_causal_lm`, and hidden states go
through the LM head with :func:`output_logits`: these three are the inference layer's own, so
this package imports nothing above the core (``so8t.model.base_model`` holds copies of them
until it imports these).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from so8t.inference.decoding import cut_at_stop
from so8t.inference.types import CHUNK, Generation, Progress, Throughput
from so8t.io import DataError


def _require_dir(path: str | Path) -> None:
    if not Path(path).is_dir():
        raise DataError(f"{path}: model folder not found (has the stage that writes it run?)")


def load_tokenizer(path: str | Path, gguf_file: str | None = None):
    """Load a tokenizer from a local folder (``gguf_file``: a GGUF inside it)."""
    from transformers import AutoTokenizer

    _require_dir(path)
    tok = AutoTokenizer.from_pretrained(str(path), gguf_file=gguf_file, local_files_only=True)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    gguf_file: str | None = None,
    quantization: str = "none",
    attn_implementation: str | None = None,
):
    """Load a causal LM from a local folder, optionally quantised by bitsandbytes.

    Args:
        path: HF model folder (or the folder holding ``gguf_file``).
        dtype: compute dtype (float32 on CPU: bf16 matmul is ~60x slower there).
        gguf_file: a GGUF file name inside ``path``; dequantised on load.
        quantization: ``"none"``, ``"8bit"`` or ``"4bit"`` (QLoRA, nf4 with double quantisation).
        attn_implementation: e.g. ``"sdpa"`` (``None``: transformers' default).
    """
    from transformers import AutoModelForCausalLM

    _require_dir(path)
    kwargs: dict = {"dtype": dtype, "local_files_only": True}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    if quantization != "none":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_8bit=True)
            if quantization == "8bit"
            else BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_compute_dtype=dtype,
                bnb_4bit_use_double_quant=True,
            )
        )
    return AutoModelForCausalLM.from_pretrained(str(path), **kwargs)


def output_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Apply the LM head (and any final logit soft-capping) to ``hidden``.

    Args:
        hidden: ``(N, D)`` final normalised hidden states.

    Returns:
        ``(N, V)`` float32 logits, as the model's own forward would produce them.
    """
    logits = model.get_output_embeddings()(hidden).float()
    cap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


class HFBackend:
    """A Hugging Face causal LM folder, float32, batched with left padding.

    Args:
        model_dir: the folder (weights, config and tokenizer).
        batch_size: sequences per forward.
        tokenizer: the tokenizer to use (default: the folder's own).
    """

    kind = "hf"

    def __init__(self, model_dir: str | Path, batch_size: int = 8, tokenizer=None) -> None:
        self.path = Path(model_dir)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model_dir)
        self.model = load_causal_lm(model_dir, torch.float32).eval()
        self.batch_size = batch_size
        self.device = next(self.model.parameters()).device
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = sorted({eos} if isinstance(eos, int) else set(eos or []))
        self.stats = Throughput()

    @classmethod
    def from_model(cls, model, tokenizer, batch_size: int = 8) -> HFBackend:
        """A backend around a model already in memory (e.g. one being trained; put it in eval mode)."""
        self = cls.__new__(cls)
        self.path = None
        self.tokenizer = tokenizer
        self.model = model
        self.batch_size = batch_size
        self.device = next(model.parameters()).device
        eos = model.generation_config.eos_token_id
        self.eos_ids = sorted({eos} if isinstance(eos, int) else set(eos or []))
        self.stats = Throughput()
        return self

    def tokenize(self, text: str) -> list[int]:
        """Token ids of (chat-template-rendered) text: control tokens parsed, no BOS added."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def piece(self, token: int, special: bool = True) -> str:
        return self.tokenizer.decode([token], skip_special_tokens=not special)

    def special_tokens(self) -> dict[str, int]:
        """``{spelling: id}`` of every special and added-special token
        (see :meth:`so8t.inference.llamacpp.LlamaCppBackend.special_tokens`)."""
        found = {t.content: i for i, t in self.tokenizer.added_tokens_decoder.items() if t.special}
        for t in self.tokenizer.all_special_tokens:
            found.setdefault(t, self.tokenizer.convert_tokens_to_ids(t))
        return {t: i for t, i in found.items() if t and t.strip()}

    def _left_pad(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        pad = self.tokenizer.pad_token_id
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(seqs):
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        return ids.to(self.device), mask.to(self.device)

    @torch.no_grad()
    def generate(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        stops: Sequence[str] = (),
        repetition_penalty: float = 1.0,
        on_progress: Progress | None = None,
    ) -> list[Generation]:
        """Greedy continuations, ``batch_size`` prompts per ``generate`` call (left padding, KV cache).

        A stop string that is one token of the vocabulary (an end-of-turn token) ends a sequence
        as an extra EOS id; only the others go to ``generate(stop_strings=...)``, whose per-call
        table over the whole vocabulary costs seconds for a 262k-token vocabulary.
        """
        out: list[Generation] = []
        pad = self.tokenizer.pad_token_id
        token_stops: dict[int, str] = {}
        text_stops: list[str] = []
        for s in stops:
            ids = self.tokenize(s)
            if len(ids) == 1:
                token_stops.setdefault(ids[0], s)
            else:
                text_stops.append(s)
        eos = set(self.eos_ids) | set(token_stops)
        for start in range(0, len(prompts), self.batch_size):
            batch = prompts[start : start + self.batch_size]
            ids, mask = self._left_pad(batch)
            t0 = time.perf_counter()
            gen = self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                repetition_penalty=repetition_penalty,
                stop_strings=text_stops or None,
                tokenizer=self.tokenizer,
                pad_token_id=pad,
                eos_token_id=sorted(eos),
            )
            seconds = time.perf_counter() - t0
            new = gen[:, ids.shape[1] :].cpu().tolist()
            lengths, cuts = [], []
            for row in new:
                n = next((j for j, t in enumerate(row) if t in eos), len(row))
                text = self.tokenizer.decode(row[:n], skip_special_tokens=True)
                lengths.append(n)
                cut, hit = cut_at_stop(text, text_stops)
                if hit is None and n < len(row) and row[n] in token_stops:
                    hit = token_stops[row[n]]
                cuts.append((cut, hit))
            total = max(sum(lengths), 1)
            out += [
                Generation(t, hit, n, seconds * n / total, len(p))
                for (t, hit), n, p in zip(cuts, lengths, batch)
            ]
            self.stats.generated_tokens += sum(lengths)
            self.stats.generation_seconds += seconds
            if on_progress is not None:
                on_progress(len(batch))
        return out

    def stream(
        self, prompt: list[int], max_new_tokens: int, stops: Sequence[str] = (), repetition_penalty: float = 1.0
    ) -> Iterator[str]:
        """The greedy continuation of one prompt (one piece, ending with the stop string that ended it)."""
        (g,) = self.generate([prompt], max_new_tokens, stops, repetition_penalty)
        yield g.text + (g.stop or "")

    def _lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        return output_logits(self.model, hidden)

    @torch.no_grad()
    def score(self, requests: list[tuple[list[int], list[list[int]]]], on_progress: Progress | None = None):
        """As :meth:`so8t.inference.llamacpp.LlamaCppBackend.score`: prefixes once (left-padded batch),
        continuations from their cache."""
        out: list[list[float]] = []
        for start in range(0, len(requests), self.batch_size):
            chunk = requests[start : start + self.batch_size]
            t0 = time.perf_counter()
            ids, mask = self._left_pad([p for p, _ in chunk])
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
            res = self.model(
                input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=True, logits_to_keep=1
            )
            first = torch.log_softmax(res.logits[:, -1].double(), -1)
            scores = [[float(first[i, s[0]]) for s in sufs] for i, (_, sufs) in enumerate(chunk)]
            rows = [(i, k, suf) for i, (_, sufs) in enumerate(chunk) for k, suf in enumerate(sufs) if len(suf) > 1]
            if rows:
                cache = res.past_key_values
                cache.batch_select_indices(torch.tensor([i for i, _, _ in rows], device=self.device))
                width = max(len(suf) - 1 for _, _, suf in rows)
                cont = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
                cmask = torch.zeros_like(cont)
                for r, (_, _, suf) in enumerate(rows):
                    cont[r, : len(suf) - 1] = torch.tensor(suf[:-1])
                    cmask[r, : len(suf) - 1] = 1
                sel = torch.tensor([i for i, _, _ in rows], device=self.device)
                full_mask = torch.cat([mask[sel], cmask.to(self.device)], dim=1)
                pos = mask[sel].sum(-1, keepdim=True) + torch.arange(width, device=self.device)[None]
                hidden = self.model(
                    input_ids=cont.to(self.device),
                    attention_mask=full_mask,
                    position_ids=pos,
                    past_key_values=cache,
                    use_cache=True,
                    output_hidden_states=True,
                    logits_to_keep=1,
                ).hidden_states[-1]
                for r, (i, k, suf) in enumerate(rows):
                    lp = torch.log_softmax(self._lm_head(hidden[r, : len(suf) - 1]).double(), -1)
                    scores[i][k] += float(lp.gather(1, torch.tensor(suf[1:], device=self.device)[:, None]).sum())
            out += scores
            self.stats.prompt_tokens += sum(len(p) for p, _ in chunk)
            self.stats.prompt_seconds += time.perf_counter() - t0
            self.stats.scored_requests += len(chunk)
            self.stats.scoring_seconds += time.perf_counter() - t0
            if on_progress is not None:
                on_progress(len(chunk))
        return out

    @torch.no_grad()
    def token_logprobs(self, ids: list[int]) -> np.ndarray:
        """``log p(ids[t] | ids[:t])`` for t = 1..n-1 as a float64 array of length n-1."""
        x = torch.tensor([ids], device=self.device)
        hidden = self.model(input_ids=x, use_cache=False, output_hidden_states=True, logits_to_keep=1).hidden_states[-1]
        out = []
        for start in range(0, len(ids) - 1, CHUNK):
            logits = self._lm_head(hidden[0, start : min(start + CHUNK, len(ids) - 1)])
            nll = torch.nn.functional.cross_entropy(logits, x[0, start + 1 : start + 1 + len(logits)], reduction="none")
            out.append((-nll).double().cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0)

    def n_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def close(self) -> None:
        """Drop the model (memory is freed by the garbage collector)."""
        self.model = None


__all__ = ["HFBackend", "load_causal_lm", "load_tokenizer", "output_logits"]
