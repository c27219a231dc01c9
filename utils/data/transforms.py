"""Train and test image transforms; the model normalises its input itself."""

from torchvision import transforms as T


def build_transforms(
    crop_size: int,
    resize: int | tuple[int, int] | None,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    color_jitter: tuple[float, ...] | None,
    rotate: float | None,
    hflip: bool,
) -> tuple[T.Compose, T.Compose]:
    train, test = [], []
    if resize is not None:
        train.append(T.Resize(resize))
        test.append(T.Resize(resize))
    if rotate is not None:
        train.append(T.RandomRotation(rotate))
    if color_jitter is not None:
        train.append(T.ColorJitter(*color_jitter))
    train.append(T.RandomResizedCrop(crop_size, scale=tuple(scale), ratio=tuple(ratio)))
    if hflip:
        train.append(T.RandomHorizontalFlip())
    test.append(T.CenterCrop(crop_size))
    return T.Compose([*train, T.ToTensor()]), T.Compose([*test, T.ToTensor()])
