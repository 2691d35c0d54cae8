"""DMAD: coreset, neighbours, Filter, k-means, seen-anomaly split, knowledge, head, banks under
the memory cap, checkpoint round trip, PatchCore neck, losses; one slow end-to-end run."""
import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from conftest import ROOT, synthetic_dataset, tiny_dmad_net
from dualmem.datasets.seen_anomalies import apply_seen_anomalies, split_seen_anomalies
from dualmem.utils.engine.stage_one import prefix_extractor, stage_one_data
from dualmem.models.heads.dmad import (DMAD, PatchBCELoss, PatchFocalLoss,
                               gaussian_blur)
from dualmem.models.heads.memory_bank import (StreamingCoreset, filter_patches, greedy_coreset, kmeans,
                                      greedy_coreset_stepwise,
                                      knn, min_distance_per_group)


def _clustered(n=600, d=16, k=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, d, generator=g) * 4
    sizes = torch.randint(5, 100, (k,), generator=g).tolist()
    pts = torch.cat([c + torch.randn(s, d, generator=g) * torch.rand(1, generator=g)
                     for c, s in zip(centres, sizes)])
    return pts[:n]


def _radius(x, sel):
    return float(torch.cdist(x, x[sel]).min(1).values.max())


# ----------------------------------------------------------------------------- coreset
@pytest.mark.parametrize("proj_dim", [None, 16])
def test_coreset_covering_radius_no_worse_than_random(proj_dim):
    x = _clustered(d=64)
    n = 30
    idx, _ = greedy_coreset(x, n, proj_dim=proj_dim, seed=1)
    assert idx.shape == (n,) and len(set(idx.tolist())) == n
    g = torch.Generator().manual_seed(0)
    random_radii = [_radius(x, torch.randperm(len(x), generator=g)[:n]) for _ in range(10)]
    # exact greedy beats the luckiest of 10 random subsets; the projected one (approximate
    # distances) at least the typical one
    bound = min(random_radii) if proj_dim is None else float(np.median(random_radii))
    assert _radius(x, idx) <= bound


def test_greedy_coreset_matches_numpy_farthest_point():
    x = _clustered(n=200, d=5).double()
    idx, radius = greedy_coreset(x, 15, proj_dim=None, start=3)
    a = x.numpy()
    chosen = [3]
    mind = np.linalg.norm(a - a[3], axis=1)
    for _ in range(14):
        j = int(np.argmax(mind))
        chosen.append(j)
        mind = np.minimum(mind, np.linalg.norm(a - a[j], axis=1))
    assert idx.tolist() == chosen
    assert radius == pytest.approx(mind.max(), rel=1e-4)


@pytest.mark.parametrize("batch", [1, 7, 64])
def test_batched_greedy_picks_greedy_s_own_rows(batch):
    """Several picks per pass over the rows, same selection: checked against the one-pick-
    per-pass form and a float64 farthest-point search, on data with far-apart classes (the
    unified case: one class may get most of the memories)."""
    g = torch.Generator().manual_seed(5)
    x = torch.cat([torch.randn(700, 12, generator=g) * 3 + 10,
                   torch.randn(300, 12, generator=g) * 0.3]).double()
    idx, radius = greedy_coreset(x, 90, proj_dim=None, start=11, batch=batch)
    ref, ref_radius = greedy_coreset_stepwise(x, 90, proj_dim=None, start=11)
    a = x.numpy()
    chosen, mind = [11], np.linalg.norm(a - a[11], axis=1)
    for _ in range(89):
        j = int(np.argmax(mind))
        chosen.append(j)
        mind = np.minimum(mind, np.linalg.norm(a - a[j], axis=1))
    assert sorted(idx.tolist()) == sorted(ref.tolist()) == sorted(chosen)
    assert idx.tolist() == chosen  # in greedy's order too
    assert radius == pytest.approx(mind.max(), rel=1e-4) and ref_radius == pytest.approx(radius)
    assert (idx < 700).sum() > 60  # the wide class gets the memories, not a share by count


def test_streaming_coreset_one_buffer_equals_one_shot_and_sizes_hold():
    x = _clustered(n=500)
    src, cls = torch.arange(500), torch.zeros(500, dtype=torch.long)
    one = StreamingCoreset(0.05, None, proj_dim=None, buffer_rows=10 ** 6, seed=2)
    for a in range(0, 500, 64):
        one.add(x[a:a + 64], src[a:a + 64], cls[a:a + 64])
    feats, s, _ = one.result()
    idx, _ = greedy_coreset(x, 25, proj_dim=None, seed=2)
    assert s.tolist() == idx.tolist() and torch.equal(feats, x[idx])
    small = StreamingCoreset(0.05, 20, proj_dim=None, buffer_rows=100, seed=2)
    for a in range(0, 500, 64):
        small.add(x[a:a + 64], src[a:a + 64], cls[a:a + 64])
    feats, s, _ = small.result()
    assert feats.shape[0] == 20 and small.reductions >= 4  # capped at max_size
    assert torch.equal(feats, x[s])  # ids travel with their rows


# ----------------------------------------------------------------------------- neighbours
def test_knn_chunked_matches_full_cdist():
    g = torch.Generator().manual_seed(0)
    q, bank = torch.randn(70, 12, generator=g), torch.randn(53, 12, generator=g)
    d, i = knn(q, bank, 4, query_chunk=16, bank_chunk=10)
    full = torch.cdist(q, bank)
    ref_d, ref_i = full.topk(4, dim=1, largest=False)
    torch.testing.assert_close(d, ref_d, atol=1e-4, rtol=1e-4)
    assert torch.equal(i, ref_i)
    d_all, _ = knn(q, bank, 500)  # k clipped to the bank size
    assert d_all.shape == (70, 53)


def test_knn_exclusion_matches_numpy_brute_force():
    rng = np.random.default_rng(1)
    q, bank = rng.normal(size=(40, 6)), rng.normal(size=(30, 6))
    q_src, b_src = rng.integers(0, 4, 40), rng.integers(0, 4, 30)
    qt, bt = torch.tensor(q, dtype=torch.float32), torch.tensor(bank, dtype=torch.float32)
    qs, bs = torch.tensor(q_src), torch.tensor(b_src)
    d, i = knn(qt, bt, 2, query_chunk=7, bank_chunk=9,
               excluded=lambda q0, q1, b0, b1: qs[q0:q1, None] == bs[None, b0:b1])
    dist = np.linalg.norm(q[:, None] - bank[None], axis=-1)
    dist[q_src[:, None] == b_src[None]] = np.inf
    ref_i = np.argsort(dist, axis=1)[:, :2]
    np.testing.assert_array_equal(i.numpy(), ref_i)
    np.testing.assert_allclose(d.numpy(), np.take_along_axis(dist, ref_i, 1), atol=1e-4)


def test_min_distance_per_group_matches_numpy():
    rng = np.random.default_rng(2)
    q, bank, groups = rng.normal(size=(25, 4)), rng.normal(size=(40, 4)), rng.integers(0, 3, 40)
    got = min_distance_per_group(torch.tensor(q).float(), torch.tensor(bank).float(),
                                 torch.tensor(groups), 4, query_chunk=8, bank_chunk=11)
    dist = np.linalg.norm(q[:, None] - bank[None], axis=-1)
    for c in range(3):
        np.testing.assert_allclose(got[:, c].numpy(), dist[:, groups == c].min(1), atol=1e-4)
    assert torch.isinf(got[:, 3]).all()  # an empty group


# ----------------------------------------------------------------------------- Filter, k-means
def test_filter_keeps_exactly_the_patches_inside_the_mask():
    b, c, h, w, stride = 2, 3, 4, 5, 8
    feats = torch.arange(b * c * h * w, dtype=torch.float32).view(b, c, h, w)
    mask = torch.zeros(b, 1, h * stride, w * stride)
    mask[0, 0, 0:8, 8:16] = 1                 # patch (0, 1): fully inside
    mask[0, 0, 8:16, 0:5] = 1                 # patch (1, 0): 5/8 inside -> kept
    mask[0, 0, 16:24, 16:20] = 1              # patch (2, 2): exactly 1/2 -> not kept (> 0.5)
    mask[1, 0, 24:32, 32:40] = 1              # image 1, patch (3, 4)
    mask[1, 0, 0:3, 0:8] = 1                  # 3/8 -> not kept
    rows, image = filter_patches(feats, mask, threshold=0.5)
    expected = [(0, 0, 1), (0, 1, 0), (1, 3, 4)]
    assert image.tolist() == [e[0] for e in expected]
    for row, (i, y, x) in zip(rows, expected):
        assert torch.equal(row, feats[i, :, y, x])
    rows_any, _ = filter_patches(feats, mask, threshold=0.0)
    assert rows_any.shape[0] == 5


def test_kmeans_recovers_separated_centres():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = torch.cat([c + 0.1 * torch.randn(50, 2, generator=g) for c in centres])
    found, assign = kmeans(x, 3, seed=1)
    err = torch.cdist(centres, found).min(1).values
    assert err.max() < 0.1
    assert len(set(assign[:50].tolist())) == 1 and len(set(assign.tolist())) == 3


# ----------------------------------------------------------------------------- seen anomalies
def _test_records():
    recs = []
    for cls in ("a", "b"):
        recs += [{"filename": f"{cls}/good/{i}.png", "label": 0, "clsname": cls}
                 for i in range(4)]
        recs += [{"filename": f"{cls}/bad/{i}.png", "label": 1, "clsname": cls,
                  "maskname": f"{cls}/gt/{i}.png"} for i in range(6)]
    return recs


def test_seen_anomaly_split_removes_images_and_is_deterministic():
    recs = _test_records()
    seen, rest = split_seen_anomalies(recs, 2, seed=5)
    again, _ = split_seen_anomalies(list(reversed(recs)), 2, seed=5)
    assert sorted(r["filename"] for r in seen) == sorted(r["filename"] for r in again)
    assert len(seen) == 4 and len(rest) == len(recs) - 4
    assert all(r["label"] == 1 and r.get("maskname") for r in seen)
    for cls in ("a", "b"):
        assert sum(r["clsname"] == cls for r in seen) == 2
    names = {r["filename"] for r in seen}
    assert not names & {r["filename"] for r in rest}
    assert names | {r["filename"] for r in rest} == {r["filename"] for r in recs}
    other, _ = split_seen_anomalies(recs, 2, seed=6)
    assert {r["filename"] for r in other} != names
    only_a, rest_a = split_seen_anomalies(recs, 3, seed=5, classes=["a"])
    assert {r["clsname"] for r in only_a} == {"a"} and len(rest_a) == len(recs) - 3
    with pytest.raises(ValueError, match="at least one must stay"):
        split_seen_anomalies(recs, 6)
    with pytest.raises(ValueError, match="not among"):
        split_seen_anomalies(recs, 1, classes=["zzz"])


def test_apply_seen_anomalies_joins_training_and_records_files():
    recs = _test_records()
    train = [{"filename": "a/train/0.png", "label": 0, "clsname": "a"}]
    ds = {"seen_anomalies": {"num_per_class": 1, "seed": 0}}
    new_train, new_test, info = apply_seen_anomalies(ds, train, recs)
    assert len(new_train) == 3 and len(new_test) == len(recs) - 2
    assert info["files"] == [r["filename"] for r in new_train[1:]]
    ds["seen_anomalies"]["join_training"] = False
    kept_train, same_test, info2 = apply_seen_anomalies(ds, train, recs)
    assert kept_train == train and same_test == new_test and info2["files"] == info["files"]
    assert apply_seen_anomalies({}, train, recs) == (train, recs, None)


# ----------------------------------------------------------------------------- knowledge, head
def _head_with_banks(dim=6, knowledge=("distance", "residual", "attention"), **kw):
    head = DMAD([dim], [4], input_size=[16, 16], topk=3, hidden=[8], knowledge=knowledge, **kw)
    g = torch.Generator().manual_seed(0)
    head._set_bank("normal", torch.randn(20, dim, generator=g), torch.arange(20) % 5,
                   torch.zeros(20, dtype=torch.long))
    head._set_bank("abnormal", 3 + torch.randn(9, dim, generator=g), torch.full((9,), -1),
                   torch.zeros(9, dtype=torch.long), torch.zeros(9, dtype=torch.long))
    head.dist_scale.fill_(2.0)
    head.class_names = ["c"]
    return head


def test_knowledge_values_against_brute_force():
    head = _head_with_banks()
    q = torch.randn(11, 6)
    z = head.knowledge_features(q)
    assert z.shape == (11, head.knowledge_dim()) == (11, 6 + 2 + 12 + 12)
    for j, name in enumerate(("normal", "abnormal")):
        bank = getattr(head, f"{name}_bank")
        full = torch.cdist(q, bank)
        d, i = full.topk(3, dim=1, largest=False)
        torch.testing.assert_close(z[:, 6 + j], d[:, 0] / 2.0, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(z[:, 8 + 6 * j:14 + 6 * j], q - bank[i[:, 0]])
        w = torch.softmax(-d / 2.0, dim=1)
        read = (w[..., None] * bank[i]).sum(1)
        torch.testing.assert_close(z[:, 20 + 6 * j:26 + 6 * j], read, atol=1e-5, rtol=1e-4)
    only = _head_with_banks(knowledge=["distance"], include_query=False)
    assert only.knowledge_features(q).shape == (11, 2)


def test_exclude_self_skips_memories_of_the_same_image():
    head = _head_with_banks(knowledge=["distance"], include_query=False)
    q = head.normal_bank[:4].clone()  # exact copies of memories of images 0..3
    assert torch.allclose(head.knowledge_features(q)[:, 0], torch.zeros(4), atol=1e-3)
    src = torch.arange(4)
    z = head.knowledge_features(q, row_src=src)
    others = head.normal_src.long()[None] != src[:, None]
    ref = torch.cdist(q, head.normal_bank).masked_fill(~others, float("inf")).min(1).values
    torch.testing.assert_close(z[:, 0], ref / 2.0, atol=1e-4, rtol=1e-4)


def test_head_shapes_and_gradients():
    head = _head_with_banks().train()
    feats = torch.randn(2, 6, 4, 4, requires_grad=True)
    mask = torch.zeros(2, 1, 16, 16)
    mask[0, :, :8, :8] = 1
    out = head({"feature_align": feats, "mask": mask, "index": torch.tensor([0, 1])})
    assert out["patch_logits"].shape == (2, 1, 4, 4) and out["pred"].shape == (2, 1, 16, 16)
    assert out["patch_target"][0, 0, :2, :2].eq(1).all() and out["patch_target"].sum() == 4
    loss = PatchFocalLoss()(out) + PatchBCELoss()(out)
    loss.backward()
    grads = [p.grad for p in head.score_head.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    # the knowledge is differentiable in q: d(distance)/dq = (q - m) / |q - m|
    q = torch.randn(5, 6, requires_grad=True)
    head.knowledge_features(q)[:, 6].sum().backward()
    nearest = head.normal_bank[torch.cdist(q.detach(), head.normal_bank).argmin(1)]
    diff = q.detach() - nearest
    torch.testing.assert_close(q.grad, diff / diff.norm(dim=1, keepdim=True) / 2.0,
                               atol=1e-4, rtol=1e-3)
    head.eval()
    with torch.no_grad():
        pred = head({"feature_align": feats})["pred"]
    assert "patch_target" not in head({"feature_align": feats.detach()})
    assert pred.min() >= 0 and pred.max() <= 1


def test_retrieval_memo_gives_the_same_step_and_searches_each_input_once(monkeypatch):
    """Fixed inputs (``cache_index``) keep their retrieval: the same logits and gradients as a
    fresh search, leave-one-image-out kept, and a second visit searches nothing."""
    import dualmem.models.heads.dmad_knowledge as dmad_module  # where retrieval lives

    head = _head_with_banks().train()
    feats = torch.randn(3, 6, 4, 4)
    feats[0, :, 0, 0] = head.normal_bank[0]  # a copy of a memory of image 0: excluded for it
    index = torch.tensor([0, 1, 2])
    calls = []
    real_knn = dmad_module.knn
    monkeypatch.setattr(dmad_module, "knn", lambda q, *a, **k: calls.append(len(q))
                        or real_knn(q, *a, **k))

    def step(keys):
        head.zero_grad()
        inp = {"feature_align": feats, "index": index}
        if keys is not None:
            inp["cache_index"] = torch.tensor(keys)
        out = head(inp)["patch_logits"]
        out.sum().backward()
        return out.detach(), [p.grad.clone() for p in head.score_head.parameters()]

    fresh = step(None)
    assert calls and not head._retrieval_memo
    calls.clear()
    first = step([10, 11, 12])
    assert sum(calls) == 2 * 3 * 16  # both banks, every row once
    calls.clear()
    again = step([10, 11, 12])
    assert calls == []  # nothing searched on the second visit
    for got in (first, again):
        torch.testing.assert_close(got[0], fresh[0])
        for a, b in zip(got[1], fresh[1]):
            torch.testing.assert_close(a, b)
    # a batch mixing known and new inputs searches only the new image's rows
    calls.clear()
    step([10, 13, 12])
    assert sum(calls) == 2 * 16
    assert set(head._retrieval_memo["normal"]) == {10, 11, 12, 13}
    # exclusion survived the memo: row (0, 0) of image 0 did not find its own copy
    z = head.knowledge_features(feats[:1].permute(0, 2, 3, 1).reshape(-1, 6),
                                row_src=torch.zeros(16, dtype=torch.long), keys=[10])
    assert z[0, 6] > 0.01
    # new banks forget the memo; evaluation never uses it
    head._set_bank("normal", head.normal_bank.clone(), head.normal_src, head.normal_cls)
    assert head._retrieval_memo == {}
    head.eval()
    with torch.no_grad():
        head({"feature_align": feats, "cache_index": torch.tensor([10, 11, 12])})
    assert head._retrieval_memo == {}


def test_empty_banks_are_a_clear_error():
    head = DMAD([4], [4], input_size=[8, 8])
    with pytest.raises(RuntimeError, match="banks are empty"):
        head({"feature_align": torch.randn(1, 4, 2, 2)})


def test_bank_per_class_routes_to_the_nearest_class():
    head = DMAD([2], [1], input_size=[2, 2], topk=1, hidden=[], bank_per_class=True,
                knowledge=["distance"], include_query=False).eval()
    normal = torch.tensor([[0.0, 0.0], [0.1, 0.0], [10.0, 10.0], [10.1, 10.0]])
    head._set_bank("normal", normal, torch.arange(4), torch.tensor([0, 0, 1, 1]))
    head._set_bank("abnormal", torch.tensor([[5.0, 5.0]]), torch.tensor([-1]),
                   torch.tensor([0]), torch.tensor([0]))
    head.class_names = ["a", "b"]
    x = torch.tensor([[0.05, 0.0], [0.0, 0.0], [10.0, 10.05], [10.0, 10.0]]).T.reshape(1, 2, 2, 2)
    x = torch.cat([x[:, :, :1].repeat(1, 1, 2, 1), x[:, :, 1:].repeat(1, 1, 2, 1)])
    assert head._route_classes(x.permute(0, 2, 3, 1).reshape(-1, 2), 2, 4).tolist() == [0, 1]
    # with the class given, an image of class 'b' near class 'a' memories still uses 'b'
    q = torch.zeros(1, 2, 1, 1)
    z_given = head.knowledge_features(q.reshape(1, 2), row_cls=torch.tensor([1]))
    assert z_given[0, 0] == pytest.approx(float(torch.tensor([10.0, 10.0]).norm()), rel=1e-4)


def test_gaussian_blur_matches_scipy():
    from scipy.ndimage import gaussian_filter

    x = torch.rand(2, 1, 40, 37)
    got = gaussian_blur(x, 4.0)
    ref = np.stack([gaussian_filter(a[0].double().numpy(), 4.0, mode="mirror", truncate=4.0)
                    for a in x])
    np.testing.assert_allclose(got[:, 0].numpy(), ref, atol=1e-5)


def test_losses_against_formula():
    logits = torch.randn(2, 1, 3, 3)
    t = torch.rand(2, 1, 3, 3)
    out = {"patch_logits": logits, "patch_target": t}
    p = torch.sigmoid(logits)
    ref = -(t * (1 - p) ** 2 * torch.log(p) + (1 - t) * p ** 2 * torch.log(1 - p)).mean()
    torch.testing.assert_close(PatchFocalLoss(gamma=2.0)(out), ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(PatchFocalLoss(gamma=0.0)(out), PatchBCELoss()(out))
    with pytest.raises(KeyError, match="patch_target"):
        PatchBCELoss()({"patch_logits": logits})


# ----------------------------------------------------------------------------- banks
class _Images:
    """ManifestDataset-like images with masks; label 1 rows are seen anomalies."""

    pixel_mean, pixel_std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)

    def __init__(self, n_normal=6, n_anomalous=2, size=32, classes=("a", "b")):
        g = torch.Generator().manual_seed(1)
        n = n_normal + n_anomalous
        self.images = torch.randn(n, 3, size, size, generator=g)
        self.records = [{"filename": f"{i}.png", "label": int(i >= n_normal),
                         "clsname": classes[i % len(classes)]} for i in range(n)]
        self.masks = torch.zeros(n, 1, size, size)
        self.masks[n_normal:, :, 4:20, 8:24] = 1

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        r = self.records[i]
        return {"image": self.images[i], "mask": self.masks[i], "label": r["label"],
                "clsname": r["clsname"], "filename": r["filename"], "index": i}


def _conv_extractor(dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(dim, 3, 4, 4, generator=g)
    return lambda images: F.conv2d(images, weight, stride=4)


def _fit(head, extract, images, batch_size):
    """Stage one as the engine runs it, on a plain image dataset."""
    return head.fit(stage_one_data(extract, head.fit_spec(), images, torch.device("cpu"),
                                   batch_size, plain=images))


def test_build_banks_contents_and_memory_cap():
    data = _Images()
    head = DMAD([16], [4], input_size=[32, 32], coreset_ratio=0.1, pseudo_per_image=2,
                num_centers=2, center_samples=3, bank_memory_mb=0.011)
    info = _fit(head, _conv_extractor(), data, batch_size=4)
    cap = int(0.011 * 2 ** 20)
    assert head.bank_nbytes() <= cap
    normal_cap, _ = head.bank_caps()
    assert info["normal_bank"] == min(normal_cap, int(np.ceil(0.1 * 6 * 64)))
    assert head.normal_src.max() < 6  # only normal images feed the normal bank
    assert info["abnormal_real"] == 2 * 16  # two 16x16-px anomalies: 4x4 patches at stride 4
    assert info["abnormal_centres"] == 2 * 2 and info["abnormal_samples"] == 2 * 2 * 3
    assert info["abnormal_pseudo"] > 0
    assert set(head.abnormal_src[head.abnormal_kind == 1].tolist()) == {6, 7}
    assert head.class_names == ["a", "b"] and 0 < float(head.dist_scale)
    # a tighter cap shrinks the banks and still holds
    small = DMAD([16], [4], input_size=[32, 32], coreset_ratio=0.5, pseudo_per_image=2,
                 bank_memory_mb=0.002)
    _fit(small, _conv_extractor(), data, batch_size=4)
    assert small.bank_nbytes() <= int(0.002 * 2 ** 20)
    assert small.normal_bank.shape[0] < info["normal_bank"] and small.abnormal_bank.shape[0] > 0


def _model(tmp_path):
    from dualmem.models import ModelHelper

    torch.manual_seed(0)
    return ModelHelper(tiny_dmad_net(), input_size=[32, 32])


def test_checkpoint_round_trip_resizes_banks(tmp_path):
    from dualmem.utils.checkpoint import load_checkpoint, save_checkpoint

    model = _model(tmp_path)
    assert model.frozen_prefix == ["backbone", "neck"]
    data = _Images(n_normal=4, n_anomalous=1)
    _fit(model.head, prefix_extractor(model, 2, "feature_align"), data, batch_size=2)
    model.eval()
    x = {"image": torch.randn(2, 3, 32, 32)}
    with torch.no_grad():
        ref = model(x)["pred"]
    save_checkpoint({"model": model.state_dict()}, tmp_path / "m.pth")
    fresh = _model(tmp_path)
    assert fresh.head.normal_bank.shape[0] == 0
    fresh.load_state_dict(load_checkpoint(tmp_path / "m.pth")["model"])
    assert fresh.head.normal_bank.shape == model.head.normal_bank.shape
    assert fresh.head.abnormal_kind.shape == model.head.abnormal_kind.shape
    assert fresh.head.class_names == ["a", "b"] and fresh.head.build_info["normal_bank"] > 0
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(x)["pred"], ref)


# ----------------------------------------------------------------------------- neck
def test_patchcore_neck_local_average_upsample_and_projection():
    from dualmem.models.necks.patchcore import PatchCoreNeck

    g = torch.Generator().manual_seed(0)
    f1, f2 = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 6, 4, 4, generator=g)
    neck = PatchCoreNeck([4, 6], [8, 16])
    out = neck({"features": [f1, f2]})["feature_align"]
    assert out.shape == (1, 10, 8, 8) and neck.get_outstrides() == [8]
    # interior 3x3 mean, and a corner averages only its 4 real neighbours
    assert torch.allclose(out[0, :4, 3, 3], f1[0, :, 2:5, 2:5].mean((1, 2)), atol=1e-6)
    assert torch.allclose(out[0, :4, 0, 0], f1[0, :, :2, :2].mean((1, 2)), atol=1e-6)
    pooled2 = F.avg_pool2d(f2, 3, 1, 1, count_include_pad=False)
    up = F.interpolate(pooled2, size=(8, 8), mode="bilinear", align_corners=False)
    assert torch.allclose(out[:, 4:], up, atol=1e-6)
    avg = PatchCoreNeck([4, 6], [8, 16], out_dim=5)({"features": [f1, f2]})["feature_align"]
    ref = F.adaptive_avg_pool1d(out.permute(0, 2, 3, 1).reshape(-1, 1, 10), 5)
    assert torch.allclose(avg.permute(0, 2, 3, 1).reshape(-1, 5), ref[:, 0], atol=1e-6)
    r1 = PatchCoreNeck([4, 6], [8, 16], out_dim=5, projection="random", seed=3)
    r2 = PatchCoreNeck([4, 6], [8, 16], out_dim=5, projection="random", seed=3)
    assert torch.equal(r1.random_matrix, r2.random_matrix)
    proj = r1({"features": [f1, f2]})["feature_align"]
    assert torch.allclose(proj, torch.einsum("bchw,cd->bdhw", out, r1.random_matrix), atol=1e-5)
    assert not any(p.requires_grad for p in r1.parameters())
    with pytest.raises(ValueError, match="out_dim"):
        PatchCoreNeck([4, 6], [8, 16], out_dim=64, projection="avgpool")


# ----------------------------------------------------------------------------- end to end
def _write_config(tmp_path, seen=0, join=True):
    cfg = {
        "_base_": str(ROOT / "experiments" / "demo" / "dmad.yaml"),
        "random_seed": 3,
        "dataset": dict(
            synthetic_dataset(tmp_path / "data", seed=3, image_size=96, num_train=12,
                              num_test_good=4, num_test_defect=2, batch_size=8),
            seen_anomalies={"num_per_class": seen, "seed": 0, "join_training": join}),
        "trainer": {"max_epoch": 4, "val_freq_epoch": 4},
    }
    path = tmp_path / f"dmad_{seen}_{join}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
def test_dmad_end_to_end_semi_supervised_and_evaluate(tmp_path):
    from dualmem.tools import train_val

    cfg = _write_config(tmp_path, seen=2)
    run = tmp_path / "run"
    args = ["--config", str(cfg), "--work_dir", str(run), "--no_progress", "--device", "cpu"]
    assert train_val.main(args) == 0
    results = json.loads((run / "results.json").read_text())
    seen = results["protocol"]["seen_anomalies"]
    assert seen["num_per_class"] == 2 and len(seen["files"]) == 4
    assert results["mean"]["image_auroc"] >= 0.9, results["mean"]
    assert results["mean"]["pixel_auroc"] >= 0.95, results["mean"]
    assert train_val.main(args + ["--evaluate"]) == 0
    out = sorted((run / "evaluations").iterdir())[-1]
    test_files = {r["file"] for r in _csv(out)}
    assert len(test_files) == 2 * (4 + 4 * 2) - 4
    assert not test_files & set(seen["files"])  # seen anomalies are not tested
    again = json.loads((out / "results.json").read_text())
    assert again["protocol"]["seen_anomalies"]["files"] == seen["files"]
    assert again["mean"]["image_auroc"] == pytest.approx(results["mean"]["image_auroc"])
    assert again["mean"]["pixel_ap"] == pytest.approx(results["mean"]["pixel_ap"], abs=1e-6)


def _csv(run):
    import csv

    with open(run / "scores.csv") as f:
        return list(csv.DictReader(f))


def test_dmad_experiment_configs_load_and_lite_builds():
    from dualmem.models import ModelHelper
    from dualmem.utils.config import load_config

    files = sorted((ROOT / "experiments").glob("*/dmad/*.yaml")) + sorted(
        (ROOT / "experiments" / "demo").glob("dmad*.yaml"))
    files = [f for f in files if f.name not in ("lite_net.yaml", "lite_reference_net.yaml",
                                                "reference_net.yaml")]
    assert len(files) == 29  # lite2.yaml: the Lite2 variant of lite.yaml
    for f in files:
        cfg = load_config(f)
        k = cfg.dataset.seen_anomalies.num_per_class
        semi = re.search(r"semi_?(\d+)$", f.stem)  # lite_semi_5, dmad_reference_semi5
        assert k == (int(semi.group(1)) if semi else 0), f
        reference = "reference" in f.stem
        assert cfg.net[2].type == ("models.heads.DMADReference" if reference
                                   else "models.heads.DMAD"), f
        assert cfg.evaluator.image_score.reduction == ("max" if reference else "topk")
        if reference:  # nothing pasted into images: the reference's abnormal bank is textures
            assert cfg.dataset.train.pseudo_anomaly.prob == 0.0
            assert cfg.criterion[0].type == "models.losses.DMADHingeLoss"
    cfg = load_config(ROOT / "experiments" / "MVTec-AD" / "dmad" / "lite_semi_5.yaml")
    model = ModelHelper(cfg.net, input_size=cfg.dataset.input_size)
    assert model.frozen_prefix == ["backbone", "neck"]
    # the two distances and the nearest labelled-anomaly memory's; the corrected score
    assert model.head.dim == 152 and model.head.knowledge_dim() == 3
    assert model.head.score == "normal_plus_correction"
    # the authors' variant on their features: WRN50 layer2 + layer3 = 1536 dims, MLP 3C -> 1024
    cfg = load_config(ROOT / "experiments" / "MVTec-AD" / "dmad" / "reference_semi_5.yaml",
                      ["net.0.kwargs.pretrained=false"])
    model = ModelHelper(cfg.net, input_size=cfg.dataset.input_size)
    assert model.head.dim == 1536 and model.head.knowledge_dim() == 3 * 1536
    assert model.head.score_head[0].out_features == 1024 and model.head.noise_std == 0.015


@pytest.mark.slow
def test_pseudo_anomaly_pool_is_cached_and_trains_as_uncached(tmp_path):
    """``pseudo_anomaly.pool``: the feature cache holds every version of every image, and
    training from it (with DMAD's retrieval memo) follows the uncached run's losses."""
    from dualmem.utils.config import load_config
    from dualmem.utils.engine import Trainer

    cfg_path = _write_config(tmp_path, seen=1)
    losses = {}
    for cache in (False, True):
        cfg = load_config(cfg_path, [f"trainer.feature_cache={str(cache).lower()}"])
        assert cfg.dataset.train.pseudo_anomaly.pool == 2  # the demo's default
        trainer = Trainer(cfg, tmp_path / f"pool_{cache}", torch.device("cpu"), progress=False)
        assert trainer.use_cache is cache
        trainer.prepare_modules()
        losses[cache] = [trainer.train_one_epoch(e) for e in range(3)]
        if cache:
            n_train = len(trainer.train_set)
            assert len(trainer.train_loader.dataset) == n_train
            assert len(trainer.train_loader.dataset.cached) == 3 * n_train
            memo = trainer.model.head._retrieval_memo
            assert 0 < len(memo["normal"]) <= 3 * n_train
        trainer.close()
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)
    # without a pool the data is made on the fly and the cache is refused
    cfg = load_config(cfg_path, ["trainer.feature_cache=true",
                                 "dataset.train.pseudo_anomaly.pool=null"])
    with pytest.raises(ValueError, match="fixed pool"):
        Trainer(cfg, tmp_path / "refused", torch.device("cpu"), progress=False)


@pytest.mark.slow
def test_benchmark_dmad_times_training_against_a_baseline(tmp_path):
    """tools/benchmark_dmad.py: banks, epoch seconds of both variants and their ratios in
    the JSON; the pooled config trains from cached features, the baseline cannot."""
    from dualmem.tools import benchmark_dmad

    cfg = _write_config(tmp_path)
    out = tmp_path / "bench.json"
    assert benchmark_dmad.main([
        "--config", str(cfg), "--device", "cpu", "--threads", "1", "--infer_batches", "1",
        "--train_epochs", "2", "--out", str(out), "--opts", "dataset.train.pseudo_anomaly.pool=2",
        "--baseline_opts", "dataset.train.pseudo_anomaly.pool=null"]) == 0
    result = json.loads(out.read_text())
    base, cur = result["baseline"], result["current"]
    assert base["train_cache"] == "no feature cache" and cur["train_cache"] == "features cached"
    for r in (base, cur):
        assert r["normal_bank"] > 0 and r["abnormal_bank"] > 0
        assert len(r["train_epoch_seconds"]) == 2 and r["train_seconds_total"] > 0
    ratios = result["ratios_current_over_baseline"]
    assert ratios["train_seconds_total"] == pytest.approx(
        cur["train_seconds_total"] / base["train_seconds_total"])
