"""The sdpa layer spec against Megatron's local spec on CPU/gloo: same weights (one dist checkpoint loaded into
both), same layout, compared on logits, per-micro-batch LM losses through Megatron's pipeline schedule, and the
gradient of every parameter. Layouts: TP=1, TP=2 (GQA: 2 query heads, 1 KV group per rank), PP=2 (1F1B); TP=2 also
with PyTorch's SDPA kernel in place of the CPU math path.
Tolerance: fp32, 1e-5 absolute. Plus the inputs SDPAttention must refuse rather than silently mis-handle."""
from __future__ import annotations

import pytest
import torch

from tests.dist import run_distributed
from tests.megatron_models import (SEQ, fixed_batch, gather_tp_logits, init_parallel, lm_forward_step, load_model,
                                   save_model, tiny_arch, tiny_model_config)

pytestmark = pytest.mark.distributed
TOL = 1e-5
MICRO = 4  # micro-batches of 2 sequences each


def _save_reference(rank, world, tmp):
    from megatron_meml.model.provider import build_model

    par = init_parallel(1, 1)
    save_model(build_model(tiny_arch(), tiny_model_config(layer_spec="local"), par), f"{tmp}/ckpt")


def _train_step(model, tokens, labels):
    """Forward + backward of MICRO micro-batches through Megatron's schedule; per-micro-batch losses (last stage)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    model.zero_grad(set_to_none=True)
    micro = list(zip(tokens.chunk(MICRO), labels.chunk(MICRO)))
    losses = get_forward_backward_func()(
        forward_step_func=lm_forward_step, data_iterator=iter(micro), model=[model], num_microbatches=MICRO,
        seq_length=tokens.shape[1], micro_batch_size=tokens.shape[0] // MICRO, forward_only=False)
    return [l["lm loss"] for l in losses]


def _compare_specs(rank, world, tmp, tp, pp, kernel):
    from megatron.core import parallel_state as ps

    import megatron_meml.model.sdpa_attention as sdpa_module
    from megatron_meml.model.provider import build_model, causal_mask
    from megatron_meml.model.sdpa_attention import SDPAttention

    if kernel == "flash":  # every call through PyTorch's SDPA kernel, not the short-row CPU math path
        sdpa_module.CPU_MATH_MAX_KEYS = 0
    assert SEQ <= sdpa_module.CPU_MATH_MAX_KEYS or kernel == "flash"
    par = init_parallel(tp, pp)
    models = {}
    for spec in ("local", "sdpa"):
        models[spec] = build_model(tiny_arch(), tiny_model_config(layer_spec=spec), par)
        load_model(models[spec], f"{tmp}/ckpt")
    local, sdpa = models["local"], models["sdpa"]
    assert isinstance(sdpa.decoder.layers[0].self_attention.core_attention, SDPAttention)
    assert [n for n, _ in local.named_parameters()] == [n for n, _ in sdpa.named_parameters()]
    tokens, labels = fixed_batch()
    if pp == 1:
        pos = torch.arange(SEQ)[None].expand_as(tokens)
        with torch.no_grad():
            want = gather_tp_logits(local(tokens, pos, causal_mask(SEQ)))
            got = gather_tp_logits(sdpa(tokens, pos, causal_mask(SEQ)))
        assert got.shape == (tokens.shape[0], SEQ, tiny_arch().vocab_size)
        torch.testing.assert_close(got, want, atol=TOL, rtol=0)
    want_losses, got_losses = _train_step(local, tokens, labels), _train_step(sdpa, tokens, labels)
    if ps.is_pipeline_last_stage():
        assert len(got_losses) == MICRO
        torch.testing.assert_close(torch.stack(got_losses), torch.stack(want_losses), atol=TOL, rtol=0)
    n_checked = 0
    for (name, p_local), (_, p_sdpa) in zip(local.named_parameters(), sdpa.named_parameters()):
        assert p_local.grad is not None and p_sdpa.grad is not None, name
        assert p_local.grad.abs().sum() > 0, f"{name}: zero gradient, the comparison would be vacuous"
        torch.testing.assert_close(p_sdpa.grad, p_local.grad, atol=TOL, rtol=0, msg=lambda m, n=name: f"{n}: {m}")
        n_checked += 1
    assert n_checked > 0


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("sdpa_ref"))
    run_distributed(_save_reference, 1, tmp, megatron=True)
    return tmp


@pytest.mark.parametrize("tp,pp,kernel", [(1, 1, "math"), (2, 1, "math"), (1, 2, "math"), (2, 1, "flash")],
                         ids=["tp1", "tp2", "pp2_1f1b", "tp2_flash"])
def test_sdpa_spec_matches_local_spec(reference, tp, pp, kernel):
    """On CPU these short rows take the fp32 math path (sdpa_attention.CPU_MATH_MAX_KEYS); tp2_flash forces the
    SDPA kernel instead, so both paths are held to Megatron's local attention."""
    run_distributed(_compare_specs, tp * pp, reference, tp, pp, kernel, megatron=True)


def _refusals(rank, world):
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_meml.model.provider import build_model, causal_mask, transformer_config
    from megatron_meml.model.sdpa_attention import SDPAttention, SDPAttentionError

    par = init_parallel(1, 1)
    tcfg = transformer_config(tiny_arch(), tiny_model_config(layer_spec="sdpa"), par)
    with pytest.raises(SDPAttentionError, match="causal attention only, got padding"):
        SDPAttention(tcfg, 1, AttnMaskType.padding, "self")
    attn = SDPAttention(tcfg, 1, AttnMaskType.causal, "self")
    s, b = 6, 2
    q = torch.randn(s, b, 4, 16)
    kv = torch.randn(s, b, 2, 16)
    assert attn(q, kv, kv, None).shape == (s, b, 64)
    assert attn(q, kv, kv, causal_mask(s)).shape == (s, b, 64)
    padded = causal_mask(s).expand(b, 1, s, s).clone()
    padded[1, :, :, -2:] = True  # the second sequence has two padding positions
    with pytest.raises(SDPAttentionError, match="not the causal mask"):
        attn(q, kv, kv, padded)
    with pytest.raises(SDPAttentionError, match="not a causal mask for sequence length 6"):
        attn(q, kv, kv, causal_mask(s + 1))
    with pytest.raises(SDPAttentionError, match="causal attention only, got no_mask"):
        attn(q, kv, kv, None, attn_mask_type=AttnMaskType.no_mask)
    with pytest.raises(SDPAttentionError, match="needs full sequences"):
        attn(q[:1], kv, kv, None)
    # A whole model refuses a padding mask too, instead of attending across the padding.
    model = build_model(tiny_arch(), tiny_model_config(layer_spec="sdpa"), par)
    tokens, _ = fixed_batch(n=b, seq=s)
    with pytest.raises(SDPAttentionError, match="not the causal mask"):
        model(tokens, torch.arange(s)[None].expand_as(tokens), padded)


def test_sdpa_attention_refuses_what_it_does_not_support():
    run_distributed(_refusals, 1, megatron=True)


def _core_attention_parity(rank, world):
    """The module alone vs Megatron's DotProductAttention (GQA 4:2, scale 1/sqrt(16)): outputs and input grads."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_meml.model.provider import causal_mask, transformer_config
    from megatron_meml.model.sdpa_attention import SDPAttention

    par = init_parallel(1, 1)
    tcfg = transformer_config(tiny_arch(), tiny_model_config(), par)
    g = torch.Generator().manual_seed(3)
    s, b = 9, 3
    q0, k0, v0 = (torch.randn(s, b, h, 16, generator=g) for h in (4, 2, 2))
    outs, grads = [], []
    for cls in (DotProductAttention, SDPAttention):
        q, k, v = (t.clone().requires_grad_() for t in (q0, k0, v0))
        out = cls(tcfg, 1, AttnMaskType.causal, "self")(q, k, v, causal_mask(s))
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        outs.append(out.detach())
        grads.append([t.grad for t in (q, k, v)])
    assert outs[1].shape == (s, b, 64)
    torch.testing.assert_close(outs[1], outs[0], atol=TOL, rtol=0)
    for got, want in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, want, atol=TOL, rtol=0)
    # First position attends only to itself: its context is exactly v at that position (head h uses group h//2).
    torch.testing.assert_close(outs[1][0].view(b, 4, 16), v0[0].repeat_interleave(2, dim=1), atol=1e-6, rtol=0)


def test_core_attention_matches_dot_product_attention():
    run_distributed(_core_attention_parity, 1, megatron=True)


def _packed_attention(rank, world):
    """THD: three sequences packed end to end give each sequence's own causal attention (outputs and input grads
    vs the unpacked path one sequence at a time, 1e-5); the packed layout's misuses are refused."""
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_meml.model.provider import transformer_config
    from megatron_meml.model.sdpa_attention import SDPAttention, SDPAttentionError

    par = init_parallel(1, 1)
    attn = SDPAttention(transformer_config(tiny_arch(), tiny_model_config(), par), 1, AttnMaskType.causal, "self")
    g = torch.Generator().manual_seed(5)
    lens = [5, 1, 7]
    cu = torch.tensor([0, 5, 6, 13], dtype=torch.int32)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=7, max_seqlen_kv=7)
    q0, k0, v0 = (torch.randn(13, h, 16, generator=g) for h in (4, 2, 2))
    q, k, v = (t.clone().requires_grad_() for t in (q0, k0, v0))
    packed = attn(q, k, v, None, packed_seq_params=params)
    weights = torch.linspace(-1, 1, packed.numel()).view_as(packed)
    (packed * weights).sum().backward()
    assert packed.shape == (13, 64)
    for a, b in zip(cu.tolist(), cu.tolist()[1:]):
        qs, ks, vs = (t[a:b].clone()[:, None].requires_grad_() for t in (q0, k0, v0))  # [s, b=1, heads, hn]
        alone = attn(qs, ks, vs, None)[:, 0]
        torch.testing.assert_close(packed[a:b].detach(), alone.detach(), atol=TOL, rtol=0)
        (alone * weights[a:b]).sum().backward()
        for got, want in zip((q.grad, k.grad, v.grad), (qs.grad, ks.grad, vs.grad)):
            torch.testing.assert_close(got[a:b], want[:, 0], atol=TOL, rtol=0)
    with pytest.raises(SDPAttentionError, match="qkv_format 'thd'"):
        attn(q0, k0, v0, None, packed_seq_params=PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu))
    with pytest.raises(SDPAttentionError, match="take no attention_mask"):
        attn(q0, k0, v0, torch.ones(1, 1, 13, 13, dtype=torch.bool), packed_seq_params=params)
    short = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu[:3], cu_seqlens_kv=cu[:3], max_seqlen_q=5)
    with pytest.raises(SDPAttentionError, match="do not cover the 13 packed tokens"):
        attn(q0, k0, v0, None, packed_seq_params=short)


def test_packed_sequences_attend_within_themselves():
    run_distributed(_packed_attention, 1, megatron=True)
