"""PatchCore (Roth et al., CVPR 2022): a memory of normal patch features, scored by distance.

The baseline every memory-bank method is judged beside, built from the same pieces as DMAD's
normal bank (one greedy coreset, one chunked kNN in ``memory_bank.py``), so a comparison of the
two differs only in what DMAD adds. Nothing is trained: stage one (:meth:`fit`, run by the
engine with the batches :meth:`fit_spec` asks for) fills the memory, per class or over all
classes (unified) alike.

* features: the frozen prefix's locally aware patch features (``PatchCoreNeck``: 3x3
  neighbourhood average of the chosen stages, upsampled and concatenated);
* memory: greedy k-center coreset keeping ``coreset_ratio`` of the training patches (paper:
  0.1, 0.01 also reported), distances on a random projection to ``coreset_proj_dim``;
* patch score: distance to the nearest memory (mean over ``num_neighbors`` nearest; 1 as the
  paper); the map is the patch scores upsampled bilinearly and blurred (Gaussian ``sigma`` 4);
* image score: the paper's reweighting of the largest patch score s*: with m* the nearest
  memory of that patch and N_b(m*) the ``reweight_neighbors`` (b = 9) nearest memories of m*
  (m* first), w = 1 - exp(||q* - m*||) / sum_{m in N_b(m*)} exp(||q* - m||) and the image score
  is w * s* (as anomalib computes it). Evaluation takes image scores from the map
  (``evaluator.image_score``), so the head scales each image's map by its w (``reweight``) and
  the configs score the map's maximum (``reduction: max, kernel: 1``): the image score is then
  w times the maximum of the blurred map, where the paper takes the unblurred maximum (a
  departure the configs state).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from dualmem.models.heads.dmad import BANK_DTYPES, gaussian_blur
from dualmem.models.heads.memory_bank import BankState, StreamingCoreset, knn
from dualmem.models.registry import MODELS
from dualmem.utils.errors import UserError


def reweighting(query, nearest, bank, neighbors, query_chunk=4096, bank_chunk=16384):
    """The paper's image-score weight for each row of ``query`` (N, C), the patch with the
    largest score in each image, given ``nearest`` (N,) the index of its nearest memory."""
    m_star = bank[nearest].float()
    _, support = knn(m_star, bank, neighbors, query_chunk, bank_chunk)  # m* itself first
    support[:, 0] = nearest  # exact: ties in distance 0 must not replace m* by a duplicate
    dist = torch.linalg.vector_norm(query.float().unsqueeze(1) - bank[support].float(), dim=-1)
    return 1.0 - torch.softmax(dist, dim=1)[:, 0]


@MODELS.register(name="PatchCore", path="models.heads")
class PatchCore(BankState, nn.Module):
    learns_from_anomalies = False  # a normal memory only: labelled anomalies are not used

    def __init__(self, inplanes, instrides=None, input_size=None, feature_size=None,
                 coreset_ratio=0.1, coreset_proj_dim=128, max_bank=200000,
                 coreset_buffer_mb=512, num_neighbors=1, reweight=True, reweight_neighbors=9,
                 sigma=4.0, bank_dtype="float32", query_chunk=4096, bank_chunk=16384,
                 build_batch_size=None, seed=0):
        super().__init__()
        if isinstance(inplanes, (list, tuple)) and len(inplanes) != 1:
            raise UserError(f"PatchCore: expects one feature map (a neck such as "
                             f"PatchCoreNeck), got inplanes {list(inplanes)}")
        dim = int(list(inplanes)[0]) if isinstance(inplanes, (list, tuple)) else int(inplanes)
        if not 0.0 < float(coreset_ratio) <= 1.0:
            raise UserError(f"PatchCore: coreset_ratio must be in (0, 1], got {coreset_ratio}")
        if int(num_neighbors) < 1 or int(reweight_neighbors) < 1 or int(max_bank) < 1:
            raise UserError(f"PatchCore: num_neighbors, reweight_neighbors and max_bank must be "
                             f">= 1 (got {num_neighbors}, {reweight_neighbors}, {max_bank})")
        if bank_dtype not in BANK_DTYPES:
            raise UserError(f"PatchCore: bank_dtype must be one of {list(BANK_DTYPES)}, "
                             f"got '{bank_dtype}'")
        if float(sigma) < 0:
            raise UserError(f"PatchCore: sigma must be >= 0, got {sigma}")
        self.dim = dim
        self.input_size = list(input_size) if input_size is not None else None
        self.stride = int(list(instrides)[0]) if instrides else None
        self.coreset_ratio = float(coreset_ratio)
        self.coreset_proj_dim = int(coreset_proj_dim or 0)
        self.max_bank = int(max_bank)
        self.coreset_buffer_mb = float(coreset_buffer_mb)
        self.num_neighbors = int(num_neighbors)
        self.reweight = bool(reweight)
        self.reweight_neighbors = int(reweight_neighbors)
        self.sigma = float(sigma)
        self.bank_dtype = BANK_DTYPES[bank_dtype]
        self.query_chunk, self.bank_chunk = int(query_chunk), int(bank_chunk)
        self.build_batch_size = build_batch_size
        self.seed = int(seed)
        self.class_names = []
        self.build_info = {}
        self.register_buffer("memory_bank", torch.zeros(0, dim, dtype=self.bank_dtype))
        self.register_buffer("memory_cls", torch.zeros(0, dtype=torch.int32))

    # ------------------------------------------------------------------ state
    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._take_shapes(state_dict, prefix, ("memory_bank", "memory_cls"))  # data-sized
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ------------------------------------------------------------------ stage one
    def fit_spec(self):
        """Features of the plain normal training images; no pseudo anomalies."""
        return {"output": "feature_align", "pseudo_per_image": 0, "pseudo_recipe": None,
                "outlier_images": None, "batch_size": self.build_batch_size, "seed": self.seed}

    @torch.no_grad()
    def fit(self, data):
        """Stage one: the coreset of every normal training patch (streamed, bounded memory)."""
        import time

        t0 = time.time()
        log = data.log or (lambda m: None)
        self.class_names = list(data.class_names)
        if not data.n_normal:
            raise UserError("PatchCore: no normal (label 0) training images to build the memory")
        rows = max(1024, int(self.coreset_buffer_mb * 2 ** 20 / (4 * self.dim)))
        coreset = StreamingCoreset(self.coreset_ratio, self.max_bank, self.coreset_proj_dim,
                                   rows, self.seed)
        grid = None
        for batch in data.normal_batches:
            feats = batch["features"].float()
            b, c, h, w = feats.shape
            if c != self.dim:
                raise UserError(f"PatchCore: features have {c} channels but the head was built "
                                f"for {self.dim} (inplanes)")
            grid = (h, w)
            coreset.add(feats.permute(0, 2, 3, 1).reshape(-1, c),
                        batch["index"].repeat_interleave(h * w),
                        batch["cls"].repeat_interleave(h * w))
        feats, _, cls = coreset.result()
        device = self.memory_bank.device
        self._buffers["memory_bank"] = feats.to(device, self.bank_dtype).contiguous()
        self._buffers["memory_cls"] = cls.to(device, torch.int32).contiguous()
        per_class = torch.bincount(self.memory_cls.long().cpu(),
                                   minlength=len(self.class_names)).tolist()
        self.build_info = {
            "classes": len(self.class_names), "feature_grid": list(grid or []),
            "normal_images": data.n_normal, "patches_seen": coreset.seen,
            "memory_bank": int(self.memory_bank.shape[0]),
            "memories_per_class": dict(zip(self.class_names, per_class)),
            "coreset_reductions": coreset.reductions, "covering_radius": coreset.radius,
            "time_total_s": time.time() - t0,
        }
        log("PatchCore memory: " + ", ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
            for k, v in self.build_info.items()))
        return dict(self.build_info)

    # ------------------------------------------------------------------ scoring
    def patch_scores(self, q):
        """(N, C) -> (distances to the nearest ``num_neighbors`` memories (N, k), nearest (N,))."""
        if self.memory_bank.shape[0] == 0:
            raise RuntimeError("PatchCore: the memory is empty; the engine fills it (fit) "
                               "before evaluation, or it comes from a checkpoint")
        d, idx = knn(q, self.memory_bank, self.num_neighbors, self.query_chunk, self.bank_chunk)
        return d, idx[:, 0]

    def forward(self, input):
        x = input["feature_align"]
        b, c, h, w = x.shape
        q = x.permute(0, 2, 3, 1).reshape(-1, c).float()
        d, nearest = self.patch_scores(q)
        scores = d.mean(1).view(b, h * w)
        out = {"patch_scores": scores.view(b, 1, h, w)}
        weight = torch.ones(b, device=x.device)
        if self.reweight:
            top = scores.argmax(1) + torch.arange(b, device=x.device) * h * w
            weight = reweighting(q[top], nearest[top], self.memory_bank,
                                 self.reweight_neighbors, self.query_chunk, self.bank_chunk)
        out["image_weight"] = weight
        out["pred"] = self.anomaly_map(scores.view(b, 1, h, w)) * weight.view(b, 1, 1, 1)
        return out

    def anomaly_map(self, scores):
        if self.input_size is None and self.stride is None:
            raise UserError("PatchCore: input_size or instrides is needed to size the map")
        size = self.input_size or [s * self.stride for s in scores.shape[-2:]]
        score = F.interpolate(scores.float(), size=tuple(size), mode="bilinear",
                              align_corners=False)
        return gaussian_blur(score, self.sigma)

    def extra_repr(self):
        return (f"dim={self.dim}, memory={tuple(self.memory_bank.shape)}, "
                f"coreset_ratio={self.coreset_ratio}, reweight={self.reweight}")
