"""TEMPORARY brute-force stand-in; replaced by the evaluation engine branch."""

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def evaluate_embeddings(query, query_labels, gallery=None, gallery_labels=None, *, ks: Sequence[int] = (1,),
                        metrics: Sequence[str] = ("recall",), distances: Sequence[str] = ("l2", "cosine"),
                        backend: str = "auto", reference=None, chunk_size=None) -> dict[str, float]:
    results = {}
    for distance in distances:
        q = F.normalize(query, dim=1) if distance == "cosine" else query
        g = q if gallery is None else (F.normalize(gallery, dim=1) if distance == "cosine" else gallery)
        gl = query_labels if gallery is None else gallery_labels
        d = torch.cdist(q, g)
        if gallery is None:
            d.fill_diagonal_(float("inf"))
        idx = d.topk(max(ks), largest=False).indices
        hit = gl[idx] == query_labels[:, None]
        for k in ks:
            results[f"{distance}/R@{k}"] = hit[:, :k].any(1).float().mean().item()
    return results
