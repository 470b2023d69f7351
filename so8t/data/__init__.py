"""Data phase: collect -> synthesize -> think-format.

* :mod:`so8t.data.readers`, :mod:`so8t.data.pii`: user files in many formats and encodings, personal-data masking.
* :mod:`so8t.data.collect`: real sources (Debian FAQ / Reference, GSM-Symbolic, user folders) to JSONL with provenance.
* :mod:`so8t.data.sources` (one module per record source), :mod:`so8t.data.dedup`, :mod:`so8t.data.synthesize`:
  Japanese SFT records and safety decisions (templates in ``resources/``), deduplicated and balanced.
* :mod:`so8t.data.think_format`: chat-template rendering with separated reasoning, label masks, grouped splits.
* :mod:`so8t.data.datacard`: the data card and class-balance checks.

Imports only the core (``so8t.params``, ``schema``, ``io``, ``console``, ``access``).
"""
