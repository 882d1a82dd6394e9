"""Every bad input gets one clear message (exit code 2) naming what is wrong; nothing is written."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from checkpoints_convert.__main__ import main
from checkpoints_convert.convert import hf_to_megatron_dir
from tests.unit.test_convert_roundtrip import tiny_hf_model


@pytest.fixture(scope="module")
def qwen(tmp_path_factory) -> Path:
    return tiny_hf_model("qwen2", tmp_path_factory.mktemp("bad_input") / "hf", layers=2)


def copy_model(src: Path, dst: Path, *, config: dict | None = None, tensors=None) -> Path:
    dst.mkdir()
    cfg = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, **(config or {})}))
    weights = load_file(str(src / "model.safetensors"))
    save_file(tensors(weights) if tensors else weights, str(dst / "model.safetensors"))
    return dst


def run(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def test_unsupported_architecture_lists_supported(qwen, tmp_path, capsys):
    src = copy_model(qwen, tmp_path / "m", config={"architectures": ["MistralForCausalLM"], "model_type": "mistral"})
    code, err = run(capsys, "hf-to-megatron", "--hf", src, "--out", tmp_path / "out")
    assert code == 2 and "MistralForCausalLM" in err and "LlamaForCausalLM, Qwen2ForCausalLM" in err
    assert not (tmp_path / "out").exists()


def test_missing_tensor_is_named(qwen, tmp_path, capsys):
    def drop(w):
        del w["model.layers.1.mlp.up_proj.weight"]
        return w

    src = copy_model(qwen, tmp_path / "m", tensors=drop)
    code, err = run(capsys, "hf-to-megatron", "--hf", src, "--out", tmp_path / "out")
    assert code == 2 and "'model.layers.1.mlp.up_proj.weight' is missing" in err


def test_misshaped_tensor_names_both_shapes(qwen, tmp_path, capsys):
    def shrink(w):
        w["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(16, 64)
        return w

    src = copy_model(qwen, tmp_path / "m", tensors=shrink)
    code, err = run(capsys, "hf-to-megatron", "--hf", src, "--out", tmp_path / "out")
    assert code == 2 and "'model.layers.0.self_attn.k_proj.weight' has shape (16, 64), expected (32, 64)" in err


def test_non_empty_output_is_refused_unless_overwrite(qwen, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    code, err = run(capsys, "hf-to-megatron", "--hf", qwen, "--out", out)
    assert code == 2 and "not empty" in err and "--overwrite" in err and (out / "keep.txt").exists()
    code, _ = run(capsys, "hf-to-megatron", "--hf", qwen, "--out", out, "--overwrite")
    assert code == 0 and not (out / "keep.txt").exists() and (out / ".metadata").is_file()
    back = tmp_path / "back"
    back.mkdir()
    (back / "x").write_text("x")
    code, err = run(capsys, "megatron-to-hf", "--megatron", out, "--out", back)
    assert code == 2 and "not empty" in err


@pytest.mark.parametrize("tp,config,what", [
    (3, {}, "num_attention_heads = 4"),
    (4, {}, "num_kv_heads = 2"),
    (2, {"vocab_size": 129}, "vocab_size = 129"),
], ids=["heads", "kv_heads", "vocab"])
def test_tp_that_does_not_divide_says_which(qwen, tmp_path, capsys, tp, config, what):
    src = qwen
    if config:  # a matching embedding so that only the TP check can fail
        src = copy_model(qwen, tmp_path / "m", config=config, tensors=lambda w: {
            **w, "model.embed_tokens.weight": torch.zeros(129, 64)})
    code, err = run(capsys, "hf-to-megatron", "--hf", src, "--out", tmp_path / "out", "--tp", tp)
    assert code == 2 and f"tensor-parallel size {tp} does not divide {what}" in err


def test_pp_that_does_not_divide_layers(qwen, tmp_path, capsys):
    code, err = run(capsys, "hf-to-megatron", "--hf", qwen, "--out", tmp_path / "out", "--pp", 3)
    assert code == 2 and "does not divide num_layers = 2" in err


def test_megatron_side_errors(qwen, tmp_path, capsys):
    meg = tmp_path / "meg"
    hf_to_megatron_dir(qwen, meg)
    code, err = run(capsys, "megatron-to-hf", "--megatron", tmp_path, "--out", tmp_path / "o1", "--config", qwen)
    assert code == 2 and "is not a Megatron dist checkpoint" in err
    wider = copy_model(qwen, tmp_path / "cfg", config={"intermediate_size": 128})
    code, err = run(capsys, "megatron-to-hf", "--megatron", meg, "--out", tmp_path / "o2", "--config", wider)
    assert code == 2 and "'decoder.layers.mlp.linear_fc1.weight' has shape (2, 192, 64), expected (2, 256, 64)" in err
    llama_cfg = copy_model(qwen, tmp_path / "cfg2", config={"architectures": ["LlamaForCausalLM"],
                                                            "model_type": "llama", "tie_word_embeddings": False})
    code, err = run(capsys, "megatron-to-hf", "--megatron", meg, "--out", tmp_path / "o3", "--config", llama_cfg)
    assert code == 2 and "'output_layer.weight' is missing from the Megatron checkpoint" in err


def test_missing_config_and_weights(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, err = run(capsys, "hf-to-megatron", "--hf", tmp_path / "empty", "--out", tmp_path / "out")
    assert code == 2 and "no config.json" in err


@pytest.mark.parametrize("command", ["verify", "megatron-to-hf"])
def test_missing_megatron_directory_is_one_line(qwen, tmp_path, capsys, command):
    gone = tmp_path / "no_such_ckpt"
    argv = (["verify", "--hf", qwen, "--megatron", gone] if command == "verify" else
            ["megatron-to-hf", "--megatron", gone, "--out", tmp_path / "out"])
    code, err = run(capsys, *argv)
    assert code == 2 and err.count("\n") == 1, err
    assert f"Megatron checkpoint directory '{gone}' does not exist" in err and "hf-to-megatron" in err


def test_damaged_megatron_checkpoint_is_one_line(qwen, tmp_path, capsys):
    meg = tmp_path / "meg"
    hf_to_megatron_dir(qwen, meg)
    piece = max(meg.glob("*.distcp"), key=lambda f: f.stat().st_size)
    piece.write_bytes(piece.read_bytes()[:100])
    code, err = run(capsys, "megatron-to-hf", "--megatron", meg, "--out", tmp_path / "out", "--config", qwen)
    assert code == 2 and err.count("\n") == 1, err
    assert f"Megatron checkpoint '{meg}' cannot be read" in err and "truncated" in err


def truncated_copy(src: Path, dst: Path) -> Path:
    """``src`` with its model.safetensors cut in half (as an interrupted download or copy leaves it)."""
    dst.mkdir()
    (dst / "config.json").write_bytes((src / "config.json").read_bytes())
    data = (src / "model.safetensors").read_bytes()
    (dst / "model.safetensors").write_bytes(data[: len(data) // 2])
    return dst


def test_truncated_safetensors_is_named(qwen, tmp_path, capsys):
    src = truncated_copy(qwen, tmp_path / "m")
    code, err = run(capsys, "hf-to-megatron", "--hf", src, "--out", tmp_path / "out")
    assert code == 2 and err.count("\n") == 1, err
    assert f"'{src / 'model.safetensors'}' cannot be read as safetensors" in err and "truncated" in err
    assert not (tmp_path / "out").exists()


def test_truncated_safetensors_in_model_hf_path_is_a_run_error(qwen, tmp_path):
    """The trainer's HF weight loading (megatron_meml/stages/context.py) raises RunError, which `meml` prints as one line."""
    from megatron_meml.model.arch import arch_from_hf_config, load_hf_config
    from megatron_meml.errors import RunError
    from megatron_meml.stages.context import load_hf_weights

    src = truncated_copy(qwen, tmp_path / "m")
    arch = arch_from_hf_config(load_hf_config(src))
    with pytest.raises(RunError, match=r"^model.hf_path '.*/m': '.*/m/model.safetensors' cannot be read as "
                                       r"safetensors .*truncated"):
        load_hf_weights(src, [], arch)
