"""BN-Inception: architecture against an independent key/shape list, checkpoint loading, input conversion."""

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from models.bn_inception import BNInception, bn_inception

# The paper's table written out again, independently of the module, with explicit input widths:
# block: (in, 1x1, 3x3 reduce, 3x3, double 3x3 reduce, double 3x3, pool proj); 0 = no such layer.
TABLE = {
    "3a": (192, 64, 64, 64, 64, 96, 32),
    "3b": (256, 64, 64, 96, 64, 96, 64),
    "3c": (320, 0, 128, 160, 64, 96, 0),
    "4a": (576, 224, 64, 96, 96, 128, 128),
    "4b": (576, 192, 96, 128, 96, 128, 128),
    "4c": (576, 160, 128, 160, 128, 160, 128),
    "4d": (608, 96, 128, 192, 160, 192, 128),
    "4e": (608, 0, 128, 192, 192, 256, 0),
    "5a": (1056, 352, 192, 320, 160, 224, 128),
    "5b": (1024, 352, 192, 320, 192, 224, 128),
}

# Conv weight shapes of the checkpoint for the stem and two blocks, typed by hand.
HAND_WRITTEN = {
    "conv1_7x7_s2": (64, 3, 7, 7),
    "conv2_3x3_reduce": (64, 64, 1, 1),
    "conv2_3x3": (192, 64, 3, 3),
    "inception_3a_1x1": (64, 192, 1, 1),
    "inception_3a_3x3_reduce": (64, 192, 1, 1),
    "inception_3a_3x3": (64, 64, 3, 3),
    "inception_3a_double_3x3_reduce": (64, 192, 1, 1),
    "inception_3a_double_3x3_1": (96, 64, 3, 3),
    "inception_3a_double_3x3_2": (96, 96, 3, 3),
    "inception_3a_pool_proj": (32, 192, 1, 1),
    "inception_4e_3x3_reduce": (128, 608, 1, 1),
    "inception_4e_3x3": (192, 128, 3, 3),
    "inception_4e_double_3x3_reduce": (192, 608, 1, 1),
    "inception_4e_double_3x3_1": (256, 192, 3, 3),
    "inception_4e_double_3x3_2": (256, 256, 3, 3),
}

# Conv weights + biases + BN scales/shifts of the 69 convs, without last_linear (1024 * 1000 + 1000).
PARAMETERS = 10_270_240


def convs() -> list[tuple[str, int, int, int]]:
    """(name, in, out, kernel) of every conv of the checkpoint, from TABLE."""
    layers = [("conv1_7x7_s2", 3, 64, 7), ("conv2_3x3_reduce", 64, 64, 1), ("conv2_3x3", 64, 192, 3)]
    for block, (cin, c1, r3, c3, rd, cd, proj) in TABLE.items():
        p = f"inception_{block}_"
        if c1:
            layers.append((p + "1x1", cin, c1, 1))
        layers += [(p + "3x3_reduce", cin, r3, 1), (p + "3x3", r3, c3, 3)]
        layers += [(p + "double_3x3_reduce", cin, rd, 1), (p + "double_3x3_1", rd, cd, 3)]
        layers.append((p + "double_3x3_2", cd, cd, 3))
        if proj:
            layers.append((p + "pool_proj", cin, proj, 1))
    return layers


def fake_checkpoint(seed: int = 0) -> dict[str, Tensor]:
    """Random tensors under the checkpoint's keys, including the classifier, as in the real file."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, cin, cout, k in convs():
        state[f"{name}.weight"] = torch.randn(cout, cin, k, k, generator=g)
        state[f"{name}.bias"] = torch.randn(cout, generator=g)
        for stat in ("weight", "bias", "running_mean"):
            state[f"{name}_bn.{stat}"] = torch.randn(cout, generator=g)
        state[f"{name}_bn.running_var"] = torch.rand(cout, generator=g) + 0.5
    state["last_linear.weight"] = torch.randn(1000, 1024, generator=g)
    state["last_linear.bias"] = torch.randn(1000, generator=g)
    return state


@pytest.fixture(scope="module")
def checkpoint() -> dict[str, Tensor]:
    return fake_checkpoint()


@pytest.fixture(scope="module")
def checkpoint_file(checkpoint: dict[str, Tensor], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save(checkpoint, tmp_path_factory.mktemp("weights") / "bn_inception-52deb4733.pth")


def save(state: object, path: Path) -> Path:
    torch.save(state, path)
    return path


def test_table_channels_chain_to_1024() -> None:
    blocks = list(TABLE.values())
    for (cin, c1, _, c3, _, cd, proj), nxt in zip(blocks, [*blocks[1:], (1024,)], strict=True):
        assert c1 + c3 + cd + (proj or cin) == nxt[0]


def test_fake_checkpoint_matches_hand_written_keys_and_count(checkpoint: dict[str, Tensor]) -> None:
    state = checkpoint
    checked = {k: tuple(v.shape) for k, v in state.items() if k.startswith(("conv", "inception_3a_", "inception_4e_"))}
    expected = {}
    for name, shape in HAND_WRITTEN.items():
        expected[f"{name}.weight"] = shape
        for key in (f"{name}.bias", *(f"{name}_bn.{s}" for s in ("weight", "bias", "running_mean", "running_var"))):
            expected[key] = shape[:1]
    assert checked == expected
    assert len(state) == 69 * 6 + 2
    params = sum(v.numel() for k, v in state.items() if not k.startswith("last_linear.") and "running" not in k)
    assert params == PARAMETERS


def test_model_parameter_count() -> None:
    assert sum(p.numel() for p in BNInception().parameters()) == PARAMETERS


@pytest.mark.parametrize(("size", "out"), [(224, 7), (64, 2), (32, 1)])
def test_output_shape(size: int, out: int) -> None:
    model = bn_inception().eval()
    with torch.no_grad():
        features = model(torch.rand(1, 3, size, size))
    assert model.out_channels == 1024
    assert features.shape == (1, 1024, out, out)


def test_rejects_sizes_where_reduction_branches_misalign() -> None:
    with pytest.raises(ValueError, match="multiple of 32"):
        bn_inception().eval()(torch.rand(1, 3, 80, 80))


def test_fake_checkpoint_round_trip(checkpoint: dict[str, Tensor], checkpoint_file: Path) -> None:
    state = checkpoint
    loaded = bn_inception(checkpoint_file).state_dict()
    loaded = {k: v for k, v in loaded.items() if not k.endswith("num_batches_tracked")}
    assert loaded.keys() == {k for k in state if not k.startswith("last_linear.")}
    for key, value in loaded.items():
        assert torch.equal(value, state[key]), key


def test_accepts_bn_vectors_stored_as_rows(checkpoint: dict[str, Tensor], tmp_path: Path) -> None:
    state = checkpoint
    rows = {k: v[None] if "_bn." in k else v for k, v in state.items()}
    model = bn_inception(save(rows, tmp_path / "rows.pth"))
    assert torch.equal(model.inception_5b_pool_proj_bn.running_var, state["inception_5b_pool_proj_bn.running_var"])


def unit(state: dict[str, Tensor], name: str, x: Tensor, stride: int = 1) -> Tensor:
    """conv + eval-mode BN + ReLU straight from the checkpoint tensors."""
    w = state[f"{name}.weight"]
    y = F.conv2d(x, w, state[f"{name}.bias"], stride, w.shape[-1] // 2)
    mean, var, scale, shift = (state[f"{name}_bn.{s}"] for s in ("running_mean", "running_var", "weight", "bias"))
    return F.relu(F.batch_norm(y, mean, var, scale, shift, eps=1e-5))


def test_blocks_concatenate_branches_in_checkpoint_order(checkpoint: dict[str, Tensor], checkpoint_file: Path) -> None:
    state = checkpoint
    model = bn_inception(checkpoint_file).eval()
    x = torch.rand(1, 192, 8, 8)
    a = "inception_3a_"
    expected = [
        unit(state, a + "1x1", x),
        unit(state, a + "3x3", unit(state, a + "3x3_reduce", x)),
        unit(state, a + "double_3x3_2", unit(state, a + "double_3x3_1", unit(state, a + "double_3x3_reduce", x))),
        unit(state, a + "pool_proj", F.avg_pool2d(x, 3, 1, 1, ceil_mode=True, count_include_pad=True)),
    ]
    x4 = torch.rand(1, 608, 8, 8)
    e = "inception_4e_"
    expected_4e = [
        unit(state, e + "3x3", unit(state, e + "3x3_reduce", x4), stride=2),
        unit(state, e + "double_3x3_2", unit(state, e + "double_3x3_1", unit(state, e + "double_3x3_reduce", x4)), 2),
        F.max_pool2d(x4, 3, 2, ceil_mode=True),
    ]
    with torch.no_grad():
        torch.testing.assert_close(model.blocks[0](x), torch.cat(expected, 1))  # 3a
        torch.testing.assert_close(model.blocks[7](x4), torch.cat(expected_4e, 1))  # 4e


def test_conversions_reach_the_unregistered_blocks() -> None:
    model = copy.deepcopy(bn_inception()).double()
    layer = model.blocks[0].get_submodule("inception_3a_1x1")
    assert layer is model.inception_3a_1x1
    assert layer.weight.dtype == torch.float64


def test_input_is_converted_to_caffe_bgr() -> None:
    model = bn_inception().eval()
    seen = []
    model.conv1_7x7_s2.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    rgb = torch.tensor([0.2, 0.5, 0.8]).view(1, 3, 1, 1).expand(2, 3, 32, 32)
    with torch.no_grad():
        model(rgb)
    bgr = torch.tensor([0.8 * 255 - 104, 0.5 * 255 - 117, 0.2 * 255 - 128]).view(1, 3, 1, 1)
    torch.testing.assert_close(seen[0], bgr.expand(2, 3, 32, 32))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        bn_inception(tmp_path / "nowhere.pth")


def test_wrong_checkpoint(checkpoint: dict[str, Tensor], tmp_path: Path) -> None:
    state = dict(checkpoint)
    del state["inception_5b_pool_proj.bias"]
    state["fc.weight"] = torch.zeros(1)
    state["inception_3a_1x1.weight"] = torch.zeros(65, 192, 1, 1)
    with pytest.raises(ValueError, match="missing: inception_5b_pool_proj.bias") as error:
        bn_inception(save(state, tmp_path / "wrong.pth"))
    assert "unexpected: fc.weight" in str(error.value)
    assert "inception_3a_1x1.weight (65, 192, 1, 1) vs (64, 192, 1, 1)" in str(error.value)


def test_not_a_state_dict(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a state dict"):
        bn_inception(save(torch.zeros(3), tmp_path / "tensor.pth"))
