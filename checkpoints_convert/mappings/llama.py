"""Llama 3.x (``LlamaForCausalLM``): no q/k/v bias unless ``attention_bias``; Llama 3.2 ties the embeddings.

Rope theta / Llama 3.1 rope scaling and RMSNorm eps are not tensors: they come from config.json via ``ArchSpec``.
"""
from checkpoints_convert.mapping import (Rule, Table, has_qkv_bias, shape_down, shape_embedding, shape_gate_up,
                                         shape_norm, shape_o_proj, shape_qkv_bias, shape_qkv_weight, untied)

TABLE = Table(
    family="llama",
    model_rules=(
        Rule(megatron="embedding.word_embeddings.weight", hf=("model.embed_tokens.weight",),
             hf_shapes=shape_embedding),
        Rule(megatron="decoder.final_layernorm.weight", hf=("model.norm.weight",), hf_shapes=shape_norm),
        Rule(megatron="output_layer.weight", hf=("lm_head.weight",), hf_shapes=shape_embedding, when=untied,
             tied_to="model.embed_tokens.weight"),
    ),
    layer_rules=(
        Rule(megatron="input_layernorm.weight", hf=("input_layernorm.weight",), hf_shapes=shape_norm),
        Rule(megatron="self_attention.linear_qkv.weight", kind="qkv",
             hf=("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
             hf_shapes=shape_qkv_weight),
        Rule(megatron="self_attention.linear_qkv.bias", kind="qkv",  # only with attention_bias=true
             hf=("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
             hf_shapes=shape_qkv_bias, when=has_qkv_bias),
        Rule(megatron="self_attention.linear_proj.weight", hf=("self_attn.o_proj.weight",), hf_shapes=shape_o_proj),
        Rule(megatron="pre_mlp_layernorm.weight", hf=("post_attention_layernorm.weight",), hf_shapes=shape_norm),
        Rule(megatron="mlp.linear_fc1.weight", kind="gate_up", hf=("mlp.gate_proj.weight", "mlp.up_proj.weight"),
             hf_shapes=shape_gate_up),
        Rule(megatron="mlp.linear_fc2.weight", hf=("mlp.down_proj.weight",), hf_shapes=shape_down),
    ),
)
