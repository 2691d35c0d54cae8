"""DMAD: dual memory bank enhanced representation learning for anomaly detection
(arXiv 2403.12362), for the unified unsupervised and semi-supervised settings.

The paper has no public code; everything it leaves open is a kwarg whose default is OUR choice,
marked "(ours)" below and in ``experiments/*/dmad/README.md``.

Stage one (:meth:`DMAD.prepare`, called by the Trainer before the first epoch) builds two banks
of patch features from the frozen prefix (backbone + :class:`PatchCoreNeck`) in one pass over
the normal training images:

* normal bank: greedy k-center coreset (random projection to ``coreset_proj_dim`` = 128 for
  the distance computations) keeping ``coreset_ratio`` = 0.02 of the patches (paper), at most
  ``max_normal_bank``; one bank over all classes (unified, default) or with ``bank_per_class``
  each image retrieves only from its class (the class is routed at test time to the class
  whose memories fit the image best, so no label is needed).
* abnormal bank: ``pseudo_per_image`` DRAEM pseudo anomalies per normal image (recipe from
  ``pseudo_anomaly`` or, when null, from ``dataset.train.pseudo_anomaly``, else procedural
  textures); the Filter keeps the patches whose area inside the down-sampled mask is
  > ``filter_threshold`` = 0.5; coreset to ``abnormal_coreset_ratio`` = 0.1 (ours), at most
  ``max_abnormal_bank``. Seen (annotated) anomalies in the training set add their filtered
  patches, and anomaly center sampling adds, per class, ``num_centers`` = 8 k-means centres of
  those real patches and ``center_samples`` = 8 samples around each centre
  (``centre + center_spread * r * u``, u ~ N(0, I / C), r the cluster's RMS radius,
  ``center_spread`` = 0.5; ours). The abnormal bank is shared by all classes (the paper finds
  anomalies transfer across classes).
* memory cap: all bank buffers together stay under ``bank_memory_mb``; the normal bank may use
  up to 80 % of it (ours), the abnormal bank what is left.

Stage two trains the score head. For every patch q: distances to the nearest normal and
abnormal memories (``distance``), residuals q - m_n and q - m_a (``residual``), and attention
read-outs over the ``topk`` = 5 nearest memories of each bank, softmax(-d / (temperature *
dist_scale)) (``attention``); ``dist_scale`` is the mean nearest-normal distance of training
patches (ours). The parts chosen in ``knowledge`` (with q itself, ``include_query``) are
concatenated into a 1x1-conv MLP (``hidden``) giving patch logits. While training, memories
taken from the same image are excluded (``exclude_self``, ours), so training distances look
like test distances. Map: sigmoid(logits), bilinear to the input size, Gaussian blur with
``sigma`` = 4. Losses (:class:`PatchFocalLoss`, :class:`PatchBCELoss`) compare the logits with
the fraction of each patch inside the mask (``target: soft``, ours) or the Filter's 0/1.
"""
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from models.heads.memory_bank import (StreamingCoreset, downsample_mask, filter_patches,
                                      greedy_coreset, kmeans, knn, min_distance_per_group)
from models.losses import LOSSES
from models.registry import MODELS

KNOWLEDGE_PARTS = ("distance", "residual", "attention")
BANK_BUFFERS = ("normal_bank", "normal_src", "normal_cls", "abnormal_bank", "abnormal_src",
                "abnormal_cls", "abnormal_kind")
KIND_PSEUDO, KIND_REAL, KIND_CENTRE, KIND_SAMPLE = 0, 1, 2, 3
NORMAL_SHARE = 0.8
BANK_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def gaussian_blur(x, sigma, truncate=4.0):
    """Separable Gaussian blur of (B, 1, H, W) (scipy's kernel: radius round(truncate*sigma))."""
    if not sigma or sigma <= 0:
        return x
    radius = int(truncate * sigma + 0.5)
    t = torch.arange(-radius, radius + 1, dtype=torch.float32, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = (k / k.sum()).to(x.dtype)
    h, w = x.shape[-2:]
    mode = "reflect" if radius < min(h, w) else "replicate"
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode=mode), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode=mode), k.view(1, 1, -1, 1))


class _BankImages(Dataset):
    """Plain training images for bank building, with ``passes`` pseudo anomalies each."""

    def __init__(self, dataset, indices, class_ids, synth=None, passes=0, seed=0):
        self.dataset, self.indices, self.class_ids = dataset, list(indices), class_ids
        self.synth, self.passes, self.seed = synth, int(passes), int(seed)

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, j):
        from datasets.pseudo_anomaly import STREAM_BANK, apply_pseudo_anomaly, sample_rng

        i = self.indices[j]
        item = self.dataset[i]
        out = {"image": item["image"], "mask": item["mask"], "index": i,
               "cls": self.class_ids[item["clsname"]]}
        if self.passes:
            pseudo = [apply_pseudo_anomaly(item, self.synth, sample_rng(self.seed, p, i,
                                                                        STREAM_BANK),
                                           self.dataset.pixel_mean, self.dataset.pixel_std, i)
                      for p in range(self.passes)]
            out["pseudo_image"] = torch.stack([p["image"] for p in pseudo])
            out["pseudo_mask"] = torch.stack([p["mask"] for p in pseudo])
        return out


@MODELS.register(name="DMAD", path="models.heads")
class DMAD(nn.Module):
    learns_from_anomalies = True  # labelled anomalies in the training set are meant for it

    def __init__(self, inplanes, instrides=None, input_size=None, feature_size=None,
                 coreset_ratio=0.02, max_normal_bank=20000, coreset_proj_dim=128,
                 coreset_buffer_mb=512, bank_per_class=False,
                 abnormal_coreset_ratio=0.1, max_abnormal_bank=10000, pseudo_per_image=1,
                 pseudo_anomaly=None, filter_threshold=0.5,
                 num_centers=8, center_samples=8, center_spread=0.5,
                 bank_memory_mb=1024, bank_dtype="float32",
                 knowledge=KNOWLEDGE_PARTS, include_query=True, topk=5, temperature=1.0,
                 exclude_self=True, hidden=(256, 64), dropout=0.0, prior=0.01,
                 sigma=4.0, target="soft", query_chunk=4096, bank_chunk=16384,
                 build_batch_size=None, seed=0):
        super().__init__()
        dim = int(list(inplanes)[0]) if isinstance(inplanes, (list, tuple)) else int(inplanes)
        if isinstance(inplanes, (list, tuple)) and len(inplanes) != 1:
            raise ValueError(f"DMAD: expects one feature map (a neck such as PatchCoreNeck), "
                             f"got inplanes {list(inplanes)}")
        knowledge = [knowledge] if isinstance(knowledge, str) else list(knowledge)
        bad = [k for k in knowledge if k not in KNOWLEDGE_PARTS]
        if bad or len(set(knowledge)) != len(knowledge):
            raise ValueError(f"DMAD: knowledge must be a subset of {list(KNOWLEDGE_PARTS)} "
                             f"without repeats, got {knowledge}")
        if not knowledge and not include_query:
            raise ValueError("DMAD: knowledge is empty and include_query is false: the score "
                             "head would get no input")
        if bank_dtype not in BANK_DTYPES:
            raise ValueError(f"DMAD: bank_dtype must be one of {list(BANK_DTYPES)}, "
                             f"got '{bank_dtype}'")
        if target not in ("soft", "hard"):
            raise ValueError(f"DMAD: target must be 'soft' or 'hard', got '{target}'")
        for name, value in (("coreset_ratio", coreset_ratio),
                            ("abnormal_coreset_ratio", abnormal_coreset_ratio)):
            if not 0.0 < float(value) <= 1.0:
                raise ValueError(f"DMAD: {name} must be in (0, 1], got {value}")
        if not 0.0 <= float(filter_threshold) < 1.0:
            raise ValueError(f"DMAD: filter_threshold must be in [0, 1), got {filter_threshold}")
        if int(topk) < 1 or float(temperature) <= 0 or float(bank_memory_mb) <= 0:
            raise ValueError(f"DMAD: topk >= 1, temperature > 0 and bank_memory_mb > 0 needed "
                             f"(got {topk}, {temperature}, {bank_memory_mb})")
        self.dim = dim
        self.input_size = list(input_size) if input_size is not None else None
        self.stride = int(list(instrides)[0]) if instrides else None
        self.coreset_ratio = float(coreset_ratio)
        self.max_normal_bank = int(max_normal_bank)
        self.coreset_proj_dim = int(coreset_proj_dim or 0)
        self.coreset_buffer_mb = float(coreset_buffer_mb)
        self.bank_per_class = bool(bank_per_class)
        self.abnormal_coreset_ratio = float(abnormal_coreset_ratio)
        self.max_abnormal_bank = int(max_abnormal_bank)
        self.pseudo_per_image = int(pseudo_per_image)
        self.pseudo_anomaly = dict(pseudo_anomaly) if pseudo_anomaly else None
        self.filter_threshold = float(filter_threshold)
        self.num_centers = int(num_centers)
        self.center_samples = int(center_samples)
        self.center_spread = float(center_spread)
        self.bank_memory_mb = float(bank_memory_mb)
        self.bank_dtype = BANK_DTYPES[bank_dtype]
        self.knowledge = knowledge
        self.include_query = bool(include_query)
        self.topk = int(topk)
        self.temperature = float(temperature)
        self.exclude_self = bool(exclude_self)
        self.sigma = float(sigma)
        self.target = target
        self.query_chunk, self.bank_chunk = int(query_chunk), int(bank_chunk)
        self.build_batch_size = build_batch_size
        self.seed = int(seed)
        self.class_names = []
        self.build_info = {}

        for name in BANK_BUFFERS:
            if name.endswith("bank"):
                self.register_buffer(name, torch.zeros(0, dim, dtype=self.bank_dtype))
            else:
                self.register_buffer(name, torch.zeros(0, dtype=torch.int32))
        self.register_buffer("dist_scale", torch.ones(()))

        in_dim = self.knowledge_dim()
        layers = [nn.BatchNorm2d(in_dim)]
        prev = in_dim
        for h in ([hidden] if isinstance(hidden, int) else list(hidden or [])):
            layers += [nn.Conv2d(prev, int(h), 1), nn.BatchNorm2d(int(h)), nn.ReLU(inplace=True)]
            if dropout:
                layers.append(nn.Dropout2d(float(dropout)))
            prev = int(h)
        last = nn.Conv2d(prev, 1, 1)
        nn.init.constant_(last.bias, -math.log((1 - prior) / prior))  # start at p = prior
        layers.append(last)
        self.score_head = nn.Sequential(*layers)

    # ------------------------------------------------------------------ sizes and state
    def knowledge_dim(self):
        d = self.dim if self.include_query else 0
        d += 2 if "distance" in self.knowledge else 0
        d += 2 * self.dim if "residual" in self.knowledge else 0
        d += 2 * self.dim if "attention" in self.knowledge else 0
        return d

    def bank_nbytes(self):
        """Bytes held by the banks (features and their per-row ids)."""
        return sum(getattr(self, n).numel() * getattr(self, n).element_size()
                   for n in BANK_BUFFERS)

    def row_nbytes(self):
        return self.dim * torch.empty((), dtype=self.bank_dtype).element_size() + 4 * 2

    def bank_caps(self, normal_rows=None):
        """(normal cap, abnormal cap) in rows from ``bank_memory_mb`` and the max sizes; the
        abnormal cap is what the normal bank (``normal_rows``, default its cap) leaves."""
        budget = int(self.bank_memory_mb * 2 ** 20)
        normal_cap = min(self.max_normal_bank, int(NORMAL_SHARE * budget) // self.row_nbytes())
        used = (normal_cap if normal_rows is None else normal_rows) * self.row_nbytes()
        abnormal_cap = min(self.max_abnormal_bank,
                           (budget - used) // (self.row_nbytes() + 4))  # + abnormal_kind
        if normal_cap < 1 or abnormal_cap < 1:
            raise ValueError(f"DMAD: bank_memory_mb {self.bank_memory_mb} is too small for "
                             f"{self.dim}-dim memories")
        return normal_cap, abnormal_cap

    def get_extra_state(self):
        return {"class_names": list(self.class_names), "build_info": dict(self.build_info)}

    def set_extra_state(self, state):
        self.class_names = list(state.get("class_names", []))
        self.build_info = dict(state.get("build_info", {}))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # bank sizes depend on the data: take the checkpoint's shapes before copying
        for name in BANK_BUFFERS:
            key = prefix + name
            if key in state_dict:
                ref = getattr(self, name)
                self._buffers[name] = torch.empty(state_dict[key].shape,
                                                  dtype=state_dict[key].dtype,
                                                  device=ref.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _set_bank(self, prefix, feats, src, cls, kind=None):
        device = self.dist_scale.device
        self._buffers[f"{prefix}_bank"] = feats.to(device, self.bank_dtype).contiguous()
        self._buffers[f"{prefix}_src"] = src.to(device, torch.int32).contiguous()
        self._buffers[f"{prefix}_cls"] = cls.to(device, torch.int32).contiguous()
        if kind is not None:
            self._buffers[f"{prefix}_kind"] = kind.to(device, torch.int32).contiguous()

    # ------------------------------------------------------------------ stage one
    def prepare(self, trainer):
        """Build both banks from the Trainer's training set and frozen prefix (engine hook)."""
        from datasets.manifest_dataset import ManifestDataset
        from datasets.pseudo_anomaly import PseudoAnomalyDataset

        train_set = trainer.train_set
        base = train_set.base if isinstance(train_set, PseudoAnomalyDataset) else train_set
        # the training images as they are: no augmentation, no pseudo anomalies
        plain = ManifestDataset(base.records, base.image_dir, base.input_size, base.pixel_mean,
                                base.pixel_std, getattr(base, "color_mode", "RGB"),
                                resize=base.resize)
        info = self.build_banks(
            feature_extractor(trainer.model, self), plain, trainer.device,
            batch_size=self.build_batch_size or trainer.batch_size, workers=trainer.workers,
            recipe=self.pseudo_recipe(train_set), progress=trainer.progress,
            log=trainer.logger.info)
        if isinstance(train_set, PseudoAnomalyDataset):
            # pseudo anomalies follow the sampler's epoch, so a resumed epoch replays them
            train_set.epoch_source = trainer.sampler
        return info

    def pseudo_recipe(self, train_set=None):
        """The abnormal bank's pseudo-anomaly recipe: ``pseudo_anomaly`` when set, else the
        training set's (``dataset.train.pseudo_anomaly``), else procedural textures."""
        if self.pseudo_anomaly is not None:
            return dict(self.pseudo_anomaly)
        synth = getattr(train_set, "synth", None)
        if synth is None:
            return {}
        return {k: getattr(synth, k) for k in (
            "texture_source", "texture_dir", "beta", "perlin_scale", "threshold", "rotate",
            "coverage", "texture_augmentations")}

    @torch.no_grad()
    def build_banks(self, extract, dataset, device, batch_size=8, workers=0, recipe=None,
                    progress=True, log=None):
        """Fill the banks. ``extract(images) -> (B, C, h, w)`` features; ``dataset`` a plain
        ManifestDataset (index = training-set index); label-0 records give the normal bank and
        pseudo anomalies, label-1 records (seen anomalies, with masks) the real abnormal part.
        Returns the build statistics (also kept in ``build_info``)."""
        from datasets.pseudo_anomaly import PseudoAnomalySynthesizer, self_image_loader

        log = log or (lambda m: None)
        t0 = time.time()
        records = dataset.records
        self.class_names = sorted({r["clsname"] for r in records})
        class_ids = {c: i for i, c in enumerate(self.class_names)}
        normal_idx = [i for i, r in enumerate(records) if int(r["label"]) == 0]
        seen_idx = [i for i, r in enumerate(records) if int(r["label"]) == 1]
        if not normal_idx:
            raise ValueError("DMAD: no normal (label 0) training images to build the normal bank")
        recipe = dict(recipe or {})
        recipe.pop("prob", None)
        recipe.pop("seed", None)
        synth = None
        if self.pseudo_per_image:
            source = recipe.pop("texture_source", None) or (
                "folder" if recipe.get("texture_dir") else "procedural")
            synth = PseudoAnomalySynthesizer(
                source, recipe.pop("texture_dir", None),
                self_images=self_image_loader(dataset) if source == "self" else None, **recipe)
        elif not seen_idx:
            raise ValueError("DMAD: pseudo_per_image is 0 and there are no seen anomalies: the "
                             "abnormal bank would be empty")
        buffer_rows = max(1024, int(self.coreset_buffer_mb * 2 ** 20 / (4 * self.dim)))
        normal_cap, _ = self.bank_caps()
        normal = StreamingCoreset(self.coreset_ratio, normal_cap, self.coreset_proj_dim,
                                  buffer_rows, self.seed)
        pseudo = StreamingCoreset(self.abnormal_coreset_ratio, self.max_abnormal_bank,
                                  self.coreset_proj_dim, buffer_rows, self.seed + 1)
        sample_q, sample_src = [], []
        g = torch.Generator().manual_seed(self.seed)
        loader = DataLoader(_BankImages(dataset, normal_idx, class_ids, synth,
                                        self.pseudo_per_image if synth else 0, self.seed),
                            batch_size=batch_size, num_workers=workers, shuffle=False)
        grid = None
        for batch in tqdm(loader, desc="DMAD banks (normal images)", disable=not progress,
                          leave=False, dynamic_ncols=True):
            feats = extract(batch["image"].to(device)).float()
            b, c, h, w = feats.shape
            grid = (h, w)
            if c != self.dim:
                raise ValueError(f"DMAD: features have {c} channels but the head was built for "
                                 f"{self.dim} (inplanes)")
            rows = feats.permute(0, 2, 3, 1).reshape(-1, c)
            src = batch["index"].to(device).repeat_interleave(h * w)
            cls = batch["cls"].to(device).repeat_interleave(h * w)
            normal.add(rows, src, cls)
            pick = torch.randperm(rows.shape[0], generator=g)[:max(1, 4096 // len(loader))]
            sample_q.append(rows[pick.to(device)])
            sample_src.append(src[pick.to(device)])
            if synth is not None:
                imgs = batch["pseudo_image"].flatten(0, 1).to(device)
                masks = batch["pseudo_mask"].flatten(0, 1).to(device)
                pf, which = filter_patches(extract(imgs).float(), masks, self.filter_threshold)
                owner = which // self.pseudo_per_image
                pseudo.add(pf, batch["index"].to(device)[owner], batch["cls"].to(device)[owner])
        n_feats, n_src, n_cls = normal.result()
        self._set_bank("normal", n_feats, n_src, n_cls)
        t_normal = time.time() - t0

        # leave-one-image-out nearest-normal distance of training patches: the distance unit
        q, s = torch.cat(sample_q), torch.cat(sample_src)
        d = self._nearest(q, self.normal_bank, self.normal_src, s)
        finite = d[torch.isfinite(d)]
        self.dist_scale.fill_(float(finite.mean()) if finite.numel() and finite.mean() > 0
                              else 1.0)

        # abnormal bank: real (seen) anomalies + anomaly center sampling, then pseudo ones
        real = self._seen_features(extract, dataset, seen_idx, class_ids, device, batch_size,
                                   workers, progress)
        _, abnormal_cap = self.bank_caps(normal_rows=self.normal_bank.shape[0])
        parts = self._center_sampling(*real) if real is not None else []
        reserved = sum(p[0].shape[0] for p in parts)
        if (synth is not None and reserved > abnormal_cap // 2) or reserved > abnormal_cap:
            # too many real-derived rows: coreset them to leave room for pseudo ones
            keep = abnormal_cap // 2 if synth is not None else abnormal_cap
            cat = [torch.cat([p[i] for p in parts]) for i in range(4)]
            idx, _ = greedy_coreset(cat[0], keep, self.coreset_proj_dim, self.seed + 2)
            parts = [tuple(t[idx] for t in cat)]
            reserved = keep
        if synth is not None:
            p_feats, p_src, p_cls = pseudo.result() if pseudo.seen else (
                torch.zeros(0, self.dim, device=device), torch.zeros(0, dtype=torch.long),
                torch.zeros(0, dtype=torch.long))
            room = abnormal_cap - reserved
            if p_feats.shape[0] > room:
                idx, _ = greedy_coreset(p_feats, room, self.coreset_proj_dim, self.seed + 3)
                p_feats, p_src, p_cls = p_feats[idx], p_src[idx], p_cls[idx]
            kind = torch.full((p_feats.shape[0],), KIND_PSEUDO, dtype=torch.long)
            parts.insert(0, (p_feats, p_src.cpu(), p_cls.cpu(), kind))
        cat = [torch.cat([p[i].to(device) for p in parts]) for i in range(4)]
        if cat[0].shape[0] == 0:
            raise ValueError("DMAD: the abnormal bank is empty (no pseudo-anomalous patch "
                             "passed the Filter and no seen anomalies)")
        self._set_bank("abnormal", cat[0], cat[1], cat[2], cat[3])
        kinds = torch.bincount(self.abnormal_kind.long().cpu(), minlength=4).tolist()
        self.build_info = {
            "classes": len(self.class_names), "feature_grid": list(grid or []),
            "normal_images": len(normal_idx), "seen_anomaly_images": len(seen_idx),
            "normal_patches_seen": normal.seen, "normal_bank": int(self.normal_bank.shape[0]),
            "coreset_reductions": normal.reductions,
            "pseudo_patches_seen": pseudo.seen,
            "abnormal_bank": int(self.abnormal_bank.shape[0]),
            "abnormal_pseudo": kinds[KIND_PSEUDO], "abnormal_real": kinds[KIND_REAL],
            "abnormal_centres": kinds[KIND_CENTRE], "abnormal_samples": kinds[KIND_SAMPLE],
            "dist_scale": float(self.dist_scale), "bank_mb": self.bank_nbytes() / 2 ** 20,
            "bank_memory_mb": self.bank_memory_mb,
            "time_normal_s": t_normal, "time_total_s": time.time() - t0,
        }
        log("DMAD banks: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                       for k, v in self.build_info.items()))
        return dict(self.build_info)

    def _seen_features(self, extract, dataset, seen_idx, class_ids, device, batch_size,
                       workers, progress):
        if not seen_idx:
            return None
        loader = DataLoader(_BankImages(dataset, seen_idx, class_ids), batch_size=batch_size,
                            num_workers=workers, shuffle=False)
        feats, srcs, clss = [], [], []
        for batch in tqdm(loader, desc="DMAD banks (seen anomalies)", disable=not progress,
                          leave=False, dynamic_ncols=True):
            f, which = filter_patches(extract(batch["image"].to(device)).float(),
                                      batch["mask"].to(device), self.filter_threshold)
            feats.append(f)
            srcs.append(batch["index"].to(device)[which])
            clss.append(batch["cls"].to(device)[which])
        feats = torch.cat(feats)
        if feats.shape[0] == 0:
            return None
        return feats, torch.cat(srcs), torch.cat(clss)

    def _center_sampling(self, feats, src, cls):
        """Real anomalous patches, plus per class k-means centres and samples around them."""
        parts = [(feats, src, cls, torch.full_like(src, KIND_REAL))]
        if self.num_centers < 1:
            return parts
        g = torch.Generator().manual_seed(self.seed + 7)
        for c in torch.unique(cls).tolist():
            x = feats[cls == c]
            centres, assign = kmeans(x, self.num_centers, seed=self.seed + 11 * (c + 1))
            k = centres.shape[0]
            none = torch.full((k,), -1, dtype=src.dtype, device=src.device)
            parts.append((centres, none, torch.full_like(none, c),
                          torch.full_like(none, KIND_CENTRE)))
            if self.center_samples < 1:
                continue
            radius = torch.zeros(k, device=x.device)
            for j in range(k):
                members = x[assign == j]
                if members.shape[0] > 1:
                    radius[j] = (members - centres[j]).pow(2).sum(1).mean().sqrt()
            spare = radius[radius > 0]
            radius[radius == 0] = spare.median() if spare.numel() else self.dist_scale
            noise = torch.randn(k, self.center_samples, self.dim, generator=g).to(x.device)
            samples = centres[:, None] + (self.center_spread * radius[:, None, None] *
                                          noise / math.sqrt(self.dim))
            n = k * self.center_samples
            none = torch.full((n,), -1, dtype=src.dtype, device=src.device)
            parts.append((samples.reshape(n, self.dim), none, torch.full_like(none, c),
                          torch.full_like(none, KIND_SAMPLE)))
        return parts

    # ------------------------------------------------------------------ retrieval
    def _nearest(self, q, bank, bank_src, row_src):
        d, _ = knn(q, bank, 1, self.query_chunk, self.bank_chunk,
                   _excluder(row_src, None, bank_src, None))
        return d[:, 0]

    def _route_classes(self, q, batch, hw):
        """Per-image class ids by the class bank nearest on average (bank_per_class)."""
        d = min_distance_per_group(q, self.normal_bank, self.normal_cls, len(self.class_names),
                                   self.query_chunk, self.bank_chunk)
        return d.view(batch, hw, -1).mean(1).argmin(1)

    def _retrieve(self, q, bank, bank_src, bank_cls, row_src, row_cls):
        """(distances (N, K), memories (N, K, C)) with gradients w.r.t. q."""
        k = min(self.topk, bank.shape[0])
        d, idx = knn(q.detach(), bank, k, self.query_chunk, self.bank_chunk,
                     _excluder(row_src, row_cls, bank_src, bank_cls))
        lost = ~torch.isfinite(d).all(1)
        if bool(lost.any()):  # every candidate excluded (e.g. a one-image class): no restriction
            _, idx[lost] = knn(q.detach()[lost], bank, k, self.query_chunk, self.bank_chunk)
        mem = bank[idx].float()
        diff = q.unsqueeze(1) - mem
        dist = (diff.pow(2).sum(-1) + 1e-12).sqrt()
        return dist, mem, diff[:, 0]

    def knowledge_features(self, q, row_src=None, row_cls=None):
        """(N, C) patch features -> (N, knowledge_dim()) knowledge vectors."""
        if self.normal_bank.shape[0] == 0 or self.abnormal_bank.shape[0] == 0:
            raise RuntimeError("DMAD: the memory banks are empty; they are built by "
                               "prepare(trainer) before training, or loaded from a checkpoint")
        q = q.float()
        scale = self.dist_scale.float()
        out = [q] if self.include_query else []
        banks = (("normal", row_cls if self.bank_per_class else None), ("abnormal", None))
        dists, resids, reads = [], [], []
        for name, cls in banks:
            dist, mem, resid = self._retrieve(
                q, getattr(self, f"{name}_bank"), getattr(self, f"{name}_src"),
                getattr(self, f"{name}_cls"), row_src, cls)
            dists.append(dist[:, :1] / scale)
            resids.append(resid)
            w = torch.softmax(-dist / (self.temperature * scale), dim=1)
            reads.append((w.unsqueeze(-1) * mem).sum(1))
        if "distance" in self.knowledge:
            out += dists
        if "residual" in self.knowledge:
            out += resids
        if "attention" in self.knowledge:
            out += reads
        return torch.cat(out, dim=1)

    # ------------------------------------------------------------------ forward
    def forward(self, input):
        x = input["feature_align"]
        b, c, h, w = x.shape
        q = x.permute(0, 2, 3, 1).reshape(-1, c)
        row_src = row_cls = None
        if self.training and self.exclude_self and torch.is_tensor(input.get("index")):
            row_src = input["index"].to(q.device).long().repeat_interleave(h * w)
        if self.bank_per_class:
            names = input.get("clsname")
            if isinstance(names, (list, tuple)) and all(n in self.class_names for n in names):
                ids = torch.tensor([self.class_names.index(n) for n in names], device=q.device)
            else:
                ids = self._route_classes(q.detach(), b, h * w)
            row_cls = ids.repeat_interleave(h * w)
        z = self.knowledge_features(q, row_src, row_cls)
        z = z.view(b, h, w, -1).permute(0, 3, 1, 2)
        logits = self.score_head(z)
        out = {"patch_logits": logits, "pred": self.anomaly_map(logits)}
        mask = input.get("mask")
        if torch.is_tensor(mask):
            frac = downsample_mask(mask.to(logits.device), (h, w))
            out["patch_target"] = frac if self.target == "soft" else \
                (frac > self.filter_threshold).float()
        return out

    def anomaly_map(self, logits):
        if self.input_size is None and self.stride is None:
            raise ValueError("DMAD: input_size or instrides is needed to size the anomaly map")
        size = self.input_size or [s * self.stride for s in logits.shape[-2:]]
        prob = torch.sigmoid(logits.float())
        prob = F.interpolate(prob, size=tuple(size), mode="bilinear", align_corners=False)
        return gaussian_blur(prob, self.sigma)

    def extra_repr(self):
        return (f"dim={self.dim}, knowledge={self.knowledge}, normal_bank="
                f"{tuple(self.normal_bank.shape)}, abnormal_bank={tuple(self.abnormal_bank.shape)}"
                f", bank_per_class={self.bank_per_class}")


def _excluder(row_src, row_cls, bank_src, bank_cls):
    """The knn ``excluded`` callback: same source image, or (per-class banks) another class."""
    if row_src is None and row_cls is None:
        return None

    def excluded(q0, q1, b0, b1):
        m = None
        if row_src is not None:
            m = row_src[q0:q1, None] == bank_src[None, b0:b1].long()
        if row_cls is not None:
            other = row_cls[q0:q1, None] != bank_cls[None, b0:b1].long()
            m = other if m is None else m | other
        return m

    return excluded


def feature_extractor(model, head):
    """``images -> feature_align`` through the modules before ``head`` in a ModelHelper, which
    must all be frozen or parameter-free (the banks would go stale otherwise)."""
    names = model.module_names
    mine = [n for n in names if getattr(model, n) is head]
    if not mine:
        raise ValueError("DMAD.prepare: this head is not part of trainer.model")
    before = names[:names.index(mine[0])]
    trainable = [n for n in before if n not in model.frozen_prefix]
    if trainable:
        raise ValueError(f"DMAD: the modules before it must be frozen or parameter-free (the "
                         f"banks hold their outputs); trainable: {trainable}")

    @torch.no_grad()
    def extract(images):
        data = {"image": images}
        for n in before:
            module = getattr(model, n)
            was = module.training
            module.eval()
            data.update(module(data))
            module.train(was)
        if "feature_align" not in data:
            raise ValueError(f"DMAD: the modules before it ({', '.join(before)}) give no "
                             f"'feature_align' (use a neck such as models.necks.PatchCoreNeck)")
        return data["feature_align"]

    return extract


# ----------------------------------------------------------------------------- losses
def _patch_pair(outputs, who):
    if "patch_target" not in outputs:
        raise KeyError(f"{who}: no 'patch_target' in the outputs; DMAD makes it from "
                       f"inputs['mask'], which training batches carry")
    return outputs["patch_logits"].float(), outputs["patch_target"].float()


@LOSSES.register(path="models.heads.dmad")
class PatchFocalLoss(nn.Module):
    """Focal loss on patch logits vs (soft) patch targets, mean over patches.

    ``alpha``: weight of the anomalous term (normal term 1 - alpha); null = unweighted.
    """

    def __init__(self, weight=1.0, gamma=2.0, alpha=None):
        super().__init__()
        self.weight, self.gamma, self.alpha = weight, float(gamma), alpha

    def forward(self, outputs):
        logits, t = _patch_pair(outputs, "PatchFocalLoss")
        p = torch.sigmoid(logits)
        logp, log1mp = F.logsigmoid(logits), F.logsigmoid(-logits)
        pos = -t * (1 - p) ** self.gamma * logp
        neg = -(1 - t) * p ** self.gamma * log1mp
        if self.alpha is not None:
            pos, neg = self.alpha * pos, (1 - self.alpha) * neg
        return (pos + neg).mean()


@LOSSES.register(path="models.heads.dmad")
class PatchBCELoss(nn.Module):
    """Binary cross-entropy on patch logits vs (soft) patch targets; ``pos_weight`` optional."""

    def __init__(self, weight=1.0, pos_weight=None):
        super().__init__()
        self.weight = weight
        self.pos_weight = pos_weight

    def forward(self, outputs):
        logits, t = _patch_pair(outputs, "PatchBCELoss")
        pw = None if self.pos_weight is None else torch.tensor(float(self.pos_weight),
                                                               device=logits.device)
        return F.binary_cross_entropy_with_logits(logits, t, pos_weight=pw)
