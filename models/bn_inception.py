"""BN-Inception (Ioffe & Szegedy 2015), the Caffe-trained ImageNet backbone of deep metric learning.

Parameter names and shapes follow the converted checkpoint `bn_inception-52deb4733.pth`
(flat names such as `inception_3a_double_3x3_1_bn.weight`), so its state dict, minus the
classifier `last_linear.*`, loads strictly. The network takes the repo's RGB images in [0, 1]
and converts them to the Caffe input (BGR, 0..255, per-channel mean subtracted) itself.
"""

from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Caffe BN-Inception input: BGR channel means on the 0..255 scale, std 1.
CAFFE_BGR_MEAN = (104.0, 117.0, 128.0)


class BlockSpec(NamedTuple):
    """One inception block of the paper's table (Inception v2); a width of 0 means no such layer.

    Reduction blocks (stride 2) have no 1x1 branch and no pool projection: their max pool is
    concatenated as is.
    """

    name: str
    c1x1: int
    c3x3_reduce: int
    c3x3: int
    double_reduce: int
    double: int
    pool: str  # "avg" or "max"
    pool_proj: int
    stride: int = 1


BLOCKS = (
    BlockSpec("3a", 64, 64, 64, 64, 96, "avg", 32),
    BlockSpec("3b", 64, 64, 96, 64, 96, "avg", 64),
    BlockSpec("3c", 0, 128, 160, 64, 96, "max", 0, stride=2),
    BlockSpec("4a", 224, 64, 96, 96, 128, "avg", 128),
    BlockSpec("4b", 192, 96, 128, 96, 128, "avg", 128),
    BlockSpec("4c", 160, 128, 160, 128, 160, "avg", 128),
    BlockSpec("4d", 96, 128, 192, 160, 192, "avg", 128),
    BlockSpec("4e", 0, 128, 192, 192, 256, "max", 0, stride=2),
    BlockSpec("5a", 352, 192, 320, 160, 224, "avg", 128),
    BlockSpec("5b", 352, 192, 320, 192, 224, "max", 128),
)


def _add_conv_bn(owner: nn.Module, name: str, cin: int, cout: int, kernel: int, stride: int = 1) -> None:
    """Register `name` (conv with bias) and `name_bn`, the checkpoint's naming."""
    owner.add_module(name, nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2))
    # eps as in Caffe. The reference port passes momentum=0.9, a Caffe-convention value that in
    # PyTorch would make the running statistics track the last batch; keep PyTorch's 0.1.
    owner.add_module(f"{name}_bn", nn.BatchNorm2d(cout, eps=1e-5))


def _conv_bn_relu(owner: nn.Module, name: str, x: Tensor) -> Tensor:
    return F.relu(owner.get_submodule(f"{name}_bn")(owner.get_submodule(name)(x)))


class InceptionBlock(nn.Module):
    """Parallel conv branches plus a pool branch, concatenated along channels (1x1, 3x3, double, pool)."""

    def __init__(self, spec: BlockSpec, in_channels: int) -> None:
        super().__init__()
        p = f"inception_{spec.name}_"
        self.chains: list[list[str]] = []
        if spec.c1x1:
            _add_conv_bn(self, p + "1x1", in_channels, spec.c1x1, 1)
            self.chains.append([p + "1x1"])
        _add_conv_bn(self, p + "3x3_reduce", in_channels, spec.c3x3_reduce, 1)
        _add_conv_bn(self, p + "3x3", spec.c3x3_reduce, spec.c3x3, 3, spec.stride)
        self.chains.append([p + "3x3_reduce", p + "3x3"])
        _add_conv_bn(self, p + "double_3x3_reduce", in_channels, spec.double_reduce, 1)
        _add_conv_bn(self, p + "double_3x3_1", spec.double_reduce, spec.double, 3)
        _add_conv_bn(self, p + "double_3x3_2", spec.double, spec.double, 3, spec.stride)
        self.chains.append([p + "double_3x3_reduce", p + "double_3x3_1", p + "double_3x3_2"])
        # Caffe pooling rounds up and averages over the zero padding too.
        pad = 1 if spec.stride == 1 else 0
        self.pool_name = p + "pool"
        if spec.pool == "avg":
            self.add_module(self.pool_name, nn.AvgPool2d(3, spec.stride, pad, ceil_mode=True, count_include_pad=True))
        else:
            self.add_module(self.pool_name, nn.MaxPool2d(3, spec.stride, pad, ceil_mode=True))
        self.proj_name = p + "pool_proj" if spec.pool_proj else None
        if self.proj_name:
            _add_conv_bn(self, self.proj_name, in_channels, spec.pool_proj, 1)
        self.out_channels = spec.c1x1 + spec.c3x3 + spec.double + (spec.pool_proj or in_channels)

    def forward(self, x: Tensor) -> Tensor:
        outs = []
        for chain in self.chains:
            y = x
            for name in chain:
                y = _conv_bn_relu(self, name, y)
            outs.append(y)
        pooled = self.get_submodule(self.pool_name)(x)
        outs.append(_conv_bn_relu(self, self.proj_name, pooled) if self.proj_name else pooled)
        return torch.cat(outs, dim=1)


class BNInception(nn.Module):
    """BN-Inception trunk: (N, 3, H, W) RGB in [0, 1] -> (N, 1024, H/32, W/32), no pooling or classifier."""

    out_channels = 1024

    def __init__(self) -> None:
        super().__init__()
        # Not a buffer in the state dict, which must match the checkpoint key for key.
        self.register_buffer("caffe_mean", torch.tensor(CAFFE_BGR_MEAN).view(1, 3, 1, 1), persistent=False)
        _add_conv_bn(self, "conv1_7x7_s2", 3, 64, 7, stride=2)
        _add_conv_bn(self, "conv2_3x3_reduce", 64, 64, 1)
        _add_conv_bn(self, "conv2_3x3", 64, 192, 3)
        self.stem_pool = nn.MaxPool2d(3, 2, ceil_mode=True)
        blocks, channels = [], 192
        for spec in BLOCKS:
            blocks.append(InceptionBlock(spec, channels))
            channels = blocks[-1].out_channels
        # The blocks stay out of the module tree (a tuple is not registered) and their layers are
        # registered here, so state dict keys carry no "block." prefix and equal the checkpoint's.
        self.blocks = tuple(blocks)
        for block in blocks:
            for name, layer in block.named_children():
                self.add_module(name, layer)

    def forward(self, x: Tensor) -> Tensor:
        x = x.flip(1) * 255.0 - self.caffe_mean  # RGB [0, 1] -> Caffe BGR [0, 255] minus mean
        x = self.stem_pool(_conv_bn_relu(self, "conv1_7x7_s2", x))
        x = _conv_bn_relu(self, "conv2_3x3_reduce", x)
        x = self.stem_pool(_conv_bn_relu(self, "conv2_3x3", x))
        # 3c and 4e concatenate a stride-2 conv (floor) with a ceil-mode pool: they agree only on
        # even sizes, so the stem output must be a multiple of 4 (true for multiples of 32).
        if x.shape[-2] % 4 or x.shape[-1] % 4:
            raise ValueError(
                f"BN-Inception cannot take {tuple(x.shape[-2:])} feature maps after the stem "
                "(need multiples of 4); use an input size that is a multiple of 32, e.g. 224"
            )
        for block in self.blocks:
            x = block(x)
        return x

    def parameter_depths(self) -> dict[str, int]:
        """Parameter name -> depth: the stem's convolutions 0, Inception block i i + 1."""
        depth_of = {name: i + 1 for i, block in enumerate(self.blocks) for name, _ in block.named_children()}
        return {name: depth_of.get(name.split(".")[0], 0) for name, _ in self.named_parameters()}


def _describe(names: list[str], limit: int = 5) -> str:
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def load_checkpoint(model: BNInception, weights: str | Path) -> None:
    """Load a raw BN-Inception state dict strictly, ignoring the ImageNet classifier `last_linear.*`."""
    path = Path(weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"BN-Inception weights not found at {path} (expected bn_inception-52deb4733.pth)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path} is not a state dict but a {type(state).__name__}")
    expected = model.state_dict()
    state = {k: v for k, v in state.items() if not k.startswith("last_linear.")}
    for key, value in state.items():
        # Some conversions of the Caffe model store BN vectors as (1, C).
        if key in expected and expected[key].ndim == 1 and value.shape == (1, *expected[key].shape):
            state[key] = value.flatten()
    # Checkpoints older than PyTorch 0.4 have no num_batches_tracked; BatchNorm fills it in.
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}"
        for k, v in state.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        problems = [
            f"{label}: {_describe(names)}"
            for label, names in (("missing", missing), ("unexpected", unexpected), ("shape", mismatched))
            if names
        ]
        raise ValueError(f"{path} is not a BN-Inception checkpoint; " + "; ".join(problems))
    model.load_state_dict(state, strict=True)


def bn_inception(weights: str | Path | None = None) -> BNInception:
    """BN-Inception trunk, randomly initialised or loaded from a `bn_inception-52deb4733.pth` state dict."""
    model = BNInception()
    if weights is not None:
        load_checkpoint(model, weights)
    return model
