"""Reading images and masks with errors that name the file, shared by training and predict."""
from pathlib import Path

import cv2
import numpy as np
import torch

from dualmem.utils.errors import UserError


class ImageReadError(UserError):
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


# dataset.resize: how images (and their masks) are brought to dataset.input_size.
#   antialias   PIL's bilinear with antialiasing (Image.resize(..., BILINEAR)), masks PIL's
#               pixel-centred nearest: what UniAD and the other reference code bases do
#   cv2_linear  OpenCV INTER_LINEAR (no antialiasing: a 900 -> 224 downscale aliases), masks
#               OpenCV INTER_NEAREST (corner-aligned): DualMem before dataset.resize existed
RESIZE_METHODS = ("antialias", "cv2_linear")
# a config without dataset.resize (an old checkpoint or run folder) was trained with this;
# configs/runtime.yaml sets 'antialias' for new configs
LEGACY_RESIZE = "cv2_linear"


def resize_method(ds_cfg):
    """``dataset.resize`` of a config's dataset section; absent means :data:`LEGACY_RESIZE`."""
    method = (ds_cfg or {}).get("resize", LEGACY_RESIZE)
    return check_resize(method)


def check_resize(method):
    if method not in RESIZE_METHODS:
        raise UserError(f"dataset.resize must be one of {list(RESIZE_METHODS)}, got {method!r}")
    return method


def _pil_resize(arr, size_hw, resample):
    """``arr`` resized by Pillow: uint8 grey/RGB/RGBA directly, anything else channel by
    channel as 32-bit float images (integer types rounded back)."""
    from PIL import Image

    h, w = size_hw
    arr = np.ascontiguousarray(arr)
    if arr.dtype == np.uint8 and (arr.ndim == 2 or arr.shape[2] in (3, 4)):
        return np.array(Image.fromarray(arr).resize((w, h), resample))
    planes = arr[..., None] if arr.ndim == 2 else arr
    out = np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(planes[..., c],
                                                                    dtype=np.float32))
                               .resize((w, h), resample)) for c in range(planes.shape[2])],
                   axis=2)
    if arr.ndim == 2:
        out = out[..., 0]
    if arr.dtype.kind in "ui":
        info = np.iinfo(arr.dtype)
        out = np.clip(np.rint(out), info.min, info.max)
    return out.astype(arr.dtype, copy=False)


def resize_image(img, size_hw, method):
    """``img`` (HxW or HxWxC) to ``size_hw`` = (h, w) by ``method`` (see RESIZE_METHODS).

    The one image resize behind everything that feeds a model (dataset, predict, pseudo
    anomalies' self textures, panels), so training and prediction cannot differ.
    """
    h, w = size_hw
    if img.shape[:2] == (h, w):
        return img
    if check_resize(method) == "cv2_linear":
        return cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR)
    from PIL import Image

    return _pil_resize(img, (h, w), Image.BILINEAR)


def resize_mask(mask, size_hw, method):
    """Nearest neighbour (pixel-centred for 'antialias', OpenCV's corner-aligned for
    'cv2_linear'), then binarised: a mask stays a mask."""
    h, w = size_hw
    if mask.shape[:2] != (h, w):
        if check_resize(method) == "cv2_linear":
            mask = cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST)
        else:
            from PIL import Image

            mask = _pil_resize(mask.astype(np.float32, copy=False), (h, w), Image.NEAREST)
    return (mask > 0.5).astype(np.float32)


def to_chw_uint8(img):
    """HxWx3 or HxW uint8 array -> 3xHxW uint8 tensor (grey repeated to three channels)."""
    t = torch.from_numpy(np.ascontiguousarray(img))
    if t.ndim == 2:
        return t.unsqueeze(0).repeat(3, 1, 1)
    return t.permute(2, 0, 1).contiguous()


def normalize(image, mean, std):
    x = image.float().div_(255.0)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return (x - mean_t) / std_t


def model_input(img, input_size, resize, mean, std, augment=None, mask=None):
    """The one way an image becomes the model's input, in training, evaluation, ``predict.py``,
    the Python API and the runner of exported models: resize (``dataset.resize``), uint8
    CxHxW, the training augmentation when given (on image and ``mask`` together), then scale
    to [0, 1] and normalise. Returns ``(image, mask)``."""
    image = to_chw_uint8(resize_image(img, input_size, resize))
    if augment is not None:
        image, mask = augment(image, mask)
    return normalize(image, mean, std), mask
