"""Running the fine-tuned model inside an organisation: ``so8t ask / chat / serve / audit / ollama``.

* :mod:`so8t.runtime.agent`: retrieval + generation + calibrated decision + policy + audit row.
* :mod:`so8t.guard`: the model's reasoning never leaves the runtime.
* :mod:`so8t.runtime.model`: the model interface; llama.cpp (GGUF, default) and transformers.
* :mod:`so8t.data.retrieval`: BM25 (+ optional dense) over local folders, by access level.
* :mod:`so8t.access`: access levels 公開 < 取扱注意 < 機密 < 極秘.
* :mod:`so8t.runtime.audit`: hash-chained SQLite audit log and its verification.
* :mod:`so8t.runtime.server`: OpenAI-compatible HTTP API (FastAPI + uvicorn).
* :mod:`so8t.runtime.ollama`: Ollama Modelfiles whose TEMPLATE is checked against the chat template.

Importing this package loads nothing heavy; each module imports what it needs.
"""
