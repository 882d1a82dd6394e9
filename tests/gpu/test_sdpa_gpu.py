"""The sdpa layer spec on CUDA: parity with Megatron's local spec, a fused SDPA kernel, no score matrix.

Tolerances (stated, relative Frobenius error ||x - ref|| / ||ref||, ref = the local spec in fp32, same weights):
  fp32: sdpa vs local <= 1e-5 on logits and on every parameter gradient.
  bf16: sdpa's error <= 1.5 x the local spec's own bf16 error + 1e-3, on logits and on every parameter gradient
        (the two bf16 paths round differently, so neither is compared with the other directly).
Run on a GPU machine by bench/gpu_check.sh; skipped without CUDA (tests/conftest.py).
"""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

SHAPE = dict(vocab_size=512, hidden_size=256, num_layers=4, num_attention_heads=8, num_kv_heads=2, head_dim=32,
             ffn_hidden_size=704, max_position_embeddings=4096)
B, S = 4, 256


@pytest.fixture(scope="module")
def megatron_gpu():
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_meml.parallel import ParallelConfig

    from megatron_meml.distributed import destroy_distributed, init_distributed

    par = ParallelConfig(backend="nccl")
    init_distributed(par)
    model_parallel_cuda_manual_seed(0)
    yield par
    destroy_distributed()


def _build(par, spec: str, dtype: str, **shape):
    from megatron_meml.model.arch import arch_from_model_config
    from megatron_meml.model.config import ModelConfig
    from megatron_meml.model.provider import build_model

    cfg = ModelConfig(**{**SHAPE, **shape}, layer_spec=spec, dtype=dtype)
    return build_model(arch_from_model_config(cfg), cfg, par)


def _copy_weights(dst, src) -> None:
    missing, unexpected = dst.load_state_dict(src.state_dict(), strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    assert not missing and not unexpected, (missing, unexpected)


def _run(model, tokens, mask=None):
    """Logits [B, S, V] (fp32) and every parameter's gradient (fp32) of a fixed linear functional of them."""
    model.zero_grad(set_to_none=True)
    pos = torch.arange(tokens.shape[1], device=tokens.device)[None].expand_as(tokens)
    logits = model(tokens, pos, mask)
    w = torch.linspace(-1.0, 1.0, logits.numel(), device=logits.device).view_as(logits)
    (logits.float() * w).sum().backward()
    return logits.detach().float(), {n: p.grad.detach().float() for n, p in model.named_parameters()}


def _rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x - ref).norm() / ref.norm().clamp_min(1e-30))


def _tokens():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, SHAPE["vocab_size"], (B, S), generator=g).cuda()


def test_sdpa_matches_local_fp32(megatron_gpu):
    from megatron_meml.model.provider import causal_mask

    local = _build(megatron_gpu, "local", "fp32")
    sdpa = _build(megatron_gpu, "sdpa", "fp32")
    _copy_weights(sdpa, local)
    tokens = _tokens()
    want_logits, want_grads = _run(local, tokens)
    for mask in (None, causal_mask(S, device="cuda")):  # GPU path (is_causal alone) and the explicit-mask path
        logits, grads = _run(sdpa, tokens, mask)
        assert _rel(logits, want_logits) <= 1e-5
        for name, g in grads.items():
            assert _rel(g, want_grads[name]) <= 1e-5, name


def test_sdpa_bf16_error_no_worse_than_local_bf16(megatron_gpu):
    ref = _build(megatron_gpu, "local", "fp32")
    models = {spec: _build(megatron_gpu, spec, "bf16") for spec in ("local", "sdpa")}
    _copy_weights(models["local"], ref)
    _copy_weights(models["sdpa"], ref)
    _copy_weights(ref, models["local"])  # the fp32 reference holds exactly the bf16-rounded weights
    tokens = _tokens()
    ref_logits, ref_grads = _run(ref, tokens)
    (l_logits, l_grads), (s_logits, s_grads) = (_run(models[s], tokens) for s in ("local", "sdpa"))
    err_local, err_sdpa = _rel(l_logits, ref_logits), _rel(s_logits, ref_logits)
    assert err_sdpa <= 1.5 * err_local + 1e-3, (err_sdpa, err_local)
    for name, g in s_grads.items():
        e_s, e_l = _rel(g, ref_grads[name]), _rel(l_grads[name], ref_grads[name])
        assert e_s <= 1.5 * e_l + 1e-3, (name, e_s, e_l)


def test_sdpa_runs_on_a_fused_kernel(megatron_gpu):
    """With PyTorch's math fallback disabled, forward + backward must still run (flash / cuDNN / efficient)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = _build(megatron_gpu, "sdpa", "bf16")
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        logits, grads = _run(model, _tokens())
    assert torch.isfinite(logits).all() and all(torch.isfinite(g).all() for g in grads.values())


def _peak_mib(model, tokens) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    _run(model, tokens)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def test_sdpa_never_holds_the_score_matrix(megatron_gpu):
    """Local attention saves at least the bf16 probabilities [b, heads, s, s] per layer for backward; SDPA not."""
    shape = dict(num_layers=2, vocab_size=256)
    b, s, heads = 2, 2048, SHAPE["num_attention_heads"]
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 256, (b, s), generator=g).cuda()
    local, sdpa = _build(megatron_gpu, "local", "bf16", **shape), _build(megatron_gpu, "sdpa", "bf16", **shape)
    _copy_weights(sdpa, local)
    _peak_mib(local, tokens), _peak_mib(sdpa, tokens)  # warm-up: allocator caches, lazy buffers
    peak_local, peak_sdpa = _peak_mib(local, tokens), _peak_mib(sdpa, tokens)
    probs_mib = 2 * b * heads * s * s * 2 / 2**20  # two layers of bf16 probabilities
    assert peak_local - peak_sdpa >= probs_mib, (peak_local, peak_sdpa, probs_mib)


def test_packed_sequences_attend_within_themselves_on_cuda(megatron_gpu):
    """THD packed rows on CUDA (the layout train.max_tokens_per_micro_batch trains with): each sequence's output and
    input gradients equal its own unpacked causal attention (fp32, atol 1e-5), on the fused kernels."""
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_meml.model.arch import arch_from_model_config
    from megatron_meml.model.config import ModelConfig
    from megatron_meml.model.provider import transformer_config
    from megatron_meml.model.sdpa_attention import SDPAttention

    cfg = ModelConfig(**SHAPE, layer_spec="sdpa", dtype="fp32")
    attn = SDPAttention(transformer_config(arch_from_model_config(cfg), cfg, megatron_gpu), 1, AttnMaskType.causal,
                        "self").cuda()
    lens = [37, 1, 130, 64]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    n = int(cu[-1])
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=max(lens),
                             max_seqlen_kv=max(lens))
    g = torch.Generator().manual_seed(3)
    q0, k0, v0 = (torch.randn(n, h, 32, generator=g).cuda() for h in (8, 2, 2))
    q, k, v = (t.clone().requires_grad_() for t in (q0, k0, v0))
    packed = attn(q, k, v, None, packed_seq_params=params)
    weights = torch.linspace(-1, 1, packed.numel(), device="cuda").view_as(packed)
    (packed * weights).sum().backward()
    for a, b in zip(cu.tolist(), cu.tolist()[1:]):
        qs, ks, vs = (t[a:b].clone()[:, None].requires_grad_() for t in (q0, k0, v0))
        alone = attn(qs, ks, vs, None)[:, 0]
        torch.testing.assert_close(packed[a:b].detach(), alone.detach(), atol=1e-5, rtol=0)
        (alone * weights[a:b]).sum().backward()
        for got, want in zip((q.grad, k.grad, v.grad), (qs.grad, ks.grad, vs.grad)):
            torch.testing.assert_close(got[a:b], want[:, 0], atol=1e-5, rtol=0)
