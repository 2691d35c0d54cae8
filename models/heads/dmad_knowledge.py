"""DMAD's retrieval and knowledge: the nearest memories of every patch in each bank and the
knowledge vector built from them (a mixin of :class:`models.heads.dmad.DMAD`).

Knowledge parts (``knowledge``): ``distance`` - the nearest normal and abnormal distances in
units of ``dist_scale``; ``residual`` - q minus each nearest memory; ``attention`` - softmax
read-outs over the ``topk`` nearest memories of each bank; ``real_distance`` (ours) - the
distance to the nearest memory made from a labelled anomaly (its patches, anomaly centres and
their samples), capped at ``REAL_DISTANCE_CAP`` and equal to the cap when there are none. The
abnormal distance alone cannot tell a pseudo anomaly from a real defect: with it, what the
nearest abnormal memory *is* reaches the score head, so labelled anomalies can pay.
"""
import torch

from dualmem.models.heads.dmad_banks import KIND_CENTRE, KIND_REAL, KIND_SAMPLE
from dualmem.models.heads.memory_bank import knn, min_distance_per_group, retrieval_excluder

KNOWLEDGE_PARTS = ("distance", "residual", "attention", "real_distance")
REAL_KINDS = (KIND_REAL, KIND_CENTRE, KIND_SAMPLE)
REAL_DISTANCE_CAP = 4.0


class KnowledgeRetrieval:
    """Needs from the head: the bank buffers, ``dist_scale``, ``knowledge``, ``include_query``,
    ``topk``, ``temperature``, the chunk sizes and ``_retrieval_memo``."""

    def knowledge_dim(self):
        d = self.dim if self.include_query else 0
        d += 2 if "distance" in self.knowledge else 0
        d += 2 * self.dim if "residual" in self.knowledge else 0
        d += 2 * self.dim if "attention" in self.knowledge else 0
        d += 1 if "real_distance" in self.knowledge else 0
        return d

    def _nearest(self, q, bank, bank_src, row_src):
        d, _ = knn(q, bank, 1, self.query_chunk, self.bank_chunk,
                   retrieval_excluder(row_src, None, bank_src, None))
        return d[:, 0]

    def _route_classes(self, q, batch, hw):
        """Per-image class ids by the class bank nearest on average (bank_per_class)."""
        d = min_distance_per_group(q, self.normal_bank, self.normal_cls, len(self.class_names),
                                   self.query_chunk, self.bank_chunk)
        return d.view(batch, hw, -1).mean(1).argmin(1)

    def _nearest_indices(self, q, bank, bank_src, bank_cls, row_src, row_cls, derived=()):
        """(N, K) indices of each row's ``topk`` nearest allowed memories."""
        k = min(self.topk, bank.shape[0])
        d, idx = knn(q, bank, k, self.query_chunk, self.bank_chunk,
                     retrieval_excluder(row_src, row_cls, bank_src, bank_cls, *derived))
        allowed = torch.isfinite(d)
        # fewer allowed memories than k: repeat the nearest allowed one, never an excluded one
        idx = torch.where(allowed, idx, idx[:, :1])
        lost = ~allowed[:, 0]
        if bool(lost.any()):  # every candidate excluded (e.g. a one-image class): no restriction
            _, idx[lost] = knn(q[lost], bank, k, self.query_chunk, self.bank_chunk)
        return idx

    def _memo_indices(self, name, keys, q, bank, bank_src, bank_cls, row_src, row_cls, derived):
        """:meth:`_nearest_indices` through the per-image memo: ``keys`` (B,) say which fixed
        input each image is; only images not seen before are searched."""
        store = self._retrieval_memo.setdefault(name, {})
        hw = q.shape[0] // len(keys)
        missing = [i for i, key in enumerate(keys) if key not in store]
        if missing:
            rows = (torch.tensor(missing, device=q.device).unsqueeze(1) * hw
                    + torch.arange(hw, device=q.device)).reshape(-1)
            found = self._nearest_indices(
                q[rows], bank, bank_src, bank_cls, None if row_src is None else row_src[rows],
                None if row_cls is None else row_cls[rows], derived)
            for j, i in enumerate(missing):
                store[keys[i]] = found[j * hw:(j + 1) * hw].to("cpu", torch.int32)
        return torch.cat([store[key] for key in keys]).to(q.device, torch.long)

    def _retrieve(self, q, bank, bank_src, bank_cls, row_src, row_cls, derived=(), name=None,
                  keys=None, nearest_only=False):
        """(distances (N, K), memories (N, K, C)) with gradients w.r.t. q. ``derived``:
        (row groups, links) of memories derived from several images (see
        ``memory_bank.retrieval_excluder``); ``keys``: per-image memo keys (see the module
        docstring), None to search afresh; ``nearest_only``: K = 1, when no knowledge part
        reads the others (only the attention read-outs do)."""
        args = (bank, bank_src, bank_cls, row_src, row_cls, derived)
        idx = self._memo_indices(name, keys, q.detach(), *args) if keys is not None \
            else self._nearest_indices(q.detach(), *args)
        if nearest_only:
            idx = idx[:, :1]
        mem = bank[idx].float()
        diff = q.unsqueeze(1) - mem
        dist = (diff.pow(2).sum(-1) + 1e-12).sqrt()
        return dist, mem, diff[:, 0]

    def _real_subset(self):
        """The abnormal memories made from labelled anomalies, with their ids (or None); kept
        while the banks stay as they are (``_retrieval_memo`` is cleared with them)."""
        key = (self.abnormal_bank.data_ptr(), self.abnormal_kind.data_ptr())  # moved: recompute
        cached = self._retrieval_memo.get("real_subset")
        if cached is not None and cached[1] == key:
            return cached[0]
        subset = self._select_real()
        self._retrieval_memo["real_subset"] = (subset, key)
        return subset

    def _select_real(self):
        real = torch.tensor(REAL_KINDS, dtype=torch.int32, device=self.abnormal_kind.device)
        keep = (self.abnormal_kind.unsqueeze(1) == real).any(1)  # isin: not in ONNX opset 17
        if not bool(keep.any()):
            return None
        return (self.abnormal_bank[keep], self.abnormal_src[keep], self.abnormal_cls[keep],
                (self.abnormal_group[keep], self.derived_links))

    def knowledge_parts(self, q, row_src=None, row_cls=None, keys=None):
        """The knowledge of (N, C) patch features, part by part: ``normal_distance`` and
        ``abnormal_distance`` (N, 1) in units of ``dist_scale``, ``residual`` and
        ``attention`` (N, 2C), ``real_distance`` (N, 1) when asked for."""
        if self.normal_bank.shape[0] == 0 or self.abnormal_bank.shape[0] == 0:
            raise RuntimeError("DMAD: the memory banks are empty; the engine builds them "
                               "(fit) before training, or they come from a checkpoint")
        q = q.float()
        scale = self.dist_scale.float()
        banks = (("normal", row_cls if self.bank_per_class else None), ("abnormal", None))
        attention = "attention" in self.knowledge  # the only part reading all topk memories
        dists, resids, reads = [], [], []
        for name, cls in banks:
            derived = (self.abnormal_group, self.derived_links) if name == "abnormal" else ()
            dist, mem, resid = self._retrieve(
                q, getattr(self, f"{name}_bank"), getattr(self, f"{name}_src"),
                getattr(self, f"{name}_cls"), row_src, cls, derived, name, keys,
                nearest_only=not attention)
            dists.append(dist[:, :1] / scale)
            resids.append(resid)
            if attention:
                w = torch.softmax(-dist / (self.temperature * scale), dim=1)
                reads.append((w.unsqueeze(-1) * mem).sum(1))
        parts = {"normal_distance": dists[0], "abnormal_distance": dists[1],
                 "residual": torch.cat(resids, 1)}
        if attention:
            parts["attention"] = torch.cat(reads, 1)
        if "real_distance" in self.knowledge:
            real = self._real_subset()
            cap = torch.full_like(dists[0], REAL_DISTANCE_CAP)
            if real is None:
                parts["real_distance"] = cap
            else:
                bank, src, cls, derived = real
                dist, _, _ = self._retrieve(q, bank, src, cls, row_src, None, derived, "real",
                                            keys, nearest_only=True)
                parts["real_distance"] = torch.minimum(dist[:, :1] / scale, cap)
        return parts

    def knowledge_features(self, q, row_src=None, row_cls=None, keys=None):
        """(N, C) patch features -> (N, knowledge_dim()) knowledge vectors. ``keys``: one memo
        key per image (rows in image order), to reuse retrievals of fixed inputs."""
        return self.assemble_knowledge(q, self.knowledge_parts(q, row_src, row_cls, keys))

    def assemble_knowledge(self, q, parts):
        out = [q.float()] if self.include_query else []
        if "distance" in self.knowledge:
            out += [parts["normal_distance"], parts["abnormal_distance"]]
        if "residual" in self.knowledge:
            out.append(parts["residual"])
        if "attention" in self.knowledge:
            out.append(parts["attention"])
        if "real_distance" in self.knowledge:
            out.append(parts["real_distance"])
        return torch.cat(out, dim=1)
