"""The `vae` ingredient: autoencoder architecture and the weight of its KL term."""

from sacred import Ingredient

from losses.autoencoder import AutoencoderLoss
from models.vae import Autoencoder
from utils.data.ingredient import data_ingredient
from utils.errors import InputError
from utils.training import check_choice

ARCHS = ("ae", "vae")

# The dataset sub-ingredient lets the depth follow the image size.
vae_ingredient = Ingredient("vae", ingredients=[data_ingredient])


@vae_ingredient.config
def config(dataset):
    arch = "ae"  # ae: deterministic autoencoder | vae: variational autoencoder
    in_channels = 3  # the data sets are read as RGB
    latent_dim = 64  # size of the code used for retrieval (the posterior mean for the vae)
    # One stride-2 conv block per width, so feature maps end at 4 x 4 for 32 px digits and 64 px sets.
    hidden_dims = [32, 64, 128] if dataset["crop_size"] <= 32 else [32, 64, 128, 256]
    kl_weight = 1.0 if arch == "vae" else 0.0  # vae only: weight of the KL term


@vae_ingredient.named_config
def ae():
    arch = "ae"
    kl_weight = 0.0


@vae_ingredient.named_config
def vae():
    arch = "vae"
    kl_weight = 1.0


@vae_ingredient.capture
def get_vae(image_size: int, arch: str, in_channels: int, latent_dim: int, hidden_dims: list[int]) -> Autoencoder:
    """The autoencoder for images of image_size pixels (dataset.crop_size)."""
    check_choice("vae.arch", arch, ARCHS)
    return Autoencoder(image_size, arch == "vae", in_channels, latent_dim, tuple(hidden_dims))


@vae_ingredient.capture
def get_autoencoder_loss(arch: str, kl_weight: float) -> AutoencoderLoss:
    if arch == "ae" and kl_weight:
        raise InputError(f"vae.kl_weight={kl_weight} needs a variational model: add vae.vae (or vae.arch=vae), "
                         f"or drop the kl_weight setting")
    return AutoencoderLoss(kl_weight)
