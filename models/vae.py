"""Convolutional autoencoder, deterministic or variational, for the autoencoder baselines.

The encoder halves the image once per hidden width (stride-2 conv blocks) and maps the last feature
map to a latent code; the decoder mirrors it with stride-2 transposed convolutions and ends in a
sigmoid, since its targets are the [0, 1] images the transforms produce.
"""

from itertools import pairwise

import torch
from torch import Tensor, nn

from utils.errors import InputError


def reparameterize(mean: Tensor, logvar: Tensor) -> Tensor:
    """A sample of N(mean, exp(logvar)) written as a function of mean and logvar, so gradients reach both."""
    return mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)


def check_image_size(image_size: int, num_blocks: int) -> None:
    """The encoder's stride-2 blocks need a size that halves exactly num_blocks times."""
    factor = 2**num_blocks
    if image_size < factor or image_size % factor:
        sizes = ", ".join(str(factor * k) for k in range(1, 5))
        raise InputError(
            f"dataset.crop_size={image_size} does not fit vae.hidden_dims with {num_blocks} stride-2 "
            f"blocks: image sizes must be multiples of {factor} ({sizes}, ...); change "
            f"dataset.crop_size or the number of vae.hidden_dims"
        )


def down_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 4, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.LeakyReLU(0.2, inplace=True),
    )


def up_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.ConvTranspose2d(in_channels, out_channels, 4, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.LeakyReLU(0.2, inplace=True),
    )


class Autoencoder(nn.Module):
    """images -> (reconstructions, latent means, latent log-variances or None).

    variational: the encoder also predicts a log-variance and, in training mode, the decoder
    reconstructs a sample of the posterior; in eval mode it decodes the mean, so test metrics are
    deterministic. The deterministic autoencoder never samples.
    """

    def __init__(
        self,
        image_size: int,
        variational: bool,
        in_channels: int = 3,
        latent_dim: int = 64,
        hidden_dims: tuple[int, ...] = (32, 64, 128),
    ) -> None:
        super().__init__()
        if not hidden_dims or min(hidden_dims) < 1 or latent_dim < 1 or in_channels < 1:
            raise InputError(
                f"vae.hidden_dims={list(hidden_dims)}, vae.latent_dim={latent_dim} and "
                f"vae.in_channels={in_channels} must be positive, with at least one hidden width"
            )
        check_image_size(image_size, len(hidden_dims))
        self.hidden_dims = hidden_dims
        widths = [in_channels, *hidden_dims]
        side = image_size // 2 ** len(hidden_dims)
        self.code_shape = (hidden_dims[-1], side, side)
        code_size = hidden_dims[-1] * side * side

        self.encoder = nn.Sequential(*(down_block(a, b) for a, b in pairwise(widths)), nn.Flatten())
        self.mean = nn.Linear(code_size, latent_dim)
        self.logvar = nn.Linear(code_size, latent_dim) if variational else None
        self.project = nn.Linear(latent_dim, code_size)
        ups = [up_block(a, b) for a, b in pairwise(reversed(hidden_dims))]
        last = nn.ConvTranspose2d(hidden_dims[0], in_channels, 4, stride=2, padding=1)
        self.decoder = nn.Sequential(*ups, last, nn.Sigmoid())

    def encode(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        """The latent mean (the code itself for the autoencoder) and log-variance (None for the autoencoder)."""
        features = self.encoder(images)
        return self.mean(features), self.logvar(features) if self.logvar is not None else None

    def decode(self, codes: Tensor) -> Tensor:
        return self.decoder(self.project(codes).view(-1, *self.code_shape))

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        mean, logvar = self.encode(images)
        codes = reparameterize(mean, logvar) if logvar is not None and self.training else mean
        return self.decode(codes), mean, logvar
