"""Pooling of mixed feature maps without materialising them (models.mixing, EmbeddingHead.pool_mixtures) against
the maps built pair by pair: values, gradients, chunk boundaries and ties, for both ways of mixing (GridMax: one
lam for many pairs; MixedMax: a lam per pair, or few pairs)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor

import models.mixing
from models.metric_model import POOLINGS, EmbeddingHead
from models.mixing import mixed_pool

DTYPE = torch.float64


# (pairs, shared lam): 23 pairs of 7 examples, past a quarter of the 7 x 7 grid, take GridMax with a shared lam;
# 5 pairs or a lam per pair take MixedMax.
LAYOUTS = {"grid": (23, True), "few pairs": (5, True), "lam per pair": (23, False)}


def random_case(
    layout: str = "lam per pair", batch: int = 7, channels: int = 5, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Feature maps (B, C, 3, 4), arbitrary pairs (repeats and i == j included) and lam, (M,) or 0-d."""
    pairs, shared = LAYOUTS[layout]
    generator = torch.Generator().manual_seed(seed)
    feature_map = torch.randn(batch, channels, 3, 4, generator=generator, dtype=DTYPE)
    first = torch.randint(0, batch, (pairs,), generator=generator)
    second = torch.randint(0, batch, (pairs,), generator=generator)
    lam = torch.rand(() if shared else pairs, generator=generator, dtype=DTYPE)
    return feature_map, first, second, lam


def materialised(feature_map: Tensor, first: Tensor, second: Tensor, lam: Tensor) -> Tensor:
    """(M, C, H, W): every mixed map, one pair at a time."""
    lam = lam.expand(first.shape)
    return torch.stack(
        [
            lam[m] * feature_map[i] + (1 - lam[m]) * feature_map[j]
            for m, (i, j) in enumerate(zip(first.tolist(), second.tolist(), strict=True))
        ]
    )


def value_and_gradient(function, feature_map: Tensor, probe: Tensor) -> tuple[Tensor, Tensor]:
    leaf = feature_map.clone().requires_grad_()
    value = function(leaf)
    (value * probe).sum().backward()
    return value.detach(), leaf.grad


POOLS = {
    "avg": lambda x: x.mean(dim=(2, 3)),
    "max": lambda x: x.amax(dim=(2, 3)),
    "avg+max": lambda x: x.mean(dim=(2, 3)) + x.amax(dim=(2, 3)),
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("pooling", POOLINGS)
@pytest.mark.parametrize("chunk_elements", [1, 24, 50, 2**22])
def test_mixed_pool_equals_the_pooling_of_the_materialised_maps(
    chunk_elements: int, pooling: str, layout: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With one pair (or grid row) per chunk, chunks cutting them unevenly, and a single chunk."""
    monkeypatch.setattr(models.mixing, "CHUNK_ELEMENTS", chunk_elements)
    feature_map, first, second, lam = random_case(layout)
    probe = torch.randn(first.shape[0], feature_map.shape[1], dtype=DTYPE)
    got = value_and_gradient(lambda x: mixed_pool(x, first, second, lam, pooling), feature_map, probe)
    want = value_and_gradient(lambda x: POOLS[pooling](materialised(x, first, second, lam)), feature_map, probe)
    torch.testing.assert_close(got, want)


def test_large_maps() -> None:
    """20 x 20 = 400 positions, one chunk per pair."""
    generator = torch.Generator().manual_seed(2)
    feature_map = torch.randn(3, 2, 20, 20, generator=generator, dtype=DTYPE)
    first, second, lam = torch.tensor([0, 2, 1]), torch.tensor([1, 0, 2]), torch.tensor([0.3, 0.6, 0.9], dtype=DTYPE)
    probe = torch.randn(3, 2, generator=generator, dtype=DTYPE)
    got = value_and_gradient(lambda x: mixed_pool(x, first, second, lam, "max"), feature_map, probe)
    want = value_and_gradient(lambda x: POOLS["max"](materialised(x, first, second, lam)), feature_map, probe)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("pooling", POOLINGS)
def test_head_on_pooled_mixtures_equals_the_head_on_mixed_maps(pooling: str, layout: str) -> None:
    """The whole head (pooling, BatchNorm on the batch of mixtures, remap, L2 norm) and its parameters' gradients."""
    feature_map, first, second, lam = random_case(layout, seed=1)
    torch.manual_seed(0)
    head = EmbeddingHead(5, 3, pooling=pooling, norm_layer="batch", remap=True, normalize=True).to(DTYPE)
    probe = torch.randn(first.shape[0], 3, dtype=DTYPE)
    results = []
    for function in (
        lambda x: head.embed(head.pool_mixtures(x, first, second, lam)),
        lambda x: head(materialised(x, first, second, lam)),
    ):
        head.zero_grad()
        value, gradient = value_and_gradient(function, feature_map, probe)
        results.append((value, gradient, head.remap.weight.grad.clone()))
    torch.testing.assert_close(results[0], results[1])


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("chunk_elements", [1, 2**22])
def test_ties_share_the_gradient_as_with_torch_amax(
    chunk_elements: int, layout: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Constant maps tie at every position; after a ReLU many positions tie at zero."""
    monkeypatch.setattr(models.mixing, "CHUNK_ELEMENTS", chunk_elements)
    feature_map, first, second, lam = random_case(layout, seed=3)
    feature_map[0] = 1.0
    feature_map[1] = 1.0
    first[:2], second[:2] = torch.tensor([0, 1]), torch.tensor([1, 0])
    probe = torch.randn(first.shape[0], feature_map.shape[1], dtype=DTYPE)
    for maps in (feature_map, feature_map.relu()):
        got = value_and_gradient(lambda x: mixed_pool(x, first, second, lam, "max"), maps, probe)
        want = value_and_gradient(lambda x: POOLS["max"](materialised(x, first, second, lam)), maps, probe)
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("lam", [torch.zeros(0, dtype=DTYPE), torch.tensor(0.5, dtype=DTYPE)])
def test_no_pairs_gives_an_empty_result(lam: Tensor) -> None:
    feature_map = torch.randn(3, 2, 2, 2, dtype=DTYPE)
    empty = torch.zeros(0, dtype=torch.long)
    assert mixed_pool(feature_map, empty, empty, lam, "avg+max").shape == (0, 2)


def test_the_grid_is_taken_with_a_shared_lam_and_many_pairs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The layouts above do reach the way of mixing they are meant for."""
    taken = []
    for name in ("GridMax", "MixedMax"):
        forward = getattr(models.mixing, name).forward
        monkeypatch.setattr(
            getattr(models.mixing, name),
            "forward",
            staticmethod(lambda ctx, *args, name=name, forward=forward: taken.append(name) or forward(ctx, *args)),
        )
    for layout in LAYOUTS:
        mixed_pool(*random_case(layout), "max")
    assert taken == ["GridMax", "MixedMax", "MixedMax"]


def test_lam_is_not_differentiated() -> None:
    feature_map, first, second, lam = random_case()
    with pytest.raises(ValueError, match="lam"):
        mixed_pool(feature_map, first, second, lam.requires_grad_(), "max")


WIDE_MAPS = """
import torch
from models.mixing import mixed_pool
from tests.test_mixing import materialised, value_and_gradient

# 8,192 channels, more than any fixed per-channel buffer of a kernel would hold; every pair of 4 maps (the grid).
feature_map = torch.randn(4, 8192, 1, 2, generator=torch.Generator().manual_seed(5))
first, second = torch.tensor([i for i in range(4) for j in range(4) if i != j]), torch.tensor(
    [j for i in range(4) for j in range(4) if i != j]
)
lam, probe = torch.tensor(0.3), torch.randn(12, 8192, generator=torch.Generator().manual_seed(6))
got = value_and_gradient(lambda x: mixed_pool(x, first, second, lam, "max"), feature_map, probe)
want = value_and_gradient(lambda x: materialised(x, first, second, lam).amax(dim=(2, 3)), feature_map, probe)
torch.testing.assert_close(got, want)
"""


def test_maps_of_8192_channels_pool_as_the_materialised_mixtures() -> None:
    """In a process of its own, so that a crash (a kernel writing past a buffer) fails this test, not the suite."""
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", WIDE_MAPS], cwd=root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
