"""The autoencoder baselines: KL and reparameterisation maths, shapes, bad input (also through the command
line), a short real run on digits with its -F artifacts, and each seed command on a stand-in data set."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.distributions import Normal, kl_divergence

from autoencoder_experiment import autoencoder_objective, ex
from losses.autoencoder import AutoencoderLoss
from losses.autoencoder import kl_divergence as closed_form_kl
from models.vae import Autoencoder, reparameterize
from models.vae_ingredient import get_vae
from utils.engine.driver import BestEpoch
from utils.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
TINY = ["vae.hidden_dims=[8,16]", "vae.latent_dim=8"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny models gain nothing from intra-op threads, and on a shared 2-core machine a second thread
    # waiting for a busy core can slow these runs tenfold.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_kl_matches_torch_distributions():
    generator = torch.Generator().manual_seed(0)
    mean = torch.randn(16, 10, generator=generator, dtype=torch.float64)
    logvar = torch.randn(16, 10, generator=generator, dtype=torch.float64)
    posterior, prior = Normal(mean, (0.5 * logvar).exp()), Normal(torch.zeros_like(mean), torch.ones_like(mean))
    torch.testing.assert_close(closed_form_kl(mean, logvar), kl_divergence(posterior, prior).sum(1).mean())
    assert closed_form_kl(torch.zeros(4, 3), torch.zeros(4, 3)).item() == 0.0


def test_reparameterize_samples_the_posterior():
    torch.manual_seed(0)
    mean = torch.tensor([1.5, -2.0, 0.0]).expand(200_000, 3)
    logvar = torch.tensor([0.0, math.log(4.0), math.log(0.25)]).expand(200_000, 3)
    samples = reparameterize(mean, logvar)
    torch.testing.assert_close(samples.mean(0), mean[0], atol=0.01, rtol=0)
    torch.testing.assert_close(samples.std(0), (0.5 * logvar[0]).exp(), atol=0, rtol=0.01)


def test_reparameterize_passes_gradients_to_mean_and_logvar():
    mean = torch.randn(5, 4, requires_grad=True)
    logvar = torch.randn(5, 4, requires_grad=True)
    samples = reparameterize(mean, logvar)
    samples.sum().backward()
    torch.testing.assert_close(mean.grad, torch.ones_like(mean))
    # z = mean + exp(logvar / 2) * eps, so dz/dlogvar = (z - mean) / 2.
    torch.testing.assert_close(logvar.grad, (samples - mean).detach() / 2)


def test_autoencoder_never_samples_and_vae_samples_only_in_training():
    images = torch.rand(4, 3, 32, 32)
    ae = Autoencoder(32, variational=False, latent_dim=8, hidden_dims=(8, 16))
    rng = torch.get_rng_state()
    first, mean, logvar = ae(images)
    assert logvar is None and torch.equal(torch.get_rng_state(), rng)
    torch.testing.assert_close(ae(images)[0], first)

    vae = Autoencoder(32, variational=True, latent_dim=8, hidden_dims=(8, 16))
    assert not torch.equal(vae(images)[0], vae(images)[0])
    vae.eval()
    torch.testing.assert_close(vae(images)[0], vae.decode(vae.encode(images)[0]))


@pytest.mark.parametrize("size, hidden_dims", [(32, (8, 16, 32)), (64, (8, 16, 32, 64))])
@pytest.mark.parametrize("variational", [False, True])
def test_shapes(size, hidden_dims, variational):
    model = Autoencoder(size, variational, latent_dim=12, hidden_dims=hidden_dims)
    reconstructions, mean, logvar = model(torch.rand(3, 3, size, size))
    assert reconstructions.shape == (3, 3, size, size)
    assert 0 <= reconstructions.min() and reconstructions.max() <= 1  # sigmoid output, like the input pixels
    assert mean.shape == (3, 12)
    assert (logvar.shape == (3, 12)) if variational else logvar is None
    loss, logs = AutoencoderLoss(kl_weight=0.5 if variational else 0.0)(model, torch.rand(3, 3, size, size), None)
    assert set(logs) == ({"reconstruction", "kl", "loss"} if variational else {"reconstruction", "loss"})
    assert loss.requires_grad and not any(value.requires_grad for value in logs.values())


def test_unknown_arch():
    with pytest.raises(InputError, match=r"unknown vae.arch 'vq': choose one of ae, vae"):
        get_vae(image_size=32, arch="vq", in_channels=3, latent_dim=8, hidden_dims=[8])


def test_kl_weight_needs_the_variational_model():
    with pytest.raises(InputError, match=r"vae.kl_weight=0.5 needs a variational model: add vae.vae"):
        autoencoder_objective(arch="ae", kl_weight=0.5)


@pytest.mark.parametrize("lower_is_better, expected", [(False, 3), (True, 1)])  # 0.7 twice: the later epoch
def test_best_epoch_keeps_the_best_weights(lower_is_better, expected):
    best, model = BestEpoch("x", lower_is_better), torch.nn.Linear(1, 1)
    for epoch, value in enumerate([0.5, 0.2, 0.7, 0.7]):
        with torch.no_grad():
            model.bias.fill_(epoch)
        best.update(epoch, {"x": value}, model)
    assert best.epoch == expected and best.state["bias"].item() == expected
    assert best.metrics["x"] == (0.2 if lower_is_better else 0.7)


# Not a multiple of 2 ** blocks, a multiple of a smaller power of two, too small.
@pytest.mark.parametrize(
    "size, hidden_dims, multiple", [(30, (8, 16), 4), (40, (8, 16, 32, 64), 16), (8, (8,) * 4, 16)]
)
def test_image_size_that_does_not_fit(size, hidden_dims, multiple):
    with pytest.raises(InputError, match=rf"dataset.crop_size={size} .* multiples of {multiple} \({multiple}, "):
        Autoencoder(size, False, hidden_dims=hidden_dims)


def test_bad_input_on_the_command_line_is_one_line_and_status_1():
    result = subprocess.run(
        [sys.executable, "autoencoder_experiment.py", "with", "vae.arch=vq"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert (
        result.stderr.strip().splitlines()[-1]
        == "utils.errors.InputError: vae.arch='vq' is invalid: expected one of ae, vae"
    )
    assert "Traceback" not in result.stderr


def test_bad_image_size_on_the_command_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        ex.run_commandline(
            ["autoencoder_experiment.py", "with", "vae.ae", "dataset.crop_size=40", "vae.hidden_dims=[8,16,32,64]"]
        )
    assert exit_info.value.code == 1
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith("utils.errors.InputError: dataset.crop_size=40 does not fit vae.hidden_dims")


@pytest.mark.parametrize("arch", ["ae", "vae"])
def test_short_digits_run_writes_artifacts(digits_path, tmp_path, arch):
    run = ex.run_commandline(
        [
            "autoencoder_experiment.py",
            "-F",
            str(tmp_path),
            "with",
            f"vae.{arch}",
            "epochs=1",
            "dataset.batch_size=32",
            f"dataset.data_path={digits_path}",
            f"output_dir={tmp_path}",
            *TINY,
        ]
    )
    files = {path.name for path in (tmp_path / "1").iterdir()}
    assert {
        "config.json",
        "run.json",
        "metrics.json",
        "cout.txt",
        "checkpoint.pt",
        "reconstructions.png",
        "curves.png",
        "retrieval.png",
    } <= files

    metrics = json.loads((tmp_path / "1" / "metrics.json").read_text())
    assert metrics["eval.cosine/R@1"]["steps"] == [0, 1]
    assert ("eval.test/kl" in metrics) == (arch == "vae")
    info = json.loads((tmp_path / "1" / "info.json").read_text())
    assert run.result == info["metrics"]["cosine/R@1"] and info["best_epoch"] in (0, 1)
    # The final evaluation of the best weights: every metric, and the same test losses as that epoch's.
    assert {"cosine/MAP@R", "l2/R-Precision", "NMI", "utilization", "test/reconstruction"} <= set(info["metrics"])
    epoch_reconstruction = metrics["eval.test/reconstruction"]["values"][info["best_epoch"]]
    assert info["metrics"]["test/reconstruction"] == pytest.approx(epoch_reconstruction, rel=1e-6)

    model = Autoencoder(32, arch == "vae", latent_dim=8, hidden_dims=(8, 16))
    model.load_state_dict(torch.load(tmp_path / "1" / "checkpoint.pt", weights_only=True)["best"]["model"])
    # 16 test images in 2 blocks of 8: inputs, the best epoch's and the first epoch's reconstructions, tiles of
    # 128 px at least; then the curves and the retrieval grid of the latent codes.
    pictures = {
        name: Image.open(tmp_path / "1" / name) for name in ("reconstructions.png", "curves.png", "retrieval.png")
    }
    assert all(picture.format == "PNG" for picture in pictures.values())
    width, height = pictures["reconstructions.png"].size
    assert width >= 8 * 128 and height >= 6 * 128


@pytest.mark.parametrize("name", ["cub", "cars", "sop", "inshop"])
def test_seed_command_on_a_standin(tmp_path, name, datasets):
    data = datasets[name]
    run = ex.run_commandline(
        [
            "autoencoder_experiment.py",
            "with",
            f"dataset.{name}_vae",
            "vae.ae",
            f"dataset.data_path={data}",
            "epochs=1",
            "dataset.batch_size=4",
            "dataset.test_batch_size=8",
            "dataset.num_workers=0",
            "evaluation.recalls=[1,2]",
            f"output_dir={tmp_path}",
        ]
    )
    assert run.config["dataset"]["crop_size"] == 64 and run.info["vae"]["hidden_dims"] == [32, 64, 128, 256]
    assert 0 <= run.result <= 1 and run.info["best_epoch"] in (0, 1)
