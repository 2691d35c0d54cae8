"""Reading images and masks with errors that name the file, shared by training and predict."""
from pathlib import Path

import cv2
import numpy as np


class ImageReadError(ValueError):
    pass


def read_image(path, color_mode="RGB"):
    """HxWx3 uint8 RGB (or BGR), or HxW for GRAY; grey files are expanded to 3 channels."""
    path = str(path)
    if not Path(path).is_file():
        raise ImageReadError(f"image not found: {path}")
    flag = cv2.IMREAD_GRAYSCALE if color_mode == "GRAY" else cv2.IMREAD_COLOR
    img = cv2.imread(path, flag)
    if img is None:
        raise ImageReadError(f"cannot decode image (corrupt or not an image): {path}")
    if color_mode == "RGB":
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    return img


def read_mask(path, expected_hw=None):
    """Binary float32 HxW mask (> 127 counts as anomalous) at the image's original size."""
    path = str(path)
    if not Path(path).is_file():
        raise ImageReadError(f"mask not found: {path}")
    mask = cv2.imread(path, cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise ImageReadError(f"cannot decode mask (corrupt or not an image): {path}")
    if expected_hw is not None and tuple(mask.shape[:2]) != tuple(expected_hw):
        raise ImageReadError(f"mask {path} is {mask.shape[1]}x{mask.shape[0]} but its image is "
                             f"{expected_hw[1]}x{expected_hw[0]} (width x height)")
    return (mask > 127).astype(np.float32)


def resize_image(img, size_hw):
    h, w = size_hw
    if img.shape[:2] == (h, w):
        return img
    return cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR)


def resize_mask(mask, size_hw):
    """Nearest neighbour, then binarised: a mask stays a mask."""
    h, w = size_hw
    if mask.shape[:2] != (h, w):
        mask = cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST)
    return (mask > 0.5).astype(np.float32)


def to_tensor_normalized(img, mean, std):
    """uint8 HxWxC -> float CxHxW in the normalisation the backbone's weights expect."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(img)).float().div_(255.0)
    if x.ndim == 2:
        x = x.unsqueeze(-1).expand(-1, -1, 3)
    x = x.permute(2, 0, 1)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return (x - mean_t) / std_t
