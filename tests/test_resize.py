"""dataset.resize: 'antialias' (PIL bilinear with antialiasing, PIL's pixel-centred nearest for
masks, as UniAD resizes) and 'cv2_linear' (OpenCV INTER_LINEAR / INTER_NEAREST, the old
behaviour), checked against PIL and OpenCV themselves on real-size (900 px) inputs."""
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
from easydict import EasyDict
from PIL import Image

from dualmem.datasets.builder import build_datasets
from dualmem.datasets.image_io import LEGACY_RESIZE, resize_image, resize_mask, resize_method
from dualmem.datasets.manifest_dataset import ManifestDataset

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def textured(size=900, seed=0):
    """A photo-like 900 px RGB image: gradients, fine stripes, a disc and noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    img = np.stack([96 + 80 * np.sin(x / 3.1) * np.cos(y / 17.0),
                    40 + 150 * x / size,
                    128 + 60 * np.sin((x + 2 * y) / 5.3)], axis=2)
    img[(x - 600) ** 2 + (y - 300) ** 2 < 150 ** 2] += 50
    img += rng.normal(0, 20, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def pil_bilinear(img, size):
    return np.asarray(Image.fromarray(img).resize((size, size), Image.BILINEAR))


def blob_mask(size=900):
    """An off-centre ellipse (0/1 float32), like a defect annotation."""
    y, x = np.mgrid[0:size, 0:size]
    return (((x - 641) / 57.0) ** 2 + ((y - 233) / 31.0) ** 2 <= 1).astype(np.float32)


def centroid(mask):
    ys, xs = np.nonzero(mask)
    return np.array([ys.mean(), xs.mean()])


@pytest.mark.parametrize("size", [224, 256])
def test_antialias_matches_pil_bilinear_on_real_size_images(size):
    img = textured()
    ours = resize_image(img, (size, size), "antialias")
    assert ours.shape == (size, size, 3) and ours.dtype == np.uint8
    assert np.abs(ours.astype(float) - pil_bilinear(img, size)).mean() <= 1.0
    grey = img[:, :, 1].copy()  # GRAY colour mode: HxW
    ref = np.asarray(Image.fromarray(grey).resize((size, size), Image.BILINEAR))
    assert np.abs(resize_image(grey, (size, size), "antialias").astype(float) - ref).mean() <= 1


def test_white_noise_keeps_pils_std_after_900_to_224():
    noise = np.random.default_rng(1).integers(0, 256, (900, 900, 3), dtype=np.uint8)
    ref = pil_bilinear(noise, 224).std()
    ours = resize_image(noise, (224, 224), "antialias").std()
    assert abs(ours - ref) <= 0.05 * ref, (ours, ref)
    assert ours < 20  # aliasing would keep most of the noise (std about 49)


def test_antialias_mask_centroid_matches_pil_nearest():
    mask = blob_mask()
    ref = np.asarray(Image.fromarray((mask * 255).astype(np.uint8)).resize((224, 224),
                                                                        Image.NEAREST)) > 127
    ours = resize_mask(mask, (224, 224), "antialias")
    assert ours.dtype == np.float32 and set(np.unique(ours)) <= {0.0, 1.0}
    assert np.abs(centroid(ours) - centroid(ref)).max() <= 0.25
    # and on the image grid: centre of output pixel i is source coordinate (i + 0.5) * 900/224
    scale = 900 / 224
    assert np.abs((centroid(ours) + 0.5) * scale - 0.5 - centroid(mask)).max() <= 0.25 * scale


def test_cv2_linear_reproduces_opencv_exactly():
    img, mask = textured(seed=2), blob_mask()
    np.testing.assert_array_equal(resize_image(img, (224, 256), "cv2_linear"),
                                  cv2.resize(img, (256, 224), interpolation=cv2.INTER_LINEAR))
    ref = cv2.resize(mask, (256, 224), interpolation=cv2.INTER_NEAREST) > 0.5
    np.testing.assert_array_equal(resize_mask(mask, (224, 256), "cv2_linear"),
                                  ref.astype(np.float32))


def test_method_is_checked_and_a_config_without_it_means_cv2_linear():
    assert resize_method({}) == LEGACY_RESIZE == "cv2_linear"  # old checkpoints / run folders
    assert resize_method({"resize": "antialias"}) == "antialias"
    with pytest.raises(ValueError, match="dataset.resize"):
        resize_image(textured(60), (30, 30), "bicubic")
    from dualmem.utils.config import ConfigError, validate_config
    with pytest.raises(ConfigError, match="resize"):
        validate_config({"dataset": {"resize": "bicubic"}})
    validate_config({"dataset": {"resize": "antialias"}})


def test_new_configs_default_to_antialias():
    from conftest import ROOT
    from dualmem.utils.config import load_config

    for cfg in ("experiments/MVTec-AD/uniad/lite.yaml", "experiments/MVTec-AD/dmad/lite.yaml"):
        assert load_config(ROOT / cfg).dataset.resize == "antialias"


def test_dataset_honours_dataset_resize(tmp_path):
    from tests.test_prepare_data import make_mvtec

    root = make_mvtec(tmp_path / "m", classes=("a",), defects=("crack",), size=(90, 90))
    img = textured(90, seed=3)
    assert cv2.imwrite(str(root / "a" / "train" / "good" / "000.png"), img[:, :, ::-1])
    assert cv2.imwrite(str(root / "a" / "ground_truth" / "crack" / "000_mask.png"),
                       (blob_mask(90) * 255).astype(np.uint8))
    expected_img = {"antialias": np.asarray(Image.fromarray(img).resize((32, 32),
                                                                      Image.BILINEAR)),
                    "cv2_linear": cv2.resize(img, (32, 32), interpolation=cv2.INTER_LINEAR)}
    pil_mask = np.asarray(Image.fromarray((blob_mask(90) * 255).astype(np.uint8))
                          .resize((32, 32), Image.NEAREST)) > 127
    expected_mask = {"antialias": pil_mask,
                     "cv2_linear": cv2.resize(blob_mask(90), (32, 32),
                                              interpolation=cv2.INTER_NEAREST) > 0.5}
    seen = {}
    for method in ("antialias", "cv2_linear", None):
        ds = {"type": "mvtec", "data_root": str(root), "input_size": [32, 32]}
        if method:
            ds["resize"] = method
        cfg = EasyDict({"random_seed": 0, "config_path": str(tmp_path / "c.yaml"), "dataset": ds})
        train, test, _ = build_datasets(cfg, MEAN, STD)
        want = method or "cv2_linear"
        assert train.resize == test.resize == want
        i = [r["filename"].endswith("train/good/000.png") for r in train.records].index(True)
        x = train[i]["image"].permute(1, 2, 0).numpy() * np.array(STD) + np.array(MEAN)
        np.testing.assert_allclose(x * 255, expected_img[want], atol=1e-3)
        j = [str(r.get("maskname", "")).endswith("crack/000_mask.png")
             for r in test.records].index(True)
        np.testing.assert_array_equal(test[j]["mask"][0].numpy(), expected_mask[want])
        seen[method] = x
    assert not np.allclose(seen["antialias"], seen["cv2_linear"])


def test_everything_else_follows_the_datasets_method(tmp_path):
    """Self textures, panels' images and the feature-cache key use the dataset's method."""
    from dualmem.datasets.pseudo_anomaly_synthesis import self_image_loader
    from dualmem.utils.engine.feature_cache import cache_key
    from dualmem.utils.visualize import display_image

    img = textured(90, seed=4)
    assert cv2.imwrite(str(tmp_path / "a.png"), img[:, :, ::-1])
    rec = {"filename": "a.png", "label": 0, "clsname": "c"}
    keys = set()
    for method in ("antialias", "cv2_linear"):
        ds = ManifestDataset([rec], str(tmp_path), (32, 32), MEAN, STD, resize=method)
        want = resize_image(img, (32, 32), method)
        np.testing.assert_array_equal(self_image_loader(ds)[1](0), want)
        np.testing.assert_array_equal(display_image(ds, 0), want)
        x = ds[0]["image"].permute(1, 2, 0).numpy() * np.array(STD) + np.array(MEAN)
        np.testing.assert_allclose(x * 255, want, atol=1e-3)
        keys.add(cache_key(SimpleNamespace(frozen_prefix=[]), ds, [], torch.float32, "train"))
    assert len(keys) == 2
