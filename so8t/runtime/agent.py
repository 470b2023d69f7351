"""The answering agent: retrieval, generation, a calibrated decision, the policy, the audit row.

For one request (a conversation ending in a user turn) :meth:`Agent.answer`:

1. retrieves passages for the last user turn from the documents the caller's
   access level allows (:class:`so8t.data.retrieval.Retriever`) and puts
   them, with their document ids, before the question in that turn;
2. removes chat-template control tokens from every untrusted text (turns and
   passages) and renders the conversation with the model's chat template;
3. scores the three labels right after the prompt with the calibrate stage's
   code (:func:`so8t.inference.score_labels`; the model was trained to state
   ``判定: X`` first): ``z_L`` = log-likelihood of ``判定: L``, ``p = softmax(z / T)``
   with the fitted temperature ``T`` of this artifact
   (:func:`so8t.eval.calibration.apply_temperature`); the model's decision is
   ``argmax p`` and its confidence ``max p``;
4. applies the policy (:func:`so8t.policy.apply_policy`, the function the evaluation
   calls too): an ALLOW with confidence below ``runtime.allow_threshold`` becomes
   ESCALATION; only an ALLOW is answered: the model generates greedily after
   ``判定: ALLOW`` (repetition penalty ``generation.repetition_penalty``) until it
   ends its turn or reaches ``runtime.max_new_tokens``, the generation is split
   (:func:`so8t.guard.separate`) and the policy applied again with its parts: an
   answer that kept reasoning or has no final answer becomes ESCALATION; otherwise
   the final answer (reasoning removed) is returned with the documents it cites
   (``【資料 n】``: the n-th passage of the prompt) as citations and a grounding
   flag (:class:`Answer`: cited, abstained, or, for an answer that cites nothing,
   whether its sentences are in the passages). ESCALATION and DENY return the
   policy text of ``runtime.policy`` and generate nothing;
5. appends one audit row (also for a request that fails: decision ``ERROR``), with
   the retrieved document ids, the cited ones and the grounding flag.

Everything is decided before anything is returned, so a streamed answer is
the same text, cut into pieces, and never shows a draft the decision would
refuse.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from so8t.access import AccessLevel, parse_level
from so8t.errors import So8tError
from so8t.eval.calibration import apply_temperature
from so8t.decision import LABELS, answer_context
from so8t.model.quantize import artifact_of
from so8t.runtime.audit import AuditEntry, AuditLog
from so8t.runtime.engine import Cancellation
from so8t.guard import separate
from so8t.runtime.model import ChatModel
from so8t.data.retrieval import Passage, Retriever
from so8t.data.grounding import cited, fit_passages, grounded_prompt, is_abstention, support
from so8t.policy import apply_policy
from so8t.schema import END_OF_TURN_TOKENS, Decision

#: Roles a caller may send.
ROLES: tuple[str, ...] = ("system", "user", "assistant")


class AgentInputError(So8tError, ValueError):
    """The request itself is unusable (bad roles, too long, rejected by the chat template)."""


@dataclass(frozen=True)
class Principal:
    """Who asks: the user id written to the audit log and the access level retrieval honours."""

    user: str
    level: AccessLevel

    @classmethod
    def of(cls, user: str, level: str | AccessLevel) -> Principal:
        return cls(user, parse_level(level))


@dataclass(frozen=True)
class Policy:
    """What the agent answers instead of the model for ESCALATION and DENY (``runtime.policy``)."""

    escalation: str
    deny: str
    allow_threshold: float = 0.5

    def text(self, decision: str) -> str:
        return {Decision.ESCALATION.value: self.escalation, Decision.DENY.value: self.deny}[decision]


@dataclass
class Answer:
    """The result of one request.

    Attributes:
        decision: ALLOW / ESCALATION / DENY after the policy.
        confidence: calibrated probability of ``model_decision`` in [0, 1].
        answer: the text shown to the caller (final answer or policy text).
        citations: ids of the documents whose passages the answer cites (``【資料 n】``, n the
            passage's number in the prompt, :data:`so8t.data.grounding.PASSAGE_FORMAT`), in order of
            first citation, without repeats; numbers with no passage in the prompt are ignored.
            Empty for ESCALATION and DENY and for an answer that cites nothing.
        grounding: how the answer stands to the passages of the prompt (ALLOW only, else ``None``):

            * ``cited``: it cites at least one passage of the prompt;
            * ``abstained``: it says the documents do not hold the answer
              (:func:`so8t.data.grounding.is_abstention`);
            * ``uncited``: it cites none, yet every sentence checked is supported by the passages;
            * ``unsupported``: it cites none and some sentence checked is not supported, or it has
              no sentence long enough to check: an answer the documents do not back, to be treated
              with care;
            * ``no_passages``: the prompt held no passage (retrieval off, nothing found for the
              caller's level, or nothing fitted ``retrieval.max_passage_tokens``).

            Support is :func:`so8t.data.grounding.support`: a sentence is supported when at least
            :data:`so8t.data.grounding.SUPPORT_THRESHOLD` of its character 3-grams occur in the
            passages' text as the prompt showed it (the last one possibly cut).
        model_decision: the model's own label (argmax of ``probabilities``).
        probabilities: calibrated ``{label: p}``.
        override: why the policy changed the model's label: ``low_confidence``,
            ``no_final_answer`` or ``None``.
        latency_ms: wall time in milliseconds.
    """

    request_id: str
    decision: str
    confidence: float
    answer: str
    citations: list[str]
    grounding: str | None
    model_decision: str
    probabilities: dict[str, float]
    override: str | None
    model_id: str
    latency_ms: float
    prompt_tokens: int = 0
    completion_tokens: int = 0
    passages: list[Passage] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        """JSON-ready fields for callers (no passages' text, never any reasoning)."""
        d = asdict(self)
        d.pop("passages")
        return d


def grounded(
    answer: str, passages: list[Passage], fitted: list[tuple[str, str, str]]
) -> tuple[list[str], str]:
    """The citations and grounding flag of an allowed ``answer`` (see :class:`Answer`).

    Args:
        answer: the final answer shown to the caller.
        passages: the retrieved passages, best first (their ``doc_id`` is what a citation returns).
        fitted: ``(doc_id, title, text)`` as numbered in the prompt (:meth:`Agent._prompt_messages`):
            ``fitted[n - 1]`` is ``passages[n - 1]`` with its text possibly cut.

    Returns:
        ``(citations, grounding)``: the cited documents' ids (citation numbers outside
        ``1..len(fitted)`` ignored) and one of ``cited``, ``abstained``, ``uncited``,
        ``unsupported``, ``no_passages``.
    """
    if not fitted:
        return [], "no_passages"
    ids = list(dict.fromkeys(passages[n - 1].doc_id for n in cited(answer) if 1 <= n <= len(fitted)))
    if ids:
        return ids, "cited"
    if is_abstention(answer):
        return [], "abstained"
    supported, checked = support(answer, [text for _, _, text in fitted])
    if supported < checked or (checked == 0 and answer.strip()):
        return [], "unsupported"
    return [], "uncited"


def _control_pattern(tokens) -> re.Pattern | None:
    tokens = sorted({t for t in tokens if t}, key=len, reverse=True)
    return re.compile("|".join(map(re.escape, tokens))) if tokens else None


def strip_to_fixed_point(text: str, pattern: re.Pattern | None) -> str:
    """``text`` with every match of ``pattern`` removed, again and again until none is left.

    One pass is not enough: ``<start_of_<end_of_turn>turn>`` becomes ``<start_of_turn>``.
    """
    if pattern is None:
        return text
    while True:
        stripped = pattern.sub("", text)
        if stripped == text:
            return text
        text = stripped


def has_lone_surrogate(text: str) -> bool:
    """True when ``text`` holds a lone UTF-16 surrogate (``"\\ud800"`` in JSON): not valid Unicode text."""
    try:
        text.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def canonical_messages(messages: list[dict]) -> str:
    """The canonical JSON of a conversation (what the audit's ``input_sha256`` covers)."""
    return json.dumps(messages, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


class Agent:
    """Answers requests with a decision, a calibrated confidence and only a final answer.

    Args:
        model: the language model (:class:`so8t.runtime.model.ChatModel`).
        style: the think-format style the model was trained with (``params.think_format.style``).
        temperature: the calibrated ``T`` (1.0 = uncalibrated).
        policy: policy texts and the ALLOW threshold.
        audit: where rows go (``None``: no audit, for tests of other parts only).
        retriever: document search (``None``: no retrieval).
        max_new_tokens: generation budget (tokens).
        max_input_chars: longest accepted conversation (characters over all turns).
        allow_system_turns: accept ``system`` turns from untrusted callers (HTTP); an operator's choice.
        max_passage_tokens: token budget of all passages of one prompt (``retrieval.max_passage_tokens``).
    """

    def __init__(
        self,
        model: ChatModel,
        *,
        style: str,
        temperature: float,
        policy: Policy,
        audit: AuditLog | None,
        retriever: Retriever | None = None,
        max_new_tokens: int = 256,
        max_input_chars: int = 8000,
        allow_system_turns: bool = False,
        max_passage_tokens: int = 192,
    ) -> None:
        self.model = model
        self.style = style
        self.temperature = float(temperature)
        self.policy = policy
        self.audit = audit
        self.retriever = retriever
        self.max_new_tokens = max_new_tokens
        self.max_input_chars = max_input_chars
        self.allow_system_turns = allow_system_turns
        self.max_passage_tokens = max_passage_tokens
        self._control = _control_pattern(model.control_tokens)
        self._lock = threading.Lock()  # one generation at a time: models are not thread-safe
        # A batching model (so8t.runtime.engine) is shared by concurrent requests and takes their
        # cancellations; any other runs one request at a time under the lock.
        self._shared = bool(getattr(model, "concurrent", False))

    # ------------------------------------------------------------ input

    def _clean(self, text: str) -> str:
        """Untrusted text with every control-token spelling of the model's vocabulary removed, to a fixed point."""
        return strip_to_fixed_point(text, self._control)

    def check_messages(self, messages: list[dict], principal: Principal | None = None, untrusted: bool = False):
        """Validated ``[{"role", "content"}]`` (roles in :data:`ROLES`, last one ``user``).

        Args:
            principal: the caller (for ``untrusted`` assistant turns).
            untrusted: the turns come from a remote caller (HTTP): ``system`` turns are refused
                unless ``allow_system_turns``, and an ``assistant`` turn must be an answer this
                runtime gave the same user (its digest is in the audit log).

        Raises:
            AgentInputError: naming the bad message.
        """
        if not isinstance(messages, list) or not messages:
            raise AgentInputError("messages: expected a non-empty list of {role, content} objects")
        out, total = [], 0
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str):
                raise AgentInputError(f'messages[{i}]: expected {{"role": ..., "content": "text"}}')
            if m.get("role") not in ROLES:
                raise AgentInputError(f"messages[{i}].role: {m.get('role')!r}; use one of {list(ROLES)}")
            if has_lone_surrogate(m["content"]):
                raise AgentInputError(f"messages[{i}].content: a lone UTF-16 surrogate is not text")
            if untrusted and m["role"] == "system" and not self.allow_system_turns:
                raise AgentInputError(
                    f"messages[{i}]: system turns are not accepted from callers (runtime.server.allow_system_turns)"
                )
            if untrusted and m["role"] == "assistant" and not self._issued(m["content"], principal):
                raise AgentInputError(
                    f"messages[{i}]: an assistant turn must be an answer this server gave you (copy it unchanged)"
                )
            total += len(m["content"])
            out.append({"role": m["role"], "content": m["content"]})
        if out[-1]["role"] != "user" or not out[-1]["content"].strip():
            raise AgentInputError("messages: the last message must be a non-empty user message")
        if total > self.max_input_chars:
            raise AgentInputError(
                f"messages: {total} characters; at most {self.max_input_chars} (runtime.max_input_chars)"
            )
        return out

    def _issued(self, answer: str, principal: Principal | None) -> bool:
        return self.audit is not None and principal is not None and self.audit.issued(answer, principal.user)

    def _prompt_messages(
        self, messages: list[dict], passages: list[Passage]
    ) -> tuple[list[dict], list[tuple[str, str, str]]]:
        """The turns with control tokens stripped; passages (fenced, markers neutralised) before the question.

        Returns:
            ``(turns, fitted)``: ``fitted`` are the ``(doc_id, title, text)`` numbered 1, 2, ... in the
            last turn: the leading ``passages`` (control tokens stripped) that fit
            ``max_passage_tokens``, the last possibly cut (:func:`so8t.data.grounding.fit_passages`);
            ``fitted[i]`` is ``passages[i]``.
        """
        out = [{"role": m["role"], "content": self._clean(m["content"])} for m in messages]
        found = [(self._clean(p.doc_id), self._clean(p.title), self._clean(p.text)) for p in passages]
        fitted = fit_passages(found, self.model.count_tokens, self.max_passage_tokens)
        out[-1]["content"] = grounded_prompt(out[-1]["content"], fitted)
        return out, fitted

    # ------------------------------------------------------------ model

    def _generate(self, prompt: str, max_new_tokens: int, cancel: Cancellation | None = None) -> str:
        """Greedy answer after ``判定: ALLOW`` up to the end of the turn or the budget.

        Raises:
            RequestCancelled: ``cancel`` fired (the generation stops at once).
        """
        text = ""
        context = answer_context(prompt)
        if self._shared:
            pieces = self.model.generate(context, max_new_tokens, cancel)
        else:
            pieces = self.model.generate(context, max_new_tokens)
        try:
            for piece in pieces:
                if cancel is not None:
                    cancel.check()
                text += piece
                ends = [j for j in (text.find(s) for s in END_OF_TURN_TOKENS) if j >= 0]
                if ends:
                    text = text[: min(ends)]
                    break
        finally:
            close = getattr(pieces, "close", None)  # stop a streaming generator early
            if close is not None:
                close()
        return text

    def _decide(self, prompt: str, cancel: Cancellation | None = None) -> np.ndarray:
        """Calibrated label probabilities ``softmax(z / T)`` of the logits the calibrate stage fitted T on
        (:func:`so8t.inference.score_labels` after the rendered prompt)."""
        if cancel is not None:
            cancel.check()
        if self._shared:
            logits = self.model.decision_logits(prompt, cancel)
        else:
            logits = self.model.decision_logits(prompt)
        return apply_temperature(np.asarray([logits], dtype=np.float64), self.temperature)[0]

    # ------------------------------------------------------------ request

    def answer(
        self,
        messages: list[dict],
        principal: Principal,
        channel: str = "api",
        max_new_tokens: int | None = None,
        untrusted: bool = False,
        cancel: Cancellation | None = None,
    ) -> Answer:
        """Answer a conversation ending in a user turn (see the module docstring for the steps).

        Args:
            channel: where the request came from (``cli``, ``chat``, ``http:/v1/decide``...), for the audit.
            max_new_tokens: lower generation budget for this request (capped at ``runtime.max_new_tokens``).
            untrusted: the turns come from a remote caller (see :meth:`check_messages`).
            cancel: the request's deadline and cancel switch (a server's timeout, a client that left).

        Raises:
            AgentInputError: unusable request (an ``ERROR`` audit row is still written).
            so8t.runtime.engine.RequestCancelled: ``cancel`` fired (an ``ERROR`` audit row is written).
            so8t.runtime.model.ModelError: the prompt does not fit the context window.
        """
        t0 = time.perf_counter()
        request_id = uuid.uuid4().hex
        budget = min(max_new_tokens or self.max_new_tokens, self.max_new_tokens)
        raw_input = canonical_messages(messages) if isinstance(messages, list) else repr(messages)
        passages: list[Passage] = []
        try:
            messages = self.check_messages(messages, principal, untrusted)
            if self.retriever is not None:
                passages = self.retriever.search(messages[-1]["content"], principal.level)
            try:
                turns, fitted = self._prompt_messages(messages, passages)
                prompt = self.model.render(turns)
            except ValueError as e:
                raise AgentInputError(f"messages: the chat template rejected the conversation: {e}") from None
            with contextlib.nullcontext() if self._shared else self._lock:
                probs = self._decide(prompt, cancel)
                before = apply_policy(probs, self.policy.allow_threshold)
                # Only an allowed request is answered: nothing is generated for ESCALATION or DENY.
                text = self._generate(prompt, budget, cancel) if before.answered else ""
                n_prompt = self.model.count_tokens(prompt)
        except Exception as e:
            self._audit(request_id, channel, principal, t0, raw_input, passages, output=f"{type(e).__name__}: {e}")
            raise
        parts = separate(text, self.style)
        outcome = apply_policy(probs, self.policy.allow_threshold, parts if before.answered else None)
        decision, model_decision, confidence, override = (
            outcome.decision, outcome.model_decision, outcome.confidence, outcome.override
        )
        allow = outcome.answered
        shown = parts.final if allow else self.policy.text(decision)
        citations, grounding = grounded(shown, passages, fitted) if allow else ([], None)
        # Usage counts what the caller sees: the length of the private reasoning is not revealed.
        n_completion = self.model.count_tokens(shown)
        latency = self._audit(
            request_id,
            channel,
            principal,
            t0,
            raw_input,
            passages,
            reasoning=parts.reasoning,
            generation=text,
            output=shown,
            decision=decision,
            model_decision=model_decision,
            confidence=confidence,
            citations=citations,
            grounding=grounding,
        )
        return Answer(
            request_id=request_id,
            decision=decision,
            confidence=round(confidence, 6),
            answer=shown,
            citations=citations,
            grounding=grounding,
            model_decision=model_decision,
            probabilities={label: round(float(p), 6) for label, p in zip(LABELS, probs)},
            override=override,
            model_id=self.model.model_id,
            latency_ms=round(latency, 3),
            prompt_tokens=n_prompt,
            completion_tokens=n_completion,
            passages=passages,
        )

    def reject(self, principal: Principal, channel: str, raw_input: str, message: str) -> None:
        """Audit a request refused before it reached the agent (a body that is not valid JSON, a wrong shape)."""
        self._audit(uuid.uuid4().hex, channel, principal, time.perf_counter(), raw_input, [], output=message)

    def close(self) -> None:
        """Free the model now (llama.cpp objects left to interpreter shutdown can fail noisily)."""
        close = getattr(self.model, "close", None)
        if close is not None:
            close()
        if self.audit is not None:
            self.audit.close()

    def ask(self, question: str, principal: Principal, channel: str = "cli") -> Answer:
        """:meth:`answer` for a single user question."""
        return self.answer([{"role": "user", "content": question}], principal, channel)

    def _audit(
        self,
        request_id: str,
        channel: str,
        principal: Principal,
        t0: float,
        input_text: str,
        passages: list[Passage],
        *,
        output: str,
        reasoning: str = "",
        generation: str = "",
        decision: str = "ERROR",
        model_decision: str | None = None,
        confidence: float | None = None,
        citations: list[str] | None = None,
        grounding: str | None = None,
    ) -> float:
        """Append the request's audit row; returns the latency in milliseconds.

        ``passages`` are the retrieved ones (``doc_ids``); ``citations`` and ``grounding`` those of the
        :class:`Answer` (none for a request that failed or was refused).
        """
        latency_ms = (time.perf_counter() - t0) * 1000.0
        if self.audit is not None:
            self.audit.append(
                AuditEntry(
                    request_id=request_id,
                    channel=channel,
                    user_id=principal.user,
                    access_level=principal.level.ja,
                    model_id=self.model.model_id,
                    model_sha256=self.model.model_sha256,
                    input_text=input_text,
                    reasoning_text=reasoning,
                    generation_text=generation,
                    output_text=output,
                    decision=decision,
                    model_decision=model_decision,
                    confidence=confidence,
                    doc_ids=list(dict.fromkeys(p.doc_id for p in passages)),
                    latency_ms=latency_ms,
                    citations=list(citations or []),
                    grounding=grounding,
                )
            )
        return latency_ms


# ---------------------------------------------------------------- construction from params


def load_temperature(calibration_path: str | Path, key: str) -> float | None:
    """The fitted temperature of artifact ``key``, or ``None`` when the file or key is missing."""
    path = Path(calibration_path)
    if not path.is_file():
        return None
    from so8t.io import read_json

    artifact = read_json(path).get("artifacts", {}).get(key)
    return None if not artifact else float(artifact["temperature"])


def resolve(base_dir: str | Path, path: str | Path) -> Path:
    """``path`` taken relative to ``base_dir`` (the folder of params.yaml) unless absolute."""
    path = Path(path)
    return path if path.is_absolute() else Path(base_dir) / path


def audit_log(params, base_dir: str | Path = ".") -> AuditLog:
    """The :class:`AuditLog` of ``runtime.audit`` (paths relative to ``base_dir``)."""
    a = params.runtime.audit
    return AuditLog(
        resolve(base_dir, a.db),
        a.store_plaintext,
        key_file=resolve(base_dir, a.key_file) if a.key_file else None,
        anchor=resolve(base_dir, a.anchor) if a.anchor else None,
        timeout_s=a.lock_timeout_s,
    )


def build_agent(
    params, base_dir: str | Path = ".", model: ChatModel | None = None, warn=print, info=None, batching: bool = False
) -> Agent:
    """An :class:`Agent` configured by ``params`` (a :class:`so8t.params.Params`).

    Args:
        base_dir: the folder relative paths in params are taken from.
        model: a model to use instead of loading ``runtime.model``.
        warn: called with a message when the model has no fitted temperature, or ``runtime.model:
            auto`` falls back for want of metrics.
        info: called with one line naming the served file and why (:mod:`so8t.runtime.select`).
        batching: serve concurrent requests from one batch (:class:`so8t.runtime.engine.BatchingModel`,
            ``generation.batch_size`` sequences; the server's choice), rather than one at a time.

    Raises:
        so8t.runtime.select.SelectionError: ``runtime.model: auto`` finds no GGUF to serve.
    """
    from so8t.runtime.model import load_model
    from so8t.runtime.select import AUTO, SelectionError, served_model
    from so8t.data.retrieval import Retriever, roots_from_params

    rt = params.runtime
    if model is None:
        served = served_model(rt.model, base_dir, rt.metrics)
        if served.warning:
            warn(served.warning)
        if info is not None:
            info(served.reason)
        model_path = served.path
        g = params.generation
        model = load_model(model_path, rt.n_ctx, rt.n_threads, g.repetition_penalty, rt.model_id, g.n_gpu_layers,
                           batch_size=g.batch_size if batching else 1)
    else:  # a model given in memory: only its calibration key comes from runtime.model
        try:
            model_path = served_model(rt.model, base_dir, rt.metrics).path
        except SelectionError:  # auto with nothing on disk to choose from: the baked model's key
            model_path = Path(AUTO)  # not a .gguf: artifact_of() gives "baked"
    key = rt.calibration_key or artifact_of(model_path)
    temperature = load_temperature(resolve(base_dir, rt.calibration), key)
    if temperature is None:
        warn(f"no temperature for {key!r} in {rt.calibration}: confidences are uncalibrated (T = 1)")
        temperature = 1.0
    retriever = None
    if params.retrieval.enabled:
        r = params.retrieval
        retriever = Retriever(
            roots_from_params(r.roots, base_dir),
            r.tokenizer,
            r.top_k,
            r.chunk_chars,
            r.dense,
            str(resolve(base_dir, r.cache_dir)),
        )
        for line in retriever.refused:
            warn(f"retrieval refused {line}")
    if batching and hasattr(model, "backend"):
        from so8t.runtime.engine import BatchingModel

        model = BatchingModel(model, params.generation.batch_size, rt.n_ctx)
    return Agent(
        model,
        style=params.think_format.style,
        temperature=temperature,
        policy=Policy(rt.policy.escalation, rt.policy.deny, rt.allow_threshold),
        audit=audit_log(params, base_dir),
        retriever=retriever,
        max_new_tokens=rt.max_new_tokens,
        max_input_chars=rt.max_input_chars,
        allow_system_turns=rt.server.allow_system_turns,
        max_passage_tokens=params.retrieval.max_passage_tokens,
    )
