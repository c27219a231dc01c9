"""Mixed precision and channels-last: bf16 on the CPU trains with the losses in float32 and a gradient close to
float32's; fp16 where there is a GPU; bad settings name their key."""

import pytest
import torch
import torch.nn.functional as F

from losses.criterion import Criterion
from losses.metrix import Metrix
from losses.multi_similarity import MultiSimilarityLoss
from models.backbones import small_cnn
from models.metric_model import EmbeddingHead, MetricModel
from tests.conftest import assert_input_error, digits_updates
from utils.engine.speed import Precision, batch_mover, prepare_model
from utils.errors import InputError

CPU = torch.device("cpu")


class RecordingLoss(MultiSimilarityLoss):
    """Multi-similarity that remembers the dtypes it was given."""

    def weighted(self, anchors, anchor_labels, candidates):
        self.seen = getattr(self, "seen", []) + [(anchors.dtype, candidates.embeddings.dtype)]
        return super().weighted(anchors, anchor_labels, candidates)


def setup(device: torch.device = CPU) -> tuple[MetricModel, Criterion, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = MetricModel(small_cnn(None), EmbeddingHead(256, 16, remap=True), set_bn_eval=True).train().to(device)
    criterion = Criterion({"ms": (1.0, RecordingLoss())}, Metrix("feature"))
    images = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(1)).to(device)
    return model, criterion, images, (torch.arange(8) % 4).to(device)


def gradient(
    amp: str | None, channels_last: bool = False, device: torch.device = CPU
) -> tuple[torch.Tensor, torch.Tensor, Criterion]:
    model, criterion, images, labels = setup(device)
    prepare_model(model, channels_last, compile=False)
    images = batch_mover(device, channels_last)(images)
    precision = Precision(amp, device)
    torch.manual_seed(2)
    with precision.autocast():
        loss, _ = criterion(model, images, labels)
    precision.backward(loss)
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    return loss, grads / precision.scaler.get_scale() if amp == "fp16" else grads, criterion


def test_bf16_runs_the_model_in_bf16_and_the_losses_in_float32():
    model, criterion, images, labels = setup()
    feature_maps = []
    model.backbone.register_forward_hook(lambda module, args, output: feature_maps.append(output.dtype))
    with Precision("bf16", CPU).autocast():
        loss, _ = criterion(model, images, labels)
    assert feature_maps == [torch.bfloat16]
    assert loss.dtype == torch.float32
    assert criterion.losses["ms"].seen == [(torch.float32, torch.float32)] * 2  # clean and mixed


@pytest.mark.parametrize("amp, channels_last, tolerance", [("bf16", False, 0.02), (None, True, 1e-5)])
def test_gradient_close_to_float32(amp, channels_last, tolerance):
    loss, grads, _ = gradient(amp, channels_last)
    reference_loss, reference, _ = gradient(None)
    assert loss.item() == pytest.approx(reference_loss.item(), rel=tolerance)
    assert 1 - F.cosine_similarity(grads, reference, dim=0) < tolerance


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 with a gradient scaler needs a GPU")
def test_fp16_gradient_close_to_float32_on_the_gpu():
    loss, grads, _ = gradient("fp16", device=torch.device("cuda"))
    reference_loss, reference, _ = gradient(None, device=torch.device("cuda"))
    assert loss.item() == pytest.approx(reference_loss.item(), rel=0.02)
    assert 1 - F.cosine_similarity(grads, reference, dim=0) < 0.02


def test_bad_amp_names_the_key():
    with pytest.raises(InputError, match=r"unknown amp 'fp32': choose one of None, bf16, fp16"):
        Precision("fp32", CPU)
    with pytest.raises(InputError, match=r"amp='fp16' needs a GPU"):
        Precision("fp16", CPU)


@pytest.mark.slow
def test_experiment_trains_with_bf16_and_channels_last(digits_path, experiment):
    outcome = experiment("with epochs=1 amp=bf16 channels_last=True cpu=True", *digits_updates(digits_path))
    assert outcome.code == 0, outcome.err
    assert outcome.run.result > 0


def test_experiment_refuses_a_bad_amp(digits_path, experiment):
    assert_input_error(experiment("with epochs=1 amp=half cpu=True", *digits_updates(digits_path)), "amp", "'half'")
