"""DMAD as its authors' code (``dmadiad/DMAD``, built on SimpleNet) does it, beside our
reconstruction (:class:`models.heads.dmad.DMAD`). Facts from that code; where it cannot run or
contradicts itself, our fix is named (and listed in ``experiments/MVTec-AD/dmad/README.md``).

* Banks (stage one, shared with DMAD): normal bank a 2 % coreset; abnormal bank = the real
  anomalous patches of the seen images + ``center_sampling: mean_noise`` (the mean of the real
  patches plus N(0, 0.015^2) noise, as many samples as real patches) + features of outlier
  texture images (one image per texture class, ``outlier_textures``) reduced by a 10 % coreset.
  No pseudo anomalies are pasted into images.
* Knowledge: for a patch x and its nearest memory n (k = 1) in each bank,
  ``K(x, n) = BN(x - n + CrossAttn(x, n))``. The reference's cross-attention takes n as the
  query and x as the one key and value: a softmax over one key is 1, so it is exactly
  ``W_v x + b_v`` (one linear map). One module serves both banks; its BatchNorm keeps running
  statistics per bank (ours: the reference never uses running statistics, see below).
* Score: one shared linear projection P applied to x, K_normal and K_abnormal, concatenated,
  then an MLP: Linear -> BN -> LeakyReLU(0.2) -> Linear (no bias) giving a normality score s;
  the anomaly logit is -s. Map: -s bilinearly up-sampled, Gaussian sigma 4 (no sigmoid).
* Training (SimpleNet's hinge, :class:`models.losses.DMADHingeLoss`): normal patches'
  s > +0.5; the same features plus one N(0, noise_std^2) draw added to all three parts (after
  the projection), and real anomalous patches, s < -0.5, the real ones weighted x10.
  ``normal_per_step`` (ours, null = all as the reference) trains on a random subset of each
  batch's normal patches: the step's cost is the retrieval and the MLP over every patch.

Where we differ from that code (its bugs): the knowledge module is trained (the reference
creates its optimizer but never steps it) and is in eval mode at test time (the reference
scores test batches with batch statistics); real anomalies go through the same knowledge
module as every other patch (the reference feeds them raw residuals); leave-one-image-out in
training (the reference retrieves a real patch's own copy from the abnormal bank).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from dualmem.models.heads.dmad import DMAD, KIND_REAL
from dualmem.models.heads.memory_bank import downsample_mask, knn, retrieval_excluder
from dualmem.models.registry import MODELS
from dualmem.utils.errors import UserError


@MODELS.register(name="DMADReference", path="models.heads")
class DMADReference(DMAD):
    map_activation = "none"

    def __init__(self, inplanes, instrides=None, input_size=None, feature_size=None,
                 bank_per_class=False,
                 mlp_hidden=1024, noise_std=0.015, real_per_step=512, normal_per_step=None,
                 projection=True,
                 center_sampling="mean_noise", pseudo_per_image=0,
                 outlier_textures=None, filter_threshold=0.0, **kwargs):
        if bank_per_class:
            raise UserError("DMADReference: bank_per_class is not supported (the reference "
                            "keeps one normal bank over all classes)")
        self.mlp_hidden, self.projection = int(mlp_hidden), bool(projection)
        textures = {"texture_dir": None, "count": 47, "per_folder": 1, "seed": 0}
        textures.update(outlier_textures or {})
        super().__init__(inplanes, instrides, input_size, feature_size,
                         center_sampling=center_sampling, pseudo_per_image=pseudo_per_image,
                         outlier_textures=textures, filter_threshold=filter_threshold,
                         knowledge=["residual"], include_query=True, **kwargs)
        self.noise_std = float(noise_std)
        self.real_per_step = int(real_per_step)
        self.normal_per_step = int(normal_per_step) if normal_per_step else None

    def _build_scorer(self, hidden, dropout, prior):
        d = self.dim
        self.value = nn.Linear(d, d)  # CrossAttn with one key = its value projection
        # one affine BN as the reference, but running statistics per bank: one set of running
        # statistics would average the normal and abnormal residuals, which differ, and shift
        # every test patch away from what training normalised
        self.knowledge_bn = nn.BatchNorm1d(d)
        self.knowledge_bn_abnormal = nn.BatchNorm1d(d, affine=False)
        self.project = nn.Linear(d, d) if self.projection else nn.Identity()
        self.score_head = nn.Sequential(
            nn.Linear(3 * d, self.mlp_hidden), nn.BatchNorm1d(self.mlp_hidden),
            nn.LeakyReLU(0.2), nn.Linear(self.mlp_hidden, 1, bias=False))
        for m in [self.value, self.project, *self.score_head]:
            if isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)  # the reference's init

    def knowledge_dim(self):
        return 3 * self.dim

    def _knowledge_norm(self, x, bank):
        """BatchNorm1d with the shared affine parameters and the bank's running statistics."""
        bn = self.knowledge_bn
        stats = bn if bank == "normal" else self.knowledge_bn_abnormal
        return F.batch_norm(x, stats.running_mean, stats.running_var, bn.weight, bn.bias,
                            self.training, bn.momentum, bn.eps)

    def _nearest_memory(self, q, name, row_src):
        bank = getattr(self, f"{name}_bank")
        derived = (self.abnormal_group, self.derived_links) if name == "abnormal" else ()
        excl = retrieval_excluder(row_src, None, getattr(self, f"{name}_src"), None, *derived)
        d, idx = knn(q.detach(), bank, 1, self.query_chunk, self.bank_chunk, excl)
        lost = ~torch.isfinite(d[:, 0])
        if bool(lost.any()):  # every memory excluded: no restriction
            _, idx[lost] = knn(q.detach()[lost], bank, 1, self.query_chunk, self.bank_chunk)
        return bank[idx[:, 0]].float()

    def knowledge_features(self, q, row_src=None, row_cls=None):
        """(N, C) -> (N, 3C): [P x, P K(x, n_normal), P K(x, n_abnormal)]."""
        if self.normal_bank.shape[0] == 0 or self.abnormal_bank.shape[0] == 0:
            raise RuntimeError("DMADReference: the memory banks are empty; the engine builds "
                               "them (fit) before training, or they come from a checkpoint")
        q = q.float()
        v = self.value(q)
        parts = [self.project(q)]
        for name in ("normal", "abnormal"):
            n = self._nearest_memory(q, name, row_src)
            parts.append(self.project(self._knowledge_norm(q - n + v, name)))
        return torch.cat(parts, 1)

    def forward(self, input):
        x = input["feature_align"]
        b, c, h, w = x.shape
        q = x.permute(0, 2, 3, 1).reshape(-1, c)
        mask = input.get("mask")
        if self.training and torch.is_tensor(mask):
            return self._training_scores(q, input, downsample_mask(mask.to(q.device), (h, w)))
        z = self.knowledge_features(q)
        logits = -self.score_head(z).view(b, h, w, 1).permute(0, 3, 1, 2)
        return {"patch_logits": logits, "pred": self.anomaly_map(logits)}

    def _training_scores(self, q, input, frac):
        """Anomaly logits (-s) of normal patches, their noisy copies and real anomalous
        patches (in-mask patches of the batch and ``real_per_step`` drawn from the bank's real
        rows), all through one MLP pass (shared BatchNorm statistics, as the reference)."""
        frac = frac.reshape(-1)
        row_src = None
        if self.exclude_self and torch.is_tensor(input.get("index")):
            row_src = input["index"].to(q.device).long().repeat_interleave(
                q.shape[0] // input["index"].numel())
        normal = frac == 0
        if self.normal_per_step and int(normal.sum()) > self.normal_per_step:
            # ours: a random subset of the normal patches per step (the reference uses all)
            keep = normal.nonzero()[:, 0]
            keep = keep[torch.randperm(keep.numel(), device=keep.device)[:self.normal_per_step]]
            normal = torch.zeros_like(normal).index_fill_(0, keep, True)
        real = frac > self.filter_threshold
        real_q = [q[real]]
        real_src = [row_src[real]] if row_src is not None else None
        bank_real = (self.abnormal_kind == KIND_REAL).nonzero()[:, 0]
        if self.real_per_step and bank_real.numel():
            pick = bank_real[torch.randint(bank_real.numel(), (self.real_per_step,),
                                           device=bank_real.device)]
            real_q.append(self.abnormal_bank[pick].float())
            if real_src is not None:
                real_src.append(self.abnormal_src[pick].long())
        real_q = torch.cat(real_q)
        src = None if row_src is None else torch.cat([row_src[normal], torch.cat(real_src)])
        z = self.knowledge_features(torch.cat([q[normal], real_q]), src)
        n_norm = int(normal.sum())
        z_norm, z_real = z[:n_norm], z[n_norm:]
        noise = torch.randn(n_norm, self.dim, device=z.device) * self.noise_std
        z_fake = z_norm + noise.repeat(1, 3)  # one draw, on all three parts
        s = self.score_head(torch.cat([z_norm, z_fake, z_real]))[:, 0]
        return {"hinge_normal": -s[:n_norm], "hinge_fake": -s[n_norm:2 * n_norm],
                "hinge_real": -s[2 * n_norm:]}
