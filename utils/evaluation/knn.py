"""Exact k-nearest-neighbour search with one deterministic neighbour order for every backend.

Order rule: neighbours are sorted by their float32 distance to the query (squared Euclidean for
"l2", minus the inner product of L2-normalised vectors for "cosine"), and exact ties go to the
lower gallery index. Every backend first returns *some* valid top-k set (no item outside it is
strictly closer than its farthest member) in an arbitrary order on ties; `exact_knn` then
  1. re-sorts the rows that contain a tie by (distance, index), and
  2. detects rows whose tie group straddles the cut-off (the k-th distance equals the farthest
     returned one, so equally distant items with lower indices may have been left out) and
     searches those rows again with twice as many neighbours until the group closes or the whole
     gallery is returned.
The result therefore equals a stable (distance, index) sort of the backend's distances. Backends
agree exactly whenever they compute the same float32 distances (always for exactly representable
data such as the quantised test sets); otherwise they can differ only where two distances lie
within float32 rounding of each other.
"""

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol

import faiss
import numpy as np
import torch
from torch import Tensor

from utils.errors import check_choice

DISTANCES = ("l2", "cosine")
BACKENDS = ("auto", "faiss", "faiss-gpu", "torch")
# faiss's GPU k-selection handles at most this many neighbours; larger k runs on the CPU index.
FAISS_GPU_MAX_K = 2048
# neighbours_within takes each query's radius from SAMPLE_BLOCKS x SAMPLE_BLOCKS tiles around the
# diagonal: a larger sample gives tighter radii, hence fewer candidates, at the price of a larger tile.
SAMPLE_BLOCKS = 2


class Searcher(Protocol):
    """Holds a query and a gallery set; returns a valid top-k set for some query rows."""

    gallery_size: int

    def search(self, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(len(rows), k) float32 distances sorted ascending and int64 gallery indices."""
        ...

    def bytes_per_query(self, k: int) -> int:
        """Memory one query row costs during a search of k neighbours."""
        ...


def faiss_has_gpu() -> bool:
    """Whether this faiss build can search on a GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def resolve_backend(backend: str, on_cuda: bool) -> str:
    """Turn "auto" into a concrete backend and refuse a faiss-gpu request faiss cannot serve."""
    check_choice("backend", backend, BACKENDS)
    if backend == "auto":
        if not on_cuda:
            return "faiss"
        return "faiss-gpu" if faiss_has_gpu() else "torch"
    if backend == "faiss-gpu" and not faiss_has_gpu():
        raise ValueError(
            "backend 'faiss-gpu' needs a faiss build with GPU support and a visible GPU "
            f"(faiss {faiss.__version__} reports {faiss.get_num_gpus()} GPUs); use 'torch' or 'faiss'"
        )
    return backend


def prepare(x: Tensor | np.ndarray, distance: str) -> Tensor:
    """float32 embeddings, L2-normalised for cosine. Both backends normalise with this same code,
    so that they see the same float32 vectors."""
    check_choice("distance", distance, DISTANCES)
    if isinstance(x, np.ndarray):
        # torch cannot wrap negative strides (a reversed view) nor, without a warning, read-only arrays.
        x = np.require(x, requirements=["C", "W"])
    x = torch.as_tensor(x).detach().to(torch.float32)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be a 2-D (N, D) array, got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("embeddings contain NaN or infinite values")
    if distance == "cosine":
        x = torch.nn.functional.normalize(x, dim=1)
    return x


class FaissSearcher:
    """faiss exact flat index (IndexFlatL2 / IndexFlatIP), on the CPU or on one GPU."""

    def __init__(self, query: Tensor, gallery: Tensor, distance: str, gpu: bool = False):
        self.query = _to_numpy(query)
        self.gallery = _to_numpy(gallery)
        self.gallery_size = len(self.gallery)
        self.inner_product = distance == "cosine"
        self.index = self._flat_index()
        self.gpu_index = None
        if gpu:
            self.resources = faiss.StandardGpuResources()
            device = query.device.index if query.is_cuda and query.device.index is not None else 0
            self.gpu_index = faiss.index_cpu_to_gpu(self.resources, device, self.index)

    def _flat_index(self) -> faiss.Index:
        dim = self.gallery.shape[1]
        index = faiss.IndexFlatIP(dim) if self.inner_product else faiss.IndexFlatL2(dim)
        index.add(self.gallery)
        return index

    def search(self, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        index = self.gpu_index if self.gpu_index is not None and k <= FAISS_GPU_MAX_K else self.index
        dist, idx = index.search(self.query[rows], k)
        if self.inner_product:
            # IndexFlatIP returns similarities in descending order: negate to get ascending distances.
            np.negative(dist, out=dist)
        return dist, idx

    def bytes_per_query(self, k: int) -> int:
        # faiss's float32 + int64 result, its internal reservoir (about 2k entries) and our copies.
        return 48 * k


class TorchSearcher:
    """Exact search with a matmul and top-k on the embeddings' device (CPU or CUDA)."""

    def __init__(self, query: Tensor, gallery: Tensor, distance: str):
        self.query = query
        self.gallery = gallery.to(query.device)
        self.gallery_size = len(gallery)
        self.l2 = distance == "l2"
        if self.l2:
            self.gallery_sq_norms = (self.gallery * self.gallery).sum(1)

    def distances(self, rows: np.ndarray) -> Tensor:
        """(len(rows), gallery size) float32 distances, computed like faiss does."""
        return self._distances(self.query[torch.as_tensor(rows, device=self.query.device)], slice(None))

    def distance_block(self, rows: slice, columns: slice, out: Tensor) -> Tensor:
        """Distances of the query rows to the gallery columns, like `distances`, written into the
        first elements of out."""
        q = self.query[rows]
        return self._distances(q, columns, out[: len(q) * len(self.gallery[columns])])

    def _distances(self, q: Tensor, columns: slice, out: Tensor | None = None) -> Tensor:
        gallery = self.gallery[columns]
        if out is None:
            out = torch.empty(len(q) * len(gallery), device=q.device)
        out = out.view(len(q), len(gallery))
        if not self.l2:
            # alpha=-1 negates inside the product (exactly), sparing a pass over the tile.
            return torch.addmm(out, q, gallery.T, beta=0, alpha=-1, out=out)
        torch.add((q * q).sum(1, keepdim=True), self.gallery_sq_norms[columns], out=out)
        return out.addmm_(q, gallery.T, alpha=-2).clamp_(min=0)

    def search(self, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        with _ieee_float32_matmul():
            dist, idx = torch.topk(self.distances(rows), k, dim=1, largest=False, sorted=True)
        return dist.cpu().numpy(), idx.cpu().numpy()

    def bytes_per_query(self, k: int) -> int:
        # The distance row dominates; add the top-k result and our copies.
        return 4 * self.gallery_size + 48 * k


@contextmanager
def _ieee_float32_matmul() -> Iterator[None]:
    """Training code often allows TF32 matmuls for speed; they would round the distances to about
    three decimal digits and reorder neighbours, so the search forces full float32 meanwhile."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def make_searcher(query: Tensor, gallery: Tensor, distance: str, backend: str) -> Searcher:
    """A searcher for a concrete backend (see resolve_backend)."""
    if backend == "torch":
        return TorchSearcher(query, gallery, distance)
    return FaissSearcher(query, gallery, distance, gpu=backend == "faiss-gpu")


def neighbours_within(
    distances: TorchSearcher,
    *,
    self_search: bool,
    radius: Callable[[slice, Tensor], Tensor],
    block: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every (query, gallery index, distance) with a distance at most the query's radius, sorted by
    (query, distance, gallery index); in self-search (the gallery is the query set) without the
    query itself.

    Each query's radius comes from `radius(rows, sample)`: the query rows' distances to a sample of
    the gallery (the block of SAMPLE_BLOCKS x block queries around the diagonal in self-search, the
    first as many gallery items otherwise; the query itself at +inf). Everything else is searched
    in block x block tiles. Self-search computes each distance once and reads its tile both ways, as
    the distances of the rows to the columns and of the columns to the rows: half the matrix
    products of a search, which is what makes the evaluation cheaper than the k-NN search.
    """
    n_query, n_gallery = len(distances.query), distances.gallery_size
    sample = SAMPLE_BLOCKS * block
    device = distances.query.device
    radii = torch.empty(n_query, device=device)
    # Every tile is written into these two buffers: allocating a fresh tile each time lets the
    # C allocator's free lists grow by gigabytes over a large evaluation.
    tile_buffer = torch.empty(min(sample, n_query) * min(sample, n_gallery), device=device)
    mask_buffer = torch.empty(max(len(tile_buffer), 2 * block * block), dtype=torch.bool, device=device)
    found = []
    with _ieee_float32_matmul():
        for start in range(0, n_query, sample):
            rows = slice(start, min(start + sample, n_query))
            columns = rows if self_search else slice(0, min(sample, n_gallery))
            tile = distances.distance_block(rows, columns, out=tile_buffer)
            if self_search:
                tile.fill_diagonal_(float("inf"))
            radii[rows] = radius(rows, tile)
            found.append(_within(tile, radii[rows], rows.start, columns.start, mask_buffer))
        for rows in _blocks(n_query, block):
            for columns in _blocks(n_gallery, block):
                if self_search and (columns.start <= rows.start or columns.start // sample == rows.start // sample):
                    continue  # the lower triangle, and the sample tiles: done already
                if not self_search and columns.start < sample:
                    continue
                tile = distances.distance_block(rows, columns, out=tile_buffer)
                if self_search:
                    found += _within_both_ways(
                        tile, radii[rows], radii[columns], rows.start, columns.start, mask_buffer
                    )
                else:
                    found.append(_within(tile, radii[rows], rows.start, columns.start, mask_buffer))
    query, item, dist = (torch.cat(part).cpu().numpy() for part in zip(*found, strict=True))
    order = _order(query, item, dist)
    return query[order], item[order], dist[order]


def _order(query: np.ndarray, item: np.ndarray, dist: np.ndarray) -> np.ndarray:
    """The permutation that sorts by (query, distance, item): one sort of a 64-bit (query, distance)
    key, then a sort by item of the few runs of equal keys (exact ties)."""
    bits = (dist + np.float32(0)).view(np.uint32)  # + 0: -0.0 and 0.0 are one distance, one key
    # IEEE floats order like their bits once negative ones have all bits flipped, positive ones the sign.
    bits = bits ^ np.where(bits >> 31, np.uint32(0xFFFFFFFF), np.uint32(0x80000000))
    key = (query.astype(np.uint64) << np.uint64(32)) | bits
    order = np.argsort(key)
    key = key[order]
    tied = np.flatnonzero(key[1:] == key[:-1])
    if tied.size:
        runs = np.union1d(tied, tied + 1)
        order[runs] = order[runs][np.lexsort((item[order[runs]], key[runs]))]
    return order


def _blocks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def _within(
    tile: Tensor, radii: Tensor, row_offset: int, column_offset: int, mask_buffer: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """(row, column, distance) of the tile's entries within their row's radius."""
    mask = torch.le(tile, radii[:, None], out=mask_buffer[: tile.numel()].view(tile.shape))
    rows, columns, dist = _entries(tile, mask)
    return rows + row_offset, columns + column_offset, dist


def _within_both_ways(
    tile: Tensor, row_radii: Tensor, column_radii: Tensor, row_offset: int, column_offset: int, mask_buffer: Tensor
) -> list[tuple[Tensor, Tensor, Tensor]]:
    """_within for the rows as queries and for the columns as queries, from one scan of the tile.

    An entry belongs to its row or to its column when it lies within the larger of their radii, so
    one comparison with max(row radius, largest column radius) finds a superset of both, and the
    few entries it finds are then checked against each radius exactly.
    """
    bound = torch.clamp(row_radii, min=column_radii.max())
    near = torch.le(tile, bound[:, None], out=mask_buffer[: tile.numel()].view(tile.shape))
    rows, columns, dist = _entries(tile, near)
    for_row, for_column = dist <= row_radii[rows], dist <= column_radii[columns]
    return [
        (rows[for_row] + row_offset, columns[for_row] + column_offset, dist[for_row]),
        (columns[for_column] + column_offset, rows[for_column] + row_offset, dist[for_column]),
    ]


def _entries(tile: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(row, column, value) of the tile's entries where mask is true."""
    if mask.is_cuda:
        flat = mask.view(-1).nonzero().squeeze(1)
    else:
        # numpy finds the few true entries of a CPU mask several times faster than torch.nonzero.
        flat = torch.from_numpy(np.flatnonzero(mask.numpy()))
    return flat // tile.shape[1], flat % tile.shape[1], tile.view(-1)[flat]


def first_positive_ranks(
    distances: TorchSearcher, rows: np.ndarray, positives: np.ndarray, *, self_search: bool, max_bytes: int
) -> np.ndarray:
    """The rank (from 0) in (distance, index) order of each query row's first positive: the number
    of gallery items closer to it, or as close with a lower index.

    positives holds each row's positive gallery indices, padded with -1; every row has one. Each
    row's distances are computed whole, so that its count and its positives' distances come from
    the same numbers.
    """
    ranks = np.empty(len(rows))
    device = distances.query.device
    n = distances.gallery_size
    batch = max(1, max_bytes // (6 * n + 16 * positives.shape[1]))
    with _ieee_float32_matmul():
        for start in range(0, len(rows), batch):
            chunk = torch.as_tensor(rows[start : start + batch], device=device)
            dist = distances.distances(chunk.cpu().numpy())
            if self_search:
                dist[torch.arange(len(chunk), device=device), chunk] = torch.inf
            index = torch.as_tensor(positives[start : start + batch], device=device)
            positive_dist = dist.gather(1, index.clamp(min=0)).masked_fill_(index < 0, torch.inf)
            best = positive_dist.min(dim=1, keepdim=True).values
            first = torch.where(positive_dist == best, index, n).min(dim=1).values
            closer = _count_below(dist, best)
            ranks[start : start + len(chunk)] = closer
            # Items as close as the first positive are rare: look for them only where there are any.
            tied = np.flatnonzero(_count_below(dist, best, or_equal=True) > closer + 1)
            if tied.size:
                at = torch.as_tensor(tied, device=device)
                tied_row, tied_column = _equal(dist[at], best[at])
                before = tied_column < first[at].cpu().numpy()[tied_row]
                ranks[start + tied] += np.bincount(tied_row[before], minlength=len(tied))
    return ranks


def _count_below(dist: Tensor, limit: Tensor, *, or_equal: bool = False) -> np.ndarray:
    """How many entries of each row lie below (or_equal: at most) the row's limit."""
    if dist.is_cuda:
        return (dist <= limit if or_equal else dist < limit).sum(dim=1).cpu().numpy()
    # torch sums a bool tensor several times slower than numpy counts it on the CPU.
    below = np.less_equal if or_equal else np.less
    return np.count_nonzero(below(dist.numpy(), limit.numpy()), axis=1)


def _equal(dist: Tensor, value: Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(row, column) of the entries equal to their row's value."""
    return tuple(index.cpu().numpy() for index in (dist == value).nonzero(as_tuple=True))


def exact_knn(searcher: Searcher, rows: np.ndarray, k: int, max_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    """The first k neighbours of the query rows in (distance, gallery index) order.

    k is capped at the gallery size. max_bytes bounds the memory of each search call; the rows are
    split further where needed.
    """
    n = searcher.gallery_size
    k = min(k, n)
    dist, idx = _sorted_search(searcher, rows, min(k + 1, n), max_bytes)
    open_rows = _open_rows(dist, k, n)
    dist, idx = dist[:, :k], idx[:, :k]
    probe = k + 1
    while open_rows.size:
        probe = min(2 * probe, n)
        more_dist, more_idx = _sorted_search(searcher, rows[open_rows], probe, max_bytes)
        dist[open_rows], idx[open_rows] = more_dist[:, :k], more_idx[:, :k]
        open_rows = open_rows[_open_rows(more_dist, k, n)]
    return dist, idx


def _open_rows(dist: np.ndarray, k: int, gallery_size: int) -> np.ndarray:
    """Rows whose k-th distance equals the farthest returned one: the tie group at the cut-off may
    continue outside the returned set. A search that returned the whole gallery is always closed."""
    if dist.shape[1] <= k or dist.shape[1] == gallery_size:
        return np.empty(0, dtype=np.int64)
    return np.flatnonzero(dist[:, k - 1] == dist[:, -1])


def _sorted_search(searcher: Searcher, rows: np.ndarray, k: int, max_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    """Search in batches of at most max_bytes, then order ties by gallery index."""
    batch = max(1, max_bytes // searcher.bytes_per_query(k))
    parts = [searcher.search(rows[start : start + batch], k) for start in range(0, len(rows), batch)]
    if len(parts) == 1:
        dist, idx = parts[0]
    else:
        dist, idx = (np.concatenate(arrays) for arrays in zip(*parts, strict=True))
    _sort_ties(dist, idx, searcher.gallery_size)
    return dist, idx


def _sort_ties(dist: np.ndarray, idx: np.ndarray, gallery_size: int) -> None:
    """Order, in place, each run of equal distances by gallery index.

    Rows arrive sorted by distance, so only rows with an exact tie are touched: their sort key is
    (number of the run of equal distances, index), which a stable sort handles in near-linear time
    because the runs are already in order.
    """
    tied = dist[:, 1:] == dist[:, :-1]
    rows = np.flatnonzero(tied.any(axis=1))
    if rows.size == 0:
        return
    key = np.zeros((len(rows), dist.shape[1]), dtype=np.int64)
    np.cumsum(~tied[rows], axis=1, out=key[:, 1:])
    key *= gallery_size
    key += idx[rows]
    order = np.argsort(key, axis=1, kind="stable")
    dist[rows] = np.take_along_axis(dist[rows], order, axis=1)
    idx[rows] = np.take_along_axis(idx[rows], order, axis=1)


def _to_numpy(x: Tensor) -> np.ndarray:
    return np.ascontiguousarray(x.cpu().numpy())
