"""Peak RSS of checkpoint conversion vs. layer count: a 4-layer and a 16-layer model of the same width.

Each conversion runs in a fresh subprocess (``python -m checkpoints_convert ...``); its peak RSS is read from
``os.wait4``. Streaming means the peak grows with one layer's size, not with the number of layers, so the
16-layer / 4-layer ratio should stay near 1 (goal <= 1.5). The reverse direction is measured too, with
safetensors shards capped below one layer-group so that it also streams.

    python bench/convert_memory.py [--hidden 1024] [--ffn 2048] [--keep DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file


def make_hf_model(path: Path, layers: int, hidden: int, ffn: int, vocab: int, heads: int, kv_heads: int) -> int:
    """Random Llama-layout safetensors checkpoint, written one layer per shard (low memory). Returns bytes."""
    path.mkdir(parents=True)
    d = hidden // heads
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g) * 0.02

    weight_map, total = {}, 0
    files = {"model-embed.safetensors": {"model.embed_tokens.weight": rnd(vocab, hidden),
                                         "model.norm.weight": torch.ones(hidden), "lm_head.weight": rnd(vocab, hidden)}}
    for name, tensors in files.items():
        save_file(tensors, str(path / name))
        weight_map.update({k: name for k in tensors})
        total += sum(t.numel() * 4 for t in tensors.values())
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors = {p + "input_layernorm.weight": torch.ones(hidden), p + "post_attention_layernorm.weight": torch.ones(hidden),
                   p + "self_attn.q_proj.weight": rnd(heads * d, hidden), p + "self_attn.k_proj.weight": rnd(kv_heads * d, hidden),
                   p + "self_attn.v_proj.weight": rnd(kv_heads * d, hidden), p + "self_attn.o_proj.weight": rnd(hidden, heads * d),
                   p + "mlp.gate_proj.weight": rnd(ffn, hidden), p + "mlp.up_proj.weight": rnd(ffn, hidden),
                   p + "mlp.down_proj.weight": rnd(hidden, ffn)}
        name = f"model-layer{i:03d}.safetensors"
        save_file(tensors, str(path / name))
        weight_map.update({k: name for k in tensors})
        total += sum(t.numel() * 4 for t in tensors.values())
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                   "weight_map": weight_map}))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab, "hidden_size": hidden,
              "intermediate_size": ffn, "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": kv_heads, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
              "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "float32"}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return total


def peak_rss_mb(args: list[str]) -> tuple[float, float]:
    """(peak RSS in MiB, seconds) of ``python -m checkpoints_convert *args`` in a fresh process."""
    t0 = time.monotonic()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "checkpoints_convert", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    err = proc.stderr.read().decode()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"conversion failed ({' '.join(args)}):\n{err}")
    return usage.ru_maxrss / 1024, time.monotonic() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--ffn", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--layers", type=int, nargs=2, default=(4, 16))
    ap.add_argument("--keep", type=Path, default=None, help="work directory to keep (default: a temp dir)")
    a = ap.parse_args()
    root = a.keep or Path(tempfile.mkdtemp(prefix="convert_memory_"))
    rows = []
    for n in a.layers:
        hf, meg, back = root / f"hf{n}", root / f"meg{n}", root / f"back{n}"
        size = make_hf_model(hf, n, a.hidden, a.ffn, a.vocab, heads=16, kv_heads=4)
        fwd, t_fwd = peak_rss_mb(["hf-to-megatron", "--hf", str(hf), "--out", str(meg), "--overwrite"])
        rev, t_rev = peak_rss_mb(["megatron-to-hf", "--megatron", str(meg), "--out", str(back), "--overwrite",
                                  "--max-shard-gb", "0.05"])
        rows.append((n, size / 2**20, fwd, t_fwd, rev, t_rev))
        print(f"{n:3d} layers  weights {size / 2**20:7.1f} MiB  hf-to-megatron peak RSS {fwd:7.1f} MiB ({t_fwd:.1f}s)"
              f"  megatron-to-hf peak RSS {rev:7.1f} MiB ({t_rev:.1f}s)", flush=True)
    (s, ss, f_s, _, r_s, _), (b, bs, f_b, _, r_b, _) = rows
    print(f"weights ratio {b}/{s} layers: {bs / ss:.2f}")
    print(f"peak RSS ratio hf-to-megatron: {f_b / f_s:.2f}  (goal <= 1.5)")
    print(f"peak RSS ratio megatron-to-hf: {r_b / r_s:.2f}")
    if a.keep is None:
        import shutil

        shutil.rmtree(root)


if __name__ == "__main__":
    main()
