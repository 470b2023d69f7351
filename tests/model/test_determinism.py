"""benchmarks/determinism.py: machine classes from /proc/cpuinfo, and the comparison of two records (no training)."""

from __future__ import annotations

import hashlib
import json
import re
import struct
from pathlib import Path

import pytest
from scripts import load_script

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def det():
    return load_script("benchmarks/determinism.py")


def _cpuinfo(vendor: str, name: str, family: int, model: int, stepping: int, flags: str, cpus: int = 2) -> str:
    block = (
        f"vendor_id\t: {vendor}\ncpu family\t: {family}\nmodel\t\t: {model}\nmodel name\t: {name}\n"
        f"stepping\t: {stepping}\nmicrocode\t: 0xffffffff\nflags\t\t: fpu sse4_2 {flags}\n\n"
    )
    return "".join(f"processor\t: {i}\n" + block for i in range(cpus))


GENOA = _cpuinfo("AuthenticAMD", "AMD EPYC", 25, 17, 1,
                 "avx f16c fma avx2 avx512f avx512dq avx512bw avx512vl avx512_bf16 avx512_vnni")
MILAN = _cpuinfo("AuthenticAMD", "AMD EPYC 7B13", 25, 1, 0, "avx f16c fma avx2")
SAPPHIRE = _cpuinfo("GenuineIntel", "Intel(R) Xeon(R) Platinum 8488C", 6, 143, 8,
                    "avx f16c fma avx2 avx512f avx512bw avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8")


def test_machine_class_names_vendor_line_family_model_and_isa(det):
    assert det.machine_class(det.parse_cpuinfo(GENOA)) == "amd-epyc-f25-m17-avx512"
    assert det.machine_class(det.parse_cpuinfo(MILAN)) == "amd-epyc-f25-m1-avx2"
    assert det.machine_class(det.parse_cpuinfo(SAPPHIRE)) == "intel-xeon-f6-m143-amx"
    core = _cpuinfo("GenuineIntel", "11th Gen Intel(R) Core(TM) i7-1185G7 @ 3.00GHz", 6, 140, 1, "avx avx2 avx512f")
    assert det.machine_class(det.parse_cpuinfo(core)) == "intel-core-f6-m140-avx512"
    assert det.machine_class(det.parse_cpuinfo("")) == "unknown-cpu-sse"


def test_parse_cpuinfo_reads_the_first_processor_and_counts_them(det):
    cpu = det.parse_cpuinfo(SAPPHIRE)
    assert (cpu["vendor"], cpu["model_name"], cpu["family"], cpu["model"], cpu["stepping"]) == (
        "GenuineIntel", "Intel(R) Xeon(R) Platinum 8488C", 6, 143, 8)
    assert cpu["logical_cpus"] == 2
    assert cpu["isa"]["amx_tile"] and cpu["isa"]["avx512_bf16"] and cpu["isa"]["avx2"]
    assert set(cpu["isa"]) == set(det.ISA_FLAGS)
    milan = det.parse_cpuinfo(MILAN)["isa"]
    assert milan["avx2"] and not milan["avx512f"] and not milan["amx_tile"]
    # a flag that is only a prefix of a listed one does not count
    assert not det.parse_cpuinfo(_cpuinfo("AuthenticAMD", "x", 1, 1, 1, "avx512fx"))["isa"]["avx512f"]


def test_isa_level_is_the_widest_vector_set(det):
    assert det.isa_level({"avx2": True, "avx512f": True, "amx_tile": True}) == "amx"
    assert det.isa_level({"avx2": True, "avx512f": True}) == "avx512"
    assert det.isa_level({"avx": True, "avx2": True}) == "avx2"
    assert det.isa_level({}) == "sse"


def test_default_record_names_carry_the_knobs_in_effect(det):
    knobs = det.knobs_in_effect({"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "COMPATIBLE", "PATH": "/bin"})
    assert knobs == {"MKL_CBWR": "COMPATIBLE", "ATEN_CPU_CAPABILITY": "avx2"}
    cls = "amd-epyc-f25-m17-avx512"
    assert det.default_out(cls, {}) == Path("reports/determinism/amd-epyc-f25-m17-avx512.json")
    assert det.default_out(cls, knobs, "rerun") == Path(
        "reports/determinism/amd-epyc-f25-m17-avx512.cbwr-compatible.aten-avx2.rerun.json")
    assert det.knob_slug({"MKL_CBWR": "AVX2,STRICT"}) == "cbwr-avx2-strict"


def test_child_process_gets_the_env_or_the_default_without_it(det):
    argv = ["--steps", "2", "--env", "MKL_CBWR=COMPATIBLE", "--env=ATEN_CPU_CAPABILITY=avx2", "--also-default"]
    assert det.child_argv(argv) == ["--steps", "2"]
    env = det._parse_env(["MKL_CBWR=COMPATIBLE", "ATEN_CPU_CAPABILITY=avx2"])
    base = {"PATH": "/bin", "MKL_CBWR": "AUTO"}
    child = det.child_env(base, env, default=False)
    assert child["MKL_CBWR"] == "COMPATIBLE" and child["ATEN_CPU_CAPABILITY"] == "avx2"
    assert child[det.CHILD_FLAG] == "1" and json.loads(child[det.REQUESTED]) == dict(env)
    default = det.child_env(base, env, default=True)
    assert "MKL_CBWR" not in default and "ATEN_CPU_CAPABILITY" not in default and default["PATH"] == "/bin"
    assert json.loads(default[det.REQUESTED]) == {}
    with pytest.raises(SystemExit):
        det._parse_env(["MKL_CBWR"])


def test_sha256_floats_is_the_float64_bytes_row_major(det):
    rows = [[-1.5, -2.25, -7.0], [0.1, 0.2, 0.3]]
    flat = [-1.5, -2.25, -7.0, 0.1, 0.2, 0.3]
    assert det.sha256_floats(rows) == hashlib.sha256(struct.pack("<6d", *flat)).hexdigest()
    assert det.sha256_floats([0.0]) != det.sha256_floats([-0.0])  # bitwise, not numeric
    assert det.sha256_floats([1.0]) != det.sha256_floats([1.0 + 2**-52])


def _record(cls="amd-epyc-f25-m17-avx512", env=None, losses=(20.521418, 18.2, 15.9), logits=None, gguf="g1"):
    logits = logits or [[-0.5, -2.0, -3.0], [-3.0, -0.2, -4.0]]
    return {
        "machine_class": cls,
        "machine": {"class": cls, "env": env or {}, "torch": {"version": "2.x", "cpu_capability": "AVX512", "threads": 2}},
        "hashes": {
            "base": {"model.safetensors": "b0"},
            "train": {f"step{i + 1}": {"loss": f"l{v}", "grad_norm": f"g{v}"} for i, v in enumerate(losses)},
            "adapter": {"adapter_model.safetensors": "a" + "".join(map(str, losses)), "adapter_config.json": "c"},
            "baked": {"model.safetensors": "k" + "".join(map(str, losses))},
            "gguf": {"f16": gguf, "q8_0": gguf + "q"},
            "logits": {"f16": json.dumps(logits), "q8_0": json.dumps(logits)},
        },
        "values": {
            "train": [{"step": i + 1, "loss": v, "grad_norm": v / 10} for i, v in enumerate(losses)],
            "logits": {"f16": logits, "q8_0": logits},
        },
    }


def test_ordered_hashes_follow_the_pipeline(det):
    keys = [k for k, _ in det.ordered_hashes(_record(losses=tuple(range(1, 12))))]
    assert keys[0] == "base/model.safetensors"
    assert keys[1:5] == ["train/step1/loss", "train/step1/grad_norm", "train/step2/loss", "train/step2/grad_norm"]
    assert keys.index("train/step10/loss") > keys.index("train/step9/grad_norm")  # numeric, not lexical
    assert keys[-4:] == ["gguf/f16", "gguf/q8_0", "logits/f16", "logits/q8_0"]
    with pytest.raises(det.RecordError):
        det.ordered_hashes({"machine": {}})


def test_compare_names_the_first_step_that_differs(det):
    a = _record()
    assert det.compare(a, _record())["same"] and det.compare(a, a)["first_difference"] is None
    b = _record(losses=(20.521418, 18.2000001, 15.9), logits=[[-0.5, -2.0, -3.0], [-0.1, -0.2, -4.0]])
    result = det.compare(a, b)
    assert not result["same"] and result["first_difference"] == "train/step2/loss"
    status = {k: s for k, _, _, s in result["rows"]}
    assert status["base/model.safetensors"] == "same" and status["train/step1/loss"] == "same"
    assert status["adapter/adapter_model.safetensors"] == "differs" and status["gguf/f16"] == "same"
    assert status["adapter/adapter_config.json"] == "same"
    text = det.format_compare(a, b)
    assert "first difference: train/step2/loss (6 of 14 shared hashes differ)" in text
    assert re.search(r"train/step2/loss .* differs +18\.2 vs 18\.2000001", text)
    assert "1/2 predictions differ" in text  # row 2: ESCALATION (-0.2) in a, ALLOW (-0.1) in b


def test_compare_lists_hashes_only_one_record_has(det):
    a, b = _record(), _record()
    del b["hashes"]["train"]["step3"]
    b["hashes"]["gguf"]["q4_k_m"] = "q4"
    result = det.compare(a, b)
    status = {k: s for k, _, _, s in result["rows"]}
    assert status["train/step3/loss"] == "only a" and status["gguf/q4_k_m"] == "only b"
    assert result["same"] and result["first_difference"] is None and result["only_one"] == 3
    assert "identical: all 12 shared hashes match; 3 in one record only" in det.format_compare(a, b)
    b["hashes"]["baked"]["model.safetensors"] = "other"
    assert det.compare(a, b)["first_difference"] == "baked/model.safetensors"


def test_compare_command_exit_status(det, tmp_path, capsys):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_record()), encoding="utf-8")
    b.write_text(json.dumps(_record(cls="amd-epyc-f25-m1-avx2", gguf="g2")), encoding="utf-8")
    assert det.main(["--compare", str(a), str(a)]) == 0
    assert "identical" in capsys.readouterr().out
    assert det.main(["--compare", str(a), str(b)]) == 1
    out = capsys.readouterr().out
    assert "first difference: gguf/f16" in out and "amd-epyc-f25-m1-avx2" in out


def test_balanced_decisions_take_every_label_in_turn(det):
    rows = [{"id": f"{d}{i}", "task": "decision", "decision": d, "prompt_text": "p"}
            for d in ("DENY", "ALLOW", "ESCALATION") for i in range(3)]
    rows.append({"id": "m", "task": "math", "prompt_text": "p"})
    picked = det.balanced_decisions(rows, 7)
    assert [r["id"] for r in picked] == ["ALLOW0", "ESCALATION0", "DENY0", "ALLOW1", "ESCALATION1", "DENY1",
                                         "ALLOW2"]
    assert len(det.balanced_decisions(rows, 50)) == 9


def test_short_params_are_valid_and_never_resume(det, tmp_path):
    p = det._short_params(ROOT / "params.yaml", 3, tmp_path)
    assert p.train.max_steps == 3 and p.train.eval_steps == 0
    assert not p.checkpoint.resume and Path(p.checkpoint.dir) == tmp_path / "checkpoints"


def test_table_letters_group_records_with_the_same_bytes(det):
    a, b, c = _record(), _record(gguf="g2"), _record(losses=(20.521418, 18.2))
    rows = dict(det.agreement([a, b, c, a]))
    assert rows["base/model.safetensors"] == ["a", "a", "a", "a"]
    assert rows["gguf/f16"] == ["a", "b", "a", "a"]
    assert rows["train/step3/loss"] == ["a", "a", None, "a"]
    assert rows["adapter/adapter_model.safetensors"] == ["a", "a", "b", "a"]
    text = det.format_table([a, b, c, a], ["r1", "r2", "r3", "r1"])
    assert re.search(r"gguf/f16 +a +b +a +a +differs", text) and re.search(r"train/step3/loss +a +a +- +a +same", text)
