"""The autoencoder objective: reconstruction error plus, for the VAE, a weighted KL term.

Reconstruction is the squared error summed over pixels and channels and averaged over the batch:
the negative log-likelihood of a Gaussian decoder up to constants, comparable across epochs and
runs of one image size, and zero only for a perfect reconstruction (unlike binary cross-entropy on
non-binary pixels). With kl_weight = 1 the sum is the negative ELBO of a Gaussian decoder with
variance 1/2 per pixel; other weights trade reconstruction against a smoother latent space.
"""

from torch import Tensor, nn


def reconstruction_loss(reconstructions: Tensor, images: Tensor) -> Tensor:
    return (reconstructions - images).square().flatten(1).sum(1).mean()


def kl_divergence(mean: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mean, diag(exp(logvar))) || N(0, I)) in closed form, summed over dimensions, averaged over the batch."""
    return 0.5 * (mean.square() + logvar.exp() - 1 - logvar).sum(1).mean()


class AutoencoderLoss(nn.Module):
    """loss = reconstruction + kl_weight * KL, with the training loop's criterion interface."""

    def __init__(self, kl_weight: float = 0.0) -> None:
        super().__init__()
        self.kl_weight = kl_weight

    def parameter_groups(self) -> list[dict]:
        """None: the objective has no parameters of its own."""
        return []

    def terms(self, images: Tensor, reconstructions: Tensor, mean: Tensor, logvar: Tensor | None) -> dict[str, Tensor]:
        """The reconstruction error, and the KL term when the model is variational (logvar is not None)."""
        terms = {"reconstruction": reconstruction_loss(reconstructions, images)}
        if logvar is not None:
            terms["kl"] = kl_divergence(mean, logvar)
        return terms

    def forward(self, model: nn.Module, images: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        logs = self.terms(images, *model(images))
        loss = logs["reconstruction"] + self.kl_weight * logs.get("kl", 0.0)
        logs["loss"] = loss
        return loss, {key: value.detach() for key, value in logs.items()}
