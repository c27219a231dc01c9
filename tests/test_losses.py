"""The losses in their one weighted form: clean parity with pytorch-metric-learning, mixed = clean for lam in
{0, 1}, fractional lam against a loop-by-loop reading of the weighted form (docs/design.md), and the edge cases
(no positive, bad labels, no host sync)."""

import contextlib
import math
from collections.abc import Callable, Iterator

import pytest
import pytorch_metric_learning.losses as pml_losses
import pytorch_metric_learning.miners as pml_miners
import torch
import torch.nn.functional as F
from pytorch_metric_learning.distances import LpDistance
from torch import Tensor

from losses.candidates import Candidates
from losses.contrastive import ContrastiveLoss
from losses.cross_entropy import CrossEntropyLoss
from losses.functional import cosine_similarity, sphere_distance
from losses.multi_similarity import MultiSimilarityLoss
from losses.proxy_anchor import ProxyAnchorLoss

# float64 keeps the parity tight; the maths is the same in float32.
DTYPE = torch.float64
DIM = 16
TOL = {"atol": 1e-5, "rtol": 1e-5}


def make_labels(layout: str, generator: torch.Generator) -> Tensor:
    if layout == "distinct":  # no positive pair at all
        return torch.randperm(12, generator=generator)
    if layout == "m_per_class":  # 8 classes x 4, shuffled
        return torch.arange(8).repeat_interleave(4)[torch.randperm(32, generator=generator)]
    if layout == "random":  # some classes once, some several times
        return torch.randint(0, 10, (24,), generator=generator)
    raise ValueError(layout)


def make_batch(layout: str, seed: int) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    labels = make_labels(layout, generator)
    embeddings = torch.randn(labels.shape[0], DIM, generator=generator, dtype=DTYPE)
    return embeddings, labels


LAYOUTS = ["distinct", "m_per_class", "random"]
SEEDS = [0, 1, 2]


def value_and_grads(loss_fn: Callable[[], Tensor], inputs: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
    """The loss and its gradients w.r.t. inputs (zeros where the loss does not depend on one)."""
    value = loss_fn()
    grads = torch.autograd.grad(value, inputs, allow_unused=True) if value.requires_grad else [None] * len(inputs)
    return value.detach(), [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads, strict=True)]


def assert_same(ours: tuple[Tensor, list[Tensor]], theirs: tuple[Tensor, list[Tensor]]) -> None:
    torch.testing.assert_close(ours[0], theirs[0].to(ours[0].dtype), **TOL)
    for g_ours, g_theirs in zip(ours[1], theirs[1], strict=True):
        torch.testing.assert_close(g_ours, g_theirs, **TOL)


def leaf(x: Tensor) -> Tensor:
    return x.detach().clone().requires_grad_(True)


def pml_proxy_anchor(ours: ProxyAnchorLoss) -> pml_losses.ProxyAnchorLoss:
    """PML's proxy-anchor with our hyper-parameters and a copy of our proxies."""
    num_classes, size = ours.proxies.shape
    theirs = pml_losses.ProxyAnchorLoss(num_classes, size, margin=ours.delta, alpha=ours.alpha)
    theirs.proxies.data = ours.proxies.detach().clone()
    return theirs


# --- 1. clean parity with pytorch-metric-learning -----------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_contrastive_matches_pml(layout: str, seed: int) -> None:
    embeddings, labels = make_batch(layout, seed)
    ours, theirs = leaf(embeddings), leaf(embeddings)
    oracle = pml_losses.ContrastiveLoss(
        pos_margin=0, neg_margin=0.5, distance=LpDistance(normalize_embeddings=True, p=2, power=1)
    )
    assert_same(
        value_and_grads(lambda: ContrastiveLoss(0.5)(ours, labels, Candidates.clean(ours, labels)), [ours]),
        value_and_grads(lambda: oracle(theirs, labels), [theirs]),
    )


@pytest.mark.parametrize("mining", [False, True])
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_multi_similarity_matches_pml(layout: str, seed: int, mining: bool) -> None:
    embeddings, labels = make_batch(layout, seed)
    ours, theirs = leaf(embeddings), leaf(embeddings)
    loss = MultiSimilarityLoss(alpha=2, beta=50, base=0.5, mining=mining, epsilon=0.1)
    oracle = pml_losses.MultiSimilarityLoss(alpha=2, beta=50, base=0.5)
    miner = pml_miners.MultiSimilarityMiner(epsilon=0.1)

    def pml_loss() -> Tensor:
        if not mining:
            return oracle(theirs, labels)
        pairs = miner(theirs, labels)
        # PML returns 0 when every index list holds at most one pair; keep the test away from that quirk.
        assert all(len(x) > 1 for x in pairs) or layout == "distinct"
        return oracle(theirs, labels, pairs)

    assert_same(
        value_and_grads(lambda: loss(ours, labels, Candidates.clean(ours, labels)), [ours]),
        value_and_grads(pml_loss, [theirs]),
    )


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_proxy_anchor_matches_pml(layout: str, seed: int) -> None:
    embeddings, labels = make_batch(layout, seed)
    torch.manual_seed(seed)
    # Two spare classes, so some proxies have no positive in the batch.
    loss = ProxyAnchorLoss(int(labels.max()) + 3, DIM, alpha=32, delta=0.1).to(DTYPE)
    oracle = pml_proxy_anchor(loss)
    ours, theirs = leaf(embeddings), leaf(embeddings)
    assert_same(
        value_and_grads(lambda: loss(ours, labels, Candidates.clean(ours, labels)), [ours, loss.proxies]),
        value_and_grads(lambda: oracle(theirs, labels), [theirs, oracle.proxies]),
    )


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cross_entropy_matches_torch(layout: str, seed: int) -> None:
    embeddings, labels = make_batch(layout, seed)
    generator = torch.Generator().manual_seed(seed)
    loss = cross_entropy(DIM, int(labels.max()) + 3, generator)
    weight, bias = loss.classifier.linear.weight, loss.classifier.linear.bias
    ours, theirs, their_weight, their_bias = leaf(embeddings), leaf(embeddings), leaf(weight), leaf(bias)
    assert_same(
        value_and_grads(lambda: loss(ours, labels), [ours, weight, bias]),
        value_and_grads(
            lambda: F.cross_entropy(F.linear(theirs, their_weight, their_bias), labels, label_smoothing=0.1),
            [theirs, their_weight, their_bias],
        ),
    )


def cross_entropy(num_features: int, num_classes: int, generator: torch.Generator) -> CrossEntropyLoss:
    """Cross-entropy with a random classifier (its zero initialisation would make every logit 0)."""
    loss = CrossEntropyLoss(num_features, num_classes, label_smoothing=0.1).to(DTYPE)
    with torch.no_grad():
        for parameter in loss.classifier.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=DTYPE))
    return loss


# --- 2. mixed candidates: lam in {0, 1} is clean, fractional lam follows the weighted form (docs/design.md) ---


def all_losses(num_classes: int) -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    return {
        "contrastive": ContrastiveLoss(0.5),
        "multi_similarity": MultiSimilarityLoss(),
        "multi_similarity_mining": MultiSimilarityLoss(mining=True),
        "proxy_anchor": ProxyAnchorLoss(num_classes, DIM).to(DTYPE),
        "cross_entropy": cross_entropy(DIM, num_classes, torch.Generator().manual_seed(0)),
    }


LOSS_NAMES = list(all_losses(1))


def other_class_partner(labels: Tensor, generator: torch.Generator) -> Tensor:
    """For every example, a random example of another class: the x' a Metrix mixture pairs it with."""
    scores = torch.rand(labels.shape[0], labels.shape[0], generator=generator, dtype=DTYPE)
    return scores.masked_fill(labels[:, None] == labels[None, :], -1).argmax(dim=1)


@pytest.mark.parametrize("lam_value", [0.0, 1.0])
@pytest.mark.parametrize("name", LOSS_NAMES)
@pytest.mark.parametrize("layout", ["m_per_class", "random"])
def test_mixed_with_lam_0_or_1_is_clean(layout: str, name: str, lam_value: float) -> None:
    embeddings, labels = make_batch(layout, seed=3)
    generator = torch.Generator().manual_seed(3)
    partner = other_class_partner(labels, generator)
    loss = all_losses(int(labels.max()) + 1)[name]
    n = labels.shape[0]
    lam = torch.full((n,), lam_value, dtype=DTYPE)
    # The candidate v is x_v (lam = 1) or its partner x_partner(v) (lam = 0); an anchor never meets itself.
    source = torch.arange(n) if lam_value == 1 else partner
    mask = torch.arange(n)[:, None] != source[None, :]

    def mixed(x: Tensor) -> Tensor:
        v = lam[:, None] * x + (1 - lam[:, None]) * x[partner]
        return loss(x, labels, Candidates(v, labels, labels[partner], lam, mask))

    def clean(x: Tensor) -> Tensor:
        return loss(x, labels, Candidates(x[source], labels[source], labels[source], torch.ones_like(lam), mask))

    x1, x2 = leaf(embeddings), leaf(embeddings)
    params = list(loss.parameters())
    mixed_result = value_and_grads(lambda: mixed(x1), [x1, *params])
    clean_result = value_and_grads(lambda: clean(x2), [x2, *params])
    assert_same(mixed_result, clean_result)
    if lam_value == 1:  # the same candidates as the batch itself
        assert torch.equal(mask, Candidates.clean(embeddings, labels).anchor_mask)


# Hand-written, loop-by-loop readings of the weighted form (docs/design.md): independent of losses/, naive.


def unit(x: Tensor) -> Tensor:
    return x / x.norm()


def share_of(c: int, label: int, other: int, lam: Tensor) -> Tensor:
    """Share of class c in the interpolated label lam * label + (1 - lam) * other."""
    return lam * (label == c) + (1 - lam) * (other == c)


def reference_contrastive(x: Tensor, y: list[int], c: Candidates, margin: float = 0.5) -> Tensor:
    pos_terms, neg_terms = [], []
    for a in range(len(y)):
        for v in range(len(c.lam)):
            if not c.anchor_mask[a, v]:
                continue
            w_pos = share_of(y[a], int(c.labels[v]), int(c.other_labels[v]), c.lam[v])
            d = (unit(x[a]) - unit(c.embeddings[v])).norm()
            pos, neg = w_pos * d, (1 - w_pos) * torch.relu(margin - d)
            if pos > 0:
                pos_terms.append(pos)
            if neg > 0:
                neg_terms.append(neg)
    return sum(pos_terms) / max(len(pos_terms), 1) + sum(neg_terms) / max(len(neg_terms), 1)


def reference_multi_similarity(
    x: Tensor,
    y: list[int],
    c: Candidates,
    mining: bool,
    alpha: float = 2,
    beta: float = 50,
    base: float = 0.5,
    epsilon: float = 0.1,
) -> Tensor:
    per_anchor = []
    for a in range(len(y)):
        seen = [v for v in range(len(c.lam)) if c.anchor_mask[a, v]]
        if not seen:
            continue
        s = {v: unit(x[a]) @ unit(c.embeddings[v]) for v in seen}
        w_pos = {v: share_of(y[a], int(c.labels[v]), int(c.other_labels[v]), c.lam[v]) for v in seen}
        positives = [v for v in seen if w_pos[v] > 0]
        negatives = [v for v in seen if w_pos[v] < 1]
        if mining:
            # MS mining, with every candidate of non-zero weight counted as a positive / negative.
            hardest_neg = max((float(s[v].detach()) for v in negatives), default=-math.inf)
            hardest_pos = min((float(s[v].detach()) for v in positives), default=math.inf)
            positives = [v for v in positives if s[v] - epsilon < hardest_neg]
            negatives = [v for v in negatives if s[v] + epsilon > hardest_pos]
        pos_sum = sum((w_pos[v] * torch.exp(-alpha * (s[v] - base)) for v in positives), torch.tensor(0.0, dtype=DTYPE))
        neg_sum = sum(
            ((1 - w_pos[v]) * torch.exp(beta * (s[v] - base)) for v in negatives), torch.tensor(0.0, dtype=DTYPE)
        )
        per_anchor.append(torch.log1p(pos_sum) / alpha + torch.log1p(neg_sum) / beta)
    return sum(per_anchor) / max(len(per_anchor), 1)


def reference_proxy_anchor(proxies: Tensor, c: Candidates, alpha: float = 32, delta: float = 0.1) -> Tensor:
    used = [v for v in range(len(c.lam)) if c.anchor_mask[:, v].any()]
    pos_terms, neg_terms = [], []
    for k in range(proxies.shape[0]):
        w_pos = {v: share_of(k, int(c.labels[v]), int(c.other_labels[v]), c.lam[v]) for v in used}
        s = {v: unit(proxies[k]) @ unit(c.embeddings[v]) for v in used}
        zero = torch.tensor(0.0, dtype=DTYPE)
        pos_sum = sum((w_pos[v] * torch.exp(-alpha * (s[v] - delta)) for v in used), zero)
        neg_sum = sum(((1 - w_pos[v]) * torch.exp(alpha * (s[v] + delta)) for v in used), zero)
        if sum(float(w_pos[v]) for v in used) > 0:
            pos_terms.append(torch.log1p(pos_sum))
        neg_terms.append(torch.log1p(neg_sum))
    return sum(pos_terms) / max(len(pos_terms), 1) + sum(neg_terms) / len(neg_terms)


def reference_cross_entropy(c: Candidates, weight: Tensor, bias: Tensor, eps: float = 0.1) -> Tensor:
    terms = []
    for v in range(len(c.lam)):
        if not c.anchor_mask[:, v].any():
            continue
        log_p = (weight @ c.embeddings[v] + bias).log_softmax(dim=0)
        smooth = -log_p.mean()
        ce_first = (1 - eps) * -log_p[c.labels[v]] + eps * smooth
        ce_second = (1 - eps) * -log_p[c.other_labels[v]] + eps * smooth
        terms.append(c.lam[v] * ce_first + (1 - c.lam[v]) * ce_second)
    return sum(terms) / max(len(terms), 1)


def fractional_case(x: Tensor) -> tuple[list[int], Candidates]:
    """Eight anchors of four classes; ten mixtures lam x_i + (1 - lam) x_j of different classes with random
    lam in (0, 1) plus two clean candidates; a random anchor mask that leaves anchor 0 without a candidate and
    candidate 11 unused."""
    y = [0, 0, 1, 1, 2, 2, 3, 3]
    generator = torch.Generator().manual_seed(7)
    first = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 0, 2, 1, 5])
    second = torch.tensor([2, 4, 6, 0, 1, 7, 3, 5, 6, 4, 1, 5])  # the last two are clean: second == first
    lam = torch.rand(12, generator=generator, dtype=DTYPE) * 0.9 + 0.05
    lam[10:] = 1
    mask = torch.rand(8, 12, generator=generator) < 0.7
    mask[0] = False
    mask[:, 11] = False
    labels = torch.tensor(y)
    v = lam[:, None] * x[first] + (1 - lam[:, None]) * x[second]
    return y, Candidates(v, labels[first], labels[second], lam, mask)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_fractional_lam_matches_design(name: str) -> None:
    generator = torch.Generator().manual_seed(11)
    embeddings = torch.randn(8, DIM, generator=generator, dtype=DTYPE)
    # Mining only drops pairs when similarities spread beyond epsilon: pull same-class embeddings together.
    embeddings = embeddings + 2 * torch.randn(4, DIM, generator=generator, dtype=DTYPE).repeat_interleave(2, dim=0)
    loss = all_losses(4)[name]
    params = list(loss.parameters())

    def ours(x: Tensor) -> Tensor:
        y, candidates = fractional_case(x)
        return loss(x, torch.tensor(y), candidates)

    def reference(x: Tensor) -> Tensor:
        y, c = fractional_case(x)
        return {
            "contrastive": lambda: reference_contrastive(x, y, c),
            "multi_similarity": lambda: reference_multi_similarity(x, y, c, mining=False),
            "multi_similarity_mining": lambda: reference_multi_similarity(x, y, c, mining=True),
            "proxy_anchor": lambda: reference_proxy_anchor(loss.proxies, c),
            "cross_entropy": lambda: reference_cross_entropy(c, *params),
        }[name]()

    x1, x2 = leaf(embeddings), leaf(embeddings)
    result = value_and_grads(lambda: ours(x1), [x1, *params])
    assert result[0] > 0
    assert_same(result, value_and_grads(lambda: reference(x2), [x2, *params]))


def test_fractional_case_exercises_mining() -> None:
    """The mining reference above must actually drop pairs, or the mining comparison proves little."""
    generator = torch.Generator().manual_seed(11)
    embeddings = torch.randn(8, DIM, generator=generator, dtype=DTYPE)
    embeddings = embeddings + 2 * torch.randn(4, DIM, generator=generator, dtype=DTYPE).repeat_interleave(2, dim=0)
    y, c = fractional_case(embeddings)
    mined = MultiSimilarityLoss(mining=True)(embeddings, torch.tensor(y), c)
    plain = MultiSimilarityLoss(mining=False)(embeddings, torch.tensor(y), c)
    assert not torch.isclose(mined, plain)


# --- 3. no positive: never NaN ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_no_positive_batch_is_finite(name: str) -> None:
    """All labels distinct: the positive parts are skipped (0, not 0 / 0); value and gradients stay finite."""
    embeddings, labels = make_batch("distinct", seed=0)
    loss = all_losses(12)[name]
    x = leaf(embeddings)
    params = list(loss.parameters())
    value, grads = value_and_grads(lambda: loss(x, labels), [x, *params])
    assert torch.isfinite(value)
    assert all(torch.isfinite(g).all() for g in grads)


def test_no_positive_contrastive_is_its_negative_part() -> None:
    embeddings, labels = make_batch("distinct", seed=0)
    d = torch.cdist(F.normalize(embeddings, dim=1), F.normalize(embeddings, dim=1))
    neg = torch.relu(0.5 - d)[~torch.eye(len(labels), dtype=torch.bool)]
    expected = neg[neg > 0].mean() if (neg > 0).any() else torch.tensor(0.0, dtype=DTYPE)
    torch.testing.assert_close(ContrastiveLoss(0.5)(embeddings, labels, Candidates.clean(embeddings, labels)), expected)


def test_sphere_distance_and_its_gradient_against_the_formula() -> None:
    """d = sqrt(2 - 2 cos) with torch's own sqrt as the oracle where d > 0; where a candidate equals its anchor
    (d = 0, sqrt's slope infinite) the gradient is the subgradient 0, finite."""
    x = torch.randn(5, DIM, dtype=DTYPE)
    x[0], x[1] = 2 * torch.eye(DIM)[0], 5 * torch.eye(DIM)[3]  # cos exactly 1 with themselves
    y = torch.cat([x[:2], torch.randn(4, DIM, dtype=DTYPE)])  # candidates 0 and 1 equal anchors 0 and 1
    probe = torch.randn(5, 6, dtype=DTYPE)
    got_x, got_y = leaf(x), leaf(y)
    got = sphere_distance(got_x, got_y)
    (got * probe).sum().backward()
    want_x, want_y = leaf(x), leaf(y)
    cos = F.normalize(want_x, dim=1) @ F.normalize(want_y, dim=1).T
    same = torch.zeros(5, 6, dtype=torch.bool)
    same[0, 0] = same[1, 1] = True
    want = (2 - 2 * cos).clamp_min(0).masked_fill(same, 1).sqrt().masked_fill(same, 0)
    (want * probe).sum().backward()
    torch.testing.assert_close(got, want, **TOL)
    assert got[0, 0] == 0 and got[1, 1] == 0
    torch.testing.assert_close((got_x.grad, got_y.grad), (want_x.grad, want_y.grad), **TOL)


def test_cosine_similarity_and_its_gradient_against_f_normalize() -> None:
    """Values and gradients of F.normalize(x) @ F.normalize(y).T, zero rows (held at F.normalize's floor) included."""
    x, y = torch.randn(5, DIM, dtype=DTYPE), torch.randn(7, DIM, dtype=DTYPE)
    x[2], y[4] = 0, 0
    probe = torch.randn(5, 7, dtype=DTYPE)
    results = []
    for similarity in (cosine_similarity, lambda a, b: F.normalize(a, dim=1) @ F.normalize(b, dim=1).T):
        got_x, got_y = leaf(x), leaf(y)
        value = similarity(got_x, got_y)
        (value * probe).sum().backward()
        results.append((value, got_x.grad, got_y.grad))
    torch.testing.assert_close(results[0], results[1], **TOL)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_nothing_to_compare_is_zero(name: str) -> None:
    """A batch of one (or candidates no anchor sees) has no pair: every loss is exactly 0 with finite gradients."""
    x = leaf(torch.randn(1, DIM, dtype=DTYPE))
    loss = all_losses(3)[name]
    params = list(loss.parameters())
    labels = torch.tensor([1])
    value, grads = value_and_grads(lambda: loss(x, labels), [x, *params])
    assert value == 0
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_no_candidate_at_all_is_zero(name: str) -> None:
    """A mixer may select no pair (say all labels equal, or a cap of 0): M = 0 candidates is a zero loss."""
    x, labels = leaf(torch.randn(4, DIM, dtype=DTYPE)), torch.tensor([0, 0, 1, 1])
    empty = torch.zeros(0, dtype=torch.long)
    candidates = Candidates(x[:0], empty, empty, torch.zeros(0, dtype=DTYPE), torch.zeros(4, 0, dtype=torch.bool))
    loss = all_losses(2)[name]
    value, grads = value_and_grads(lambda: loss(x, labels, candidates), [x, *loss.parameters()])
    assert value == 0
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("name", ["contrastive", "multi_similarity", "multi_similarity_mining"])
def test_candidate_equal_to_its_anchor_has_finite_gradients(name: str) -> None:
    """Anchor-negative mixing with lam = 1 yields v = a, where the distance d = 0 has no derivative."""
    embeddings, labels = make_batch("m_per_class", seed=0)
    x = leaf(embeddings)
    loss = all_losses(8)[name]
    candidates = Candidates(
        x[:4], labels[:4], labels[4:8], torch.ones(4, dtype=DTYPE), torch.ones(len(labels), 4, dtype=torch.bool)
    )
    value, (grad,) = value_and_grads(lambda: loss(x, labels, candidates), [x])
    assert torch.isfinite(value) and torch.isfinite(grad).all()


# --- 4. proxy-anchor labels ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [5, 7, -1])
@pytest.mark.parametrize("where", ["labels", "other_labels"])
def test_proxy_anchor_rejects_labels_outside_its_classes(bad: int, where: str) -> None:
    embeddings = torch.randn(4, DIM)
    labels = torch.tensor([0, 1, 2, 3])
    candidates = Candidates.clean(embeddings, labels)
    setattr(candidates, where, torch.tensor([0, 1, bad, 3]))
    with pytest.raises(ValueError, match=r"labels in \[0, 5\)"):
        ProxyAnchorLoss(5, DIM)(embeddings, labels, candidates)


# --- 5. no host-device synchronisation ---------------------------------------------------------------------------


HOST_READS = ["item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__"]


@contextlib.contextmanager
def host_reads_forbidden() -> Iterator[None]:
    """Make every way of reading a tensor's value into Python raise: on a GPU each would be a host sync.
    Branching on a tensor's value (if / while / and) goes through __bool__, so it is caught too."""

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("host read of a tensor value during the loss")

    saved = {name: getattr(torch.Tensor, name) for name in HOST_READS}
    try:
        for name in HOST_READS:
            setattr(torch.Tensor, name, forbidden)
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


def fractional_inputs() -> tuple[Tensor, Tensor, Candidates]:
    x = torch.randn(8, DIM, dtype=DTYPE, requires_grad=True)
    y, candidates = fractional_case(x)
    return x, torch.tensor(y), candidates


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_forward_reads_no_tensor_value_on_the_host(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    loss = all_losses(4)[name]
    if isinstance(loss, ProxyAnchorLoss):
        # The label check reads on the CPU only (documented); on a GPU it is an asynchronous assert.
        monkeypatch.setattr(loss, "check_labels", lambda labels: None)
    x, labels, candidates = fractional_inputs()
    with host_reads_forbidden():
        value = loss(x, labels, candidates)
    value.backward()
    with pytest.raises(AssertionError, match="host read"), host_reads_forbidden():
        bool(value > 0)  # the trap itself works


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host syncs only exist with a CUDA device")
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_forward_and_backward_do_not_sync_on_cuda(name: str) -> None:
    loss = all_losses(4)[name].cuda()
    x, labels, candidates = fractional_inputs()
    x = x.detach().cuda().requires_grad_(True)
    candidates = Candidates(
        *(
            t.cuda()
            for t in (
                candidates.embeddings.detach(),
                candidates.labels,
                candidates.other_labels,
                candidates.lam,
                candidates.anchor_mask,
            )
        )
    )
    labels = labels.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss(x, labels, candidates).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
