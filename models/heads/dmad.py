"""DMAD: dual memory bank enhanced representation learning for anomaly detection
(arXiv 2403.12362), for the unified unsupervised and semi-supervised settings.

The paper has no public code; everything it leaves open is a kwarg whose default is OUR choice,
marked "(ours)" below and in ``experiments/*/dmad/README.md``.

Stage one (:meth:`DMAD.fit`, run by the engine before the first epoch with the batches
:meth:`DMAD.fit_spec` asks for; the building is in ``dmad_banks.py``) builds two banks of patch
features from the frozen prefix (backbone + :class:`PatchCoreNeck`) in one pass over the normal
training images:

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
taken from the same image are excluded (``exclude_self``, ours), and so are the anomaly centres
and samples whose cluster holds a patch of that image (leave-one-image-out: ``abnormal_group``
and ``derived_links``), so training distances look like test distances. Map: sigmoid(logits),
bilinear to the input size, Gaussian blur with ``sigma`` = 4. Retrieval is the costly part of a
training step and, with the banks fixed, depends only on the patch features: when the engine
feeds cached features (``cache_index`` in the input: the same position always holds the same
features) each image's nearest-memory indices are kept after its first step, so later epochs
train the score head alone, with the same result. Losses
(``models.losses.PatchFocalLoss`` / ``PatchBCELoss``) compare the logits with the fraction of
each patch inside the mask (``target: soft``, ours) or the Filter's 0/1.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from dualmem.models.heads.dmad_banks import (CENTER_SAMPLING, KIND_CENTRE, KIND_PSEUDO,  # noqa: F401
                                     KIND_REAL, KIND_SAMPLE, KIND_TEXTURE, NORMAL_SHARE,
                                     BankBuilding)
from dualmem.models.heads.dmad_knowledge import KNOWLEDGE_PARTS, REAL_DISTANCE_CAP, KnowledgeRetrieval
from dualmem.models.heads.memory_bank import BankState, downsample_mask
from dualmem.models.losses import PatchBCELoss, PatchFocalLoss  # noqa: F401  (their old home)
from dualmem.models.registry import MODELS
from dualmem.utils.errors import UserError

SCORE_MODES = ("head", "normal_plus_correction")
BANK_BUFFERS = ("normal_bank", "normal_src", "normal_cls", "abnormal_bank", "abnormal_src",
                "abnormal_cls", "abnormal_kind", "abnormal_group", "derived_links")
# buffers a checkpoint from before leave-one-image-out lacks (loaded as "nothing derived")
_DERIVED_BUFFERS = ("abnormal_group", "derived_links")
OUTLIER_TEXTURE_KEYS = ("texture_dir", "count", "per_folder", "seed")
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


@MODELS.register(name="DMAD", path="models.heads")
class DMAD(KnowledgeRetrieval, BankBuilding, BankState, nn.Module):
    learns_from_anomalies = True  # labelled anomalies in the training set are meant for it
    map_activation = "sigmoid"  # the map is a probability; DMADReference maps raw scores

    def __init__(self, inplanes, instrides=None, input_size=None, feature_size=None,
                 coreset_ratio=0.02, max_normal_bank=20000, coreset_proj_dim=128,
                 coreset_buffer_mb=512, bank_per_class=False,
                 abnormal_coreset_ratio=0.1, max_abnormal_bank=10000, pseudo_per_image=1,
                 pseudo_anomaly=None, filter_threshold=0.5,
                 num_centers=8, center_samples=8, center_spread=0.5,
                 center_sampling="kmeans", center_noise_std=0.015,
                 outlier_textures=None, texture_coreset_ratio=0.1,
                 bank_memory_mb=1024, bank_dtype="float32",
                 knowledge=KNOWLEDGE_PARTS, include_query=True, topk=5, temperature=1.0,
                 exclude_self=True, hidden=(256, 64), dropout=0.0, prior=0.01,
                 sigma=4.0, target="soft", query_chunk=4096, bank_chunk=16384,
                 build_batch_size=None, seed=0, score="head", correction_bound=0.5,
                 seen_bonus=0.0):
        super().__init__()
        self._retrieval_memo = {}  # {bank: {cache position: (h*w, topk) int32}}, not state
        dim = int(list(inplanes)[0]) if isinstance(inplanes, (list, tuple)) else int(inplanes)
        if isinstance(inplanes, (list, tuple)) and len(inplanes) != 1:
            raise UserError(f"DMAD: expects one feature map (a neck such as PatchCoreNeck), "
                             f"got inplanes {list(inplanes)}")
        knowledge = [knowledge] if isinstance(knowledge, str) else list(knowledge)
        bad = [k for k in knowledge if k not in KNOWLEDGE_PARTS]
        if bad or len(set(knowledge)) != len(knowledge):
            raise UserError(f"DMAD: knowledge must be a subset of {list(KNOWLEDGE_PARTS)} "
                             f"without repeats, got {knowledge}")
        if not knowledge and not include_query:
            raise UserError("DMAD: knowledge is empty and include_query is false: the score "
                             "head would get no input")
        if bank_dtype not in BANK_DTYPES:
            raise UserError(f"DMAD: bank_dtype must be one of {list(BANK_DTYPES)}, "
                             f"got '{bank_dtype}'")
        if center_sampling not in CENTER_SAMPLING:
            raise UserError(f"DMAD: center_sampling must be one of {list(CENTER_SAMPLING)}, "
                            f"got '{center_sampling}'")
        unknown = sorted(set(outlier_textures or {}) - set(OUTLIER_TEXTURE_KEYS))
        if unknown:
            raise UserError(f"DMAD: outlier_textures: unknown key(s) {unknown} (valid: "
                            f"{list(OUTLIER_TEXTURE_KEYS)})")
        if score not in SCORE_MODES:
            raise UserError(f"DMAD: score must be one of {list(SCORE_MODES)}, got '{score}'")
        if not float(correction_bound) > 0:
            raise UserError(f"DMAD: correction_bound must be > 0, got {correction_bound}")
        if not 0.0 <= float(seen_bonus) < float("inf"):
            raise UserError(f"DMAD: seen_bonus must be a finite number >= 0, got {seen_bonus}")
        if float(seen_bonus) > 0 and (score != "normal_plus_correction"
                                      or "real_distance" not in knowledge):
            raise UserError("DMAD: seen_bonus needs score 'normal_plus_correction' and "
                            f"'real_distance' in the knowledge (got score '{score}', "
                            f"knowledge {knowledge})")
        if target not in ("soft", "hard"):
            raise UserError(f"DMAD: target must be 'soft' or 'hard', got '{target}'")
        for name, value in (("coreset_ratio", coreset_ratio),
                            ("abnormal_coreset_ratio", abnormal_coreset_ratio),
                            ("texture_coreset_ratio", texture_coreset_ratio)):
            if not 0.0 < float(value) <= 1.0:
                raise UserError(f"DMAD: {name} must be in (0, 1], got {value}")
        if not 0.0 <= float(filter_threshold) < 1.0:
            raise UserError(f"DMAD: filter_threshold must be in [0, 1), got {filter_threshold}")
        if int(topk) < 1 or float(temperature) <= 0 or float(bank_memory_mb) <= 0:
            raise UserError(f"DMAD: topk >= 1, temperature > 0 and bank_memory_mb > 0 needed "
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
        self.center_sampling = center_sampling
        self.center_noise_std = float(center_noise_std)
        self.outlier_textures = dict(outlier_textures) if outlier_textures else None
        self.texture_coreset_ratio = float(texture_coreset_ratio)
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
        self.score = score
        self.correction_bound = float(correction_bound)
        self.seen_bonus = float(seen_bonus)
        self.class_names = []
        self.build_info = {}

        for name in BANK_BUFFERS:
            if name.endswith("bank"):
                self.register_buffer(name, torch.zeros(0, dim, dtype=self.bank_dtype))
            elif name == "derived_links":
                self.register_buffer(name, torch.zeros(0, 2, dtype=torch.int32))
            else:
                self.register_buffer(name, torch.zeros(0, dtype=torch.int32))
        self.register_buffer("dist_scale", torch.ones(()))

        self._build_scorer(hidden, dropout, prior)

    def _build_scorer(self, hidden, dropout, prior):
        """The score head: BN, 1x1 convs (``hidden``) with BN + ReLU, one logit per patch."""
        in_dim = self.knowledge_dim()
        layers = [nn.BatchNorm2d(in_dim)]
        prev = in_dim
        for h in ([hidden] if isinstance(hidden, int) else list(hidden or [])):
            layers += [nn.Conv2d(prev, int(h), 1), nn.BatchNorm2d(int(h)), nn.ReLU(inplace=True)]
            if dropout:
                layers.append(nn.Dropout2d(float(dropout)))
            prev = int(h)
        last = nn.Conv2d(prev, 1, 1)
        if self.score == "normal_plus_correction":
            # the correction starts at 0: the first map ranks patches as the normal bank does
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)
            # logits = gain * (score - offset): a monotone map to the loss's probability
            self.score_gain = nn.Parameter(torch.tensor(math.log(math.expm1(4.0))))
            self.score_offset = nn.Parameter(torch.tensor(1.5))
        else:
            nn.init.constant_(last.bias, -math.log((1 - prior) / prior))  # start at p = prior
        layers.append(last)
        self.score_head = nn.Sequential(*layers)

    def score_logits(self, z, parts):
        """Patch logits (B, 1, h, w) from the knowledge ``z`` (B, K, h, w). ``head``: the score
        head alone. ``normal_plus_correction`` (ours): the nearest-normal distance plus a
        correction the head learns, at most ``correction_bound`` (in units of the mean normal
        distance) either way, through a monotone gain and offset; the normal distance's
        ranking (PatchCore's, on the same bank) can only be reordered where the abnormal
        knowledge says so, and never by more than the bound."""
        out = self.score_head(z)
        if self.score == "head":
            return out
        b, _, h, w = z.shape
        d_n = parts["normal_distance"].view(b, h, w, 1).permute(0, 3, 1, 2)
        total = d_n + self.correction_bound * torch.tanh(out)
        if self.seen_bonus > 0 and self._real_subset() is not None:
            total = total + self.seen_bonus * self.seen_evidence(parts, b, h, w)
        return F.softplus(self.score_gain) * (total - self.score_offset)

    @staticmethod
    def seen_evidence(parts, b, h, w):
        """(B, 1, h, w) in [0, 1): 1 - d_real / d_normal where a patch lies nearer to a memory
        made from a labelled anomaly than to any normal memory, else 0 (and 0 beyond the cap
        of ``real_distance``). Only seen anomalies can raise a score through it; without them
        the term is not added, so the unsupervised model is unchanged."""
        d_n = parts["normal_distance"].clamp_min(1e-6)
        d_r = parts["real_distance"]
        ratio = (1.0 - d_r / d_n).clamp_min(0.0) * (d_r < REAL_DISTANCE_CAP).to(d_n.dtype)
        return ratio.view(b, h, w, 1).permute(0, 3, 1, 2)

    # ------------------------------------------------------------------ sizes and state
    def bank_nbytes(self):
        """Bytes held by the banks (features and their per-row ids)."""
        return sum(getattr(self, n).numel() * getattr(self, n).element_size()
                   for n in BANK_BUFFERS)

    def row_nbytes(self):
        return self.dim * torch.empty((), dtype=self.bank_dtype).element_size() + 4 * 2

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._retrieval_memo = {}
        # bank sizes depend on the data: take the checkpoint's shapes before copying
        n_abnormal = state_dict.get(prefix + "abnormal_bank", self.abnormal_bank).shape[0]
        for name in _DERIVED_BUFFERS:  # older checkpoints: no derived memories recorded
            if prefix + "abnormal_bank" in state_dict and prefix + name not in state_dict:
                state_dict[prefix + name] = (
                    torch.full((n_abnormal,), -1, dtype=torch.int32) if name == "abnormal_group"
                    else torch.zeros(0, 2, dtype=torch.int32))
        self._take_shapes(state_dict, prefix, BANK_BUFFERS)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _set_bank(self, prefix, feats, src, cls, kind=None, group=None, links=None):
        """``group`` (abnormal bank): per row the id of the memories derived from several
        images (anomaly centres and their samples), -1 otherwise; ``links`` (L, 2): the
        (group, source image) pairs, i.e. which images each group was derived from."""
        device = self.dist_scale.device
        self._retrieval_memo = {}  # indices into the old banks mean nothing now
        self._buffers[f"{prefix}_bank"] = feats.to(device, self.bank_dtype).contiguous()
        self._buffers[f"{prefix}_src"] = src.to(device, torch.int32).contiguous()
        self._buffers[f"{prefix}_cls"] = cls.to(device, torch.int32).contiguous()
        if kind is not None:
            self._buffers[f"{prefix}_kind"] = kind.to(device, torch.int32).contiguous()
        if prefix == "abnormal":
            group = torch.full((feats.shape[0],), -1) if group is None else group
            links = torch.zeros(0, 2) if links is None else links
            self._buffers["abnormal_group"] = group.to(device, torch.int32).contiguous()
            self._buffers["derived_links"] = links.to(device, torch.int32).reshape(-1, 2)

    # ------------------------------------------------------------------ stage one
    def fit_spec(self):
        """What the engine's stage one must feed :meth:`fit` (see utils/engine/stage_one.py):
        features of the plain training images from the frozen modules before this head,
        ``pseudo_per_image`` pseudo anomalies each (recipe: ``pseudo_anomaly``, else the
        training set's, else procedural textures), and the seen anomalies with their masks."""
        return {"output": "feature_align", "pseudo_per_image": self.pseudo_per_image,
                "pseudo_recipe": dict(self.pseudo_anomaly) if self.pseudo_anomaly else None,
                "outlier_images": self.outlier_textures,
                "batch_size": self.build_batch_size, "seed": self.seed}

    def fit(self, data):
        """Stage one: build both banks (:meth:`build_banks`); they live in the state dict."""
        return self.build_banks(data)

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
        keys = None
        if self.training and torch.is_tensor(input.get("cache_index")):
            keys = [int(k) for k in input["cache_index"].tolist()]
        parts = self.knowledge_parts(q, row_src, row_cls, keys)
        z = self.assemble_knowledge(q, parts).view(b, h, w, -1).permute(0, 3, 1, 2)
        logits = self.score_logits(z, parts)
        out = {"patch_logits": logits, "pred": self.anomaly_map(logits)}
        mask = input.get("mask")
        if torch.is_tensor(mask):
            frac = downsample_mask(mask.to(logits.device), (h, w))
            out["patch_target"] = frac if self.target == "soft" else \
                (frac > self.filter_threshold).float()
        return out

    def anomaly_map(self, logits):
        if self.input_size is None and self.stride is None:
            raise UserError("DMAD: input_size or instrides is needed to size the anomaly map")
        size = self.input_size or [s * self.stride for s in logits.shape[-2:]]
        score = torch.sigmoid(logits.float()) if self.map_activation == "sigmoid" \
            else logits.float()
        score = F.interpolate(score, size=tuple(size), mode="bilinear", align_corners=False)
        return gaussian_blur(score, self.sigma)

    def extra_repr(self):
        return (f"dim={self.dim}, knowledge={self.knowledge}, normal_bank="
                f"{tuple(self.normal_bank.shape)}, abnormal_bank={tuple(self.abnormal_bank.shape)}"
                f", bank_per_class={self.bank_per_class}")
