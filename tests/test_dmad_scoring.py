"""DMAD's own additions to the method (ours, #27): a score that is the nearest-normal distance
plus a bounded learned correction, and the distance to the nearest memory made from a labelled
anomaly as knowledge."""
import pytest
import torch

from dualmem.models.heads.dmad import DMAD
from dualmem.models.heads.dmad_banks import KIND_CENTRE, KIND_PSEUDO, KIND_REAL, KIND_TEXTURE
from dualmem.models.heads.dmad_knowledge import REAL_DISTANCE_CAP


def head_with_banks(kinds, dim=6, **kw):
    head = DMAD([dim], [4], input_size=[16, 16], topk=3, hidden=[8], sigma=0.0, **kw)
    g = torch.Generator().manual_seed(0)
    head._set_bank("normal", torch.randn(20, dim, generator=g), torch.arange(20) % 5,
                   torch.zeros(20, dtype=torch.long))
    n = len(kinds)
    head._set_bank("abnormal", 3 + torch.randn(n, dim, generator=g), torch.arange(n) + 100,
                   torch.zeros(n, dtype=torch.long), torch.tensor(kinds))
    head.dist_scale.fill_(2.0)
    head.class_names = ["c"]
    return head


def test_correction_score_starts_as_the_normal_distance_ranking():
    head = head_with_banks([KIND_PSEUDO] * 5, knowledge=["distance"],
                           score="normal_plus_correction").eval()
    x = torch.randn(2, 6, 4, 4)
    out = head({"feature_align": x})
    q = x.permute(0, 2, 3, 1).reshape(-1, 6)
    d_n = torch.cdist(q, head.normal_bank).min(1).values
    logits = out["patch_logits"].permute(0, 2, 3, 1).reshape(-1)
    assert torch.equal(torch.argsort(logits), torch.argsort(d_n))  # same order, start
    expected = torch.nn.functional.softplus(head.score_gain) * (d_n / 2.0 - head.score_offset)
    torch.testing.assert_close(logits, expected.detach(), atol=1e-5, rtol=1e-5)


def test_correction_is_bounded_whatever_the_head_learns():
    head = head_with_banks([KIND_PSEUDO] * 5, knowledge=["distance"],
                           score="normal_plus_correction", correction_bound=0.3).eval()
    with torch.no_grad():  # a head gone wild: huge weights
        last = head.score_head[-1]
        last.weight.normal_(0, 100.0)
        last.bias.fill_(50.0)
    x = torch.randn(2, 6, 4, 4)
    logits = head({"feature_align": x})["patch_logits"].permute(0, 2, 3, 1).reshape(-1)
    q = x.permute(0, 2, 3, 1).reshape(-1, 6)
    d_n = torch.cdist(q, head.normal_bank).min(1).values / 2.0
    total = logits / torch.nn.functional.softplus(head.score_gain) + head.score_offset
    assert float((total - d_n).abs().max().detach()) <= 0.3 + 1e-5


def test_correction_score_trains_all_its_parts():
    head = head_with_banks([KIND_PSEUDO] * 5, knowledge=["distance"],
                           score="normal_plus_correction").train()
    out = head({"feature_align": torch.randn(2, 6, 4, 4)})
    out["patch_logits"].sum().backward()
    assert head.score_gain.grad is not None and head.score_offset.grad is not None
    assert head.score_head[-1].weight.grad.abs().sum() > 0


def test_real_distance_is_the_nearest_labelled_anomaly_memory():
    kinds = [KIND_PSEUDO, KIND_REAL, KIND_PSEUDO, KIND_CENTRE, KIND_PSEUDO]
    head = head_with_banks(kinds, knowledge=["distance", "real_distance"],
                           include_query=False)
    q = torch.randn(7, 6) + 2
    q[0] = head.abnormal_bank[1] + 0.01  # next to a real memory
    z = head.knowledge_features(q)
    assert z.shape == (7, head.knowledge_dim()) == (7, 3)
    real = head.abnormal_bank[torch.tensor([1, 3])]
    brute = (torch.cdist(q.double(), real.double()).min(1).values / 2.0).clamp(
        max=REAL_DISTANCE_CAP)
    torch.testing.assert_close(z[:, 2].double(), brute, atol=1e-4, rtol=1e-4)
    # the abnormal distance sees pseudo memories too; the real one does not
    assert float(z[0, 2]) < 0.05
    # leave-one-image-out: the real memory's own image does not meet it in training
    src = torch.tensor([101, 0, 0, 0, 0, 0, 0])
    z_loo = head.knowledge_features(q, row_src=src)
    assert float(z_loo[0, 2]) > float(z[0, 2])


def test_real_distance_without_labelled_anomalies_is_the_cap():
    head = head_with_banks([KIND_PSEUDO] * 4, knowledge=["distance", "real_distance"])
    z = head.knowledge_features(torch.randn(5, 6))
    assert torch.all(z[:, -1] == REAL_DISTANCE_CAP)


def test_bad_score_settings_are_refused():
    from dualmem.utils.errors import UserError

    with pytest.raises(UserError, match="score must be one of"):
        DMAD([6], [4], input_size=[16, 16], score="sum")
    with pytest.raises(UserError, match="correction_bound"):
        DMAD([6], [4], input_size=[16, 16], score="normal_plus_correction",
             correction_bound=0)


def test_distances_alone_equal_the_full_knowledge_s_and_the_real_subset_follows_the_bank():
    """Without attention only the nearest memory is gathered (cheaper): the same distances;
    the cached labelled-anomaly subset is rebuilt when the abnormal bank changes."""
    kinds = [KIND_PSEUDO, KIND_REAL, KIND_PSEUDO, KIND_CENTRE, KIND_PSEUDO]
    full = head_with_banks(kinds, knowledge=["distance", "attention", "real_distance"],
                           include_query=False)
    lean = head_with_banks(kinds, knowledge=["distance", "real_distance"], include_query=False)
    q = torch.randn(9, 6) + 2
    zf, zl = full.knowledge_features(q), lean.knowledge_features(q)
    torch.testing.assert_close(zl[:, :2], zf[:, :2])
    torch.testing.assert_close(zl[:, 2], zf[:, -1])
    before = lean.knowledge_features(q)[:, 2]
    lean._set_bank("abnormal", lean.abnormal_bank + 5, lean.abnormal_src, lean.abnormal_cls,
                   lean.abnormal_kind)
    assert not torch.allclose(lean.knowledge_features(q)[:, 2], before)


def _totals(head, x):
    """The patch scores before the monotone gain: d_n + correction (+ the seen bonus)."""
    logits = head({"feature_align": x})["patch_logits"].permute(0, 2, 3, 1).reshape(-1)
    return (logits / torch.nn.functional.softplus(head.score_gain) + head.score_offset).detach()


def test_seen_bonus_raises_only_patches_nearer_a_labelled_anomaly_than_any_normal_memory():
    kinds = [KIND_PSEUDO, KIND_REAL, KIND_PSEUDO, KIND_REAL, KIND_PSEUDO]
    kw = dict(knowledge=["distance", "real_distance"], score="normal_plus_correction")
    plain, bonus = head_with_banks(kinds, **kw).eval(), head_with_banks(
        kinds, seen_bonus=2.0, **kw).eval()
    bonus.load_state_dict(plain.state_dict())
    x = torch.randn(2, 6, 4, 4, generator=torch.Generator().manual_seed(3)) + 1.0
    x[0, :, 0, 0] = plain.abnormal_bank[1] + 0.05  # a patch at a labelled anomaly's memory
    x[1, :, 2, 2] = plain.normal_bank[4]           # a patch at a normal memory
    q = x.permute(0, 2, 3, 1).reshape(-1, 6).double()
    d_n = torch.cdist(q, plain.normal_bank.double()).min(1).values / 2.0
    d_r = torch.cdist(q, plain.abnormal_bank[[1, 3]].double()).min(1).values / 2.0
    expected = 2.0 * (1 - d_r / d_n).clamp(min=0) * (d_r < REAL_DISTANCE_CAP)
    added = (_totals(bonus, x) - _totals(plain, x)).double()
    torch.testing.assert_close(added, expected, atol=1e-4, rtol=1e-4)
    assert float(added[0]) > 1.5 and float(added[16 + 2 * 4 + 2]) == 0.0
    assert float(added.min()) >= 0.0  # upward only


def test_seen_bonus_leaves_a_model_without_labelled_anomalies_unchanged():
    kw = dict(knowledge=["distance", "real_distance"], score="normal_plus_correction")
    kinds = [KIND_PSEUDO, KIND_TEXTURE] * 3  # what an unsupervised run banks: no real anomaly
    plain = head_with_banks(kinds, **kw).eval()
    bonus = head_with_banks(kinds, seen_bonus=5.0, **kw).eval()
    bonus.load_state_dict(plain.state_dict())
    x = 10 * torch.randn(2, 6, 4, 4, generator=torch.Generator().manual_seed(5))  # far away too
    assert torch.equal(_totals(bonus, x), _totals(plain, x))


@pytest.mark.parametrize("kw,match", [
    (dict(seen_bonus=-1.0, score="normal_plus_correction", knowledge=["real_distance"]),
     "seen_bonus must be a finite number >= 0"),
    (dict(seen_bonus=float("inf"), score="normal_plus_correction", knowledge=["real_distance"]),
     "seen_bonus must be a finite number >= 0"),
    (dict(seen_bonus=1.0, score="head", knowledge=["distance", "real_distance"]),
     "seen_bonus needs score 'normal_plus_correction'"),
    (dict(seen_bonus=1.0, score="normal_plus_correction", knowledge=["distance"]),
     "'real_distance' in the knowledge"),
])
def test_bad_seen_bonus_settings_are_refused(kw, match):
    from dualmem.utils.errors import UserError

    with pytest.raises(UserError, match=match):
        DMAD([6], [4], input_size=[16, 16], **kw)
