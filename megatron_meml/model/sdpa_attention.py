"""Causal core attention through ``torch.nn.functional.scaled_dot_product_attention`` for Megatron-Core specs.

``SDPAttention`` takes the place of Megatron's ``DotProductAttention`` in a ``ModuleSpec`` (same constructor and
forward signature), so the rest of the layer (QKV projection, RoPE, output projection, TP/PP) is Megatron's own.
Megatron's local attention materialises the [b, np, sq, sk] score matrix; SDPA lets PyTorch pick a fused kernel
(flash / cuDNN / memory-efficient on CUDA) that never does.

Layouts (np = query heads per TP partition, ng = KV groups per partition, hn = head dim, hp = np * hn):
query [sq, b, np, hn], key/value [sk, b, ng, hn] in; context [sq, b, hp] out.

Masking: only causal self-attention over full sequences (sq == sk) is supported, via ``is_causal=True``. An
explicit ``attention_mask`` (Megatron's bool convention, True = masked out) is accepted only when it *is* the
causal mask, as on CPU where the model is handed one; any other mask (padding, sliding window) raises instead of
being ignored silently.

Packed sequences (``PackedSeqParams`` with qkv_format ``thd``, the trainer's padding-free micro-batches): query
[t, np, hn], key/value [t, ng, hn], context [t, hp]; each sequence of ``cu_seqlens`` attends causally to itself
only, one attention call per sequence (on CPU cheaper than a block-diagonal mask over the whole stream).

``SharedPromptSeqParams`` (the trainer's ``train.share_prompts``) adds ``prefix_of``: a sequence that continues a
shared prompt sequence attends to all of that prompt and causally to itself (one SDPA call over the prompt's and
its own keys). Its RoPE positions continue the prompt's (``forward_step._rope_at``).

On CPU, a call over at most ``CPU_MATH_MAX_KEYS`` keys without dropout runs ``math_attention`` (fp32 matmuls and
softmax, GQA by reshaping the query heads) instead of the SDPA kernel, whose backward is slower at these lengths.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import is_layer_window_attention
from megatron.core.utils import divide
from torch import Tensor

_HAS_ENABLE_GQA = torch.__version__ >= (2, 5)  # the enable_gqa keyword of scaled_dot_product_attention
_HALF = (torch.float16, torch.bfloat16)
CPU_MATH_MAX_KEYS = 256
"""On CPU, attention over at most this many keys (and no dropout) runs as fp32 matmuls and a softmax instead of
PyTorch's CPU flash kernel, whose backward costs about 1.7x more at these lengths (docs/performance.md,
``bench/train_step_layouts.py``); longer rows keep the flash kernel, which does not hold the [s, s] probabilities for
the backward. 0 = always the kernel."""
_CHECKED_MASK: Optional[tuple] = None
"""(mask tensor, its version) last verified causal; shared by all layers so a step checks its mask once."""


class SDPAttentionError(ValueError):
    """A setting or input the SDPA core attention does not support."""


@dataclass
class SharedPromptSeqParams(PackedSeqParams):
    """PackedSeqParams whose sequences may continue a shared prompt sequence; only the sdpa spec reads this."""

    prefix_of: Optional[list[int]] = None
    """Per sequence of cu_seqlens: the index of the prompt sequence it continues, or -1."""


class SDPAttention(MegatronModule):
    """Causal softmax(q k^T * scale) v over the heads of this TP partition, computed by PyTorch SDPA."""

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, cp_comm_type: Optional[str] = None,
                 pg_collection: Optional[ProcessGroupCollection] = None):
        super().__init__(config=config)
        _check_config(config, layer_number, attn_mask_type)
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        self.pg_collection = pg_collection
        self.tp_group = pg_collection.tp
        tp = pg_collection.tp.size()
        self.num_heads = divide(config.num_attention_heads, tp)
        self.num_groups = divide(config.num_query_groups, tp)
        self.head_dim = config.kv_channels
        self.hidden_size_per_partition = self.num_heads * self.head_dim
        # Megatron's query-key layer scaling divides the scale by layer_number and multiplies it back inside
        # the fp32 softmax: the net scale is the plain one, which is what SDPA applies.
        self.softmax_scale = 1.0 / math.sqrt(self.head_dim) if softmax_scale is None else softmax_scale
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
                attn_mask_type: Optional[AttnMaskType] = None, attention_bias: Optional[Tensor] = None,
                packed_seq_params: Optional[PackedSeqParams] = None) -> Tensor:
        """query [sq, b, np, hn], key/value [sk, b, ng, hn] -> context [sq, b, np * hn]."""
        if attention_bias is not None:
            raise SDPAttentionError("attention_bias is not supported by the sdpa layer spec")
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        if mask_type != AttnMaskType.causal:
            raise SDPAttentionError(f"the sdpa layer spec supports causal attention only, got {mask_type.name}")
        if packed_seq_params is not None:
            return self._forward_packed(query, key, value, attention_mask, packed_seq_params)
        sq, b, np_, hn = query.shape
        sk = key.shape[0]
        if sq != sk:
            raise SDPAttentionError(f"the sdpa layer spec needs full sequences (query length {sq} != key length "
                                    f"{sk}); incremental decoding is the rollout engine's job")
        if np_ != self.num_heads or key.shape[2] != self.num_groups:
            raise SDPAttentionError(f"expected {self.num_heads} query heads and {self.num_groups} KV groups per "
                                    f"partition, got {np_} and {key.shape[2]}")
        if attention_mask is not None:
            self._check_causal_mask(attention_mask, sq)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, hn]
        ctx = self._attend(q, k, v)
        # [b, np, sq, hn] -> [sq, b, np * hn]
        return ctx.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, prefix: int = 0) -> Tensor:
        """Causal SDPA of q [b, np, s, hn] over k, v [b, ng, s, hn] -> [b, np, s, hn]. ``prefix`` > 0: k, v are
        [b, ng, prefix + s, hn], and every query also sees all of the first ``prefix`` keys (a shared prompt)."""
        p = self.dropout_p if self.training else 0.0
        if q.device.type == "cpu" and p == 0.0 and k.shape[2] <= CPU_MATH_MAX_KEYS:
            return math_attention(q, k, v, self.softmax_scale, prefix)
        gqa = {}
        if self.num_groups != self.num_heads:
            if _HAS_ENABLE_GQA and q.is_cuda and q.dtype in _HALF:
                gqa = {"enable_gqa": True}  # flash handles GQA natively in half precision
            else:  # other backends would fall back to the math kernel with enable_gqa: repeat instead
                rep = self.num_heads // self.num_groups
                k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        mask = {"is_causal": True}
        if prefix:  # query i sees keys 0 .. prefix + i (True = attend)
            s = q.shape[2]
            mask = {"attn_mask": torch.ones(s, prefix + s, dtype=torch.bool, device=q.device).tril_(prefix)}
        if p > 0.0 and not self.config.sequence_parallel:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                return F.scaled_dot_product_attention(q, k, v, dropout_p=p, scale=self.softmax_scale, **mask, **gqa)
        return F.scaled_dot_product_attention(q, k, v, dropout_p=p, scale=self.softmax_scale, **mask, **gqa)

    def _forward_packed(self, query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor],
                        params: PackedSeqParams) -> Tensor:
        """THD: query [t, np, hn], key/value [t, ng, hn] -> context [t, np * hn], causal within each sequence."""
        if params.qkv_format != "thd":
            raise SDPAttentionError(f"packed sequences must use qkv_format 'thd', got '{params.qkv_format}'")
        if attention_mask is not None:
            raise SDPAttentionError("packed sequences take no attention_mask (cu_seqlens bound each sequence)")
        cu_q, cu_kv = params.cu_seqlens_q, params.cu_seqlens_kv
        if cu_kv is not None and cu_kv is not cu_q and not torch.equal(cu_q, cu_kv):
            raise SDPAttentionError("packed self-attention needs cu_seqlens_q == cu_seqlens_kv")
        if query.dim() != 3 or query.shape[0] != key.shape[0]:
            raise SDPAttentionError(f"packed query/key must be [t, heads, hn] of one length, got "
                                    f"{tuple(query.shape)} and {tuple(key.shape)}")
        bounds = cu_q.tolist()
        if bounds[0] != 0 or bounds[-1] != query.shape[0]:
            raise SDPAttentionError(f"cu_seqlens {bounds[:3]}...{bounds[-1]} do not cover the {query.shape[0]} "
                                    "packed tokens")
        lens = [b - a for a, b in zip(bounds, bounds[1:])]
        # split (not slicing): its backward is one cat, where each slice's backward would zero a full-size grad
        qs, ks, vs = (t.permute(1, 0, 2)[None].split(lens, dim=2) for t in (query, key, value))  # [1, heads, L, hn]
        prefix_of = getattr(params, "prefix_of", None) or [-1] * len(lens)
        if len(prefix_of) != len(lens):
            raise SDPAttentionError(f"prefix_of names {len(prefix_of)} sequences, cu_seqlens {len(lens)}")
        parts = []
        for i, (q, k, v, n) in enumerate(zip(qs, ks, vs, lens)):
            j = prefix_of[i]
            if not n:
                continue
            if j < 0:
                parts.append(self._attend(q, k, v))
            elif not 0 <= j < i:
                raise SDPAttentionError(f"sequence {i} continues sequence {j}, which is not before it")
            else:  # a response after a shared prompt: the prompt's keys, then its own
                parts.append(self._attend(q, torch.cat([ks[j], k], dim=2), torch.cat([vs[j], v], dim=2), lens[j]))
        ctx = torch.cat(parts, dim=2)  # [1, np, t, hn]
        return ctx[0].permute(1, 0, 2).reshape(query.shape[0], self.hidden_size_per_partition)

    def _check_causal_mask(self, mask: Tensor, s: int) -> None:
        """Accept Megatron's causal mask ([1 or b, 1, s, s], True above the diagonal); raise for anything else."""
        if mask.dim() != 4 or tuple(mask.shape[-2:]) != (s, s) or mask.shape[1] != 1:
            raise SDPAttentionError(f"attention_mask of shape {tuple(mask.shape)} is not a causal mask for "
                                    f"sequence length {s} (want [1, 1, {s}, {s}]); the sdpa layer spec does "
                                    "not support padding masks")
        global _CHECKED_MASK
        if _CHECKED_MASK is not None and _CHECKED_MASK[0] is mask and _CHECKED_MASK[1] == mask._version:
            return  # the tensor another layer already checked, unmodified: no re-check, no device sync
        causal = torch.ones(s, s, dtype=torch.bool, device=mask.device).triu_(1)
        if mask.dtype != torch.bool or not bool((mask == causal).all()):
            raise SDPAttentionError("attention_mask is not the causal mask (True strictly above the diagonal); "
                                    "the sdpa layer spec supports causal attention only, not padding or "
                                    "custom masks")
        _CHECKED_MASK = (mask, mask._version)  # holds a reference, so its identity cannot be recycled


def math_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, prefix: int = 0) -> Tensor:
    """softmax(q k^T * scale) v with fp32 scores, probabilities and products: q [b, np, s, hn], k/v [b, ng, prefix +
    s, hn] -> [b, np, s, hn] in q's dtype. Query i sees keys 0 .. prefix + i (bottom-right causal). Query head h
    uses KV group h // (np / ng), through a reshape rather than repeated keys."""
    b, np_, s, hn = q.shape
    ng, sk = k.shape[1], k.shape[2]
    rep = np_ // ng
    qf = q.float().reshape(b, ng, rep * s, hn)  # heads of one group side by side, as contiguous blocks of rows
    scores = torch.matmul(qf, k.float().transpose(-1, -2)).view(b, ng, rep, s, sk) * scale
    visible = torch.ones(s, sk, dtype=torch.bool, device=q.device).tril_(sk - s)
    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    out = torch.matmul(probs.view(b, ng, rep * s, sk), v.float())
    return out.view(b, np_, s, hn).to(q.dtype)


def _check_config(config: TransformerConfig, layer_number: int, attn_mask_type: AttnMaskType) -> None:
    if config.context_parallel_size != 1:
        raise SDPAttentionError("context parallelism needs model.layer_spec=te (sdpa supports TP and PP)")
    if config.softmax_type != "vanilla":
        raise SDPAttentionError(f"softmax_type '{config.softmax_type}' is not supported by the sdpa layer spec")
    if is_layer_window_attention(config.window_size, config.window_attn_skip_freq, layer_number):
        raise SDPAttentionError("sliding-window attention is not supported by the sdpa layer spec")
    if attn_mask_type != AttnMaskType.causal:
        raise SDPAttentionError(f"the sdpa layer spec supports causal attention only, got {attn_mask_type.name}")
