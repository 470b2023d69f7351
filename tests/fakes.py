"""A deterministic fake chat model and agent builder for the runtime tests (agent, server, CLI)."""

from __future__ import annotations

import numpy as np

from so8t.model.base_model import GEMMA_CHAT_TEMPLATE
from so8t.runtime.agent import Agent, Policy, Principal
from so8t.runtime.audit import AuditLog
from so8t.runtime.model import CONTROL_TOKENS

REASONING = "秘密の推論です。利用者の意図を内部規程の第七条に照らして検討しました。"
REASONING_2 = "二つ目の非公開の検討として、輸出管理の該非を内部で確認しました。"
ANSWER = "Debian では apt でパッケージを入れます。"
POLICY = Policy(escalation="担当者の確認が必要です。", deny="お応えできません。", allow_threshold=0.5)

#: Model outputs: normal, reasoning only, reasoning pasted into the answer, a second reasoning
#: section inside the answer, an answer that is only a reasoning section, tags style.
OUTPUTS = {
    "normal": f"# 思考ステップ\n{REASONING}\n# 最終回答\n{ANSWER}\n判定: ALLOW",
    "no_final": f"# 思考ステップ\n{REASONING}\n{REASONING_2}",
    "echo": f"# 思考ステップ\n{REASONING}\n# 最終回答\n{ANSWER}\n思考ステップは次の通りです。\n{REASONING}\n判定: ALLOW",
    "reopen": f"# 思考ステップ\n{REASONING}\n# 最終回答\n{ANSWER}\n# 思考ステップ\n{REASONING_2}\n判定: ALLOW",
    "final_is_reasoning": f"# 最終回答\n# 思考ステップ\n{REASONING}\n{REASONING_2}",
    "think_tags": f"<think>{REASONING}</think>\n# 最終回答\n{ANSWER}\n<think>{REASONING_2}</think>",
    "no_markers": f"{REASONING}{REASONING_2}",
    "after_decision": f"# 思考ステップ\n{REASONING}\n# 最終回答\n{ANSWER}\n判定: ALLOW\n{REASONING_2}",
    "end_of_turn": f"# 思考ステップ\n{REASONING}\n# 最終回答\n{ANSWER}<end_of_turn>\n{REASONING_2}",
}


class FakeModel:
    """Deterministic :class:`ChatModel`: scripted output in small pieces, fixed label log-likelihoods.

    Args:
        output: text, or a function of the rendered prompt returning text.
        logits: log-likelihoods returned for ALLOW, ESCALATION, DENY.
        piece: characters per streamed piece (1 splits every marker across pieces).
    """

    model_id = "fake-model"
    model_sha256 = "f" * 64
    control_tokens = CONTROL_TOKENS

    def __init__(self, output=OUTPUTS["normal"], logits=(0.0, -4.0, -4.0), piece: int = 3, control_tokens=None) -> None:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        if control_tokens is not None:  # e.g. every special token of a real vocabulary
            self.control_tokens = tuple(dict.fromkeys((*CONTROL_TOKENS, *control_tokens)))
        self.output = output
        self.logits = list(logits)
        self.piece = piece
        self.prompts: list[str] = []
        self.contexts: list[str] = []
        self.closed = 0
        self._formatter = Jinja2ChatFormatter(GEMMA_CHAT_TEMPLATE, "<eos>", "<bos>")

    def render(self, messages):
        return self._formatter(messages=messages).prompt

    def generate(self, prompt, max_new_tokens):
        self.prompts.append(prompt)
        text = self.output(prompt) if callable(self.output) else self.output
        try:
            for i in range(0, len(text), self.piece):
                yield text[i : i + self.piece]
        finally:
            self.closed += 1

    def decision_logits(self, context):
        self.contexts.append(context)
        return np.array(self.logits, dtype=np.float64)

    def count_tokens(self, text):
        return len(text)


def make_agent(tmp_path, model=None, temperature=1.0, retriever=None, plaintext=True, **kw) -> Agent:
    return Agent(
        model or FakeModel(),
        style=kw.pop("style", "markdown"),
        temperature=temperature,
        policy=kw.pop("policy", POLICY),
        audit=AuditLog(tmp_path / "audit.sqlite3", store_plaintext=plaintext),
        retriever=retriever,
        **kw,
    )


ALICE = Principal.of("alice", "公開")


