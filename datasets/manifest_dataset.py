"""The dataset every protocol ends in: UniAD manifest records -> normalised tensors + masks."""
import random

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from datasets.image_io import (read_image, read_mask, resize_image, resize_mask,
                               to_tensor_normalized)


class Augment:
    """Train-time flips/rotation/colour jitter applied jointly to image and mask.

    Uses Python's ``random`` so a worker's seed (set by the DataLoader) fixes it.
    """

    def __init__(self, hflip=False, vflip=False, rotate=False, color_jitter=None):
        self.hflip = float(hflip) if not isinstance(hflip, bool) else (0.5 if hflip else 0.0)
        self.vflip = float(vflip) if not isinstance(vflip, bool) else (0.5 if vflip else 0.0)
        # rotate: true -> random multiple of 90 degrees (UniAD); a number -> +- that many degrees
        self.rotate = rotate
        self.color_jitter = color_jitter

    @property
    def active(self):
        return bool(self.hflip or self.vflip or self.rotate or self.color_jitter)

    def __call__(self, img, mask):
        if self.hflip and random.random() < self.hflip:
            img, mask = img[:, ::-1], mask[:, ::-1]
        if self.vflip and random.random() < self.vflip:
            img, mask = img[::-1], mask[::-1]
        if self.rotate is True:
            k = random.randint(0, 3)
            img, mask = np.rot90(img, k), np.rot90(mask, k)
        elif self.rotate:
            angle = random.uniform(-float(self.rotate), float(self.rotate))
            h, w = img.shape[:2]
            m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0)
            img = cv2.warpAffine(np.ascontiguousarray(img), m, (w, h),
                                 flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
            mask = cv2.warpAffine(np.ascontiguousarray(mask), m, (w, h),
                                  flags=cv2.INTER_NEAREST)
        if self.color_jitter:
            cj = self.color_jitter
            if random.random() < cj.get("prob", 1.0):
                x = img.astype(np.float32)
                b = cj.get("brightness", 0)
                c = cj.get("contrast", 0)
                if b:
                    x = x * random.uniform(1 - b, 1 + b)
                if c:
                    mean = x.mean()
                    x = (x - mean) * random.uniform(1 - c, 1 + c) + mean
                s = cj.get("saturation", 0)
                if s and x.ndim == 3:
                    grey = x.mean(axis=2, keepdims=True)
                    x = (x - grey) * random.uniform(1 - s, 1 + s) + grey
                img = np.clip(x, 0, 255).astype(np.uint8)
        return np.ascontiguousarray(img), np.ascontiguousarray(mask)


class ManifestDataset(Dataset):
    def __init__(self, records, image_dir, input_size, pixel_mean, pixel_std,
                 color_mode="RGB", augment=None):
        self.records = list(records)
        self.image_dir = image_dir
        self.input_size = tuple(input_size)
        self.pixel_mean, self.pixel_std = tuple(pixel_mean), tuple(pixel_std)
        self.color_mode = color_mode
        self.augment = augment

    def __len__(self):
        return len(self.records)

    def path_of(self, name):
        import os

        return name if os.path.isabs(name) or not self.image_dir else \
            os.path.join(self.image_dir, name)

    def __getitem__(self, index):
        rec = self.records[index]
        img = read_image(self.path_of(rec["filename"]), self.color_mode)
        label = int(rec["label"])
        if rec.get("maskname"):
            mask = read_mask(self.path_of(rec["maskname"]), expected_hw=img.shape[:2])
        else:  # UniAD's rule: no mask = all normal for good, all anomalous for defective
            mask = np.full(img.shape[:2], float(label), dtype=np.float32)
        img = resize_image(img, self.input_size)
        mask = resize_mask(mask, self.input_size)
        if self.augment is not None:
            img, mask = self.augment(img, mask)
        return {
            "image": to_tensor_normalized(img, self.pixel_mean, self.pixel_std),
            "mask": torch.from_numpy(mask).unsqueeze(0),
            "label": label,
            "clsname": rec["clsname"],
            "filename": rec["filename"],
            "index": index,
        }
