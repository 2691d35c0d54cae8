"""Memory-bank primitives for DMAD: greedy k-center coreset, chunked nearest neighbours,
mask filtering of patch features and a small k-means.

All work in bounded memory: distances are computed block by block (``torch.cdist`` on at most
``query_chunk x bank_chunk`` pairs), and the coreset streams (merge and reduce), so a bank over
millions of patches never needs an N x N (or even N x d for all patches) matrix at once.
"""
import math

import torch
import torch.nn.functional as F
from dualmem.utils.errors import UserError


# ----------------------------------------------------------------------------- coreset
def random_projection(dim_in, dim_out, seed=0, device=None):
    """A fixed Gaussian (dim_in, dim_out) matrix / sqrt(dim_out): distances kept in expectation."""
    g = torch.Generator().manual_seed(int(seed))
    return (torch.randn(dim_in, dim_out, generator=g) / math.sqrt(dim_out)).to(device)


def _project(features, proj_dim, seed):
    x = features.float()
    if proj_dim and proj_dim < x.shape[1]:
        x = x @ random_projection(x.shape[1], int(proj_dim), seed, x.device)
    return x


def _checked_size(features, n):
    n = int(n)
    if n <= 0:
        raise UserError(f"greedy_coreset: n must be >= 1, got {n}")
    return n


def _start(total, seed, start):
    if start is not None:
        return int(start)
    g = torch.Generator().manual_seed(int(seed))
    return int(torch.randint(total, (1,), generator=g))


@torch.no_grad()
def greedy_coreset(features, n, proj_dim=128, seed=0, start=None, batch=64):
    """Indices of ``n`` rows chosen by greedy k-center (farthest-point) selection.

    Each step adds the row farthest from everything chosen so far, which keeps the covering
    radius (largest distance from any row to its nearest chosen row) within twice the optimum.
    Distances are measured after a random projection to ``proj_dim`` (PatchCore's speed-up;
    ``proj_dim`` 0/None or >= the feature dim: exact). The first row is drawn by ``seed``.

    The picks are greedy's own, made ``batch`` at a time: the ``batch`` rows farthest from the
    selection are candidates, and the next greedy pick is a candidate for as long as its
    distance (updated for the candidates picked before it) is at least the farthest
    non-candidate's, which can only have shrunk. All rows are then updated with one matrix
    product per round instead of one matrix-vector product per pick (memory-bound), which
    makes the selection several times faster with the same result
    (:func:`greedy_coreset_stepwise` is the one-pick-per-pass form, kept for comparison).
    Returns (indices LongTensor (n,), covering radius in the projected space).
    """
    total, n = features.shape[0], _checked_size(features, n)
    if n >= total:
        return torch.arange(total, device=features.device), 0.0
    x = _project(features, proj_dim, seed)
    sq = (x * x).sum(1)
    first = _start(total, seed, start)
    chosen = [torch.tensor([first], device=x.device)]
    count = 1
    min_d = (sq - 2 * (x @ x[first]) + sq[first]).clamp_(min=0)
    min_d[first] = -1.0  # chosen: never a candidate again
    while count < n:
        k = min(int(batch), total - count)
        vals, cand = torch.topk(min_d, min(k + 1, total))
        tau = float(vals[k]) if vals.numel() > k else -math.inf
        cand, cur = cand[:k], vals[:k].clone()
        xc = x[cand]
        picked = []
        while count + len(picked) < n:
            i = int(torch.argmax(cur))
            if picked and float(cur[i]) < tau:
                break  # a non-candidate may now be farther: update everything first
            picked.append(i)
            d_i = (sq[cand] - 2 * (xc @ xc[i]) + sq[cand[i]]).clamp_(min=0)
            torch.minimum(cur, d_i, out=cur)
            cur[i] = -1.0
        new = cand[torch.tensor(picked, device=x.device)]
        d = torch.addmm(sq.unsqueeze(1), x, x[new].T, alpha=-2).add_(sq[new]).clamp_(min=0)
        torch.minimum(min_d, d.min(1).values, out=min_d)
        min_d[new] = -1.0
        chosen.append(new)
        count += len(picked)
    return torch.cat(chosen), float(min_d.max().clamp(min=0).sqrt())


@torch.no_grad()
def greedy_coreset_stepwise(features, n, proj_dim=128, seed=0, start=None):
    """The same selection as :func:`greedy_coreset`, one matrix-vector pass over all rows per
    pick (the form used before; kept as the reference the batched one is checked against)."""
    total, n = features.shape[0], _checked_size(features, n)
    if n >= total:
        return torch.arange(total, device=features.device), 0.0
    x = _project(features, proj_dim, seed)
    sq = (x * x).sum(1)
    start = _start(total, seed, start)
    chosen = torch.empty(n, dtype=torch.long, device=x.device)
    chosen[0] = start
    min_d = (sq - 2 * (x @ x[start]) + sq[start]).clamp_(min=0)
    d = torch.empty_like(min_d)
    for i in range(1, n):  # one fused matrix-vector product per pick, no temporaries
        j = int(torch.argmax(min_d))
        chosen[i] = j
        torch.addmv(sq, x, x[j], alpha=-2, out=d)
        torch.minimum(min_d, d.add_(sq[j]), out=min_d)
    return chosen, float(min_d.max().clamp(min=0).sqrt())


class BankState:
    """What memory-bank heads share about their state: class names and build statistics as
    plain extra state, and bank buffers whose sizes come from the checkpoint being loaded."""

    def get_extra_state(self):
        return {"class_names": list(self.class_names), "build_info": dict(self.build_info)}

    def set_extra_state(self, state):
        self.class_names = list(state.get("class_names", []))
        self.build_info = dict(state.get("build_info", {}))

    def _take_shapes(self, state_dict, prefix, names):
        for name in names:
            key = prefix + name
            if key in state_dict:
                self._buffers[name] = torch.empty(state_dict[key].shape,
                                                  dtype=state_dict[key].dtype,
                                                  device=getattr(self, name).device)


class StreamingCoreset:
    """Greedy coreset over a stream of (features, src, cls) in bounded memory.

    Rows collect in a buffer of at most ``buffer_rows``; a full buffer is merged with the
    current selection and reduced (greedy k-center) to ``ceil(ratio * rows seen)`` (at most
    ``max_size``). When everything fits in one buffer the result is the exact one-shot coreset.
    """

    def __init__(self, ratio, max_size, proj_dim=128, buffer_rows=1_000_000, seed=0):
        if not 0.0 < float(ratio) <= 1.0:
            raise UserError(f"coreset ratio must be in (0, 1], got {ratio}")
        self.ratio = float(ratio)
        self.max_size = int(max_size) if max_size is not None else None
        self.proj_dim = proj_dim
        self.buffer_rows = max(int(buffer_rows), 1)
        self.seed = int(seed)
        self.seen = 0
        self.reductions = 0
        self.radius = 0.0
        self._parts = []
        self._rows = 0
        self._selected = None

    def target(self):
        n = math.ceil(self.ratio * self.seen)
        return max(1, min(n, self.max_size)) if self.max_size is not None else max(1, n)

    def add(self, feats, src, cls):
        if feats.shape[0] == 0:
            return
        self._parts.append((feats, src, cls))
        self._rows += feats.shape[0]
        self.seen += feats.shape[0]
        if self._rows >= self.buffer_rows:
            self._reduce()

    def _reduce(self):
        parts = ([self._selected] if self._selected is not None else []) + self._parts
        if not parts:
            return
        feats = torch.cat([p[0] for p in parts])
        src = torch.cat([p[1] for p in parts])
        cls = torch.cat([p[2] for p in parts])
        self._parts, self._rows = [], 0
        n = self.target()
        if feats.shape[0] > n:
            idx, self.radius = greedy_coreset(feats, n, self.proj_dim, self.seed + self.reductions)
            feats, src, cls = feats[idx], src[idx], cls[idx]
            self.reductions += 1
        self._selected = (feats, src, cls)

    def result(self):
        """(features, src, cls) of the final selection (empty tensors when nothing came)."""
        self._reduce()
        return self._selected


# ----------------------------------------------------------------------------- neighbours
@torch.no_grad()
def knn(query, bank, k, query_chunk=4096, bank_chunk=16384, excluded=None):
    """The ``k`` nearest bank rows of every query row (Euclidean), block by block.

    ``excluded(q0, q1, b0, b1)`` -> bool (q1-q0, b1-b0) marks pairs that may not match (e.g. a
    training image's own memories); such pairs get distance inf. Returns (distances (Nq, k),
    indices (Nq, k)) sorted ascending; k is clipped to the bank size. The bank may be stored in
    a lower precision: each block is compared in float32.
    """
    nq, nb = query.shape[0], bank.shape[0]
    if nb == 0:
        raise UserError("knn: the memory bank is empty")
    k = min(int(k), nb)
    q_all = query.float()
    out_d = torch.empty(nq, k, device=query.device)
    out_i = torch.empty(nq, k, dtype=torch.long, device=query.device)
    for q0 in range(0, nq, query_chunk):
        q1 = min(q0 + query_chunk, nq)
        q = q_all[q0:q1]
        best_d = best_i = None
        for b0 in range(0, nb, bank_chunk):
            b1 = min(b0 + bank_chunk, nb)
            d = torch.cdist(q, bank[b0:b1].float())
            if excluded is not None:
                d = d.masked_fill(excluded(q0, q1, b0, b1), float("inf"))
            kk = min(k, b1 - b0)
            cd, ci = torch.topk(d, kk, dim=1, largest=False)
            ci = ci + b0
            if best_d is None:
                best_d, best_i = cd, ci
            else:
                cat_d, cat_i = torch.cat([best_d, cd], 1), torch.cat([best_i, ci], 1)
                best_d, pos = torch.topk(cat_d, min(k, cat_d.shape[1]), dim=1, largest=False)
                best_i = torch.gather(cat_i, 1, pos)
        out_d[q0:q1], out_i[q0:q1] = best_d, best_i
    return out_d, out_i


def retrieval_excluder(row_src, row_cls, bank_src, bank_cls, bank_group=None, links=None):
    """The knn ``excluded`` callback: same source image (leave-one-image-out), or (per-class
    banks) another class. Memories derived from several images (``bank_group`` >= 0: anomaly
    centres and samples around them) are excluded for every image in their ``links``
    (group, image) pairs, so a seen anomaly never meets a memory made from itself."""
    if row_src is None and row_cls is None:
        return None
    contrib = None
    if row_src is not None and links is not None and links.numel():
        # (image in this batch, group) -> derived from it; only this batch's images matter
        images, row_pos = torch.unique(row_src, return_inverse=True)
        hit = links[:, 1].long()[:, None] == images[None]  # (L, images)
        n_groups = max(int(links[:, 0].max()), int(bank_group.max())) + 1
        contrib = torch.zeros(images.numel(), n_groups, dtype=torch.bool, device=row_src.device)
        pair = hit.nonzero()
        contrib[pair[:, 1], links[pair[:, 0], 0].long()] = True

    def excluded(q0, q1, b0, b1):
        m = None
        if row_src is not None:
            m = row_src[q0:q1, None] == bank_src[None, b0:b1].long()
            if contrib is not None:
                cols = (bank_group[b0:b1] >= 0).nonzero()[:, 0]
                if cols.numel():
                    groups = bank_group[b0:b1][cols].long()
                    m[:, cols] |= contrib[row_pos[q0:q1]][:, groups]
        if row_cls is not None:
            other = row_cls[q0:q1, None] != bank_cls[None, b0:b1].long()
            m = other if m is None else m | other
        return m

    return excluded


@torch.no_grad()
def min_distance_per_group(query, bank, groups, n_groups, query_chunk=4096, bank_chunk=16384):
    """(Nq, n_groups): the distance from each query row to the nearest bank row of each group
    (inf for an empty group); routes an image to a class bank without knowing its class."""
    out = torch.full((query.shape[0], n_groups), float("inf"), device=query.device)
    q_all = query.float()
    for q0 in range(0, query.shape[0], query_chunk):
        q1 = min(q0 + query_chunk, query.shape[0])
        for b0 in range(0, bank.shape[0], bank_chunk):
            b1 = min(b0 + bank_chunk, bank.shape[0])
            d = torch.cdist(q_all[q0:q1], bank[b0:b1].float())
            index = groups[b0:b1].long().unsqueeze(0).expand(q1 - q0, -1)
            out[q0:q1].scatter_reduce_(1, index, d, reduce="amin", include_self=True)
    return out


# ----------------------------------------------------------------------------- masks
def downsample_mask(mask, size):
    """Fraction of each patch covered by the mask: area (average) pooling of (B, 1, H, W) to
    ``size`` (exact block averages when H, W are multiples of the patch grid)."""
    return F.adaptive_avg_pool2d(mask.float(), tuple(size))


def filter_patches(features, mask, threshold=0.5):
    """The Filter: patch features whose covered fraction is > ``threshold``.

    ``features`` (B, C, h, w), ``mask`` (B, 1, H, W) -> (features (N, C), image index (N,)),
    rows in (image, row, column) order.
    """
    b, c, h, w = features.shape
    keep = downsample_mask(mask, (h, w))[:, 0] > threshold  # (B, h, w)
    rows = features.permute(0, 2, 3, 1)[keep]
    image = torch.arange(b, device=features.device).view(b, 1, 1).expand(b, h, w)[keep]
    return rows, image


# ----------------------------------------------------------------------------- k-means
@torch.no_grad()
def kmeans(x, k, iters=50, seed=0, tol=1e-6):
    """Lloyd's k-means with k-means++ seeding. (centres (k, C), assignment (N,))."""
    x = x.float()
    n = x.shape[0]
    k = min(int(k), n)
    if k < 1:
        raise UserError("kmeans: no points")
    g = torch.Generator().manual_seed(int(seed))
    first = int(torch.randint(n, (1,), generator=g))
    centres = [x[first]]
    d2 = ((x - x[first]) ** 2).sum(1)
    for _ in range(1, k):
        probs = d2 / d2.sum() if float(d2.sum()) > 0 else torch.full_like(d2, 1.0 / n)
        j = int(torch.multinomial(probs.cpu(), 1, generator=g))
        centres.append(x[j])
        d2 = torch.minimum(d2, ((x - x[j]) ** 2).sum(1))
    c = torch.stack(centres)
    assign = torch.cdist(x, c).argmin(1)
    for _ in range(iters):
        new = torch.zeros_like(c).index_add_(0, assign, x)
        count = torch.bincount(assign, minlength=k).clamp(min=1).unsqueeze(1).float()
        new = torch.where(torch.bincount(assign, minlength=k).unsqueeze(1) > 0, new / count, c)
        shift = float((new - c).pow(2).sum(1).max())
        c = new
        assign = torch.cdist(x, c).argmin(1)
        if shift <= tol:
            break
    return c, assign
