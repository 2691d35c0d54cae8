"""ADer's ``meta.json`` (``{"train"|"test": {cls: [{img_path, mask_path, cls_name,
specie_name, anomaly}]}}``), paths relative to the folder holding it, as UniAD manifests."""
import json
from pathlib import Path

from dualmem.datasets.prepare.common import Prepared, PrepareError, stat_fingerprint

META_NAME = "meta.json"
KEYS = ("img_path", "mask_path", "cls_name", "anomaly")


def meta_path(path):
    path = Path(path).resolve()
    if path.is_dir():
        path = path / META_NAME
    if not path.is_file():
        raise PrepareError(f"ADer meta file not found: {path}")
    return path


def build(meta, root=None, classes=None):
    path = meta_path(meta)
    root = Path(root).resolve() if root else path.parent
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise PrepareError(f"{path}: malformed JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, dict) or not isinstance(data.get("train"), dict) or \
            not isinstance(data.get("test"), dict):
        raise PrepareError(f"{path}: expected {{\"train\": {{class: [...]}}, \"test\": "
                           f"{{class: [...]}}}} (ADer format)")
    available = list(dict.fromkeys([*data["train"], *data["test"]]))
    if classes:
        unknown = [c for c in classes if c not in available]
        if unknown:
            raise PrepareError(f"unknown class(es) {unknown} in {path}; available: {available}")
    out = {}
    for split in ("train", "test"):
        recs = []
        for cls, items in data[split].items():
            if classes and cls not in classes:
                continue
            if not isinstance(items, list):
                raise PrepareError(f"{path}: {split}.{cls} must be a list")
            for i, item in enumerate(items):
                where = f"{path}: {split}.{cls}[{i}]"
                if not isinstance(item, dict) or any(k not in item for k in KEYS):
                    raise PrepareError(f"{where}: expected keys {', '.join(KEYS)}, got "
                                       f"{sorted(item) if isinstance(item, dict) else item!r}")
                label = item["anomaly"]
                if isinstance(label, bool) or label not in (0, 1):
                    raise PrepareError(f"{where}: 'anomaly' must be 0 or 1, got {label!r}")
                if item["cls_name"] != cls:
                    raise PrepareError(f"{where}: cls_name {item['cls_name']!r} differs from "
                                       f"its key {cls!r}")
                rec = {"filename": item["img_path"], "label": int(label),
                       "label_name": "defective" if label else "good"}
                if item.get("mask_path"):
                    rec["maskname"] = item["mask_path"]
                rec["clsname"] = cls
                if item.get("specie_name"):
                    rec["specie_name"] = item["specie_name"]
                recs.append(rec)
        out[split] = recs
    return Prepared(out["train"], out["test"], str(root), source=f"ADer meta {path}")


def fingerprint(meta, root=None, classes=None):
    return stat_fingerprint([meta_path(meta)])
