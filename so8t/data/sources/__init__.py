"""The sources of the synthesize stage's records, one module per source.

:mod:`so8t.data.synthesize` calls them in a fixed order and puts their records together
(deduplication, validation, class balance).

* :mod:`~so8t.data.sources.templates`: the safety-template schema
  (``so8t/data/resources/safety_templates.yaml``) and the ``decision`` records sampled from it.
* :mod:`~so8t.data.sources.faq`: ``qa_faq`` records from the Debian FAQ.
* :mod:`~so8t.data.sources.reference`: ``qa_reference`` records from the Debian Reference, the
  held-out reference sections and the ``lm_text`` documents.
* :mod:`~so8t.data.sources.gsm`: ``math`` records, GSM-Symbolic originals and rejection-sampled variants.
* :mod:`~so8t.data.sources.user`: ``qa_user`` and ``decision`` records from the user's own records.
* :mod:`~so8t.data.sources.documents`: ``qa_document`` records from sections of the user's documents.
* :mod:`~so8t.data.sources.teacher`: a teacher model (llama.cpp) that answers the document questions.
* :mod:`~so8t.data.sources.text`: Japanese sentence helpers shared by the QA sources.

Randomness comes from ``random.Random(f"{seed}:{part}")`` streams, one per part, so each
source is reproducible on its own.
"""
