"""The sdpa spec's CPU math path (``math_attention``: fp32 scores, softmax and products for short rows) against a
float64 reference of causal softmax attention with grouped-query heads, with and without a shared-prompt prefix.

Tolerances: fp32 inputs 1e-5 absolute on outputs and input gradients of size O(1); bf16 inputs: within bf16's own
output rounding (2^-8 relative, plus 1e-6), since the path rounds only its output to bf16."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_meml.model.sdpa_attention import math_attention

SCALE = 0.125


def _reference(q, k, v, prefix):
    """float64: query head h uses KV group h // (np / ng); query i sees keys 0 .. prefix + i."""
    rep = q.shape[1] // k.shape[1]
    kr, vr = (t.double().repeat_interleave(rep, dim=1) for t in (k, v))
    s, sk = q.shape[2], k.shape[2]
    visible = torch.ones(s, sk, dtype=torch.bool).tril_(sk - s)
    scores = (q.double() @ kr.transpose(-1, -2)) * SCALE
    return torch.softmax(scores.masked_fill(~visible, float("-inf")), -1) @ vr


@pytest.mark.parametrize("prefix", [0, 7], ids=["causal", "shared_prompt"])
@pytest.mark.parametrize("heads,groups", [(6, 2), (4, 4)], ids=["gqa", "mha"])
def test_math_attention_matches_float64_reference_fp32(prefix, heads, groups):
    g = torch.Generator().manual_seed(3)
    b, s, hn = 2, 5, 16
    q0 = torch.randn(b, heads, s, hn, generator=g) * 2
    k0 = torch.randn(b, groups, prefix + s, hn, generator=g) * 2
    v0 = torch.randn(b, groups, prefix + s, hn, generator=g)
    w = torch.randn(b, heads, s, hn, generator=g)
    got_in = [t.clone().requires_grad_() for t in (q0, k0, v0)]
    want_in = [t.double().requires_grad_() for t in (q0, k0, v0)]
    got = math_attention(*got_in, SCALE, prefix)
    want = _reference(*want_in, prefix)
    assert got.dtype == torch.float32 and got.shape == (b, heads, s, hn)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)
    (got * w).sum().backward()
    (want * w.double()).sum().backward()
    for name, a, e in zip("qkv", got_in, want_in):
        assert e.grad.abs().max() > 1e-3, f"d{name}: vacuous"
        torch.testing.assert_close(a.grad.double(), e.grad, atol=1e-5, rtol=0, msg=lambda m, n=name: f"d{n}: {m}")
    # the first query of a row without a prefix sees only its own key: its output is that key's value
    if not prefix:
        rep = heads // groups
        torch.testing.assert_close(got[:, :, 0].detach(), v0[:, :, 0].repeat_interleave(rep, dim=1), atol=1e-6,
                                   rtol=0)


def test_math_attention_bf16_rounds_only_its_output():
    g = torch.Generator().manual_seed(4)
    q = (torch.randn(1, 9, 51, 64, generator=g) * 2).bfloat16()
    k = (torch.randn(1, 3, 95 + 51, 64, generator=g) * 2).bfloat16()
    v = torch.randn(1, 3, 95 + 51, 64, generator=g).bfloat16()
    got = math_attention(q, k, v, SCALE, 95)
    want = _reference(q, k, v, 95)
    assert got.dtype == torch.bfloat16
    err = (got.double() - want).abs()
    assert bool((err <= want.abs() * 2 ** -8 + 1e-6).all()), float(err.max())
    # and it agrees with PyTorch's SDPA kernel on the same bf16 inputs about as well as that kernel agrees with fp64
    kernel = F.scaled_dot_product_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), scale=SCALE,
                                            attn_mask=torch.ones(51, 146, dtype=torch.bool).tril_(95))
    assert float(err.max()) <= 1.5 * float((kernel.double() - want).abs().max()) + 1e-6
