"""DMAD's training signal is the test signal: memories derived from a seen anomaly (its own
patches, anomaly centres of clusters it belongs to, samples around them) are not retrieved for
that image in training (leave-one-image-out), so seen in-mask patches are not scored against
copies of themselves."""
import numpy as np
import torch
import torch.nn.functional as F

from dualmem.models.heads.dmad import DMAD
from dualmem.models.heads.memory_bank import downsample_mask
from dualmem.utils.engine.stage_one import stage_one_data


class _SeenAnomalies:
    """Normal noise images; anomalies are a bright square with an image-specific pattern (so
    each anomaly forms its own feature cluster, as real defects of one class often do)."""

    pixel_mean, pixel_std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    input_size = (32, 32)

    def __init__(self, n_normal=8, n_anomalous=5, size=32):
        g = torch.Generator().manual_seed(3)
        n = n_normal + n_anomalous
        self.images = torch.randn(n, 3, size, size, generator=g)
        self.masks = torch.zeros(n, 1, size, size)
        for i in range(n_normal, n):
            pattern = 3 * torch.randn(3, 1, 1, generator=g)  # this anomaly's own colour
            self.images[i, :, 4:20, 8:24] = pattern + 0.3 * torch.randn(3, 16, 16, generator=g)
            self.masks[i, :, 4:20, 8:24] = 1
        self.records = [{"filename": f"{i}.png", "label": int(i >= n_normal), "clsname": "a"}
                        for i in range(n)]

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        return {"image": self.images[i], "mask": self.masks[i],
                "label": self.records[i]["label"], "clsname": "a",
                "filename": self.records[i]["filename"], "index": i}


def _extractor():
    weight = torch.randn(16, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    return lambda images: F.conv2d(images, weight, stride=4)


def _in_mask_abnormal_distances(head, extract, data, indices, training):
    """Abnormal-bank distances (dist_scale units) of the in-mask patches of ``indices``, as the
    head retrieves them in training (own memories excluded) or at test time."""
    feats = extract(data.images[indices])
    b, c, h, w = feats.shape
    q = feats.permute(0, 2, 3, 1).reshape(-1, c)
    inside = downsample_mask(data.masks[indices], (h, w)).reshape(-1) > 0.5
    row_src = torch.tensor(indices).repeat_interleave(h * w) if training else None
    z = head.knowledge_features(q, row_src=row_src)  # [normal distance, abnormal distance]
    return z[inside, 1].numpy()


def test_seen_anomalies_do_not_meet_memories_made_from_themselves():
    data = _SeenAnomalies()
    seen, unseen = [8, 9, 10, 11], [12]
    train = _SeenAnomalies()
    keep = list(range(8)) + seen  # the unseen anomaly stays out of the training set
    train.images, train.masks = data.images[keep], data.masks[keep]
    train.records = [data.records[i] for i in keep]
    extract = _extractor()
    head = DMAD([16], [4], input_size=[32, 32], knowledge=["distance"], include_query=False,
                pseudo_per_image=1, num_centers=4, center_samples=4, center_spread=0.5)
    head.fit(stage_one_data(extract, head.fit_spec(), train, torch.device("cpu"), 4,
                            plain=train))
    assert head.build_info["abnormal_centres"] == 4 and head.derived_links.shape[0] >= 4
    # each centre is linked to exactly the training images with a patch in its cluster
    assert set(head.derived_links[:, 1].tolist()) <= set(range(8, 12))

    unseen_d = np.median(_in_mask_abnormal_distances(head, extract, data, unseen, False))
    loo_d = np.median(_in_mask_abnormal_distances(head, extract, train, [8, 9, 10, 11], True))
    # without the links the shortcut comes back: centres and samples of the image's own cluster
    links = head.derived_links.clone()
    head.derived_links = torch.zeros(0, 2, dtype=torch.int32)
    shortcut_d = np.median(_in_mask_abnormal_distances(head, extract, train, [8, 9, 10, 11],
                                                       True))
    head.derived_links = links
    assert shortcut_d < 0.5 * unseen_d, (shortcut_d, unseen_d)  # the shortcut is real here
    assert loo_d > 0.8 * unseen_d, (loo_d, unseen_d)  # and gone with leave-one-image-out


def test_derived_memories_excluded_exactly_for_their_images():
    """Brute force: a query of image s never retrieves a bank row from s nor a row whose group
    is linked to s; every other row stays available."""
    g = torch.Generator().manual_seed(1)
    dim = 5
    head = DMAD([dim], [4], input_size=[16, 16], knowledge=["distance"], include_query=False,
                topk=1, hidden=[4])
    head._set_bank("normal", torch.randn(12, dim, generator=g), torch.arange(12) % 4,
                   torch.zeros(12, dtype=torch.long))
    ab = torch.randn(10, dim, generator=g)
    src = torch.tensor([0, 1, 2, -1, -1, -1, -1, -1, -1, 3])
    group = torch.tensor([-1, -1, -1, 0, 0, 1, 1, 2, 2, -1])
    links = torch.tensor([[0, 0], [0, 1], [1, 1], [2, 3]])  # group 0 from images 0 and 1, ...
    head._set_bank("abnormal", ab, src, torch.zeros(10, dtype=torch.long),
                   torch.zeros(10, dtype=torch.long), group, links)
    head.dist_scale.fill_(1.0)
    head.class_names = ["c"]
    q = torch.randn(40, dim, generator=g)
    row_src = torch.arange(40) % 5  # image 4 is linked to nothing
    got = head.knowledge_features(q, row_src=row_src)[:, 1]
    allowed = np.ones((40, 10), dtype=bool)
    for r in range(40):
        s = int(row_src[r])
        for j in range(10):
            linked = any(int(gr) == int(group[j]) and int(im) == s for gr, im in links)
            allowed[r, j] = int(src[j]) != s and not linked
    d = torch.cdist(q.double(), ab.double()).numpy()
    ref = np.where(allowed, d, np.inf).min(1)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-5, atol=1e-5)
