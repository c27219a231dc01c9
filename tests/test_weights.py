"""ImageNet weights are read from the torch cache only when their SHA-256 matches the hash published in their
file name, and only as tensors: a planted pickle never runs its code."""

import builtins
import hashlib
import os
import pickle
from pathlib import Path

import pytest
import torch
import torchvision

from models.backbones import BN_INCEPTION_URL, cached_weights, get_backbone, load_weights
from utils.errors import InputError


class Payload:
    """Unpickling it opens `marker` for writing, which creates the file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.open, (self.marker, "w")


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty torch cache, hashes checked (the suite's torch_home fixture turns the check off)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("DML_SKIP_WEIGHT_HASH", raising=False)
    folder = tmp_path / "torch" / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    return folder


def plant(path: Path, marker: Path) -> None:
    with open(path, "wb") as file:
        pickle.dump({"conv1.weight": Payload(marker)}, file)


@pytest.mark.parametrize(
    "arch, weights, url",
    [
        ("resnet18", "IMAGENET1K_V1", torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url),
        ("bninception", "imagenet", BN_INCEPTION_URL),
    ],
)
def test_a_planted_pickle_is_refused_and_its_code_never_runs(cache, tmp_path, arch, weights, url):
    name = os.path.basename(url)
    marker = tmp_path / "code-ran"
    plant(cache / name, marker)
    expected = name.rsplit("-", 1)[1].split(".")[0]
    with pytest.raises(InputError, match=f"weight file {cache / name} is not the published one") as error:
        get_backbone(arch, weights)
    assert f"expected {expected}" in str(error.value) and "delete it and download" in str(error.value)
    assert not marker.exists()
    with open(cache / name, "rb") as file:  # the control: an ordinary unpickling runs the payload
        pickle.load(file)
    assert marker.exists()


def test_tensors_only_even_when_the_hash_check_is_off(cache, tmp_path, monkeypatch):
    monkeypatch.setenv("DML_SKIP_WEIGHT_HASH", "1")
    marker = tmp_path / "code-ran"
    name = os.path.basename(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url)
    plant(cache / name, marker)
    with pytest.raises(InputError, match=f"weight file {cache / name} is not a state dict of tensors"):
        get_backbone("resnet18", "IMAGENET1K_V1")
    assert not marker.exists()


def saved_under_its_hash(model: torch.nn.Module, folder: Path) -> Path:
    """The state dict saved as torchvision names its files: resnet18-<first 8 hex digits of its SHA-256>.pth."""
    scratch = folder / "scratch.pth"
    torch.save(model.state_dict(), scratch)
    digest = hashlib.sha256(scratch.read_bytes()).hexdigest()
    return scratch.rename(folder / f"resnet18-{digest[:8]}.pth")


def test_a_file_matching_its_published_hash_loads(cache):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    path = saved_under_its_hash(model, cache)
    state = load_weights(cached_weights(f"https://download.pytorch.org/models/{path.name}"))
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(state[key], value) for key, value in model.state_dict().items())


def test_a_downloaded_file_is_checked_and_a_tampered_one_refused(cache, tmp_path):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    path = saved_under_its_hash(torchvision.models.resnet18(weights=None), mirror)
    url = path.as_uri()  # torch.hub's downloader reads file:// addresses as it reads https:// ones
    assert cached_weights(url) == cache / path.name
    assert (cache / path.name).read_bytes() == path.read_bytes()

    (cache / path.name).unlink()
    data = bytearray(path.read_bytes())
    data[-100] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match=f"pretrained weights {path.name} are unavailable .*invalid hash value"):
        cached_weights(url)
    assert not (cache / path.name).exists()


def test_a_planted_pickle_as_a_vits_weight_file_is_refused_and_its_code_never_runs(tmp_path):
    marker = tmp_path / "code-ran"
    plant(tmp_path / "dino.pth", marker)
    tiny = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    with pytest.raises(InputError, match=f"weight file {tmp_path / 'dino.pth'} is not a state dict of tensors"):
        get_backbone("vit_s16_dino", "dino", weights_file=str(tmp_path / "dino.pth"), **tiny)
    assert not marker.exists()
