"""Split files read strictly, high-bit-depth images scaled to 8 bits, test splits of one class, digits rendered
by concurrent runs."""

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.conftest import REPO
from utils.data.image_dataset import ImageDataset
from utils.data.images import load_image, read_split
from utils.errors import InputError

LINES = "a.png,0\nb.png,1\nc.png,1\n"


def split_file(tmp_path, data: bytes):
    path = tmp_path / "train.txt"
    path.write_bytes(data)
    return path


CRLF = LINES.replace("\n", "\r\n")


@pytest.mark.parametrize(
    "data",
    [LINES.encode(), b"\xef\xbb\xbf" + LINES.encode(), CRLF.encode(), b"\xef\xbb\xbf" + CRLF.encode()],
    ids=["utf-8", "bom", "crlf", "bom-crlf"],
)
def test_bom_and_crlf_are_read(tmp_path, data):
    assert read_split(split_file(tmp_path, data)) == [("a.png", 0), ("b.png", 1), ("c.png", 1)]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (LINES.encode("utf-16"), "is UTF-16 or UTF-32 encoded: save it as UTF-8"),
        (LINES.encode("utf-16-le"), "holds NUL characters (UTF-16 without a byte-order mark?): save it as UTF-8"),
        ("é.png,0\nb.png,1\n".encode("latin-1"), "is not UTF-8 (byte 0 cannot be decoded): save it as UTF-8"),
    ],
    ids=["utf-16", "utf-16-without-bom", "latin-1"],
)
def test_other_encodings_are_refused(tmp_path, data, message):
    with pytest.raises(InputError) as error:
        read_split(split_file(tmp_path, data))
    assert str(error.value) == f"{tmp_path / 'train.txt'} {message}"


@pytest.mark.parametrize("label", ["-1", "²", "٣", "1.0", "0x1", ""])
def test_labels_are_non_negative_ascii_integers(tmp_path, label):
    with pytest.raises(
        InputError, match=f"line 2: expected 'relative/path,label' with a label 0, 1, 2, ..., got 'b.png,{label}'"
    ):
        read_split(split_file(tmp_path, f"a.png,0\nb.png,{label}\n".encode()))


def test_sparse_labels_name_the_largest_instead_of_allocating(tmp_path):
    with pytest.raises(InputError) as error:
        read_split(split_file(tmp_path, b"a.png,0\nb.png,100000000\n"))
    assert str(error.value) == (
        f"{tmp_path / 'train.txt'}: largest label 100,000,000 but only 2 images: labels must "
        f"number the classes densely from 0 (0, 1, 2, ...); renumber them"
    )


def test_a_test_split_of_one_class_is_refused(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    (tmp_path / "test.txt").write_text("a.png,0\na.png,0\n")
    assert len(ImageDataset(tmp_path, "test.txt")) == 2
    with pytest.raises(InputError, match=r"test.txt holds 1 class\(es\) but at least 2 are needed"):
        ImageDataset(tmp_path, "test.txt", min_classes=2)


def test_a_one_class_test_split_stops_the_experiment(experiment, dataset_copy):
    from tests.conftest import SHRINK, assert_input_error

    root = dataset_copy("cub")
    test = root / "test.txt"
    test.write_text("".join(line.rpartition(",")[0] + ",0\n" for line in test.read_text().splitlines()))
    outcome = experiment("with dataset.cub model.small_cnn", f"dataset.data_path={root}", *SHRINK)
    assert_input_error(outcome, "test.txt holds 1 class(es) but at least 2 are needed")


def test_16_bit_greyscale_is_scaled_to_8_bits(tmp_path):
    values = np.array([[0, 257, 32896, 65535], [1000, 20000, 40000, 60000]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")  # a 16-bit greyscale PNG
    with Image.open(tmp_path / "deep.png") as image:
        assert image.mode.startswith("I")
    pixels = np.asarray(load_image(tmp_path / "deep.png"))
    assert pixels.dtype == np.uint8 and pixels.shape == (2, 4, 3)
    expected = np.round(values / 257).astype(np.uint8)
    assert (pixels == expected[..., None]).all()
    assert pixels[0, :, 0].tolist() == [0, 1, 128, 255]


def test_32_bit_integer_and_float_images_are_scaled(tmp_path):
    Image.fromarray(np.array([[0, 65535, 70000]], dtype=np.int32)).save(tmp_path / "int.tif")
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)).save(tmp_path / "float.tif")
    assert np.asarray(load_image(tmp_path / "int.tif"))[0, :, 0].tolist() == [0, 255, 255]
    assert np.asarray(load_image(tmp_path / "float.tif"))[0, :, 0].tolist() == [0, 128, 255]


def test_concurrent_runs_render_the_digits_once_and_completely(tmp_path):
    root = tmp_path / "digits"
    code = f"from utils.data.digits import prepare_digits; prepare_digits({str(root)!r})"
    runs = [
        subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stderr=subprocess.PIPE, text=True) for _ in range(3)
    ]
    for process in runs:
        assert process.wait(timeout=120) == 0, process.stderr.read()
    assert len(read_split(root / "train.txt")) == 901 and len(read_split(root / "test.txt")) == 896
    assert len(list((root / "images").iterdir())) == 1797
