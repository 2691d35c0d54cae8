"""The dataset every protocol ends in: UniAD manifest records -> normalised tensors + masks."""
import os

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from dualmem.datasets.image_io import (LEGACY_RESIZE, ImageReadError, check_resize,  # noqa: F401
                               model_input, normalize, read_image, resize_mask, to_chw_uint8)
from dualmem.utils.errors import UserError


def read_binary_mask(path, expected_hw=None):
    """Float32 HxW mask of 0/1 at the image's original size.

    Masks come as 0/255 (MVTec) or as small label values 0, 1..k (raw VisA, many label tools).
    A mask whose largest value is in the lower half of its type's range is a label mask: any
    non-zero pixel is anomalous; otherwise the threshold is half the range (> 127 for 8 bit),
    which keeps lossy 0/255 masks clean. Colour masks count a pixel if any channel does.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise ImageReadError(f"mask not found: {path}")
    mask = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if mask is None:
        raise ImageReadError(f"cannot decode mask (corrupt or not an image): {path}")
    if mask.ndim == 3:
        mask = mask[:, :, :3].max(axis=2)
    if expected_hw is not None and tuple(mask.shape[:2]) != tuple(expected_hw):
        raise ImageReadError(f"mask {path} is {mask.shape[1]}x{mask.shape[0]} but its image is "
                             f"{expected_hw[1]}x{expected_hw[0]} (width x height)")
    half = np.iinfo(mask.dtype).max // 2 if mask.dtype.kind in "ui" else 0.5
    threshold = 0 if mask.max() <= half else half
    return (mask > threshold).astype(np.float32)


class RandomRot90(v2.Transform):
    """A random multiple of 90 degrees (UniAD's ``rotate: true``): exact, no interpolation.

    A non-square input only gets 0 or 180 degrees so that every sample keeps the batch shape.
    """

    def make_params(self, flat_inputs):
        return {"k": int(torch.randint(4, ()).item())}

    def transform(self, inpt, params):
        k = params["k"]
        if inpt.shape[-1] != inpt.shape[-2] and k % 2:
            k = (k + 1) % 4
        out = torch.rot90(inpt, k, dims=(-2, -1))
        if isinstance(inpt, (tv_tensors.Image, tv_tensors.Mask)):
            out = tv_tensors.wrap(out, like=inpt)
        return out


class Augment:
    """Train-time flips, rotation and colour jitter, applied jointly to image and mask with
    torchvision.transforms.v2 (geometric ops move the mask with the image, nearest-neighbour
    for arbitrary angles; colour ops leave the mask alone).

    ``hflip``/``vflip``: true (p = 0.5) or a probability. ``rotate``: true = random multiple of
    90 degrees, a number = uniform in +- that many degrees (corners filled with 0).
    ``color_jitter``: torchvision ColorJitter's brightness/contrast/saturation/hue, applied
    with probability ``prob`` (default 1). Randomness comes from torch's generator, which the
    DataLoader seeds per worker and checkpoints save.
    """

    def __init__(self, hflip=False, vflip=False, rotate=False, color_jitter=None):
        self.hflip = float(hflip) if not isinstance(hflip, bool) else (0.5 if hflip else 0.0)
        self.vflip = float(vflip) if not isinstance(vflip, bool) else (0.5 if vflip else 0.0)
        for name, p in (("hflip", self.hflip), ("vflip", self.vflip)):
            if not 0.0 <= p <= 1.0:
                raise UserError(f"dataset.train.{name} must be a bool or a probability in "
                                 f"[0, 1], got {p}")
        self.rotate = rotate
        self.color_jitter = dict(color_jitter or {})
        unknown = set(self.color_jitter) - {"brightness", "contrast", "saturation", "hue",
                                            "prob"}
        if unknown:
            raise UserError(f"dataset.train.color_jitter: unknown key(s) {sorted(unknown)}")
        ops = []
        if self.hflip:
            ops.append(v2.RandomHorizontalFlip(self.hflip))
        if self.vflip:
            ops.append(v2.RandomVerticalFlip(self.vflip))
        if rotate is True:
            ops.append(RandomRot90())
        elif rotate:
            ops.append(v2.RandomRotation(float(rotate),
                                         interpolation=v2.InterpolationMode.BILINEAR))
        jitter = {k: v for k, v in self.color_jitter.items() if k != "prob" and v}
        if jitter:
            ops.append(v2.RandomApply([v2.ColorJitter(**jitter)],
                                      p=float(self.color_jitter.get("prob", 1.0))))
        self.transform = v2.Compose(ops) if ops else None

    @property
    def active(self):
        return self.transform is not None

    def __call__(self, image, mask):
        """``image`` uint8 CxHxW, ``mask`` float 1xHxW (tensors) -> the same, transformed."""
        if self.transform is None:
            return image, mask
        img, msk = self.transform(tv_tensors.Image(image), tv_tensors.Mask(mask))
        return img.as_subclass(torch.Tensor), msk.as_subclass(torch.Tensor)


class ManifestDataset(Dataset):
    """Images resized to ``input_size`` by ``resize`` (``dataset.resize``: 'antialias' or
    'cv2_linear', see datasets/image_io.py); masks resized nearest and binarised.

    Missing masks follow UniAD: all zeros for a good image, all ones for a defective one.
    """

    def __init__(self, records, image_dir, input_size, pixel_mean, pixel_std,
                 color_mode="RGB", augment=None, resize=LEGACY_RESIZE):
        self.records = list(records)
        self.image_dir = image_dir
        self.input_size = tuple(input_size)
        self.pixel_mean, self.pixel_std = tuple(pixel_mean), tuple(pixel_std)
        self.color_mode = color_mode
        self.augment = augment
        self.resize = check_resize(resize)

    def __len__(self):
        return len(self.records)

    def path_of(self, name):
        return name if os.path.isabs(name) or not self.image_dir else \
            os.path.join(self.image_dir, name)

    def __getitem__(self, index):
        rec = self.records[index]
        img = read_image(self.path_of(rec["filename"]), self.color_mode)
        label = int(rec["label"])
        if rec.get("maskname"):
            mask = read_binary_mask(self.path_of(rec["maskname"]), expected_hw=img.shape[:2])
        else:  # UniAD's rule: no mask = all normal for good, all anomalous for defective
            mask = np.full(img.shape[:2], float(label), dtype=np.float32)
        mask = torch.from_numpy(resize_mask(mask, self.input_size, self.resize)).unsqueeze(0)
        image, mask = model_input(img, self.input_size, self.resize, self.pixel_mean,
                                  self.pixel_std, self.augment, mask)
        return {
            "image": image,
            "mask": mask.contiguous(),
            "label": label,
            "clsname": rec["clsname"],
            "filename": rec["filename"],
            "index": index,
        }
