"""The CPU fast paths compute what the plain formulas compute: cheap dropout masks (SplitMix64),
the chunked fast-dropout attention, and the learned query projected once per batch."""
import math

import pytest
import torch
import torch.nn.functional as F

from dualmem.models.layers.chunked_attention import attention_dropout
from dualmem.models.layers.fast_dropout import FastDropout, fast_dropout, keep_mask, splitmix64, uniform16
from dualmem.models.reconstructions.transformer import MultiheadAttention, TransformerDecoderLayer


def test_splitmix64_matches_published_vector_and_python_reference():
    # the first outputs of SplitMix64 seeded with 1234567 (the test vector of Vigna's C code)
    expected = [6457827717110365317, 3203168211198807973, 9817491932198370423,
                4593380528125082431, 16408922859458223821]
    got = [w % 2 ** 64 for w in splitmix64(1234567, 5, "cpu").tolist()]
    assert got == expected
    # negative and large seeds, a long run, reused buffers: against Python big integers
    mask = 2 ** 64 - 1

    def reference(seed, i):
        z = (seed + (i + 1) * 0x9E3779B97F4A7C15) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    out, scratch = torch.empty(3000, dtype=torch.int64), torch.empty(3000, dtype=torch.int64)
    for seed in (-2 ** 63, -1, 2 ** 63 - 1, 987654321987):
        words = splitmix64(seed, 2500, "cpu", out, scratch).tolist()
        assert words[:2500] == words and len(words) == 2500
        for i in (0, 1, 777, 2499):
            assert words[i] % 2 ** 64 == reference(seed % 2 ** 64, i)


def test_uniform16_follows_manual_seed_and_fresh_seeds_differ():
    torch.manual_seed(5)
    a, b = uniform16(10_001, "cpu").clone(), uniform16(10_001, "cpu").clone()
    torch.manual_seed(5)
    assert torch.equal(uniform16(10_001, "cpu"), a)
    assert a.dtype == torch.int16 and a.shape == (10_001,)
    # two successive masks: uncorrelated (each a fresh seed from the default generator)
    corr = torch.corrcoef(torch.stack([a.double(), b.double()]))[0, 1].item()
    assert abs(corr) < 6 / math.sqrt(10_001)
    # uniform over the int16 range: mean and variance of U{-32768..32767}
    big = uniform16(1_000_000, "cpu").double()
    assert abs(big.mean().item() + 0.5) < 6 * 18918 / 1000
    assert big.var().item() == pytest.approx((65536 ** 2 - 1) / 12, rel=0.01)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_mask_drop_rate_and_unbiased_scale(p):
    torch.manual_seed(0)
    n = 1_000_003  # not a multiple of 4: the last word is only partly used
    keep, scale = keep_mask((n,), p, torch.device("cpu"))
    assert keep.dtype == torch.bool and keep.shape == (n,)
    drop = round(p * 65536) / 65536
    assert abs(drop - p) <= 1 / 65536
    assert scale == pytest.approx(1 / (1 - drop), rel=1e-12)
    # binomial: 6 standard deviations
    assert abs((~keep).float().mean().item() - drop) < 6 * math.sqrt(p * (1 - p) / n)
    # neighbouring elements come from slices of one word: they must be independent
    a, b = keep[:-1].float(), keep[1:].float()
    assert abs(((a * b).mean() - a.mean() * b.mean()).item()) < 6 * (1 - p) / math.sqrt(n)


def test_fast_dropout_forward_backward_and_seed():
    x = torch.randn(64, 50, 50, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(3)
    out = fast_dropout(x, 0.2)
    torch.manual_seed(3)
    again = fast_dropout(x, 0.2)
    assert torch.equal(out, again)  # follows torch.manual_seed
    kept = out != 0
    scale = 65536 / (65536 - round(0.2 * 65536))
    assert torch.allclose(out[kept], x[kept] * scale)
    out.backward(torch.ones_like(out))
    assert torch.allclose(x.grad, kept.double() * scale)
    # mean preserved: E[out] = x
    ones = torch.ones(2_000_000)
    assert fast_dropout(ones, 0.3).mean().item() == pytest.approx(1.0, abs=4e-3)


def test_fast_dropout_module_eval_edges_and_dtypes():
    x = torch.randn(8, 16)
    layer = FastDropout(0.5).eval()
    assert torch.equal(layer(x), x)
    layer.train()
    assert torch.equal(fast_dropout(x, 0.0), x)
    assert torch.equal(fast_dropout(x, 1.0), torch.zeros_like(x))  # F.dropout's p = 1
    y = layer(x.bfloat16())
    assert y.dtype == torch.bfloat16
    layer.fast = False  # the standard nn.Dropout
    torch.manual_seed(1)
    ref = layer(x)
    torch.manual_seed(1)
    assert torch.equal(ref, F.dropout(x, 0.5, True))


def test_fast_dropout_attention_matches_float64_formula():
    """Train-mode attention (fast dropout path) = softmax(qk^T/sqrt(d) + mask) * keep @ v."""
    torch.manual_seed(0)
    dim, heads, b, length = 32, 4, 3, 12
    attn = MultiheadAttention(dim, heads, dropout=0.25).double().train()
    q, k, v = torch.randn(3, b, length, dim, dtype=torch.float64).unbind(0)
    allowed = torch.rand(length, length) > 0.4
    allowed[:, 0] = True
    torch.manual_seed(7)
    out = attn(q, k, v, allowed)
    torch.manual_seed(7)  # the forward's only draw: the attention-weight mask
    keep, scale = keep_mask((b * heads, length, length), 0.25, torch.device("cpu"))
    wq, wk, wv = attn.in_proj_weight.chunk(3)
    bq, bk, bv = attn.in_proj_bias.chunk(3)

    def split(x):
        return x.view(b, length, heads, dim // heads).transpose(1, 2).reshape(b * heads, length, -1)

    qh, kh, vh = split(q @ wq.t() + bq), split(k @ wk.t() + bk), split(v @ wv.t() + bv)
    scores = qh @ kh.transpose(1, 2) / math.sqrt(dim // heads)
    scores = scores.masked_fill(~allowed, float("-inf"))
    weights = torch.softmax(scores, -1) * keep * scale
    heads_out = (weights @ vh).view(b, heads, length, -1).transpose(1, 2).reshape(b, length, dim)
    expected = attn.out_proj(heads_out)
    assert torch.allclose(out, expected, atol=1e-10)


def test_learned_query_projected_once_equals_per_image():
    """The decoder keeps its learned query (L, d) unexpanded; the result and every gradient
    equal those of the query materialised per image."""
    torch.manual_seed(0)
    layer = TransformerDecoderLayer(16, 9, 4, 32, 0.0, "relu", False).double()
    memory, out = torch.randn(2, 3, 9, 16, dtype=torch.float64).unbind(0)
    pos = torch.randn(9, 16, dtype=torch.float64)
    y_once = layer(out, memory, pos)
    grads_once = torch.autograd.grad(y_once.square().sum(), list(layer.parameters()))
    per_image = layer.learned_embed.weight.unsqueeze(0).repeat(3, 1, 1)  # a real (B, L, d) copy
    y_each = layer(out, memory, pos, query=per_image)
    grads_each = torch.autograd.grad(y_each.square().sum(), list(layer.parameters()))
    assert torch.allclose(y_once, y_each, atol=1e-12)
    names = [n for n, _ in layer.named_parameters()]
    assert "learned_embed.weight" in names  # reached through expand in one, repeat in the other
    for name, g1, g2 in zip(names, grads_once, grads_each):
        assert torch.allclose(g1, g2, atol=1e-10), name


@pytest.mark.parametrize("chunk", [1, 3, 5, None])
@pytest.mark.parametrize("masked", [True, False])
def test_chunked_attention_matches_float64_formula_forward_and_backward(chunk, masked):
    """Every chunk size (one map, a partial last chunk, all at once) gives softmax(q k^T /
    sqrt(d) + mask) * keep * scale @ v and its gradients, with keep the chunk-by-chunk masks."""
    torch.manual_seed(0)
    bh, lq, lk, d, p = 5, 9, 7, 4, 0.3
    q, k, v = (torch.randn(bh, n, d, dtype=torch.float64, requires_grad=True)
               for n in (lq, lk, lk))
    allowed = torch.rand(lq, lk) > 0.3
    allowed[:, 0] = True
    additive = torch.zeros(lq, lk, dtype=torch.float64).masked_fill(~allowed, float("-inf")) \
        if masked else None
    grad_out = torch.randn(bh, lq, d, dtype=torch.float64)
    torch.manual_seed(11)
    out = attention_dropout(q, k, v, additive, p, chunk=chunk)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    torch.manual_seed(11)  # the same draws, one mask per chunk
    step = chunk or bh
    keep = torch.cat([keep_mask((min(step, bh - s), lq, lk), p, torch.device("cpu"))[0]
                      for s in range(0, bh, step)])
    scale = 65536 / (65536 - round(p * 65536))
    scores = q @ k.transpose(1, 2) / math.sqrt(d)
    if masked:
        scores = scores + additive
    expected = (torch.softmax(scores, -1) * keep * scale) @ v
    expected_grads = torch.autograd.grad(expected, (q, k, v), grad_out)
    assert torch.allclose(out, expected, atol=1e-12)
    for name, g, e in zip("qkv", grads, expected_grads):
        assert torch.allclose(g, e, atol=1e-10), name
    assert 0 < keep.float().mean().item() < 1  # some kept, some dropped


def test_chunked_attention_gradient_only_where_needed_and_bad_calls():
    q, k, v = torch.randn(3, 4, 6, 8).unbind(0)
    k.requires_grad_(True)
    out = attention_dropout(q, k, v, None, 0.5)
    (gk,) = torch.autograd.grad(out.sum(), (k,))
    assert gk.shape == k.shape and torch.isfinite(gk).all()
    with pytest.raises(ValueError, match="0 < p < 1"):
        attention_dropout(q, k, v, None, 0.0)


def test_feedforward_relu_dropout_in_place_matches_float64_formula():
    """The FFN's in-place relu + dropout gives relu(x W1 + b1) * keep * scale @ W2 + b2 and the
    same gradients for every weight, with keep the mask float_mask draws for that shape."""
    from dualmem.models.reconstructions.transformer import FeedForward

    torch.manual_seed(0)
    ffn = FeedForward(8, 16, 0.25, "relu").double().train()
    x = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(4)
    out = ffn(x)
    grads = torch.autograd.grad(out.square().sum(), [x, *ffn.parameters()])
    torch.manual_seed(4)  # the forward's only draw: the hidden layer's mask
    keep, scale = keep_mask((3, 5, 16), 0.25, torch.device("cpu"))
    hidden = torch.relu(x @ ffn.linear1.weight.t() + ffn.linear1.bias) * keep * scale
    expected = hidden @ ffn.linear2.weight.t() + ffn.linear2.bias
    expected_grads = torch.autograd.grad(expected.square().sum(), [x, *ffn.parameters()])
    assert torch.allclose(out, expected, atol=1e-12)
    for g, e in zip(grads, expected_grads):
        assert torch.allclose(g, e, atol=1e-10)
    assert 0 < keep.double().mean().item() < 1
    ffn.eval()  # no dropout, nothing in place
    assert torch.allclose(ffn(x), torch.relu(ffn.linear1(x)) @ ffn.linear2.weight.t()
                          + ffn.linear2.bias, atol=1e-12)
