"""The `vae` ingredient: autoencoder architecture and the weight of its KL term."""

import math

from sacred import Ingredient

from models.vae import Autoencoder
from utils.errors import check_choice
from utils.settings import NON_NEGATIVE, SIZE, Check, add_named_config, choice, items, optional, register

ARCHS = ("ae", "vae")
CODE_SIDE = 4  # the encoder halves the image down to feature maps of this side

vae_ingredient = Ingredient("vae")


@vae_ingredient.config
def config():
    arch = "ae"  # ae: deterministic autoencoder | vae: variational autoencoder
    in_channels = 3  # the data sets are read as RGB
    latent_dim = 64  # size of the code used for retrieval (the posterior mean for the vae)
    hidden_dims = None  # a stride-2 conv block per width; None: enough to halve the image to 4 x 4 (3 at 32 px)
    kl_weight = 1.0 if arch == "vae" else 0.0  # vae only: weight of the KL term (objective: reconstruction + KL)


register(
    {
        "vae.arch": choice(ARCHS),
        # Every data set is read as RGB (utils/data/images.py): other channel counts cannot meet the images.
        "vae.in_channels": Check(lambda v: type(v) is int and v == 3, "3 (the images are read as RGB)"),
        "vae.latent_dim": SIZE,
        "vae.hidden_dims": optional(items(SIZE)),
        "vae.kl_weight": NON_NEGATIVE,
    }
)


add_named_config(vae_ingredient, "ae", {"arch": "ae", "kl_weight": 0.0}, "a plain autoencoder (reconstruction only)")
add_named_config(
    vae_ingredient, "vae", {"arch": "vae", "kl_weight": 1.0}, "a variational autoencoder (reconstruction + KL term)"
)


def default_widths(image_size: int) -> list[int]:
    """32, 64, 128, ... (at most 512): one block per halving of image_size down to about CODE_SIDE."""
    blocks = max(1, round(math.log2(max(image_size, 1) / CODE_SIDE)))
    return [min(32 * 2**i, 512) for i in range(blocks)]


@vae_ingredient.capture
def get_vae(
    image_size: int, arch: str, in_channels: int, latent_dim: int, hidden_dims: list[int] | None
) -> Autoencoder:
    """The autoencoder for images of image_size pixels (the experiment passes dataset.crop_size)."""
    check_choice("vae.arch", arch, ARCHS)
    widths = default_widths(image_size) if hidden_dims is None else hidden_dims
    return Autoencoder(image_size, arch == "vae", in_channels, latent_dim, tuple(widths))
