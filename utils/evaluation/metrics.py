"""Retrieval and clustering metrics of an embedding: Recall@K, MAP@R, R-Precision, NMI, utilization.

Queries are processed in chunks and the metrics are accumulated chunk by chunk, so memory stays
bounded: no N x N matrix, and no N x K neighbour matrix beyond one chunk. Neighbours come from
utils.evaluation.knn in its deterministic (distance, gallery index) order, whichever backend searches.
"""

import math
from collections.abc import Iterator, Sequence

import faiss
import numpy as np
import torch
from sklearn.metrics import normalized_mutual_info_score
from torch import Tensor

from utils.errors import check_choice
from utils.evaluation.knn import (
    DISTANCES,
    SAMPLE_BLOCKS,
    Searcher,
    TorchSearcher,
    exact_knn,
    first_positive_ranks,
    make_searcher,
    neighbours_within,
    prepare,
    resolve_backend,
)

METRICS = ("recall", "map_at_r", "r_precision", "nmi", "utilization")
RETRIEVAL_METRICS = ("recall", "map_at_r", "r_precision")
# Memory a chunk of queries may spend on its distance rows and k-NN results.
CHUNK_BYTES = 256 * 2**20
# Recall@K collects at least min(max(ks), CANDIDATES) nearest neighbours of each query; a first
# positive beyond them (and within max(ks)) sends the query to the k-NN search.
CANDIDATES = 8
KMEANS_SEED = 1234
KMEANS_ITERATIONS = 20
FLOAT32_MAX = float(np.finfo(np.float32).max)

Labels = Tensor | np.ndarray | Sequence[int]


def evaluate_embeddings(
    query: Tensor | np.ndarray,
    query_labels: Labels,
    gallery: Tensor | np.ndarray | None = None,
    gallery_labels: Labels | None = None,
    *,
    ks: Sequence[int],
    metrics: Sequence[str] = RETRIEVAL_METRICS,
    distances: Sequence[str] = DISTANCES,
    backend: str = "auto",
    reference: Tensor | np.ndarray | None = None,
    chunk_size: int | None = None,
) -> dict[str, float]:
    """Evaluate query embeddings against a gallery (or against themselves when gallery is None).

    Returns flat keys: "{distance}/R@{k}", "{distance}/MAP@R", "{distance}/R-Precision" and
    "queries_without_positive" for the retrieval metrics, "NMI" and "utilization".
    Self-search (gallery None) excludes each query from its own neighbours by index, so duplicates
    of it still count. Queries whose label has no other item in the gallery are excluded from the
    retrieval metrics and counted. "utilization" needs the training embeddings as reference.
    chunk_size is the number of queries searched at once (default: chosen to fit CHUNK_BYTES).
    """
    _check_request(metrics, distances, ks, reference, chunk_size)
    _check_shapes(query, query_labels, gallery, gallery_labels)
    _check_contents(query, gallery, reference, ks if "recall" in metrics else [])
    on_cuda = any(isinstance(x, Tensor) and x.is_cuda for x in (query, gallery, reference))
    backend = resolve_backend(backend, on_cuda)
    query_codes, gallery_codes = _label_codes(query_labels, gallery_labels)
    results: dict[str, float] = {}
    if any(m in RETRIEVAL_METRICS for m in metrics):
        retrieval = _Retrieval(query_codes, gallery_codes, ks, metrics, gallery is None)
        results["queries_without_positive"] = retrieval.without_positive
        for distance in distances:
            results.update(retrieval.run(query, gallery, distance, backend, chunk_size))
    if "nmi" in metrics:
        embeddings = prepare(query, "l2").cpu().numpy()
        clusters = kmeans_assignments(embeddings, len(np.unique(query_codes)), gpu=backend == "faiss-gpu")
        results["NMI"] = float(normalized_mutual_info_score(query_codes, clusters))
    if "utilization" in metrics:
        results["utilization"] = utilization(query, reference, backend=backend, chunk_size=chunk_size)
    return results


def kmeans_assignments(embeddings: np.ndarray, n_clusters: int, *, gpu: bool = False) -> np.ndarray:
    """Cluster index of every embedding after seeded faiss k-means (deterministic for a given input)."""
    # k-means++ seeding: random seeding often puts two centroids in one class and splits it even when
    # classes are well separated. min_points_per_centroid=1: few points per class is normal (SOP),
    # not worth faiss's warning.
    kmeans = faiss.Kmeans(
        embeddings.shape[1],
        n_clusters,
        niter=KMEANS_ITERATIONS,
        seed=KMEANS_SEED,
        gpu=gpu,
        init_method=faiss.ClusteringInitMethod_KMEANS_PLUS_PLUS,
        min_points_per_centroid=1,
    )
    kmeans.train(embeddings)
    _, assignments = kmeans.index.search(embeddings, 1)
    return assignments[:, 0]


def utilization(
    query: Tensor | np.ndarray, reference: Tensor | np.ndarray, *, backend: str = "auto", chunk_size: int | None = None
) -> float:
    """Metrix's utilization: mean squared L2 distance from each query to its nearest reference embedding."""
    _check_contents(query, None, reference, [])
    q = prepare(query, "l2")
    ref = prepare(reference, "l2").to(q.device)
    if ref.shape[1] != q.shape[1]:
        raise ValueError(f"query and reference dimensions differ: {q.shape[1]} vs {ref.shape[1]}")
    backend = resolve_backend(backend, q.is_cuda)
    searcher = make_searcher(q, ref, "l2", backend)
    total = 0.0
    for rows in _chunks(np.arange(len(q)), chunk_size or _default_chunk(searcher, 1)):
        _, idx = exact_knn(searcher, rows, 1, CHUNK_BYTES)
        # The search found the neighbour; measure the distance directly, which is more accurate than
        # the |q|^2 + |r|^2 - 2 q.r expansion the search uses.
        diff = q[torch.as_tensor(rows, device=q.device)] - ref[torch.as_tensor(idx[:, 0], device=q.device)]
        total += float((diff * diff).sum(1, dtype=torch.float64).sum())
    return total / len(q)


class _Retrieval:
    """Recall@K, MAP@R and R-Precision of one query/gallery labelling, for any distance.

    Recall@K needs only the rank of each query's first positive, MAP@R and R-Precision only its
    first R neighbours (R: its positives). neighbours_within collects, for each query, every item
    within a radius that holds that many neighbours: its R nearest, and min(max(ks), CANDIDATES)
    more for Recall@K. Whatever that leaves open (a first positive beyond the collected items but
    within max(ks), a query whose radius the sample could not bound) is searched the usual way.
    """

    def __init__(
        self,
        query_codes: np.ndarray,
        gallery_codes: np.ndarray,
        ks: Sequence[int],
        metrics: Sequence[str],
        self_search: bool,
    ):
        self.query_codes, self.gallery_codes = query_codes, gallery_codes
        self.ks = list(dict.fromkeys(ks)) if "recall" in metrics else []
        self.ranked = "map_at_r" in metrics or "r_precision" in metrics
        self.metrics = metrics
        self.self_search = self_search
        n_codes = int(max(query_codes.max(initial=-1), gallery_codes.max(initial=-1))) + 1
        # R of each query: its same-label items in the gallery, itself excluded in self-search.
        self.positives = np.bincount(gallery_codes, minlength=n_codes)[query_codes] - int(self_search)
        self.valid = np.flatnonzero(self.positives > 0)
        self.without_positive = len(query_codes) - len(self.valid)
        self.deepest_k = max(self.ks, default=0)
        # Recall@K needs max(ks) neighbours, MAP@R and R-Precision need R of them.
        ranked_depth = int(self.positives.max(initial=0)) if self.ranked else 0
        self.depth = max(self.deepest_k, ranked_depth)
        # How many nearest neighbours each query's radius must hold (0: the query takes no part).
        self.needed = np.maximum(self.positives * self.ranked, min(self.deepest_k, CANDIDATES))
        self.needed[self.positives <= 0] = 0

    def run(
        self,
        query: Tensor | np.ndarray,
        gallery: Tensor | np.ndarray | None,
        distance: str,
        backend: str,
        chunk_size: int | None,
    ) -> dict[str, float]:
        q = prepare(query, distance)
        g = q if gallery is None else prepare(gallery, distance).to(q.device)
        tally = _Tally(self.ks, self.ranked)
        block = chunk_size or int(math.isqrt(CHUNK_BYTES // 4)) // SAMPLE_BLOCKS
        distances = TorchSearcher(q, g, distance)
        found = neighbours_within(distances, self_search=self.self_search, radius=self._radius, block=block)
        rest = self._tally_found(*found, tally, distances)
        if rest.size:
            searcher = make_searcher(q, g, distance, backend)
            # In self-search the query itself is among its neighbours: ask for one more and drop it.
            depth = self.depth + int(self.self_search)
            for rows in _chunks(rest, chunk_size or _default_chunk(searcher, depth)):
                _, idx = exact_knn(searcher, rows, depth, CHUNK_BYTES)
                if self.self_search:
                    idx = _drop_self(idx, rows)
                hits = self.gallery_codes[idx] == self.query_codes[rows, None]
                first_hit = np.where(hits.any(axis=1), hits.argmax(axis=1), np.inf)
                tally.add(first_hit, hits, self.positives[rows])
        return tally.summary(distance, self.metrics)

    def _radius(self, rows: slice, sample: Tensor) -> Tensor:
        """A distance within which each query row has at least its needed neighbours: the needed-th
        smallest distance to the sample, or -inf (no candidates) where the sample is too small."""
        needed = torch.as_tensor(self.needed[rows], device=sample.device)
        usable = sample.shape[1] - int(self.self_search)
        needed[needed > usable] = 0
        radius = torch.full((len(needed),), -math.inf, device=sample.device)
        depth = int(needed.max()) if len(needed) else 0
        if depth:
            nearest = torch.topk(sample, depth, dim=1, largest=False).values
            at = needed > 0
            radius[at] = nearest[at, needed[at] - 1]
        return radius

    def _tally_found(
        self, query: np.ndarray, item: np.ndarray, dist: np.ndarray, tally: "_Tally", distances: TorchSearcher
    ) -> np.ndarray:
        """Tally the valid queries that the candidates settle; return the others.

        The candidates of a query are all items within its radius, in order, so they are the exact
        head of its neighbour list: its first R neighbours if it has at least R candidates, and the
        rank of its first positive if one is among them (or at least max(ks) if it has that many).
        Where only that rank is missing, first_positive_ranks counts it on the whole distance row.
        """
        counts = np.bincount(query, minlength=len(self.query_codes))
        position = np.arange(len(query)) - (np.cumsum(counts) - counts)[query]
        hit = self.gallery_codes[item] == self.query_codes[query]
        first_hit = np.full(len(self.query_codes), np.inf)
        hit_queries, first = np.unique(query[hit], return_index=True)
        first_hit[hit_queries] = position[hit][first]
        settled = counts >= self.positives if self.ranked else np.ones(len(counts), dtype=bool)
        settled[self.positives <= 0] = False
        unranked = np.flatnonzero(settled & np.isinf(first_hit) & (counts < self.deepest_k))
        first_hit[unranked] = first_positive_ranks(
            distances, unranked, self._positives_of(unranked), self_search=self.self_search, max_bytes=CHUNK_BYTES
        )
        rows = np.flatnonzero(settled)
        hits = None
        if self.ranked and rows.size:
            row_of = np.full(len(self.query_codes), -1)
            row_of[rows] = np.arange(len(rows))
            keep = hit & (position < self.positives[query]) & settled[query]
            hits = np.zeros((len(rows), int(self.positives[rows].max())), dtype=bool)
            hits[row_of[query[keep]], position[keep]] = True
        tally.add(first_hit[rows], hits, self.positives[rows])
        return np.setdiff1d(self.valid, rows)

    def _positives_of(self, rows: np.ndarray) -> np.ndarray:
        """The gallery indices of each row's label, padded with -1 (in self-search the row itself
        among them: first_positive_ranks puts it at distance +inf)."""
        by_label = np.argsort(self.gallery_codes, kind="stable")
        counts = np.bincount(self.gallery_codes)
        starts = np.cumsum(counts) - counts
        codes = self.query_codes[rows]
        width = np.arange(int(counts[codes].max(initial=0)))
        at = starts[codes, None] + width
        return np.where(width < counts[codes, None], by_label[np.minimum(at, len(by_label) - 1)], -1)


class _Tally:
    """Per-chunk sums of the retrieval metrics over the valid queries."""

    def __init__(self, ks: list[int], ranked: bool):
        self.ks = np.asarray(ks, dtype=np.int64)
        self.ranked = ranked
        self.found = np.zeros(len(ks), dtype=np.int64)
        self.average_precision = 0.0
        self.r_precision = 0.0
        self.count = 0

    def add(self, first_hit: np.ndarray, hits: np.ndarray | None, positives: np.ndarray) -> None:
        """first_hit: the rank (from 0) of each row's first positive, inf if beyond max(ks); hits:
        (rows, >= R) whether each of the first neighbours, in order, shares the query's label (needed
        only for MAP@R and R-Precision); positives: R per row."""
        self.count += len(first_hit)
        if len(self.ks):
            self.found += (first_hit[:, None] < self.ks).sum(axis=0)
        if self.ranked and len(first_hit):
            depth = int(positives.max())
            relevant = hits[:, :depth] & (np.arange(depth) < positives[:, None])
            correct_so_far = relevant.cumsum(axis=1)
            self.r_precision += float((correct_so_far[:, -1] / positives).sum())
            precision_at_hits = correct_so_far * relevant / np.arange(1, depth + 1)
            self.average_precision += float((precision_at_hits.sum(axis=1) / positives).sum())

    def summary(self, distance: str, metrics: Sequence[str]) -> dict[str, float]:
        count = self.count or float("nan")
        results = {f"{distance}/R@{k}": int(found) / count for k, found in zip(self.ks, self.found, strict=True)}
        if "map_at_r" in metrics:
            results[f"{distance}/MAP@R"] = self.average_precision / count
        if "r_precision" in metrics:
            results[f"{distance}/R-Precision"] = self.r_precision / count
        return results


def _drop_self(idx: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Remove each query's own index from its neighbours (one column fewer)."""
    is_self = idx == rows[:, None]
    # Without itself among the returned neighbours (more items tie with it at lower indices), the
    # query's exact top-k without itself is the first k: drop the farthest instead.
    is_self[~is_self.any(axis=1), -1] = True
    return idx[~is_self].reshape(len(idx), -1)


def _default_chunk(searcher: Searcher, depth: int) -> int:
    return max(1, CHUNK_BYTES // searcher.bytes_per_query(depth + 1))


def _chunks(rows: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(rows), size):
        yield rows[start : start + size]


def _label_codes(query_labels: Labels, gallery_labels: Labels | None) -> tuple[np.ndarray, np.ndarray]:
    """Dense integer codes shared by query and gallery labels."""
    query_np = _labels_numpy(query_labels)
    gallery_np = query_np if gallery_labels is None else _labels_numpy(gallery_labels)
    _, codes = np.unique(np.concatenate([query_np, gallery_np]), return_inverse=True)
    return codes[: len(query_np)], codes[len(query_np) :]


def _labels_numpy(labels: Labels) -> np.ndarray:
    if isinstance(labels, Tensor):
        return labels.detach().cpu().numpy().reshape(-1)
    return np.asarray(labels).reshape(-1)


def _check_request(
    metrics: Sequence[str],
    distances: Sequence[str],
    ks: Sequence[int],
    reference: Tensor | np.ndarray | None,
    chunk_size: int | None,
) -> None:
    for metric in metrics:
        check_choice("metric", metric, METRICS)
    for distance in distances:
        check_choice("distance", distance, DISTANCES)
    if "recall" in metrics and (len(ks) == 0 or any(int(k) != k or k < 1 for k in ks)):
        raise ValueError(f"recall needs ks, a non-empty sequence of positive integers; got {ks!r}")
    if "utilization" in metrics and reference is None:
        raise ValueError("metric 'utilization' needs the training embeddings: pass reference=")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of queries, got {chunk_size}")


def _check_contents(
    query: Tensor | np.ndarray,
    gallery: Tensor | np.ndarray | None,
    reference: Tensor | np.ndarray | None,
    ks: Sequence[int],
) -> None:
    """Refuse empty sets, a K beyond the gallery and magnitudes whose float32 distances would overflow."""
    sets = {"query": query, "gallery": gallery, "reference": reference}
    for name, embeddings in sets.items():
        if embeddings is not None:
            if embeddings.shape[0] == 0:
                raise ValueError(f"the {name} set is empty (shape {tuple(embeddings.shape)}): nothing to evaluate")
            _check_magnitude(name, embeddings)
    # A query is never its own neighbour, so a self-searched set offers one candidate less.
    candidates = gallery.shape[0] if gallery is not None else query.shape[0] - 1
    if ks and max(ks) > candidates:
        raise ValueError(
            f"R@{max(ks)} asks for {max(ks)} neighbours but the gallery offers only {candidates} per query: lower ks"
        )


def _check_magnitude(name: str, embeddings: Tensor | np.ndarray) -> None:
    """Distances are float32 |q|^2 + |g|^2 - 2 q.g: refuse finite values large enough to overflow them."""
    largest = float(max(embeddings.max(), -embeddings.min()))  # no copy of the array, unlike abs()
    limit = math.sqrt(FLOAT32_MAX / (4 * max(1, embeddings.shape[1])))  # bounds (|q| + |g|)^2
    if math.isfinite(largest) and largest > limit:
        raise ValueError(
            f"the {name} embeddings reach {largest:.3g} in magnitude, beyond {limit:.3g}, where their "
            f"squared float32 distances overflow in dimension {embeddings.shape[1]}: rescale them"
        )


def _check_shapes(
    query: Tensor | np.ndarray, query_labels: Labels, gallery: Tensor | np.ndarray | None, gallery_labels: Labels | None
) -> None:
    if (gallery is None) != (gallery_labels is None):
        raise ValueError("pass gallery and gallery_labels together, or neither for self-search")
    pairs = [("query", query, query_labels)] + ([("gallery", gallery, gallery_labels)] if gallery is not None else [])
    for name, embeddings, labels in pairs:
        if len(embeddings.shape) != 2:
            raise ValueError(f"{name} must be a 2-D (N, D) array, got shape {tuple(embeddings.shape)}")
        if len(_labels_numpy(labels)) != embeddings.shape[0]:
            raise ValueError(f"{name} has {embeddings.shape[0]} embeddings but {len(_labels_numpy(labels))} labels")
    if gallery is not None and gallery.shape[1] != query.shape[1]:
        raise ValueError(f"query and gallery dimensions differ: {query.shape[1]} vs {gallery.shape[1]}")
