"""inspect_gguf (ggml's GGUF reader through ctypes) reads what gguf-py's GGUFReader reads."""

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter

from so8t.model.quantize import QuantizeError, inspect_gguf


def _write(path, template):
    writer = GGUFWriter(str(path), "llama")
    if template is not None:
        writer.add_chat_template(template)
    writer.add_token_list([f"tok{i}" for i in range(3000)])
    writer.add_tensor("token_embd.weight", np.ones((12, 64), dtype=np.float32))
    writer.add_tensor("blk.0.attn_q.weight", np.ones((64, 64), dtype=np.float16))
    writer.add_tensor("output_norm.weight", np.ones(64, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("template", ["{{ messages[0]['content'] }}日本語", None])
def test_inspect_gguf_equals_gguf_py(tmp_path, template):
    path = _write(tmp_path / "m.gguf", template)
    info = inspect_gguf(path)
    reader = GGUFReader(str(path))
    assert info.tensor_types == {t.name: t.tensor_type.name for t in reader.tensors}
    assert info.tensor_types["blk.0.attn_q.weight"] == GGMLQuantizationType.F16.name
    assert info.type_counts == {"F32": 2, "F16": 1}
    assert info.n_weights == 12 * 64 + 64 * 64 + 64 == sum(int(t.n_elements) for t in reader.tensors)
    assert info.chat_template == template


def test_inspect_gguf_names_a_missing_or_broken_file(tmp_path):
    with pytest.raises(QuantizeError, match="not found"):
        inspect_gguf(tmp_path / "absent.gguf")
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf at all")
    with pytest.raises(QuantizeError, match=r"bad\.gguf: not a GGUF"):
        inspect_gguf(tmp_path / "bad.gguf")
