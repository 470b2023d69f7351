"""Names of the flat metrics in ``reports/metrics.json`` and ``reports/distill.json``.

Every key is ``<artifact>.<name>`` (``q4_k_m.perplexity``, ``baked.decision.macro_f1``), so
``dvc metrics diff`` lines up runs and artifacts. The names are defined once here and used by
the evaluate, distill and report code.
"""

from __future__ import annotations

from so8t.model import quantize

DECISION_N = "decision.n"
DECISION_ACCURACY = "decision.accuracy"
DECISION_MACRO_F1 = "decision.macro_f1"
DECISION_MACRO_F1_CI_LOW = "decision.macro_f1_ci_low"
DECISION_MACRO_F1_CI_HIGH = "decision.macro_f1_ci_high"
DECISION_ECE = "decision.ece"
DECISION_BRIER = "decision.brier"
DECISION_NLL = "decision.nll"
DECISION_ECE_CALIBRATED = "decision.ece_calibrated"
DECISION_ECE_CALIBRATED_CI_LOW = "decision.ece_calibrated_ci_low"
DECISION_ECE_CALIBRATED_CI_HIGH = "decision.ece_calibrated_ci_high"
DECISION_BRIER_CALIBRATED = "decision.brier_calibrated"
DECISION_NLL_CALIBRATED = "decision.nll_calibrated"
DECISION_TEMPERATURE = "decision.temperature"
DECISION_TEMPERATURE_AT_BOUND = "decision.temperature_at_bound"
#: Decision scores of a sample of the train split (to see over- or under-fitting).
TRAIN_DECISION_N = "decision.train.n"
TRAIN_DECISION_MACRO_F1 = "decision.train.macro_f1"
#: With retrieved passages before the question (the runtime's prompt).
DECISION_MACRO_F1_RAG = "decision.macro_f1_rag"
FAQ_CHRF_RAG = "faq.chrf_rag"
REFERENCE_CHRF = "reference.chrf"
REFERENCE_CHRF_RAG = "reference.chrf_rag"
#: Share of FAQ test questions answered (ALLOW) with their own FAQ entry among the cited passages.
FAQ_CITATION_RATE_RAG = "faq.citation_rate_rag"
#: The runtime policy's labels (ALLOW below ``runtime.allow_threshold`` -> ESCALATION), scored.
POLICY_MACRO_F1 = "decision.policy.macro_f1"
#: Share of the gold-ALLOW test decisions the runtime policy answers (its label, after temperature
#: scaling and ``runtime.allow_threshold``, is ALLOW).
POLICY_ALLOW_RECALL = "decision.policy.allow_recall"
#: The linear-probe baseline (stage ``probe``): its rows in ``reports/metrics.json`` are
#: ``probe.decision.*`` (``key(PROBE, DECISION_MACRO_F1)``); every row's paired gain over it on the
#: same test decisions (row macro-F1 - probe macro-F1, paired bootstrap interval).
PROBE = "probe"
DECISION_PROBE_GAIN = "decision.probe_gain"
DECISION_PROBE_GAIN_CI_LOW = "decision.probe_gain_ci_low"
DECISION_PROBE_GAIN_CI_HIGH = "decision.probe_gain_ci_high"
#: The greedy ``判定: X`` line generated for every test decision: share whose label equals the scored
#: label (argmax of the label log-likelihoods), macro-F1 of the generated labels against the gold ones
#: (a line without a label counts as wrong), and the share of lines without a parseable label.
DECISION_GENERATED_AGREEMENT = "decision.generated_agreement"
DECISION_GENERATED_MACRO_F1 = "decision.generated_macro_f1"
DECISION_GENERATED_UNPARSED = "decision.generated_unparsed_rate"
#: Seconds per generated ``判定`` line (performance file only).
SECONDS_PER_GENERATED_DECISION = "decision.seconds_per_generated_line"
#: Prompt-side seconds per decision request, bare and with passages.
SECONDS_PER_REQUEST = "decision.seconds_per_request"
SECONDS_PER_REQUEST_RAG = "decision.seconds_per_request_rag"
#: Share of the test split's benign requests (FAQ, reference and document QA, math) decided ALLOW.
BENIGN_ALLOW_RATE = "decision.benign_allow_rate"
DECISIONS_PER_MINUTE = "decision.per_minute"
PERPLEXITY = "perplexity"
MATH_EXACT_MATCH = "math.exact_match"
FAQ_CHRF = "faq.chrf"
FAQ_BLEU = "faq.bleu"
FAQ_ROUGE_L = "faq.rouge_l"
FAQ_KEIGO_RATE = "faq.keigo_rate"
STABILITY_REPEATED_NGRAM_RATE = "stability.repeated_ngram_rate"
STABILITY_LONGEST_REPEATED_SPAN = "stability.longest_repeated_span"
STABILITY_OSCILLATION = "stability.oscillation"
TOKENS_PER_S = "tokens_per_s"
PROMPT_TOKENS_PER_S = "prompt_tokens_per_s"
PERPLEXITY_TOKENS_PER_S = "perplexity_tokens_per_s"
SIZE_MB = "size_mb"
PARAMETERS = "parameters"
PARITY_TEXT = "parity.text"
PARITY_DECISION = "parity.decision"
#: The transformers reference sample (``f16.parity.*``): its sizes, and the baked model's held-out
#: perplexity in transformers float32 and the F16 GGUF's over it.
PARITY_TEXT_N = "parity.text_n"
PARITY_DECISION_N = "parity.decision_n"
PARITY_PERPLEXITY_HF = "parity.perplexity_hf"
PARITY_PERPLEXITY_RATIO = "parity.perplexity_ratio"
#: The artifact whose ``parity.*`` keys compare the F16 GGUF with transformers: the quantize report's
#: F16 entry (:data:`so8t.model.quantize.F16`).
F16 = quantize.F16
#: Wall time of one artifact's evaluation, or of a whole stage (``reports/performance/*.json``).
WALL_S = "wall_s"
AGREEMENT_TOP1 = "agreement.top1"
AGREEMENT_KL = "agreement.kl"


def key(artifact: str, name: str) -> str:
    """The flat metric key of ``name`` for ``artifact``: ``key("q8_0", PERPLEXITY) == "q8_0.perplexity"``."""
    return f"{artifact}.{name}"
