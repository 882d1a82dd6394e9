"""meml plan: hand-worked buffer layouts, published parameter counts, the layout checks and the CLI verdicts."""
from __future__ import annotations

import json

import pytest

from megatron_meml.cli import main
from megatron_meml.config import load_config
from megatron_meml.experiments.plan import (KNOWN_SHAPES, Layout, Param, buffer_shards, chunk_params, inflight_chunks,
                                            layer_activation_bytes, plan, rank_state)
from megatron_meml.model.arch import arch_from_hf_config

RECIPE_70B = "recipes/meml-llama-3.1-70b-8n8g-tp8pp4dp2.yaml"


def test_buffer_layout_hand_worked():
    # reversed order: b (30) at [0, 30); a (100) at pad64(30) = 64 -> [64, 164); bucket end pad(164, lcm(2, 128)) = 256.
    # rank 0 owns [0, 128): 30 + 64 = 94; rank 1 owns [128, 256): 36.
    assert buffer_shards([Param("a", 100), Param("b", 30)], 2) == (256, [94, 36])
    # without the distributed optimizer: no padding, every rank holds everything
    assert buffer_shards([Param("a", 100), Param("b", 30)], 2, distributed_optimizer=False) == (130, [130, 130])


def test_shared_embedding_gets_its_own_bucket():
    # first stage of a tied model under PP: the embedding (first param) closes the bucket of the others.
    # reversed: c (10) [0, 10), d (20) [64, 84) -> bucket [0, 384) (lcm(3, 128) = 384), emb (50) [384, 434) -> [384, 768)
    ps = [Param("emb", 50, shared_embedding=True), Param("d", 20), Param("c", 10)]
    n, shards = buffer_shards(ps, 3)
    assert n == 768
    # each bucket is cut in 3 slices of 128: rank 0 owns [0, 128) and [384, 512), i.e. c, d and the embedding
    assert shards == [10 + 20 + 50, 0, 0]
    # one bucket for all (no sharing): [0, 10), [64, 84), [128, 178) -> end 384; rank 0 [0, 128), rank 1 [128, 256)
    assert buffer_shards([Param("emb", 50), Param("d", 20), Param("c", 10)], 3) == (384, [30, 50, 0])


@pytest.mark.parametrize("name,count", [("Qwen2.5-Math-1.5B", 1_543_714_304), ("Qwen2.5-7B", 7_615_616_512),
                                        ("Qwen2.5-32B", 32_763_876_352), ("Llama-3.2-1B-Instruct", 1_235_814_400),
                                        ("Llama-3.1-8B", 8_030_261_248), ("Llama-3.1-70B", 70_553_706_496)])
def test_known_shapes_give_published_parameter_counts(name, count):
    arch = arch_from_hf_config(KNOWN_SHAPES[name])
    assert sum(p.numel for p in chunk_params(arch, 1, 1, None, 0)) == count


def test_tp_pp_split_adds_up():
    arch = arch_from_hf_config(KNOWN_SHAPES["Llama-3.1-8B"])
    whole = sum(p.numel for p in chunk_params(arch, 1, 1, None, 0))
    norms = (2 * arch.num_layers + 1) * arch.hidden_size  # replicated over TP
    split = sum(p.numel for s in range(2) for c in range(2) for p in chunk_params(arch, 4, 2, 2, s, c))
    assert split == (whole - norms) // 4 + norms


def test_rank_state_optimizer_bytes():
    from megatron_meml.parallel import ParallelConfig

    arch = arch_from_hf_config(KNOWN_SHAPES["Llama-3.2-1B-Instruct"])  # tied, pp=1: one embedding, no output layer
    rs = rank_state(arch, ParallelConfig(), "bf16", 0, 1)
    assert rs.params == 1_235_814_400 and rs.shards == [rs.buffer_numel]
    # bf16 weights (norms included), fp32 main params + two fp32 moments per element
    assert rs.optim_bytes == [12 * rs.buffer_numel] and rs.weight_bytes == 2 * rs.buffer_numel


def test_activation_formula_hand_worked():
    arch = arch_from_hf_config(dict(architectures=["LlamaForCausalLM"], hidden_size=8, num_hidden_layers=2,
                                    num_attention_heads=2, num_key_value_heads=1, intermediate_size=12,
                                    vocab_size=16))
    # h=8, q=8, kv=4, f=12; 10 tokens, bf16: 4*10*8*2 = 640 + 10*(16+8+36)*2 = 1200 -> 1840
    assert layer_activation_bytes(arch, 10, 1, False, 2, False) == 1840
    # TP=2 without SP: the h-wide tensors stay whole: 640 + 600
    assert layer_activation_bytes(arch, 10, 2, False, 2, False) == 1240
    assert layer_activation_bytes(arch, 10, 2, True, 2, False) == 320 + 600
    assert layer_activation_bytes(arch, 10, 2, True, 2, True) == 80  # recompute keeps the layer input only


def test_inflight_microbatches():
    assert [inflight_chunks(4, None, s, 16) for s in range(4)] == [4, 3, 2, 1]
    assert inflight_chunks(4, None, 0, 2) == 2
    assert inflight_chunks(4, 2, 0, 16) == 3 * 2 + 4 + 1


def test_scale_recipe_fits_and_reports_every_stage():
    p = plan(load_config(RECIPE_70B), Layout(nodes=8, gpus_per_node=8))
    assert p.ok, p.errors
    assert p.dp == 2 and len(p.stages) == 4 and p.seq_len == 3072
    assert p.stages[0].rows["activations"] > p.stages[3].rows["activations"]  # 1F1B: stage 0 holds pp batches
    assert p.stages[3].rows["logits"] > 0 and p.stages[0].rows["logits"] == 0


@pytest.mark.parametrize("overrides,layout,reason", [
    ([], (1, 8), "not divisible by parallel.tp x parallel.pp = 8 x 4"),
    (["parallel.tp=3", "parallel.pp=1", "parallel.sequence_parallel=false"], (1, 3),
     "parallel.tp=3 does not divide num_attention_heads = 64"),
    (["parallel.pp=3", "parallel.tp=1", "parallel.sequence_parallel=false"], (1, 3),
     "num_layers = 80 is not divisible by parallel.pp = 3"),
    (["rollout.tensor_parallel_size=16"], (8, 8), "must divide the 8 GPUs of a node"),
    (["train.micro_batch_size=5"], (8, 8), "not divisible by DP x train.micro_batch_size = 2 x 5"),
    (["parallel.vpp=3"], (8, 8), "num_layers = 80 is not divisible by parallel.pp x parallel.vpp = 12"),
    (["rollout.max_new_tokens=200000"], (8, 8), "exceeds the model's max_position_embeddings"),
    (["parallel.tp=1", "parallel.pp=1", "parallel.sequence_parallel=false"], (8, 8), "GiB per GPU during"),
    (["rollout.gpu_memory_utilization=0.12"], (8, 8), "less than one sequence"),
    (["train.max_tokens_per_micro_batch=2048"], (8, 8), "shorter than a full-length row (rollout.max_prompt_tokens"
                                                        " + rollout.max_new_tokens = 3072)"),
])
def test_wrong_layouts_fail_with_the_reason(overrides, layout, reason):
    p = plan(load_config(RECIPE_70B, overrides), Layout(nodes=layout[0], gpus_per_node=layout[1]))
    assert not p.ok
    assert any(reason in e for e in p.errors), p.errors


def test_shape_from_config_json_wins(tmp_path):
    d = tmp_path / "Llama-3.1-8B"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({**KNOWN_SHAPES["Llama-3.1-8B"], "num_hidden_layers": 30}))
    p = plan(load_config(None, [f"model.hf_path={d}"]), Layout(nodes=1, gpus_per_node=1))
    assert p.arch.num_layers == 30 and p.shape_source.endswith("config.json")


def test_cli_exit_codes_and_table(capsys, tmp_path):
    assert main(["plan", RECIPE_70B, "--nodes", "8", "--gpus-per-node", "8"]) == 0
    out = capsys.readouterr().out
    assert "stage 3" in out and "optimizer (dist.)" in out and "OK: the layout is valid" in out
    assert main(["plan", RECIPE_70B, "--nodes", "1", "--gpus-per-node", "8"]) == 1
    assert "error: world size 8" in capsys.readouterr().out
    assert main(["plan", RECIPE_70B, "model.hf_path=/nowhere/Mystery-9B", "--nodes", "8",
                 "--gpus-per-node", "8"]) == 2
    assert "'Mystery-9B' is not a built-in shape" in capsys.readouterr().err


def test_embedded_default_plans_on_one_process():
    p = plan(load_config("recipes/embedded-default.yaml"), Layout(nodes=1, gpus_per_node=1))
    assert p.ok, p.errors
    # per layer: 2 norms (2h) + proj (h*q) + qkv weight ((q + 2kv) * h) + qkv bias (q + 2kv) + fc1 (2f*h) + fc2 (f*h)
    # with h = q = 128, kv = 64, f = 256; plus the final norm and untied embedding + output layer (2 * 64 * 128)
    assert p.stages[0].params == 4 * (2 * 128 + 128 * 128 + 256 * 128 + 256 + 3 * 256 * 128) + 128 + 2 * 64 * 128


def test_packed_micro_batches_in_the_plan():
    """Packing by token budget: the micro-batch count is the step's full-length tokens over the budget, and a
    micro-batch's activations are the budget's, not micro_batch_size full rows'."""
    rows = load_config(RECIPE_70B)
    padded = plan(rows, Layout(nodes=8, gpus_per_node=8))
    packed = plan(load_config(RECIPE_70B, ["train.max_tokens_per_micro_batch=6144"]), Layout(nodes=8, gpus_per_node=8))
    assert packed.ok, packed.errors
    per_rank = -(-rows.train.problems_per_step * rows.algo.num_experts * rows.rollout.samples_per_expert // 2)
    assert packed.microbatches == -(-per_rank * 3072 // 6144)
    ratio = 6144 / (3072 * rows.train.micro_batch_size)
    assert packed.stages[3].rows["activations"] == pytest.approx(padded.stages[3].rows["activations"] * ratio)


def test_asynchronous_rollouts_keep_the_engine_awake_during_training():
    """With sleep mode the engine's share is freed for the train phase; asynchronous rollouts generate during
    training, so that share counts in the train peak."""
    layout = Layout(nodes=8, gpus_per_node=8)
    on_policy = plan(load_config(RECIPE_70B, ["rollout.sleep_between_steps=true"]), layout)
    ahead = plan(load_config(RECIPE_70B, ["rollout.sleep_between_steps=true", "rollout.max_staleness=1"]), layout)
    for a, b in zip(on_policy.stages, ahead.stages):
        assert b.train_peak == a.train_peak + a.rows["vllm"] and a.rows["vllm"] > 0
        assert b.rollout_peak == a.rollout_peak
