"""Training-time attention with dropout on CPU, run a few heads at a time.

``softmax(q k^T * alpha + mask) * keep @ v`` touches (B*H, L, L) maps several times per
layer (scores, softmax, dropout mask, masked weights, and in the backward pass their
gradients). At UniAD's size (64 x 196 x 196 floats, 9.8 MB per map) each of those passes
streams from main memory, and together they cost more than the two matmuls. Here the maps are
made and consumed a chunk of heads at a time (about 2 MiB, so they stay in cache); only the
softmax output and the 0/1 keep mask are kept for the backward pass. Each chunk's mask is what
:func:`models.layers.fast_dropout.keep_mask` draws for that chunk's shape (one seed per chunk), and
the weights are scaled by ``keep_scale(p)`` through V, as the unchunked formula would.
"""
import torch

from dualmem.models.layers.fast_dropout import keep_scale, threshold, uniform16

_CHUNK_BYTES = 2 ** 21


def chunk_heads(lq, lk, itemsize):
    """Maps per chunk: about ``_CHUNK_BYTES`` of scores."""
    return max(1, _CHUNK_BYTES // (lq * lk * itemsize))


class _ChunkedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, additive, p, chunk):
        bh, lq, d = q.shape
        lk = k.shape[1]
        alpha, scale, keep_at = d ** -0.5, keep_scale(p), threshold(p)
        v_scaled = v * scale
        weights = q.new_empty(bh, lq, lk)   # softmax output, for the backward pass
        keep = q.new_empty(bh, lq, lk)      # 0 / 1
        out = q.new_empty(bh, lq, d)
        scores = q.new_empty(min(chunk, bh), lq, lk)
        words = torch.empty(2, (min(chunk, bh) * lq * lk + 3) // 4, dtype=torch.int64,
                            device=q.device)  # random words and their scratch
        for q_c, k_c, v_c, w_c, keep_c, out_c in zip(
                *(t.split(chunk) for t in (q, k, v_scaled, weights, keep, out))):
            s = scores[:len(q_c)]
            if additive is None:
                torch.baddbmm(s, q_c, k_c.transpose(1, 2), beta=0, alpha=alpha, out=s)
            else:
                torch.baddbmm(additive, q_c, k_c.transpose(1, 2), alpha=alpha, out=s)
            torch._softmax(s, -1, False, out=w_c)
            draws = uniform16(s.numel(), q.device, *words).view(s.shape)
            torch.ge(draws, keep_at, out=keep_c)
            torch.bmm(torch.mul(w_c, keep_c, out=s), v_c, out=out_c)
        ctx.save_for_backward(q, k, v_scaled, weights, keep)
        ctx.alpha, ctx.scale, ctx.chunk = alpha, scale, chunk
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v_scaled, weights, keep = ctx.saved_tensors
        bh, lq, _ = q.shape
        lk, chunk = k.shape[1], ctx.chunk
        grad = grad.contiguous()
        need_q, need_k, need_v = ctx.needs_input_grad[:3]
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v_scaled)
        buf_a = q.new_empty(min(chunk, bh), lq, lk)
        buf_b = q.new_empty(min(chunk, bh), lq, lk)
        for q_c, k_c, v_c, w, kept, g, dq_c, dk_c, dv_c in zip(
                *(t.split(chunk) for t in (q, k, v_scaled, weights, keep, grad, dq, dk, dv))):
            a, b = buf_a[:len(q_c)], buf_b[:len(q_c)]
            if need_v:
                torch.bmm(torch.mul(w, kept, out=a).transpose(1, 2), g, out=dv_c)
            if need_q or need_k:
                d_dropped = torch.bmm(g, v_c.transpose(1, 2), out=a).mul_(kept)
                d_scores = torch._softmax_backward_data(d_dropped, w, -1, w.dtype, grad_input=b)
                if need_q:
                    torch.bmm(d_scores, k_c, out=dq_c)
                if need_k:
                    torch.bmm(d_scores.transpose(1, 2), q_c, out=dk_c)
        return (dq.mul_(ctx.alpha) if need_q else None, dk.mul_(ctx.alpha) if need_k else None,
                dv.mul_(ctx.scale) if need_v else None, None, None, None)


@torch.compiler.disable  # runs eagerly inside torch.compile (its buffers are reused in place)
def attention_dropout(q, k, v, additive_mask, p, chunk=None):
    """Dropout(softmax(q k^T / sqrt(d) + additive_mask)) @ v for (B*H, L, d) CPU tensors,
    0 < p < 1; ``additive_mask`` is None or (Lq, Lk) of 0 / -inf. Computed in q's dtype with
    autocast off (k and v are cast to it)."""
    if not 0 < p < 1 or q.device.type != "cpu":
        raise ValueError(f"attention_dropout is the CPU path for 0 < p < 1, got p={p} on "
                         f"{q.device.type}")
    with torch.autocast("cpu", enabled=False):
        k, v = k.to(q.dtype).contiguous(), v.to(q.dtype).contiguous()
        if additive_mask is not None:
            additive_mask = additive_mask.to(q.dtype)
        chunk = chunk or chunk_heads(q.shape[1], k.shape[1], q.element_size())
        return _ChunkedAttention.apply(q.contiguous(), k, v, additive_mask, p, chunk)
