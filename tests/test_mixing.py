"""Pooling of mixed feature maps without materialising them (models.mixing, EmbeddingHead.pool_mixtures) against
the maps built pair by pair: values, gradients, chunk boundaries and ties."""

import pytest
import torch
from torch import Tensor

import models.mixing
from models.metric_model import POOLINGS, EmbeddingHead
from models.mixing import mixed_pool

DTYPE = torch.float64


def random_case(batch: int = 7, channels: int = 5, pairs: int = 23, seed: int = 0
                ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Feature maps (B, C, 3, 4), arbitrary pairs (repeats and i == j included) and one lam per pair."""
    generator = torch.Generator().manual_seed(seed)
    feature_map = torch.randn(batch, channels, 3, 4, generator=generator, dtype=DTYPE)
    first = torch.randint(0, batch, (pairs,), generator=generator)
    second = torch.randint(0, batch, (pairs,), generator=generator)
    lam = torch.rand(pairs, generator=generator, dtype=DTYPE)
    return feature_map, first, second, lam


def materialised(feature_map: Tensor, first: Tensor, second: Tensor, lam: Tensor) -> Tensor:
    """(M, C, H, W): every mixed map, one pair at a time."""
    return torch.stack([lam[m] * feature_map[i] + (1 - lam[m]) * feature_map[j]
                        for m, (i, j) in enumerate(zip(first.tolist(), second.tolist(), strict=True))])


def value_and_gradient(function, feature_map: Tensor, probe: Tensor) -> tuple[Tensor, Tensor]:
    leaf = feature_map.clone().requires_grad_()
    value = function(leaf)
    (value * probe).sum().backward()
    return value.detach(), leaf.grad


POOLS = {"avg": lambda x: x.mean(dim=(2, 3)), "max": lambda x: x.amax(dim=(2, 3)),
         "avg+max": lambda x: x.mean(dim=(2, 3)) + x.amax(dim=(2, 3))}


@pytest.mark.parametrize("pooling", POOLINGS)
@pytest.mark.parametrize("chunk_elements", [1, 24, 50, 2**22])
def test_mixed_pool_equals_the_pooling_of_the_materialised_maps(chunk_elements: int, pooling: str,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """With one pair per chunk, chunks cutting the pairs unevenly, and a single chunk."""
    monkeypatch.setattr(models.mixing, "CHUNK_ELEMENTS", chunk_elements)
    feature_map, first, second, lam = random_case()
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


@pytest.mark.parametrize("pooling", POOLINGS)
def test_head_on_pooled_mixtures_equals_the_head_on_mixed_maps(pooling: str) -> None:
    """The whole head (pooling, BatchNorm on the batch of mixtures, remap, L2 norm) and its parameters' gradients."""
    feature_map, first, second, lam = random_case(seed=1)
    torch.manual_seed(0)
    head = EmbeddingHead(5, 3, pooling=pooling, norm_layer="batch", remap=True, normalize=True).to(DTYPE)
    probe = torch.randn(first.shape[0], 3, dtype=DTYPE)
    results = []
    for function in (lambda x: head.embed(head.pool_mixtures(x, first, second, lam)),
                     lambda x: head(materialised(x, first, second, lam))):
        head.zero_grad()
        value, gradient = value_and_gradient(function, feature_map, probe)
        results.append((value, gradient, head.remap.weight.grad.clone()))
    torch.testing.assert_close(results[0], results[1])


@pytest.mark.parametrize("chunk_elements", [1, 2**22])
def test_ties_share_the_gradient_as_with_torch_amax(chunk_elements: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Constant maps tie at every position; after a ReLU many positions tie at zero."""
    monkeypatch.setattr(models.mixing, "CHUNK_ELEMENTS", chunk_elements)
    feature_map, first, second, lam = random_case(seed=3)
    feature_map[0] = 1.0
    feature_map[1] = 1.0
    first[:2], second[:2] = torch.tensor([0, 1]), torch.tensor([1, 0])
    probe = torch.randn(first.shape[0], feature_map.shape[1], dtype=DTYPE)
    for maps in (feature_map, feature_map.relu()):
        got = value_and_gradient(lambda x: mixed_pool(x, first, second, lam, "max"), maps, probe)
        want = value_and_gradient(lambda x: POOLS["max"](materialised(x, first, second, lam)), maps, probe)
        torch.testing.assert_close(got, want)


def test_no_pairs_gives_an_empty_result() -> None:
    feature_map = torch.randn(3, 2, 2, 2, dtype=DTYPE)
    empty = torch.zeros(0, dtype=torch.long)
    assert mixed_pool(feature_map, empty, empty, torch.zeros(0, dtype=DTYPE), "avg+max").shape == (0, 2)


def test_lam_is_not_differentiated() -> None:
    feature_map, first, second, lam = random_case()
    with pytest.raises(ValueError, match="lam"):
        mixed_pool(feature_map, first, second, lam.requires_grad_(), "max")
