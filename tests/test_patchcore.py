"""PatchCore: nearest-memory patch scores against a float64 brute force, the paper's image-score
reweighting against its formula, stage one's memory = the greedy coreset of every patch."""
import math

import numpy as np
import pytest
import torch

from dualmem.models.heads.memory_bank import greedy_coreset
from dualmem.models.heads.patchcore import PatchCore, reweighting
from dualmem.utils.engine.stage_one import StageOneData


def head_with_bank(bank, **kw):
    head = PatchCore(inplanes=[bank.shape[1]], instrides=[4], input_size=[16, 16], sigma=0.0,
                     **kw)
    head._buffers["memory_bank"] = bank.float()
    head._buffers["memory_cls"] = torch.zeros(len(bank), dtype=torch.int32)
    return head.eval()


def test_patch_scores_are_the_nearest_memory_distance():
    g = torch.Generator().manual_seed(0)
    bank = torch.randn(50, 6, generator=g)
    x = torch.randn(2, 6, 4, 4, generator=g)
    head = head_with_bank(bank, reweight=False)
    out = head({"feature_align": x})
    q = x.permute(0, 2, 3, 1).reshape(-1, 6).double().numpy()
    brute = np.sqrt(((q[:, None] - bank.double().numpy()[None]) ** 2).sum(-1)).min(1)
    np.testing.assert_allclose(out["patch_scores"].reshape(-1).numpy(), brute, rtol=1e-5)
    assert out["pred"].shape == (2, 1, 16, 16)
    # the map is the patch scores upsampled bilinearly (no blur here)
    up = torch.nn.functional.interpolate(torch.from_numpy(brute).float().view(2, 1, 4, 4),
                                         size=(16, 16), mode="bilinear", align_corners=False)
    np.testing.assert_allclose(out["pred"].numpy(), up.numpy(), rtol=1e-5)
    three = head_with_bank(bank, reweight=False, num_neighbors=3)({"feature_align": x})
    brute3 = np.sort(np.sqrt(((q[:, None] - bank.double().numpy()[None]) ** 2).sum(-1)),
                     1)[:, :3].mean(1)
    np.testing.assert_allclose(three["patch_scores"].reshape(-1).numpy(), brute3, rtol=1e-5)


def test_reweighting_is_the_paper_formula():
    """w = 1 - exp(||q* - m*||) / sum over N_b(m*) of exp(||q* - m||), N_b(m*) the b nearest
    memories of m* (m* itself first); image score = w * s*."""
    g = torch.Generator().manual_seed(1)
    bank = torch.randn(40, 5, generator=g).double()
    x = torch.randn(3, 5, 3, 3, generator=g)
    head = head_with_bank(bank, reweight=True, reweight_neighbors=4)
    out = head({"feature_align": x})
    b = bank.numpy()
    for i in range(3):
        q = x[i].permute(1, 2, 0).reshape(-1, 5).double().numpy()
        d = np.sqrt(((q[:, None] - b[None]) ** 2).sum(-1))
        top = int(d.min(1).argmax())
        s_star, m_star = d[top].min(), int(d[top].argmin())
        support = np.argsort(np.sqrt(((b - b[m_star]) ** 2).sum(-1)))[:4]
        assert support[0] == m_star
        e = np.exp(np.sqrt(((q[top] - b[support]) ** 2).sum(-1)))
        w = 1 - e[0] / e.sum()
        assert float(out["image_weight"][i]) == pytest.approx(w, rel=1e-5)
        assert float(out["patch_scores"][i].max()) == pytest.approx(s_star, rel=1e-5)
        unweighted = head.anomaly_map(out["patch_scores"][i:i + 1])
        torch.testing.assert_close(out["pred"][i:i + 1], unweighted * w, rtol=1e-5,
                                   atol=1e-6, check_dtype=False)
    assert 0 < float(out["image_weight"].min()) and float(out["image_weight"].max()) < 1


def test_reweighting_keeps_m_star_first_among_duplicates():
    bank = torch.tensor([[0.0, 0.0], [0.0, 0.0], [5.0, 0.0]])
    w = reweighting(torch.tensor([[1.0, 0.0]]), torch.tensor([1]), bank, 2)
    assert float(w) == pytest.approx(1 - 1 / 2)  # m* and its duplicate: equal weights
    w3 = reweighting(torch.tensor([[1.0, 0.0]]), torch.tensor([0]), bank, 3)
    e = [math.exp(1), math.exp(1), math.exp(4)]
    assert float(w3) == pytest.approx(1 - e[0] / sum(e))


def test_fit_keeps_the_greedy_coreset_of_every_patch():
    g = torch.Generator().manual_seed(2)
    feats = [torch.randn(3, 8, 4, 4, generator=g) for _ in range(2)]
    batches = [{"features": f, "index": torch.arange(3) + 3 * i,
                "cls": torch.tensor([0, 1, 1])} for i, f in enumerate(feats)]
    data = StageOneData(["a", "b"], iter(batches), 2, 6, iter(()), 0, False,
                        torch.device("cpu"))
    head = PatchCore(inplanes=[8], instrides=[4], input_size=[16, 16], coreset_ratio=0.1,
                     coreset_proj_dim=0, seed=3)
    info = head.fit(data)
    rows = torch.cat([f.permute(0, 2, 3, 1).reshape(-1, 8) for f in feats])
    idx, radius = greedy_coreset(rows, math.ceil(0.1 * len(rows)), proj_dim=0, seed=3)
    assert torch.equal(head.memory_bank, rows[idx])
    assert info["memory_bank"] == len(idx) == 10 and info["classes"] == 2
    assert sum(info["memories_per_class"].values()) == 10
    assert info["covering_radius"] == pytest.approx(radius)
    # the memory is state: a fresh head loads it from the state dict
    fresh = PatchCore(inplanes=[8], instrides=[4], input_size=[16, 16])
    fresh.load_state_dict(head.state_dict())
    assert torch.equal(fresh.memory_bank, head.memory_bank)
    assert fresh.class_names == ["a", "b"]


def test_bad_settings_are_refused_by_name():
    from dualmem.utils.errors import UserError

    with pytest.raises(UserError, match="coreset_ratio"):
        PatchCore(inplanes=[8], coreset_ratio=0)
    with pytest.raises(UserError, match="reweight_neighbors"):
        PatchCore(inplanes=[8], reweight_neighbors=0)
    with pytest.raises(UserError, match="one feature map"):
        PatchCore(inplanes=[8, 8])


def tiny_patchcore_net():
    return [
        {"name": "backbone", "type": "models.backbones.resnet18", "frozen": True,
         "kwargs": {"pretrained": False, "outlayers": [1, 2]}},
        {"name": "neck", "prev": "backbone", "type": "models.necks.PatchCoreNeck",
         "kwargs": {"out_dim": 48, "projection": "random", "seed": 1}},
        {"name": "head", "prev": "neck", "type": "models.heads.PatchCore",
         "kwargs": {"coreset_ratio": 0.25, "coreset_proj_dim": 16}},
    ]


@pytest.mark.slow
def test_patchcore_fits_without_training_evaluates_and_exports(tmp_path):
    """Stage one is the whole fit: no optimizer steps, one evaluation; --evaluate gives the
    same numbers from the folder; the ONNX export passes its parity check."""
    import json

    import yaml

    from conftest import ROOT, synthetic_dataset
    from dualmem.tools import export, train_val

    cfg = {"_base_": str(ROOT / "experiments/MVTec-AD/patchcore/config.yaml"),
           "random_seed": 3,
           "dataset": dict(synthetic_dataset(tmp_path / "data", seed=4, num_train=6,
                                             num_test_good=3, num_test_defect=2)),
           "net": tiny_patchcore_net()}
    cfg["dataset"]["input_size"] = [64, 64]
    path = tmp_path / "pc.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"
    common = ["--no_progress", "--device", "cpu"]
    assert train_val.main(["--config", str(path), "--work_dir", str(run)] + common) == 0
    res = json.loads((run / "results.json").read_text())
    assert res["protocol"]["method"] == "PatchCore"
    assert res["protocol"]["training"].startswith("none")
    log = (run / "log.txt").read_text()
    assert "nothing to train" in log and "PatchCore memory" in log
    # random-weight features still find the synthetic defects (pixel level)
    assert res["mean"]["pixel_auroc"] > 0.75, res["mean"]
    state = torch.load(run / "checkpoints" / "last.pth", weights_only=True)
    assert state["optimizer"] is None
    assert state["model"]["head.memory_bank"].shape[0] > 0
    assert train_val.main(["--work_dir", str(run), "--evaluate"] + common) == 0
    again = json.loads(sorted((run / "evaluations").glob("*/results.json"))[-1].read_text())
    for cls, values in res["per_class"].items():
        assert again["per_class"][cls]["image_auroc"] == pytest.approx(values["image_auroc"])
        assert again["per_class"][cls]["pixel_ap"] == pytest.approx(values["pixel_ap"])
    out = tmp_path / "pc.onnx"
    assert export.main(["--work_dir", str(run), "--format", "onnx", "--output", str(out),
                        "--device", "cpu"]) == 0
    meta = json.loads((tmp_path / "pc.onnx.json").read_text())  # exit 0: parity held
    assert meta["parity"]["test images"]["rank_changes"] in (0, None, [])
    assert "PatchCore" in meta["methods"][-1]
