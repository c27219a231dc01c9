"""The Metrix mixer: candidates of each mode against a loop-by-loop construction, anchor masks of both strategies,
the cap's hardest pairs, lam in {0, 1}, reproducibility, and no host read inside a training step."""

import contextlib
from collections.abc import Callable, Iterator

import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from torch import Tensor, nn

from losses.candidates import Candidates
from losses.contrastive import ContrastiveLoss
from losses.criterion import Criterion
from losses.cross_entropy import CrossEntropyLoss
from losses.metrix import ANCHOR_NEGATIVE, LAMS, MODES, STRATEGIES, Metrix, ordered_pairs
from losses.multi_similarity import MultiSimilarityLoss
from losses.proxy_anchor import ProxyAnchorLoss
from models.backbones import Backbone, Normalize
from models.metric_model import EmbeddingHead, MetricModel
from tests.conftest import digits_updates

DTYPE = torch.float64
NUM_CLASSES = 5
# Class 4 appears once: under positive-negative mixing its example has no positive.
LABELS = torch.tensor([0, 1, 0, 2, 1, 3, 3, 4, 2])
PN, AN = "positive_negative", "anchor_negative"


def make_model() -> MetricModel:
    """A two-layer CNN with BatchNorm (fast enough for B (B - 1) mixed images) and the repo's head."""
    torch.manual_seed(0)
    body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 12, 3, 2, 1))
    backbone = Backbone(Normalize((0.5,) * 3, (0.25,) * 3), body, out_channels=12)
    head = EmbeddingHead(12, 16, pooling="avg+max", remap=True)
    return MetricModel(backbone, head).to(DTYPE)


def make_images(count: int, seed: int = 0) -> Tensor:
    """8 px images, 4 x 4 feature maps."""
    return torch.rand(count, 3, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=DTYPE)


def make_batch(model: MetricModel, labels: Tensor = LABELS, seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Images, their feature maps and embeddings."""
    images = make_images(labels.shape[0], seed)
    feature_map = model.backbone(images)
    return images, feature_map, model.head(feature_map)


def run(metrix: Metrix, model: MetricModel, labels: Tensor = LABELS, seed: int = 0) -> Candidates:
    images, feature_map, embeddings = make_batch(model, labels, seed)
    return metrix(model, images, feature_map, embeddings, labels)


def loop_pairs(n: int) -> list[tuple[int, int]]:
    return [(i, j) for i in range(n) for j in range(n) if i != j]


def loop_anchor_mask(
    labels: list[int], pairs: list[tuple[int, int]], strategy: str, anchor_negative: str = "no_positive"
) -> Tensor:
    """The weighted form's rules (docs/design.md), one (anchor, pair) at a time; the paper's anchor-negative
    mixing only for an anchor without a positive."""
    mask = torch.zeros(len(labels), len(pairs), dtype=torch.bool)
    for m, (i, j) in enumerate(pairs):
        if labels[i] == labels[j]:
            continue
        lacks_positive = labels.count(labels[i]) == 1
        for a in range(len(labels)):
            if strategy == PN:
                mask[a, m] = labels[a] == labels[i] and a != i
            else:
                mask[a, m] = a == i and (anchor_negative == "every_anchor" or lacks_positive)
    return mask


def fixed_lam(value: float) -> Callable[[int, torch.device], Tensor]:
    """A stand-in for Metrix.sample_lam that returns value for every pair."""
    return lambda count, device: torch.full((count,), value, device=device)


def pair_of_each_candidate(candidates: Candidates, embeddings: Tensor, lam: float) -> list[tuple[int, int]]:
    """Which (i, j) each embed-mode candidate mixes, by exhaustive search (lam must not be 0, 1 or 1/2)."""
    pairs = loop_pairs(embeddings.shape[0])
    mixes = torch.stack([lam * embeddings[i] + (1 - lam) * embeddings[j] for i, j in pairs])
    distance = torch.cdist(candidates.embeddings, mixes)
    return [pairs[m] for m in distance.argmin(dim=1).tolist()]


# --- arguments, shapes and labels ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"mode": "pixels"},
        {"mode": "embed", "strategy": "hard"},
        {"mode": "embed", "alpha": 0},
        {"mode": "embed", "max_pairs": 0},
        {"mode": "embed", "lam": "per_anchor"},
        {"mode": "embed", "anchor_negative": "all"},
        {"mode": "embed", "weight": -1},
        {"mode": "embed", "anchor_negative_weight": -1},
        {"mode": "input", "selection": "hardest"},
        {"mode": "input", "selection": "hardest_negative", "max_pairs": 10},
    ],
)
def test_rejects_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        Metrix(**kwargs)


@pytest.mark.parametrize("max_pairs", [None, 10, 1000])
@pytest.mark.parametrize("mode", MODES)
def test_candidates_have_the_pairs_labels_and_lam(mode: str, max_pairs: int | None) -> None:
    model = make_model()
    candidates = run(Metrix(mode, max_pairs=max_pairs), model)
    n = LABELS.shape[0]
    m = n * (n - 1) if max_pairs is None else min(max_pairs, n * (n - 1))
    assert candidates.embeddings.shape == (m, 16)
    assert candidates.lam.shape == (m,) and candidates.lam.dtype == DTYPE
    assert ((candidates.lam > 0) & (candidates.lam < 1)).all()
    assert candidates.anchor_mask.shape == (n, m) and candidates.anchor_mask.dtype == torch.bool
    if max_pairs is None:  # all ordered pairs, in ordered_pairs' order
        pairs = loop_pairs(n)
        assert candidates.labels.tolist() == [LABELS[i] for i, _ in pairs]
        assert candidates.other_labels.tolist() == [LABELS[j] for _, j in pairs]


def test_ordered_pairs_lists_every_pair_once() -> None:
    for n in range(5):
        first, second = ordered_pairs(n, torch.device("cpu"))
        assert list(zip(first.tolist(), second.tolist(), strict=True)) == loop_pairs(n)


# --- the three modes mix what they say ------------------------------------------------------------------------------


def test_embed_mode_mixes_the_embeddings_exactly() -> None:
    model = make_model()
    images, feature_map, embeddings = make_batch(model)
    candidates = Metrix("embed")(model, images, feature_map, embeddings, LABELS)
    first, second = ordered_pairs(LABELS.shape[0], torch.device("cpu"))
    lam = candidates.lam[:, None]
    assert torch.equal(candidates.embeddings, lam * embeddings[first] + (1 - lam) * embeddings[second])


@pytest.mark.parametrize("max_pairs", [None, 10])
@pytest.mark.parametrize("lam", LAMS)
def test_feature_mode_equals_the_head_on_materialised_mixed_maps(lam: str, max_pairs: int | None) -> None:
    """Values and gradients (into the backbone and the head) of the pooled mixtures equal those of the head run on
    every mixed feature map, built pair by pair."""
    model = make_model()
    images, feature_map, embeddings = make_batch(model)
    metrix = Metrix("feature", lam=lam, max_pairs=max_pairs)
    picked = []
    mix = metrix.mix

    def recording_mix(*args: Tensor) -> Tensor:  # (model, images, feature_map, embeddings, first, second, lam)
        picked.extend(zip(args[4].tolist(), args[5].tolist(), strict=True))
        return mix(*args)

    metrix.mix = recording_mix
    candidates = metrix(model, images, feature_map, embeddings, LABELS)
    weights = candidates.lam.tolist()
    mixed = torch.stack(
        [weights[m] * feature_map[i] + (1 - weights[m]) * feature_map[j] for m, (i, j) in enumerate(picked)]
    )
    expected = model.head(mixed)
    torch.testing.assert_close(candidates.embeddings, expected)
    probe = torch.randn_like(expected)
    fast = torch.autograd.grad(
        (candidates.embeddings * probe).sum(), list(model.parameters()), allow_unused=True, retain_graph=True
    )  # the backbone part of the graph is shared
    slow = torch.autograd.grad((expected * probe).sum(), list(model.parameters()), allow_unused=True)
    for got, want in zip(fast, slow, strict=True):
        torch.testing.assert_close(got, want)


def test_lam_is_one_draw_per_batch_by_default_and_per_pair_on_request() -> None:
    per_batch = run(Metrix("embed"), make_model()).lam
    per_pair = run(Metrix("embed", lam="per_pair"), make_model()).lam
    assert (per_batch == per_batch[0]).all()
    assert per_pair.unique().numel() == per_pair.numel()


@pytest.mark.parametrize("mode, weights", [("embed", (0.4, 0.3)), ("feature", (0.5, 0.5))])
def test_mixed_loss_weight_follows_the_drawn_strategy(mode: str, weights: tuple[float, float]) -> None:
    metrix = Metrix(mode, weight=weights[0], anchor_negative_weight=None if mode == "feature" else weights[1])
    model, pairs = make_model(), loop_pairs(LABELS.shape[0])
    expected = {PN: weights[0], AN: weights[1]}
    for seed in range(6):
        torch.manual_seed(seed)
        candidates = run(metrix, model)
        strategy = PN if torch.equal(candidates.anchor_mask, loop_anchor_mask(LABELS.tolist(), pairs, PN)) else AN
        assert candidates.weight.item() == pytest.approx(expected[strategy])


@pytest.mark.parametrize("strategy, expected", [(PN, 0.4), (AN, 0.3)])
def test_mixed_loss_weight_is_exact_in_float64(strategy: str, expected: float) -> None:
    # By hand: loss = clean + weight * mixed, all in float64; a weight rounded to float32 (0.4000000059604645) is
    # off by about 1e-8 relative.
    model = make_model()
    criterion = Criterion(
        {"contrastive": (1.0, ContrastiveLoss())},
        Metrix("embed", strategy=strategy, weight=0.4, anchor_negative_weight=0.3),
    )
    loss, logs = criterion(model, make_images(LABELS.shape[0]), LABELS)
    assert loss.dtype == DTYPE
    assert loss.item() == logs["contrastive"].item() + expected * logs["mixed_contrastive"].item()


def test_input_mode_runs_the_model_on_mixed_images() -> None:
    model = make_model()
    images, feature_map, embeddings = make_batch(model)
    candidates = Metrix("input")(model, images, feature_map, embeddings, LABELS)
    lam = candidates.lam.tolist()
    # In training mode the backbone's BatchNorm uses the statistics of the mixed batch: same images, same order.
    mixed = torch.stack(
        [lam[m] * images[i] + (1 - lam[m]) * images[j] for m, (i, j) in enumerate(loop_pairs(LABELS.shape[0]))]
    )
    torch.testing.assert_close(candidates.embeddings, model.head(model.backbone(mixed)))


@pytest.mark.parametrize("lam", [0.0, 1.0])
@pytest.mark.parametrize("mode", MODES)
def test_lam_0_or_1_gives_the_clean_examples(mode: str, lam: float, monkeypatch: pytest.MonkeyPatch) -> None:
    model = make_model().eval()  # BatchNorm with running statistics: an example's embedding is its own
    metrix = Metrix(mode)
    monkeypatch.setattr(metrix, "sample_lam", fixed_lam(lam))
    images, feature_map, embeddings = make_batch(model)
    candidates = metrix(model, images, feature_map, embeddings, LABELS)
    first, second = ordered_pairs(LABELS.shape[0], torch.device("cpu"))
    source = first if lam == 1 else second
    torch.testing.assert_close(candidates.embeddings, embeddings[source])


def make_batch_norm_head_model() -> MetricModel:
    """make_model with a BatchNorm1d head (model.norm_layer=batch)."""
    model = make_model()
    model.head = EmbeddingHead(12, 16, pooling="avg+max", norm_layer="batch", remap=True).to(DTYPE)
    return model


@pytest.mark.parametrize("mode", ["input", "feature"])
def test_one_mixture_goes_through_a_batch_norm_head_with_its_running_statistics(
    mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One mixture has no batch statistics ("Expected more than 1 value per channel when training"): the head's
    # BatchNorm normalises it as in evaluation, keeps its running statistics and stays in training mode.
    model = make_batch_norm_head_model()
    metrix = Metrix(mode, strategy=PN, max_pairs=1)
    monkeypatch.setattr(metrix, "sample_lam", fixed_lam(0.3))
    images, feature_map, embeddings = make_batch(model)
    norm = model.head.norm
    running = norm.running_mean.clone(), norm.running_var.clone()
    candidates = metrix(model, images, feature_map, embeddings, LABELS)
    assert norm.training and torch.equal(norm.running_mean, running[0]) and torch.equal(norm.running_var, running[1])

    # The one pair kept: the usable pair with the most similar clean embeddings, by loop.
    pairs = loop_pairs(LABELS.shape[0])
    usable = loop_anchor_mask(LABELS.tolist(), pairs, PN).any(dim=0).tolist()
    unit = F.normalize(embeddings.detach(), dim=1)
    i, j = max((pair for pair, ok in zip(pairs, usable, strict=True) if ok), key=lambda p: unit[p[0]] @ unit[p[1]])
    norm.eval()
    if mode == "input":
        expected = model.head(model.backbone((0.3 * images[i] + 0.7 * images[j])[None]))
    else:
        expected = model.head((0.3 * feature_map[i] + 0.7 * feature_map[j])[None])
    torch.testing.assert_close(candidates.embeddings, expected)


# --- which anchors see which mixture -------------------------------------------------------------------------------


@pytest.mark.parametrize("anchor_negative", ANCHOR_NEGATIVE)
@pytest.mark.parametrize("strategy", [PN, AN])
def test_anchor_mask_matches_the_loop(strategy: str, anchor_negative: str) -> None:
    candidates = run(Metrix("embed", strategy=strategy, anchor_negative=anchor_negative), make_model())
    pairs = loop_pairs(LABELS.shape[0])
    assert torch.equal(candidates.anchor_mask, loop_anchor_mask(LABELS.tolist(), pairs, strategy, anchor_negative))


def test_paper_anchor_negative_mixes_only_the_anchor_without_a_positive() -> None:
    """Class 4 (index 7) is alone in LABELS: it is the only anchor, mixed with each of its 8 negatives."""
    mask = run(Metrix("embed", strategy=AN), make_model()).anchor_mask
    assert mask.sum(dim=1).tolist() == [0, 0, 0, 0, 0, 0, 0, 8, 0]
    balanced = torch.arange(10).div(2, rounding_mode="floor")  # every anchor has a positive: nothing to mix
    assert not run(Metrix("embed", strategy=AN), make_model(), balanced).anchor_mask.any()


def test_all_labels_equal_leaves_no_usable_pair() -> None:
    labels = torch.zeros(6, dtype=torch.long)
    for strategy in (PN, AN):
        candidates = run(Metrix("embed", strategy=strategy, max_pairs=4), make_model(), labels)
        assert candidates.lam.shape == (4,) and not candidates.anchor_mask.any()


def released_input_pairs(labels: list[int], embeddings: Tensor, strategy: str) -> set[tuple[int, int, int]]:
    """(anchor, mixed positive or anchor, negative) as the released code's input mode builds them: all positive
    pairs (a, p) and, for each, the negative at the smallest L2 distance from a (top_k=1); on an anchor-negative
    step each anchor without a positive with its nearest negative."""
    distance = torch.cdist(F.normalize(embeddings, dim=1), F.normalize(embeddings, dim=1))
    count = len(labels)

    def nearest_negative(a: int) -> int:
        negatives = [n for n in range(count) if labels[n] != labels[a]]
        return min(negatives, key=lambda n: distance[a, n].item())

    if strategy == PN:
        return {
            (a, p, nearest_negative(a)) for a in range(count) for p in range(count) if p != a and labels[p] == labels[a]
        }
    return {(a, a, nearest_negative(a)) for a in range(count) if labels.count(labels[a]) == 1}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("strategy", [PN, AN])
def test_hardest_negative_selection_is_the_released_input_mode(strategy: str, seed: int) -> None:
    labels = torch.tensor([0, 1, 0, 2, 1, 3, 3, 4, 2, 0, 5])
    model = make_model()
    images, feature_map, embeddings = make_batch(model, labels, seed)
    candidates = Metrix("input", strategy=strategy, selection="hardest_negative")(
        model, images, feature_map, embeddings, labels
    )
    # Each mixture is seen by one anchor; recover (anchor, first, second) from the anchor mask and the labels.
    assert candidates.anchor_mask.sum(dim=0).tolist() == [1] * candidates.anchor_mask.shape[1]
    metrix = Metrix("input", strategy=strategy, selection="hardest_negative")
    torch.manual_seed(0)
    first, second, mask = metrix.hardest_negative_pairs(embeddings, labels, torch.tensor(strategy == PN))
    got = {
        (a, i, j) for a, i, j in zip(mask.int().argmax(dim=0).tolist(), first.tolist(), second.tolist(), strict=True)
    }
    assert got == released_input_pairs(labels.tolist(), embeddings.detach(), strategy)
    assert len(got) == first.shape[0] == candidates.lam.shape[0]
    torch.testing.assert_close(candidates.labels, labels[first])
    torch.testing.assert_close(candidates.other_labels, labels[second])


def test_hardest_negative_selection_under_every_anchor_trains_each_anchor_once() -> None:
    model = make_model()
    images, feature_map, embeddings = make_batch(model)
    first, second, mask = Metrix(
        "input", selection="hardest_negative", anchor_negative="every_anchor"
    ).hardest_negative_pairs(embeddings, LABELS, torch.tensor(False))
    assert torch.equal(first, torch.arange(LABELS.shape[0])) and torch.equal(mask, torch.eye(LABELS.shape[0]) > 0)
    assert (LABELS[second] != LABELS).all()


def test_random_strategy_draws_one_of_the_two_per_call() -> None:
    model = make_model()
    pairs = loop_pairs(LABELS.shape[0])
    masks = {name: loop_anchor_mask(LABELS.tolist(), pairs, name) for name in (PN, AN)}
    seen = []
    for seed in range(12):
        torch.manual_seed(seed)
        mask = run(Metrix("embed"), model).anchor_mask
        seen += [name for name, expected in masks.items() if torch.equal(mask, expected)]
    assert len(seen) == 12 and set(seen) == {PN, AN}


def test_positive_negative_weights_are_lam_and_one_minus_lam() -> None:
    """For an anchor of class y_i, v = lam x_i + (1 - lam) x_j is a positive of weight lam, a negative of 1 - lam."""
    candidates = run(Metrix("embed", strategy=PN), make_model())
    w_pos, w_neg = candidates.pair_weights(LABELS)
    mask = candidates.anchor_mask
    lam = candidates.lam.expand_as(w_pos)
    assert mask.any()
    torch.testing.assert_close(w_pos, torch.where(mask, lam, 0))
    torch.testing.assert_close(w_neg, torch.where(mask, 1 - lam, 0))


# --- the cap --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_pairs", [1, 7, 20, 66])
@pytest.mark.parametrize("strategy", [PN, AN])
@pytest.mark.parametrize("anchor_negative", ANCHOR_NEGATIVE)
def test_cap_keeps_the_hardest_usable_pairs(
    strategy: str, max_pairs: int, anchor_negative: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = make_model()
    images, feature_map, embeddings = make_batch(model)
    metrix = Metrix("embed", strategy=strategy, max_pairs=max_pairs, anchor_negative=anchor_negative)
    monkeypatch.setattr(metrix, "sample_lam", fixed_lam(0.75))
    candidates = metrix(model, images, feature_map, embeddings, LABELS)

    labels = LABELS.tolist()
    all_pairs = loop_pairs(len(labels))
    mask = loop_anchor_mask(labels, all_pairs, strategy, anchor_negative)
    usable = {pair for m, pair in enumerate(all_pairs) if mask[:, m].any()}
    cosine = F.cosine_similarity(embeddings[:, None], embeddings[None, :], dim=2).detach()
    top_scores = sorted((cosine[pair].item() for pair in usable), reverse=True)[:max_pairs]

    picked = pair_of_each_candidate(candidates, embeddings, 0.75)
    seen = candidates.anchor_mask.any(dim=0).tolist()
    picked_usable = [pair for pair, used in zip(picked, seen, strict=True) if used]
    assert len(picked) == max_pairs and len(set(picked)) == max_pairs
    assert set(picked_usable) <= usable
    # cos(i, j) = cos(j, i): the pairs tied at the cut may be either, so compare the scores of the picks.
    assert sorted((cosine[pair].item() for pair in picked_usable), reverse=True) == pytest.approx(top_scores)
    # Each candidate's mask column is the loop's column of the pair it mixes.
    expected = torch.stack([mask[:, all_pairs.index(pair)] for pair in picked], dim=1)
    assert torch.equal(candidates.anchor_mask, expected)
    assert candidates.labels.tolist() == [labels[i] for i, _ in picked]
    assert candidates.other_labels.tolist() == [labels[j] for _, j in picked]


# --- reproducibility and gradients ----------------------------------------------------------------------------------


@pytest.mark.parametrize("max_pairs", [None, 12])
def test_same_seed_same_candidates(max_pairs: int | None) -> None:
    model = make_model()
    results = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        results.append(run(Metrix("feature", max_pairs=max_pairs), model))
    for field in ("embeddings", "labels", "other_labels", "lam", "anchor_mask"):
        assert torch.equal(getattr(results[0], field), getattr(results[1], field))
    assert not torch.equal(results[0].lam, results[2].lam)


@pytest.mark.parametrize("mode", MODES)
def test_gradients_reach_the_backbone_through_the_mixtures(mode: str) -> None:
    model = make_model()
    images, feature_map, embeddings = make_batch(model)
    candidates = Metrix(mode, strategy=AN, anchor_negative="every_anchor")(
        model, images, feature_map, embeddings, LABELS
    )
    ContrastiveLoss()(embeddings.detach(), LABELS, candidates).backward()
    grads = [p.grad for p in model.backbone.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)


# --- no host-device synchronisation ---------------------------------------------------------------------------------


HOST_READS = [
    "item",
    "tolist",
    "cpu",
    "numpy",
    "__bool__",
    "__int__",
    "__float__",
    "__index__",
    "nonzero",
    "argwhere",
    "masked_select",
]
TORCH_SYNCS = ["nonzero", "argwhere", "masked_select"]


@contextlib.contextmanager
def host_reads_forbidden() -> Iterator[None]:
    """Make every way of reading a tensor's value into Python raise, as in tests/test_losses.py, and also the ops
    whose output shape depends on values (nonzero, boolean indexing, masked_select): on a GPU each is a host sync."""

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("host read of a tensor value during the step")

    getitem = torch.Tensor.__getitem__

    def getitem_without_masks(self: Tensor, index: object) -> Tensor:
        parts = index if isinstance(index, tuple) else (index,)
        if any(isinstance(part, Tensor) and part.dtype == torch.bool for part in parts):
            forbidden()
        return getitem(self, index)

    saved = [(torch.Tensor, name, getattr(torch.Tensor, name)) for name in [*HOST_READS, "__getitem__"]]
    saved += [(torch, name, getattr(torch, name)) for name in TORCH_SYNCS]
    try:
        for owner, name, _ in saved:
            setattr(owner, name, getitem_without_masks if name == "__getitem__" else forbidden)
        yield
    finally:
        for owner, name, method in saved:
            setattr(owner, name, method)


def test_the_trap_catches_host_reads() -> None:
    x = torch.randn(4)
    for read in (lambda: bool(x.sum() > 0), lambda: x[x > 0], lambda: torch.nonzero(x), lambda: x.max().item()):
        with pytest.raises(AssertionError, match="host read"), host_reads_forbidden():
            read()


def all_losses() -> dict[str, tuple[float, nn.Module]]:
    return {
        "contrastive": (1.0, ContrastiveLoss()),
        "multi_similarity": (1.0, MultiSimilarityLoss(mining=True)),
        "proxy_anchor": (1.0, ProxyAnchorLoss(NUM_CLASSES, 16).to(DTYPE)),
        "cross_entropy": (1.0, CrossEntropyLoss(16, NUM_CLASSES).to(DTYPE)),
    }


@pytest.mark.parametrize("lam", LAMS)
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("max_pairs", [None, 15])
@pytest.mark.parametrize("mode", MODES)
def test_step_reads_no_tensor_value_on_the_host(
    mode: str, max_pairs: int | None, strategy: str, lam: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = make_model()
    criterion = Criterion(all_losses(), Metrix(mode, strategy=strategy, max_pairs=max_pairs, lam=lam))
    # The label check reads on the CPU only (documented there); on a GPU it is an asynchronous assert.
    monkeypatch.setattr(criterion.losses["proxy_anchor"], "check_labels", lambda labels: None)
    images = make_images(LABELS.shape[0])
    with host_reads_forbidden():
        loss, logs = criterion(model, images, LABELS)
        loss.backward()
    assert torch.isfinite(loss) and logs["mixed_contrastive"] > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host syncs only exist with a CUDA device")
@pytest.mark.parametrize("max_pairs", [None, 15])
@pytest.mark.parametrize("mode", MODES)
def test_step_does_not_sync_on_cuda(mode: str, max_pairs: int | None) -> None:
    model = make_model().cuda()
    criterion = Criterion(all_losses(), Metrix(mode, max_pairs=max_pairs)).cuda()
    images, labels = make_images(LABELS.shape[0]).cuda(), LABELS.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, _ = criterion(model, images, labels)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


@pytest.mark.parametrize("mode", ["input", "feature"])
def test_a_run_mixing_one_pair_with_a_batch_norm_head_trains(mode: str, experiment, digits_path) -> None:
    words = (
        f"with model.norm_layer=batch metrix.{mode} metrix.selection=all metrix.max_pairs=1 epochs=1 "
        "dataset.num_iterations=3 cpu=True evaluation.final_metrics=['recall']"
    )
    outcome = experiment(words, *digits_updates(digits_path))
    assert outcome.code == 0, outcome.err
    assert outcome.run.status == "COMPLETED"


# --- lam ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.1, 2, 1e38])
def test_lam_follows_the_beta_distribution_over_the_range_of_alpha(alpha: float) -> None:
    # The ends of metrix.alpha's rule, and an integer (sacred reads metrix.alpha=2 as one); scipy's Beta is the
    # oracle, at points float32 tells apart at any alpha.
    torch.manual_seed(0)
    lam = Metrix("embed", alpha=alpha, lam="per_pair").sample_lam(20_000, torch.device("cpu"))
    assert lam.dtype == torch.float32 and ((lam >= 0) & (lam <= 1)).all()
    for point in (0.001, 0.1, 0.4):
        expected = stats.beta(alpha, alpha).cdf(point)
        share = (lam < point).double().mean().item()
        assert abs(share - expected) < 4 * (expected * (1 - expected) / lam.numel()) ** 0.5 + 1e-3
