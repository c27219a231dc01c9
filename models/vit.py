"""Vision transformers from timm (DINO, DINOv2, CLIP image towers): building, offline weights and token layout.

A ViT backbone maps images in [0, 1] to its final token features, (N, T, C) after timm's final norm: the class
token first, then the register tokens (DINOv2 with registers), then the patch tokens in raster order. How many
of each comes from the timm model (num_prefix_tokens, has_class_token), never from the name. The head pools them
(models/metric_model.py). Models are built with dynamic_img_size: the position embedding is resampled on load to
the backbone's input size and interpolated at run time for any crop that is a multiple of the patch size.

Weights never come from the network when a file is given or HF_HUB_OFFLINE=1 is set: model.weights_file (a
safetensors or .pth file, read as tensors only), else timm's file in the Hugging Face cache. timm's
checkpoint_filter_fn converts the raw DINO, DINOv2 and OpenAI-CLIP layouts as timm's own loader does.
"""

import os
import pickle
from functools import cache
from pathlib import Path
from typing import NamedTuple

import huggingface_hub
import safetensors.torch
import timm
import torch
from timm.models import get_pretrained_cfg
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import nn

from utils.errors import InputError

TIMM_PREFIX = "timm:"  # model.arch=timm:<timm name>: any timm VisionTransformer
# timm publishes its converted weights under this name in each model's Hugging Face repository.
HUB_FILENAME = "model.safetensors"
OFFLINE_VALUES = ("1", "ON", "YES", "TRUE")  # huggingface_hub's reading of HF_HUB_OFFLINE


class TokenLayout(NamedTuple):
    class_token: bool  # the first token is the class token
    prefix_tokens: int  # class and register tokens, before the patch tokens


class VitInfo(NamedTuple):
    """What the registry and the settings rules need to know of a timm ViT, from its pretrained config."""

    timm_name: str  # without the weights tag
    weights: tuple[str, ...]  # the tag of its weights (the name's, else timm's default); () for none
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    hub_repo: str | None  # where timm publishes the weights (Hugging Face)


def vit_info(name: str) -> VitInfo:
    """The pretrained config of a timm ViT name, with or without a tag ('vit_small_patch16_224.dino')."""
    if not timm.is_model(name):
        raise InputError(
            f"unknown timm model {name!r} in model.arch: list the ViTs with "
            "python -c \"import timm; print(timm.list_models('vit*', pretrained=True))\""
        )
    try:
        cfg = get_pretrained_cfg(name)
    except RuntimeError as error:  # an unknown tag
        raise InputError(f"model.arch {TIMM_PREFIX}{name}: {error}") from None
    if cfg is None:  # where timm knows no input size, normalisation or weights
        raise InputError(
            f"timm model {name!r} has no pretrained config: choose a ViT that python -m models.backbones lists"
        )
    base = name.split(".")[0]
    _, size, _ = cfg.input_size
    return VitInfo(base, (cfg.tag,) if cfg.hf_hub_id else (), size, tuple(cfg.mean), tuple(cfg.std), cfg.hf_hub_id)


def create_vit(timm_name: str, input_size: int, drop_path: float, **architecture) -> VisionTransformer:
    """A randomly initialised timm ViT without its classifier; architecture overrides timm's (tests: tiny ViTs)."""
    options = dict(num_classes=0, img_size=input_size, dynamic_img_size=True, drop_path_rate=drop_path)
    try:
        model = timm.create_model(timm_name, pretrained=False, **(options | architecture))
    except TypeError:  # another family's constructor refuses the ViT options
        model = None
    if not isinstance(model, VisionTransformer):
        raise InputError(
            f"model.arch {TIMM_PREFIX}{timm_name} is not a timm VisionTransformer: "
            f"{TIMM_PREFIX}<name> takes ViTs only (python -m models.backbones lists the registry)"
        )
    return model


@cache
def meta_vit(timm_name: str) -> VisionTransformer:
    """A timm ViT built on the meta device (no memory, no weights): its patch size and token layout."""
    with torch.device("meta"):
        return create_vit(timm_name, vit_info(timm_name).input_size, 0.0)


def patch_size(timm_name: str) -> int:
    return meta_vit(timm_name).patch_embed.patch_size[0]


def describe_tokens(timm_name: str) -> str:
    """The token layout in words, for docs/models.md's table."""
    model = meta_vit(timm_name)
    registers = model.num_prefix_tokens - int(model.has_class_token)
    parts = ["class"] * model.has_class_token + [f"{registers} registers"] * (registers > 0)
    return " + ".join([*parts, f"{patch_size(timm_name)} px patches"])


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").upper() in OFFLINE_VALUES


def hub_weights(info: VitInfo, tag: str) -> Path:
    """timm's weight file from the Hugging Face cache; downloaded into it only when HF_HUB_OFFLINE is not set."""
    repo = info.hub_repo
    cached = huggingface_hub.try_to_load_from_cache(repo, HUB_FILENAME)
    if isinstance(cached, str):
        return Path(cached)
    if not hub_offline():
        try:
            return Path(huggingface_hub.hf_hub_download(repo, HUB_FILENAME))
        except (OSError, ValueError) as error:  # the hub's HTTP and connection errors are OSErrors
            reason = f"the download failed ({type(error).__name__})"
    else:
        reason = "HF_HUB_OFFLINE=1"
    raise InputError(
        f"no weights for {info.timm_name}.{tag} ({reason}): it wants {repo}/{HUB_FILENAME} in the Hugging Face "
        f"cache {huggingface_hub.constants.HF_HUB_CACHE}; put it there with `hf download {repo} {HUB_FILENAME}`, "
        "or pass model.weights_file=PATH (safetensors or .pth; raw DINO, DINOv2 and OpenAI-CLIP files are converted)"
    )


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors or .pth file; weights_only: a pickle that would run code is refused."""
    try:
        if path.suffix == ".safetensors":
            return safetensors.torch.load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, safetensors.SafetensorError) as error:
        raise InputError(f"weight file {path} is not a state dict of tensors ({error})") from None


def load_vit_weights(model: VisionTransformer, path: Path, name: str) -> None:
    """Load a timm, raw DINO, raw DINOv2 or raw OpenAI-CLIP state dict into model, converted and its position
    embedding resampled by timm's checkpoint_filter_fn; a classifier or projection head in the file is dropped
    (the metric head replaces it). Any other missing or unexpected key refuses the file."""
    state = checkpoint_filter_fn(read_state_dict(path), model)
    state = {key: value for key, value in state.items() if not key.startswith("head.")}
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    shapes = [key for key, value in state.items() if key in expected and value.shape != expected[key].shape]
    if missing or unexpected or shapes:
        raise InputError(
            f"weight file {path} does not fit {name} (missing {missing[:3]}, unexpected {unexpected[:3]}, "
            f"other shapes {shapes[:3]}): give the file of this model or choose the model.arch it belongs to"
        )
    model.load_state_dict(state)


class ViTBackbone(nn.Module):
    """Normalisation with the backbone's own mean and std, then the timm ViT: images -> (N, T, C) tokens."""

    def __init__(self, normalize: nn.Module, vit: VisionTransformer) -> None:
        super().__init__()
        self.normalize = normalize
        self.vit = vit
        self.out_channels = vit.embed_dim
        self.layout = TokenLayout(vit.has_class_token, vit.num_prefix_tokens)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.vit.forward_features(self.normalize(images))

    def parameter_depths(self) -> dict[str, int]:
        """Parameter name -> depth for layer-wise decay: the embeddings (patch, position, class and register
        tokens, CLIP's pre-norm) 0, block i i + 1, the final norm len(blocks) + 1."""
        blocks = len(self.vit.blocks)
        depths = {}
        for name, _ in self.named_parameters():
            if name.startswith("vit.blocks."):
                depths[name] = int(name.split(".")[2]) + 1
            elif name.startswith(("vit.norm.", "vit.fc_norm.")):
                depths[name] = blocks + 1
            else:
                depths[name] = 0
        return depths


def build_vit(
    name: str,
    normalize: nn.Module,
    *,
    weights: str | None,
    weights_file: Path | None,
    drop_path: float,
    input_size: int,
    **architecture,
) -> ViTBackbone:
    """The ViT backbone of the timm name (without tag) for input_size images, with the weights tag's weights
    (None: random), read from weights_file when given, else from the Hugging Face cache."""
    # The weight file first: missing weights stop the run before a large model is built.
    path = None if weights is None else weights_file or hub_weights(vit_info(f"{name}.{weights}"), weights)
    model = create_vit(name, input_size, drop_path, **architecture)
    if path is not None:
        load_vit_weights(model, path, f"{name}.{weights}")
    return ViTBackbone(normalize, model)
