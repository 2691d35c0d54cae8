"""DMAD as its authors' code does it (models.heads.DMADReference): the knowledge module against
a float64 formula, the hinge loss against a hand computation, mean-plus-noise centre samples,
outlier textures in the abnormal bank with their provenance, and a training step."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dualmem.models.heads.dmad import KIND_REAL, KIND_SAMPLE, KIND_TEXTURE
from dualmem.models.heads.dmad_reference import DMADReference
from dualmem.models.losses import DMADHingeLoss
from test_dmad_training_signal import _extractor, _SeenAnomalies
from dualmem.utils.engine.stage_one import stage_one_data


def _head(dim=6, **kw):
    head = DMADReference([dim], [4], input_size=[16, 16], mlp_hidden=8, **kw)
    g = torch.Generator().manual_seed(0)
    head._set_bank("normal", torch.randn(20, dim, generator=g), torch.arange(20) % 5,
                   torch.zeros(20, dtype=torch.long))
    kind = torch.tensor([KIND_REAL] * 3 + [KIND_TEXTURE] * 6)
    head._set_bank("abnormal", 3 + torch.randn(9, dim, generator=g),
                   torch.tensor([5, 6, 7, -1, -1, -1, -1, -1, -1]),
                   torch.zeros(9, dtype=torch.long), kind)
    head.class_names = ["c"]
    return head


def test_knowledge_is_bn_of_residual_plus_value_projection_in_float64():
    head = _head().eval()
    bn = head.knowledge_bn
    stats = {"normal": bn, "abnormal": head.knowledge_bn_abnormal}  # running stats per bank
    with torch.no_grad():  # non-trivial running statistics and affine parameters
        for m in stats.values():
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    q = torch.randn(13, 6, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        z = head.knowledge_features(q)
    qd = q.double()
    w_v, b_v = head.value.weight.double(), head.value.bias.double()
    w_p, b_p = head.project.weight.double(), head.project.bias.double()
    parts = [qd @ w_p.T + b_p]
    for name in ("normal", "abnormal"):
        bank = getattr(head, f"{name}_bank").double()
        n = bank[torch.cdist(qd, bank).argmin(1)]  # the one nearest memory
        k = qd - n + qd @ w_v.T + b_v  # CrossAttn over one key = its value projection
        st = stats[name]
        k = (k - st.running_mean.double()) / torch.sqrt(st.running_var.double() + bn.eps)
        k = k * bn.weight.double() + bn.bias.double()
        parts.append(k @ w_p.T + b_p)
    ref = torch.cat(parts, 1)
    np.testing.assert_allclose(z.double().numpy(), ref.detach().numpy(), rtol=1e-5, atol=1e-5)


def test_hinge_loss_against_a_hand_computation():
    out = {"hinge_normal": torch.tensor([-1.0, 0.2, -0.4]),   # relu(0.5 + l): 0, 0.7, 0.1
           "hinge_fake": torch.tensor([0.3, 1.0]),            # relu(0.5 - l): 0.2, 0
           "hinge_real": torch.tensor([0.0, 0.6, 0.1, -2.0])}  # 0.5, 0, 0.4, 2.5
    expected = (0.7 + 0.1) / 3 + 0.2 / 2 + 10 * (0.5 + 0.4 + 2.5) / 4
    assert float(DMADHingeLoss()(out)) == pytest.approx(expected, rel=1e-6)
    # unsupervised: no real anomalies -> that term is 0, not nan
    out["hinge_real"] = torch.zeros(0)
    assert float(DMADHingeLoss()(out)) == pytest.approx((0.7 + 0.1) / 3 + 0.2 / 2, rel=1e-6)


def test_banks_hold_textures_and_mean_noise_samples_with_provenance(tmp_path):
    data = _SeenAnomalies()
    extract = _extractor()
    # a texture folder with one sub-folder per class: one image each is drawn
    import cv2

    for cls in ("banded", "dotted", "woven"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            img = (np.random.default_rng(i).random((20, 20, 3)) * 255).astype(np.uint8)
            cv2.imwrite(str(tmp_path / cls / f"{cls}_{i}.png"), img)
    head = DMADReference([16], [4], input_size=[32, 32], coreset_ratio=0.1,
                         outlier_textures={"texture_dir": str(tmp_path)},
                         texture_coreset_ratio=0.1)
    head.fit(stage_one_data(extract, head.fit_spec(), data, torch.device("cpu"), 4,
                            plain=data))
    info = head.build_info
    assert info["texture_images"] == 3 and info["texture_source"] == f"folder {tmp_path}"
    assert sorted(f.split("/")[-2] for f in info["texture_files"]) == ["banded", "dotted",
                                                                      "woven"]
    assert info["abnormal_textures"] == int(np.ceil(0.1 * 3 * 64))  # 8x8 patches per image
    real = head.abnormal_bank[head.abnormal_kind == KIND_REAL]
    samples = head.abnormal_bank[head.abnormal_kind == KIND_SAMPLE]
    assert info["abnormal_real"] == samples.shape[0] == 5 * 16  # as many samples as real
    torch.testing.assert_close(samples.mean(0), real.mean(0), atol=0.01, rtol=0)
    assert float((samples - real.mean(0)).std()) == pytest.approx(0.015, rel=0.1)
    # every sample is one derived group, linked to every seen image
    assert set(head.abnormal_group[head.abnormal_kind == KIND_SAMPLE].tolist()) == {0}
    assert sorted(head.derived_links[:, 1].tolist()) == list(range(8, 13))
    # procedural textures when no folder is given: same count every time, recorded
    proc = DMADReference([16], [4], input_size=[32, 32], outlier_textures={"count": 5})
    proc.fit(stage_one_data(extract, proc.fit_spec(), data, torch.device("cpu"), 4,
                            plain=data))
    assert proc.build_info["texture_source"] == "procedural"
    assert proc.build_info["texture_images"] == 5 and proc.build_info["abnormal_textures"] > 0


def test_training_step_separates_normal_from_noise_and_real_anomalies():
    """A few hundred steps on fixed features: the hinge loss falls and, at test time, the
    seen-anomaly patches score above the normal ones."""
    torch.manual_seed(0)
    data = _SeenAnomalies()
    # normal texture on a tight manifold (as real features are), anomalies far from it
    data.images = data.images * (data.masks + 0.02 * (1 - data.masks))
    extract = _extractor()
    head = DMADReference([16], [4], input_size=[32, 32], coreset_ratio=0.2, mlp_hidden=32,
                         noise_std=0.5, real_per_step=64, outlier_textures={"count": 4})
    head.fit(stage_one_data(extract, head.fit_spec(), data, torch.device("cpu"), 4,
                            plain=data))
    feats = extract(data.images)
    batch = {"feature_align": feats, "mask": data.masks, "index": torch.arange(len(data))}
    opt = torch.optim.Adam(head.parameters(), lr=1e-3)
    loss_fn = DMADHingeLoss()
    head.train()
    losses = []
    for _ in range(100):
        out = head(batch)
        loss = loss_fn(out)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert out["hinge_real"].numel() == 5 * 16 + 64
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:10])
    head.eval()
    with torch.no_grad():
        logits = head({"feature_align": feats})["patch_logits"]
    inside = F.adaptive_avg_pool2d(data.masks, logits.shape[-2:]) > 0.5
    assert float(logits[inside].mean()) > float(logits[~inside].max())


def test_empty_kmeans_clusters_are_excluded_for_every_image_of_their_class():
    """Identical anomalous patches leave k-means clusters empty; their centres copy a patch,
    so they must not be retrieved for any image of the class (and must not break retrieval)."""
    from dualmem.models.heads.dmad import DMAD

    head = DMAD([4], [4], input_size=[16, 16], knowledge=["distance"], include_query=False,
                num_centers=3, center_samples=2, hidden=[4])
    feats = torch.ones(3, 4)
    parts, links = head._center_sampling(feats, torch.tensor([10, 10, 11]),
                                         torch.zeros(3, dtype=torch.long))
    groups = torch.cat([p[4] for p in parts])
    linked = {(int(g), int(i)) for g, i in links}
    for g in set(groups[groups >= 0].tolist()):
        assert {(g, 10), (g, 11)} <= linked, g


def test_a_mistyped_outlier_texture_key_is_a_user_error():
    from dualmem.utils.errors import UserError

    with pytest.raises(UserError, match=r"outlier_textures: unknown key\(s\) \['dir'\]"):
        DMADReference([8], [4], input_size=[16, 16], outlier_textures={"dir": "DTD/images"})
