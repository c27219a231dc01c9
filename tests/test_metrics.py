"""The evaluation engine against an independent brute-force oracle, PML and sklearn.

Test embeddings are exactly representable: small integers with squared norms 1, 4 or 16, so that
every float32 distance (squared Euclidean, or inner product after L2 normalisation) is exact
whatever the summation order. Exact ties are then real ties, and every backend must rank them by
(distance, gallery index) like the oracle below.
"""

import numpy as np
import pytest
import torch
from sklearn.metrics import normalized_mutual_info_score

from utils.evaluation.knn import (
    SAMPLE_BLOCKS,
    FaissSearcher,
    TorchSearcher,
    exact_knn,
    faiss_has_gpu,
    neighbours_within,
    prepare,
)
from utils.evaluation.metrics import evaluate_embeddings, kmeans_assignments

BACKENDS = [
    "faiss",
    "torch",
    pytest.param("faiss-gpu", marks=pytest.mark.skipif(not faiss_has_gpu(), reason="faiss has no GPU support")),
    pytest.param("torch-cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]
RETRIEVAL = ("recall", "map_at_r", "r_precision")
KS = (1, 2, 4, 8)


def quantised(n: int, rng: np.random.Generator, dim: int = 16) -> np.ndarray:
    """Rows of -1/+1 entries on 1, 4 or 16 coordinates (norm 1, 2 or 4), many of them duplicated."""
    x = np.zeros((n, dim), dtype=np.float32)
    for row in x:
        support = rng.choice(dim, size=rng.choice([1, 4, 16]), replace=False)
        row[support] = rng.choice([-1.0, 1.0], size=len(support))
    duplicates = rng.choice(n, size=n // 4, replace=False)
    x[duplicates] = x[rng.choice(n, size=len(duplicates))]
    return x


def labels_with_singletons(n: int, n_classes: int, n_singletons: int, rng: np.random.Generator) -> np.ndarray:
    labels = rng.integers(0, n_classes, size=n)
    labels[rng.choice(n, size=n_singletons, replace=False)] = 1000 + np.arange(n_singletons)
    return labels


def oracle_order(q: np.ndarray, gallery: np.ndarray, distance: str, skip: int | None) -> list[int]:
    """Gallery indices sorted by (distance, index), computed in float64 (exact on the test data)."""
    q, gallery = q.astype(np.float64), gallery.astype(np.float64)
    if distance == "cosine":
        q = q / np.sqrt(q @ q)
        dist = [-(g / np.sqrt(g @ g)) @ q for g in gallery]
    else:
        dist = [((g - q) ** 2).sum() for g in gallery]
    return sorted((j for j in range(len(gallery)) if j != skip), key=lambda j: (dist[j], j))


def oracle(query, query_labels, gallery, gallery_labels, ks, distance) -> dict[str, float]:
    """Recall@K, MAP@R and R-Precision with plain loops (Musgrave et al.'s definitions)."""
    self_search = gallery is None
    if self_search:
        gallery, gallery_labels = query, query_labels
    found, average_precision, r_precision, valid = np.zeros(len(ks)), 0.0, 0.0, 0
    for i, q in enumerate(query):
        order = oracle_order(q, gallery, distance, i if self_search else None)
        relevant = [gallery_labels[j] == query_labels[i] for j in order]
        r = sum(relevant)
        if r == 0:
            continue
        valid += 1
        found += [any(relevant[:k]) for k in ks]
        r_precision += sum(relevant[:r]) / r
        hits, precision_sum = 0, 0.0
        for position in range(r):
            if relevant[position]:
                hits += 1
                precision_sum += hits / (position + 1)
        average_precision += precision_sum / r
    results = {f"{distance}/R@{k}": found[n] / valid for n, k in enumerate(ks)}
    results[f"{distance}/MAP@R"] = average_precision / valid
    results[f"{distance}/R-Precision"] = r_precision / valid
    results["queries_without_positive"] = len(query) - valid
    return results


def run(query, query_labels, gallery=None, gallery_labels=None, *, backend: str, **kwargs) -> dict[str, float]:
    """evaluate_embeddings with torch-cuda meaning the torch backend on CUDA tensors."""
    if backend == "torch-cuda":
        backend = "torch"
        query = torch.as_tensor(query).cuda()
        gallery = None if gallery is None else torch.as_tensor(gallery).cuda()
    return evaluate_embeddings(query, query_labels, gallery, gallery_labels, backend=backend, **kwargs)


def assert_matches(results: dict[str, float], expected: dict[str, float]) -> None:
    assert set(expected) <= set(results)
    for key, value in expected.items():
        assert results[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("distance", ["l2", "cosine"])
def test_self_search_matches_oracle(backend, distance):
    rng = np.random.default_rng(0)
    x = quantised(120, rng)
    labels = labels_with_singletons(120, 15, 6, rng)
    results = run(x, labels, ks=KS, distances=[distance], backend=backend)
    assert_matches(results, oracle(x, labels, None, None, KS, distance))
    assert results["queries_without_positive"] == 6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("distance", ["l2", "cosine"])
def test_separate_gallery_matches_oracle(backend, distance):
    rng = np.random.default_rng(1)
    query, gallery = quantised(50, rng), quantised(90, rng)
    gallery[:10] = query[:10]
    query_labels, gallery_labels = rng.integers(0, 12, 50), rng.integers(0, 10, 90)
    results = run(query, query_labels, gallery, gallery_labels, ks=KS, distances=[distance], backend=backend)
    expected = oracle(query, query_labels, gallery, gallery_labels, KS, distance)
    assert_matches(results, expected)
    assert results["queries_without_positive"] == np.isin(query_labels, [10, 11]).sum()


@pytest.mark.parametrize("backend", BACKENDS)
def test_small_chunks_and_large_k_give_the_same_result(backend):
    rng = np.random.default_rng(2)
    x = quantised(70, rng)
    labels = labels_with_singletons(70, 8, 3, rng)
    ks = (1, 5, 69)  # 69: every other item
    whole = run(x, labels, ks=ks, backend=backend)
    chunked = run(x, labels, ks=ks, backend=backend, chunk_size=7)
    assert_matches(chunked, whole)
    for distance in ("l2", "cosine"):
        assert_matches(whole, oracle(x, labels, None, None, ks, distance))


@pytest.mark.parametrize("backend", BACKENDS)
def test_self_excluded_by_index_not_by_distance(backend):
    # Four identical embeddings: every neighbour is at distance 0, ranked by index.
    x = np.ones((4, 3), dtype=np.float32)
    results = run(x, [0, 1, 0, 1], ks=(1, 2, 3), distances=["l2"], backend=backend)
    # Neighbour labels: query 0 -> [1, 0, 1], 1 -> [0, 0, 1], 2 -> [0, 1, 1], 3 -> [0, 1, 0].
    assert results == {
        "queries_without_positive": 0,
        "l2/R@1": 0.25,
        "l2/R@2": 0.75,
        "l2/R@3": 1.0,
        "l2/MAP@R": 0.25,
        "l2/R-Precision": 0.25,
    }


def hard_case(case: str, rng: np.random.Generator) -> tuple:
    """(query, query_labels, gallery, gallery_labels, ks) of one labelling the engine must get right."""
    x = quantised(120, rng)
    if case == "ties":  # 16 distinct vectors: every query ties with dozens of items
        x = rng.choice([-1.0, 1.0], (120, 4)).astype(np.float32)
        return x, rng.integers(0, 10, 120), None, None, (1, 3, 30)
    if case == "singletons":  # most classes have one image: few valid queries, far positives
        return x, labels_with_singletons(120, 6, 80, rng), None, None, (1, 9, 50)
    if case == "in-shop":  # separate gallery; some query classes are absent from it
        gallery = quantised(150, rng)
        gallery[:30] = x[:30]
        return x, rng.integers(0, 40, 120), gallery, rng.integers(0, 35, 150), (1, 10, 50)
    if case == "r-beyond-k":  # R up to 69 while Recall@K stops at 4
        labels = np.where(rng.random(120) < 0.6, 0, rng.integers(1, 20, 120))
        return x, labels, None, None, (1, 2, 4)
    if case == "large-classes":  # three classes: R about 40, far beyond the candidates per query
        return x, rng.integers(0, 3, 120), None, None, (1, 16, 100)
    raise ValueError(case)


HARD_CASES = ["ties", "singletons", "in-shop", "r-beyond-k", "large-classes"]


@pytest.mark.parametrize("backend", ["faiss", "torch"])
@pytest.mark.parametrize("chunk_size", [None, 4])
@pytest.mark.parametrize("case", HARD_CASES)
def test_hard_cases_match_oracle(case, chunk_size, backend):
    # chunk_size 4 bounds each radius on a sample of 8 items: loose radii, many candidates, and
    # queries left open for the k-NN search; None samples everything: exact radii.
    query, query_labels, gallery, gallery_labels, ks = hard_case(case, np.random.default_rng(HARD_CASES.index(case)))
    results = run(query, query_labels, gallery, gallery_labels, ks=ks, backend=backend, chunk_size=chunk_size)
    for distance in ("l2", "cosine"):
        assert_matches(results, oracle(query, query_labels, gallery, gallery_labels, ks, distance))


@pytest.mark.parametrize("distance", ["l2", "cosine"])
@pytest.mark.parametrize("self_search", [True, False])
@pytest.mark.parametrize("block", [3, 64])
def test_neighbours_within_returns_every_item_within_each_radius_in_order(distance, self_search, block):
    rng = np.random.default_rng(9)
    query = quantised(50, rng)
    gallery = query if self_search else quantised(70, rng)
    # Radii that fall exactly on tied distances, and one query that wants nothing.
    radius_rank = rng.integers(0, 30, 50)
    radius_rank[7] = -1

    def radius(rows: slice, sample: torch.Tensor) -> torch.Tensor:
        ordered = sample.sort(dim=1).values
        ranks = torch.as_tensor(radius_rank[rows]).clamp(max=sample.shape[1] - 1 - int(self_search))
        chosen = ordered[torch.arange(len(ordered)), ranks.clamp(min=0)]
        return torch.where(ranks < 0, -torch.inf, chosen)

    searcher = TorchSearcher(prepare(query, distance), prepare(gallery, distance), distance)
    found_query, found_item, found_dist = neighbours_within(
        searcher, self_search=self_search, radius=radius, block=block
    )
    full = searcher.distances(np.arange(50)).numpy()
    if self_search:
        np.fill_diagonal(full, np.inf)
    # The radii as neighbours_within computed them: the sample is SAMPLE_BLOCKS x block items.
    sample = min(SAMPLE_BLOCKS * block, len(gallery))
    expected = []
    for i in range(50):
        start = i // sample * sample if self_search else 0
        columns = full[i, start : start + sample] if self_search else full[i, :sample]
        rank = min(radius_rank[i], len(columns) - 1 - int(self_search))
        limit = -np.inf if rank < 0 else np.sort(columns)[rank]
        expected += sorted((full[i, j], j, i) for j in range(len(gallery)) if full[i, j] <= limit)
    assert list(zip(found_query, found_item, strict=True)) == [(i, j) for _, j, i in expected]
    np.testing.assert_array_equal(found_dist, [d for d, _, _ in expected])


class TieBreakingAdversary:
    """A valid but hostile backend: among tied items it keeps the highest indices, in random order."""

    def __init__(self, query: np.ndarray, gallery: np.ndarray, rng: np.random.Generator):
        self.dist = ((query[:, None].astype(np.float64) - gallery[None]) ** 2).sum(-1).astype(np.float32)
        self.gallery_size = len(gallery)
        self.rng = rng

    def search(self, rows, k):
        out_dist, out_idx = [], []
        for row in self.dist[rows]:
            keep = sorted(range(len(row)), key=lambda j: (row[j], -j))[:k]
            self.rng.shuffle(keep)
            keep.sort(key=lambda j: row[j])
            out_dist.append(row[keep])
            out_idx.append(keep)
        return np.array(out_dist, dtype=np.float32), np.array(out_idx, dtype=np.int64)

    def bytes_per_query(self, k):
        return 8 * k


def test_exact_knn_resolves_ties_across_the_cut_off():
    rng = np.random.default_rng(3)
    # Coordinates in {0, 1} on 3 dimensions: 4 distinct distances, tie groups of dozens.
    query = rng.integers(0, 2, (30, 3)).astype(np.float32)
    gallery = rng.integers(0, 2, (100, 3)).astype(np.float32)
    backends = [
        TieBreakingAdversary(query, gallery, rng),
        FaissSearcher(prepare(query, "l2"), prepare(gallery, "l2"), "l2"),
        TorchSearcher(prepare(query, "l2"), prepare(gallery, "l2"), "l2"),
    ]
    rows = np.arange(30)
    for k in (1, 3, 10, 37, 99, 100, 150):
        expected = np.array([oracle_order(q, gallery, "l2", None)[:k] for q in query])
        for searcher in backends:
            # A tiny memory budget also exercises the batched re-searches.
            _, idx = exact_knn(searcher, rows, k, max_bytes=2000)
            np.testing.assert_array_equal(idx, expected, err_msg=f"{type(searcher).__name__} k={k}")


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_tensor_and_numpy_inputs_agree(backend):
    rng = np.random.default_rng(4)
    x, labels = quantised(40, rng), rng.integers(0, 5, 40)
    as_numpy = evaluate_embeddings(x, labels, ks=KS, backend=backend)
    as_tensor = evaluate_embeddings(torch.from_numpy(x), torch.from_numpy(labels), ks=KS, backend=backend)
    assert as_numpy == as_tensor


def test_torch_backend_computes_in_full_float32_and_restores_the_matmul_precision():
    rng = np.random.default_rng(8)
    x, labels = quantised(40, rng), rng.integers(0, 5, 40)
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        results = evaluate_embeddings(x, labels, ks=KS, distances=["l2"], backend="torch")
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(previous)
    assert_matches(results, oracle(x, labels, None, None, KS, "l2"))


def test_nmi_is_sklearn_nmi_of_the_seeded_clustering():
    rng = np.random.default_rng(5)
    labels = np.repeat(np.arange(6), 20)
    centres = rng.normal(size=(6, 8)).astype(np.float32)
    noisy = centres[labels] + rng.normal(size=(120, 8)).astype(np.float32)
    result = evaluate_embeddings(noisy, labels, ks=[1], metrics=["nmi"])
    assert result["NMI"] == pytest.approx(normalized_mutual_info_score(labels, kmeans_assignments(noisy, 6)))
    # Well-separated classes are recovered exactly.
    separated = centres[labels] + 1e-3 * rng.normal(size=(120, 8)).astype(np.float32)
    assert evaluate_embeddings(separated, labels, ks=[1], metrics=["nmi"]) == {"NMI": pytest.approx(1.0)}


@pytest.mark.parametrize("backend", BACKENDS)
def test_utilization_is_mean_squared_distance_to_nearest_reference(backend):
    rng = np.random.default_rng(6)
    query = rng.normal(size=(60, 8)).astype(np.float32)
    reference = rng.normal(size=(150, 8)).astype(np.float32)
    squared = ((query[:, None].astype(np.float64) - reference[None]) ** 2).sum(-1)
    results = run(query, np.zeros(60), ks=[1], metrics=["utilization"], reference=reference, backend=backend)
    assert results == {"utilization": pytest.approx(squared.min(1).mean(), rel=1e-6)}


@pytest.mark.parametrize("distance", ["l2", "cosine"])
@pytest.mark.parametrize("separate_gallery", [False, True])
def test_agrees_with_pml_accuracy_calculator(distance, separate_gallery):
    faiss = pytest.importorskip("faiss")
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
    from pytorch_metric_learning.utils.inference import FaissKNN

    rng = np.random.default_rng(7)
    # Continuous Gaussian data: no ties, so any exact engine ranks alike.
    query = rng.normal(size=(150, 16)).astype(np.float32)
    query_labels = labels_with_singletons(150, 20, 5, rng)
    gallery, gallery_labels = (rng.normal(size=(200, 16)).astype(np.float32), rng.integers(0, 20, 200))
    if not separate_gallery:
        gallery, gallery_labels = None, None
    ours = evaluate_embeddings(query, query_labels, gallery, gallery_labels, ks=[1], distances=[distance])

    normalise = (lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)) if distance == "cosine" else (lambda x: x)
    index = faiss.IndexFlatIP if distance == "cosine" else faiss.IndexFlatL2
    calculator = AccuracyCalculator(
        include=("precision_at_1", "mean_average_precision_at_r", "r_precision"),
        k="max_bin_count",
        device=torch.device("cpu"),
        knn_func=FaissKNN(index_init_fn=index),
    )
    pml = calculator.get_accuracy(
        normalise(query),
        query_labels,
        None if gallery is None else normalise(gallery),
        gallery_labels,
    )
    assert ours[f"{distance}/R@1"] == pytest.approx(pml["precision_at_1"], rel=1e-9)
    assert ours[f"{distance}/MAP@R"] == pytest.approx(pml["mean_average_precision_at_r"], rel=1e-9)
    assert ours[f"{distance}/R-Precision"] == pytest.approx(pml["r_precision"], rel=1e-9)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"metrics": ["recal"]}, "recall, map_at_r"),
        ({"distances": ["euclidean"]}, "l2, cosine"),
        ({"backend": "gpu"}, "auto, faiss, faiss-gpu, torch"),
        ({"metrics": ["utilization"]}, "reference"),
        ({"ks": []}, "positive integers"),
        ({"ks": [0, 1]}, "positive integers"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"metrics": ["utilization"], "reference": np.zeros((3, 4))}, "dimensions"),
    ],
)
def test_bad_requests_raise(kwargs, message):
    x = np.zeros((5, 2), dtype=np.float32)
    with pytest.raises(ValueError, match=message):
        evaluate_embeddings(x, [0, 0, 1, 1, 2], **{"ks": [1], **kwargs})


def test_bad_inputs_raise():
    x = np.zeros((5, 2), dtype=np.float32)
    with pytest.raises(ValueError, match="labels"):
        evaluate_embeddings(x, [0, 1], ks=[1])
    with pytest.raises(ValueError, match="together"):
        evaluate_embeddings(x, [0] * 5, x, ks=[1])
    with pytest.raises(ValueError, match="dimensions"):
        evaluate_embeddings(x, [0] * 5, np.zeros((3, 4)), [0] * 3, ks=[1])
    with pytest.raises(ValueError, match="NaN"):
        evaluate_embeddings(np.full((5, 2), np.nan), [0] * 5, ks=[1])


@pytest.mark.skipif(faiss_has_gpu(), reason="faiss has GPU support here")
def test_faiss_gpu_without_gpu_support_raises():
    with pytest.raises(ValueError, match="GPU support"):
        evaluate_embeddings(np.zeros((4, 2), dtype=np.float32), [0, 0, 1, 1], ks=[1], backend="faiss-gpu")


# ---------------------------------------------------------------- strict inputs


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"query": np.zeros((0, 4), np.float32), "query_labels": []}, "the query set is empty"),
        ({"gallery": np.zeros((0, 4), np.float32), "gallery_labels": []}, "the gallery set is empty"),
        ({"metrics": ["utilization"], "reference": np.zeros((0, 4), np.float32)}, "the reference set is empty"),
        ({"metrics": ["nmi"], "query": np.zeros((0, 4), np.float32), "query_labels": []}, "the query set is empty"),
        ({"ks": [1, 10]}, "R@10 asks for 10 neighbours but the gallery offers only 9 per query"),
        (
            {"ks": [2], "gallery": np.ones((1, 4), np.float32), "gallery_labels": [0]},
            "R@2 asks for 2 neighbours but the gallery offers only 1 per query",
        ),
        ({"query": np.full((10, 4), 1e19, np.float32)}, "the query embeddings reach 1e+19 in magnitude"),
        ({"gallery": np.full((3, 4), -1e19), "gallery_labels": [0, 1, 2]}, "the gallery embeddings reach 1e+19"),
    ],
    ids=[
        "empty-query",
        "empty-gallery",
        "empty-reference",
        "empty-nmi",
        "k-self",
        "k-gallery",
        "overflow-query",
        "overflow-gallery",
    ],
)
def test_inputs_without_a_meaningful_answer_raise_one_value_error(arguments, message):
    rng = np.random.default_rng(0)
    call = {
        "query": rng.normal(size=(10, 4)).astype(np.float32),
        "query_labels": np.arange(10) % 3,
        "ks": [1],
        "metrics": ["recall", "map_at_r", "nmi"],
    } | arguments
    with pytest.raises(ValueError) as error:
        evaluate_embeddings(**call)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_large_finite_embeddings_below_the_overflow_limit_are_accepted():
    x = np.random.default_rng(0).normal(size=(10, 4)) * 1e17
    assert (
        evaluate_embeddings(x, np.arange(10) % 2, ks=[1])["l2/R@1"]
        == evaluate_embeddings(x / 1e17, np.arange(10) % 2, ks=[1])["l2/R@1"]
    )


@pytest.mark.parametrize(
    ("rows", "columns", "layout"),
    [
        (slice(None, None, -1), slice(None), np.asarray),
        (slice(None, None, 2), slice(None), np.asarray),
        (slice(None), slice(None, None, 2), np.asarray),
        (slice(None), slice(None), np.asfortranarray),
        (slice(None), slice(None), lambda x: readonly(x)),
    ],
    ids=["reversed", "strided-rows", "strided-columns", "fortran", "read-only"],
)
def test_any_numpy_view_is_accepted(rows, columns, layout):
    x = np.random.default_rng(3).normal(size=(40, 8)).astype(np.float32)
    labels = np.arange(40) % 5
    seen, seen_labels = layout(x[rows, columns]), labels[rows]
    copy, copy_labels = np.ascontiguousarray(seen), np.ascontiguousarray(seen_labels)
    metrics = ["recall", "map_at_r", "r_precision", "utilization"]
    assert evaluate_embeddings(seen, seen_labels, ks=[1, 4], metrics=metrics, reference=seen) == evaluate_embeddings(
        copy, copy_labels, ks=[1, 4], metrics=metrics, reference=copy
    )


def readonly(x: np.ndarray) -> np.ndarray:
    x = x.copy()
    x.flags.writeable = False
    return x
