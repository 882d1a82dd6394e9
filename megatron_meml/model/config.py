"""Model configuration: where the architecture/weights come from, dtype, layer spec, FP8."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

FAMILIES = ("qwen2", "llama")
SPECS = ("auto", "te", "local", "sdpa")
DTYPES = ("fp32", "bf16", "fp16", "auto")
FP8_FORMATS = ("e4m3", "hybrid")
FP8_RECIPES = ("delayed", "tensorwise", "blockwise", "mxfp8")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Architecture and weights of the policy model."""

    hf_path: Optional[str] = None
    """Hugging Face model directory (config.json [+ safetensors, tokenizer]); when set, the inline shape below is ignored."""
    megatron_path: Optional[str] = None
    """Megatron dist-checkpoint directory to load weights from (written by checkpoints_convert or a run)."""
    family: str = "qwen2"
    """Inline architecture family when hf_path is unset: qwen2 (q/k/v bias) or llama."""
    vocab_size: int = 64
    """Inline: vocabulary size (padded size; must be divisible by the TP size)."""
    hidden_size: int = 128
    """Inline: model width."""
    num_layers: int = 4
    """Inline: number of transformer layers."""
    num_attention_heads: int = 4
    """Inline: query heads."""
    num_kv_heads: int = 2
    """Inline: key/value heads (GQA groups)."""
    head_dim: int = 32
    """Inline: per-head width (vLLM on CPU needs >= 32)."""
    ffn_hidden_size: int = 256
    """Inline: SwiGLU intermediate size."""
    max_position_embeddings: int = 512
    """Inline: maximum sequence length."""
    rope_theta: float = 10000.0
    """Inline: rotary base."""
    rms_norm_eps: float = 1e-6
    """Inline: RMSNorm epsilon."""
    tie_embeddings: bool = False
    """Inline: share input embedding and output layer weights."""
    dtype: str = "fp32"
    """Parameter dtype: fp32, bf16, fp16, or auto: bf16 on CUDA, fp32 on every CPU, where bf16 training of a short
    run learns little and, without native bf16 matmuls, runs 50-90x slower (``model/dtype.py``)."""
    layer_spec: str = "auto"
    """auto (TE when transformer_engine imports, else sdpa), te, local, sdpa (local layers + PyTorch SDPA attention)."""
    fp8: Optional[str] = None
    """FP8 format (e4m3 or hybrid); needs Transformer Engine. None disables FP8."""
    fp8_recipe: str = "delayed"
    """FP8 scaling recipe: delayed, tensorwise, blockwise, mxfp8."""
    fp8_amax_history_len: int = 1024
    """Amax history length for delayed scaling."""
    recompute: bool = False
    """Full activation recompute of each transformer layer."""
    fused_kernels: bool = True
    """On CUDA, turn on Megatron's optional fusions that work on this installation (SwiGLU, bias-dropout-add and
    vocab-parallel cross-entropy via torch.compile; softmax/RoPE kernels only when their extensions import).
    Ignored on CPU."""

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"model.family must be one of {FAMILIES}, got '{self.family}'")
        if self.layer_spec not in SPECS:
            raise ValueError(f"model.layer_spec must be one of {SPECS}, got '{self.layer_spec}'")
        if self.dtype not in DTYPES:
            raise ValueError(f"model.dtype must be one of {DTYPES}, got '{self.dtype}'")
        if self.fp8 is not None and self.fp8 not in FP8_FORMATS:
            raise ValueError(f"model.fp8 must be null or one of {FP8_FORMATS}, got '{self.fp8}'")
        if self.fp8_recipe not in FP8_RECIPES:
            raise ValueError(f"model.fp8_recipe must be one of {FP8_RECIPES}, got '{self.fp8_recipe}'")
        if self.num_attention_heads % self.num_kv_heads:
            raise ValueError(f"model.num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"model.num_kv_heads ({self.num_kv_heads})")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_attention_heads", "num_kv_heads", "head_dim",
                     "ffn_hidden_size", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ValueError(f"model.{name} must be positive, got {getattr(self, name)}")
