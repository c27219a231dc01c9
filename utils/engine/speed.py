"""Speed options of the training step: mixed precision, channels-last memory, torch.compile.

All are off by default because they change the numbers (amp, and compile's fused kernels) or help only on
some hardware (channels_last on tensor cores). The losses run in float32 whatever the autocast (Criterion).
Measured effect: docs/speed.md.
"""

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from utils.errors import InputError, check_choice

AMP_DTYPES = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    """Autocast and, for fp16, a gradient scaler; with amp=None both are pass-throughs."""

    def __init__(self, amp: str | None, device: torch.device) -> None:
        check_choice("amp", amp, AMP_DTYPES)
        if amp == "fp16" and device.type != "cuda":
            raise InputError(
                "amp='fp16' needs a GPU (its gradient scaler and fast half kernels are CUDA's): use "
                "amp='bf16' on the CPU, or amp=None"
            )
        self.device_type, self.dtype = device.type, AMP_DTYPES[amp]
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")

    def autocast(self) -> AbstractContextManager:
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.dtype is not None)

    def backward(self, loss: Tensor) -> None:
        self.scaler.scale(loss).backward()

    def unscale_(self, optimizer: Optimizer) -> None:
        """Before clipping: the clip value is in the gradient's own units."""
        self.scaler.unscale_(optimizer)

    def step(self, optimizer: Optimizer) -> None:
        """optimizer.step(), skipped by the scaler when an fp16 gradient overflowed (the scale then shrinks)."""
        self.scaler.step(optimizer)
        self.scaler.update()


def prepare_model(model: nn.Module, channels_last: bool, compile: bool) -> nn.Module:
    """The model in channels-last memory and/or compiled in place (its state_dict keys unchanged, so checkpoints
    load either way). Each child (backbone and head; encoder and decoder) is compiled on its own because the
    objectives call them one by one (Metrix runs the head alone), never model.forward."""
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if compile:
        for part in model.children():
            part.compile()
    return model


def batch_mover(
    device: torch.device, channels_last: bool, device_augment: Callable[[Any, torch.device], Tensor] | None = None
) -> Callable[[Any], Tensor]:
    """images of a loader batch -> the model's input on the device: copied (asynchronously from pinned memory),
    augmented there when the workers left photometric augmentation to the device, in the model's memory format."""

    def move(images: Any) -> Tensor:
        if device_augment is not None:
            images = device_augment(images, device)  # moves the uint8 batch itself, before turning it into floats
        else:
            images = images.to(device, non_blocking=True)
        return images.contiguous(memory_format=torch.channels_last) if channels_last else images

    return move
