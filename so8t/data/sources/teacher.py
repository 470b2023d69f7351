"""A teacher model (a GGUF run by llama.cpp) that answers the document questions from the section text."""

from __future__ import annotations

from typing import Any

#: Teacher prompt: the section text is the only context (llama.cpp, greedy decoding).
TEACHER_PROMPT = (
    "次の文書の抜粋だけを根拠に、質問に日本語で簡潔に答えてください。\n\n"
    "# 抜粋（「{doc}」の「{section}」）\n{context}\n\n# 質問\n{question}\n\n# 回答\n"
)
TEACHER_N_CTX = 4096


def teacher_answers(
    records: list[dict[str, Any]], sections: list[dict[str, Any]], gguf: str, max_tokens: int, seed: int
) -> dict[str, Any]:
    """Replace each document record's template answer with a teacher model's answer, in place.

    The teacher (a GGUF file, run by llama.cpp with greedy decoding and a fixed seed) sees
    the section piece as its only context (:data:`TEACHER_PROMPT`). An empty answer keeps
    the template answer.

    Args:
        sections: the section of each record (parallel to ``records``).

    Returns:
        ``{"model", "answers", "kept_template"}``.

    Raises:
        FileNotFoundError: ``gguf`` does not exist (names ``synthesize.teacher_gguf``).
    """
    from pathlib import Path

    from llama_cpp import Llama

    from so8t.console import free_cores

    if not Path(gguf).is_file():
        raise FileNotFoundError(f"synthesize.teacher_gguf: {gguf!r} not found; give a local .gguf file or null")
    llm = Llama(model_path=gguf, n_ctx=TEACHER_N_CTX, n_threads=free_cores(), seed=seed, verbose=False)
    answered = 0
    for r, sec in zip(records, sections):
        section = sec["title"] if sec["title"] != sec["doc_title"] else "冒頭"
        prompt = TEACHER_PROMPT.format(doc=sec["doc_title"], section=section, context=sec["text"], question=r["prompt"])
        out = llm.create_completion(prompt, max_tokens=max_tokens, temperature=0.0, seed=seed, stop=["\n#", "\n\n\n"])
        answer = out["choices"][0]["text"].strip()
        if answer:
            r["response"] = answer
            answered += 1
    return {"model": gguf, "answers": answered, "kept_template": len(records) - answered}
