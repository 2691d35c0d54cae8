"""DMAD's stage one: filling the normal and abnormal memory banks (coreset, anomaly centre
sampling, memory caps) from feature batches the engine feeds (``utils/engine/stage_one.py``).

A mixin of :class:`models.heads.dmad.DMAD`, so the banks stay buffers of the head (checkpoint
keys unchanged) while the scoring head's module holds only retrieval and scoring.
"""
import math
import time

import torch

from dualmem.models.heads.memory_bank import StreamingCoreset, filter_patches, greedy_coreset, kmeans
from dualmem.utils.errors import UserError

KIND_PSEUDO, KIND_REAL, KIND_CENTRE, KIND_SAMPLE, KIND_TEXTURE = 0, 1, 2, 3, 4
CENTER_SAMPLING = ("kmeans", "mean_noise")
NORMAL_SHARE = 0.8


class BankBuilding:
    """Needs from the head: ``dim``, the bank settings, ``_set_bank``, ``_nearest`` and the
    ``dist_scale`` buffer."""

    def bank_caps(self, normal_rows=None, extra_bytes=0):
        """(normal cap, abnormal cap) in rows from ``bank_memory_mb`` and the max sizes; the
        abnormal cap is what the normal bank (``normal_rows``, default its cap) and
        ``extra_bytes`` (the derived memories' links) leave."""
        budget = int(self.bank_memory_mb * 2 ** 20)
        normal_cap = min(self.max_normal_bank, int(NORMAL_SHARE * budget) // self.row_nbytes())
        used = (normal_cap if normal_rows is None else normal_rows) * self.row_nbytes()
        abnormal_cap = min(self.max_abnormal_bank,  # + abnormal_kind, abnormal_group
                           (budget - used - int(extra_bytes)) // (self.row_nbytes() + 8))
        if normal_cap < 1 or abnormal_cap < 1:
            raise UserError(f"DMAD: bank_memory_mb {self.bank_memory_mb} is too small for "
                             f"{self.dim}-dim memories")
        return normal_cap, abnormal_cap

    @torch.no_grad()
    def build_banks(self, data):
        """Fill the banks from a :class:`utils.engine.stage_one.StageOneData`: feature batches
        of the normal training images (with their pseudo anomalies) and of the seen anomalies.
        Returns the build statistics (also kept in ``build_info``)."""
        log = data.log or (lambda m: None)
        t0 = time.time()
        device = data.device
        self.class_names = list(data.class_names)
        if not data.n_normal:
            raise UserError("DMAD: no normal (label 0) training images to build the normal bank")
        if not data.pseudo and not data.n_seen and not data.n_outlier:
            raise UserError("DMAD: pseudo_per_image is 0, no outlier textures and no seen "
                            "anomalies: the abnormal bank would be empty")
        buffer_rows = max(1024, int(self.coreset_buffer_mb * 2 ** 20 / (4 * self.dim)))
        normal_cap, _ = self.bank_caps()
        normal = StreamingCoreset(self.coreset_ratio, normal_cap, self.coreset_proj_dim,
                                  buffer_rows, self.seed)
        pseudo = StreamingCoreset(self.abnormal_coreset_ratio, self.max_abnormal_bank,
                                  self.coreset_proj_dim, buffer_rows, self.seed + 1)
        sample_q, sample_src = [], []
        g = torch.Generator().manual_seed(self.seed)
        per_batch = max(1, 4096 // data.n_normal_batches)
        grid = None
        for batch in data.normal_batches:
            feats = batch["features"].float()
            b, c, h, w = feats.shape
            grid = (h, w)
            if c != self.dim:
                raise UserError(f"DMAD: features have {c} channels but the head was built for "
                                 f"{self.dim} (inplanes)")
            rows = feats.permute(0, 2, 3, 1).reshape(-1, c)
            src = batch["index"].repeat_interleave(h * w)
            cls = batch["cls"].repeat_interleave(h * w)
            normal.add(rows, src, cls)
            pick = torch.randperm(rows.shape[0], generator=g)[:per_batch]
            sample_q.append(rows[pick.to(device)])
            sample_src.append(src[pick.to(device)])
            if "pseudo_features" in batch:
                pf, which = filter_patches(batch["pseudo_features"].float(),
                                           batch["pseudo_mask"], self.filter_threshold)
                owner = which // self.pseudo_per_image
                pseudo.add(pf, batch["index"][owner], batch["cls"][owner])
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
        real = self._seen_features(data.seen_batches) if data.n_seen else None
        parts, links = self._center_sampling(*real) if real is not None else ([], None)
        textures = self._outlier_features(data, buffer_rows) if data.n_outlier else None
        _, abnormal_cap = self.bank_caps(normal_rows=self.normal_bank.shape[0],
                                         extra_bytes=0 if links is None else 4 * links.numel())
        reserved = sum(p[0].shape[0] for p in parts)
        if (data.pseudo and reserved > abnormal_cap // 2) or reserved > abnormal_cap:
            # too many real-derived rows: coreset them to leave room for pseudo ones
            keep = abnormal_cap // 2 if data.pseudo else abnormal_cap
            cat = [torch.cat([p[i] for p in parts]) for i in range(5)]
            idx, _ = greedy_coreset(cat[0], keep, self.coreset_proj_dim, self.seed + 2)
            parts = [tuple(t[idx] for t in cat)]
            reserved = keep
        if textures is not None:  # outlier textures: after the real rows, before pseudo ones
            room = max(0, abnormal_cap - reserved)
            t_feats = textures
            if textures.shape[0] > room:
                idx, _ = greedy_coreset(textures, max(room, 1), self.coreset_proj_dim,
                                        self.seed + 4)
                t_feats = textures[idx[:room]]
            n = t_feats.shape[0]
            none = torch.full((n,), -1, dtype=torch.long, device=t_feats.device)
            parts.append((t_feats, none, none, torch.full_like(none, KIND_TEXTURE), none))
            reserved += n
        if data.pseudo:
            p_feats, p_src, p_cls = pseudo.result() if pseudo.seen else (
                torch.zeros(0, self.dim, device=device), torch.zeros(0, dtype=torch.long),
                torch.zeros(0, dtype=torch.long))
            room = abnormal_cap - reserved
            if p_feats.shape[0] > room:
                idx, _ = greedy_coreset(p_feats, room, self.coreset_proj_dim, self.seed + 3)
                p_feats, p_src, p_cls = p_feats[idx], p_src[idx], p_cls[idx]
            kind = torch.full((p_feats.shape[0],), KIND_PSEUDO, dtype=torch.long)
            parts.insert(0, (p_feats, p_src.cpu(), p_cls.cpu(), kind, torch.full_like(kind, -1)))
        cat = [torch.cat([p[i].to(device) for p in parts]) for i in range(5)]
        if cat[0].shape[0] == 0:
            raise UserError("DMAD: the abnormal bank is empty (no pseudo-anomalous patch "
                             "passed the Filter and no seen anomalies)")
        self._set_bank("abnormal", *cat, links=links)
        kinds = torch.bincount(self.abnormal_kind.long().cpu(), minlength=5).tolist()
        self.build_info = {
            "classes": len(self.class_names), "feature_grid": list(grid or []),
            "normal_images": data.n_normal, "seen_anomaly_images": data.n_seen,
            "normal_patches_seen": normal.seen, "normal_bank": int(self.normal_bank.shape[0]),
            "coreset_reductions": normal.reductions,
            "pseudo_patches_seen": pseudo.seen,
            "abnormal_bank": int(self.abnormal_bank.shape[0]),
            "abnormal_pseudo": kinds[KIND_PSEUDO], "abnormal_real": kinds[KIND_REAL],
            "abnormal_centres": kinds[KIND_CENTRE], "abnormal_samples": kinds[KIND_SAMPLE],
            "abnormal_textures": kinds[KIND_TEXTURE],
            "texture_images": data.n_outlier, "texture_source": data.outlier_source,
            "texture_files": list(data.outlier_files or []),
            "derived_links": int(self.derived_links.shape[0]),
            "dist_scale": float(self.dist_scale), "bank_mb": self.bank_nbytes() / 2 ** 20,
            "bank_memory_mb": self.bank_memory_mb,
            "time_normal_s": t_normal, "time_total_s": time.time() - t0,
        }
        log("DMAD banks: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                       for k, v in self.build_info.items()
                                       if k != "texture_files"))
        return dict(self.build_info)

    def _seen_features(self, batches):
        feats, srcs, clss = [], [], []
        for batch in batches:
            f, which = filter_patches(batch["features"].float(), batch["mask"],
                                      self.filter_threshold)
            feats.append(f)
            srcs.append(batch["index"][which])
            clss.append(batch["cls"][which])
        if not feats:
            return None
        feats = torch.cat(feats)
        if feats.shape[0] == 0:
            return None
        return feats, torch.cat(srcs), torch.cat(clss)

    def _outlier_features(self, data, buffer_rows):
        """Patch features of the outlier texture images, reduced by a coreset keeping
        ``texture_coreset_ratio`` of them (DMAD's reference: one DTD image per texture class,
        10 %)."""
        core = StreamingCoreset(self.texture_coreset_ratio, self.max_abnormal_bank,
                                self.coreset_proj_dim, buffer_rows, self.seed + 5)
        for batch in data.outlier_batches:
            feats = batch["features"].float()
            rows = feats.permute(0, 2, 3, 1).reshape(-1, feats.shape[1])
            none = torch.full((rows.shape[0],), -1, dtype=torch.long, device=rows.device)
            core.add(rows, none, none)
        return core.result()[0] if core.seen else None

    def _center_sampling(self, feats, src, cls):
        """``center_sampling: mean_noise`` (DMAD's reference code): one centre, the mean of all
        real anomalous patches, and as many samples ``mean + N(0, center_noise_std^2 I)`` as
        there are real patches (the centre itself is not kept); ``kmeans``: see below."""
        if self.center_sampling == "mean_noise":
            return self._mean_noise_sampling(feats, src, cls)
        return self._kmeans_sampling(feats, src, cls)

    def _mean_noise_sampling(self, feats, src, cls):
        parts = [(feats, src, cls, torch.full_like(src, KIND_REAL), torch.full_like(src, -1))]
        n = feats.shape[0]
        g = torch.Generator().manual_seed(self.seed + 7)
        noise = torch.randn(n, self.dim, generator=g).to(feats.device)
        samples = feats.mean(0, keepdim=True) + self.center_noise_std * noise
        none = torch.full((n,), -1, dtype=src.dtype, device=src.device)
        parts.append((samples, none, torch.full_like(none, -1),
                      torch.full_like(none, KIND_SAMPLE), torch.zeros_like(none)))
        links = torch.tensor([[0, int(i)] for i in torch.unique(src).tolist()],
                             dtype=torch.long).reshape(-1, 2)
        return parts, links

    def _kmeans_sampling(self, feats, src, cls):
        """Real anomalous patches, plus per class k-means centres and samples around them.

        Returns (parts, links): parts are (features, src, cls, kind, group) tuples; a centre and
        its samples share a group id, and ``links`` (L, 2) holds (group, image) for every image
        with a patch in that centre's cluster: in training those images do not see the group
        (leave-one-image-out; without it a seen anomaly finds memories made from itself)."""
        none_group = torch.full_like(src, -1)
        parts = [(feats, src, cls, torch.full_like(src, KIND_REAL), none_group)]
        links = []
        if self.num_centers < 1:
            return parts, None
        g = torch.Generator().manual_seed(self.seed + 7)
        first = 0  # the next free group id
        for c in torch.unique(cls).tolist():
            x, x_src = feats[cls == c], src[cls == c]
            centres, assign = kmeans(x, self.num_centers, seed=self.seed + 11 * (c + 1))
            k = centres.shape[0]
            groups = torch.arange(first, first + k, dtype=src.dtype, device=src.device)
            for j in range(k):
                members = x_src[assign == j]
                if members.numel() == 0:  # an empty cluster's centre copies some patch:
                    members = x_src       # exclude it for every image of the class
                for image in torch.unique(members).tolist():
                    links.append((first + j, image))
            none = torch.full((k,), -1, dtype=src.dtype, device=src.device)
            parts.append((centres, none, torch.full_like(none, c),
                          torch.full_like(none, KIND_CENTRE), groups))
            if self.center_samples < 1:
                first += k
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
                          torch.full_like(none, KIND_SAMPLE),
                          groups.repeat_interleave(self.center_samples)))
            first += k
        return parts, torch.tensor(links, dtype=torch.long).reshape(-1, 2)
