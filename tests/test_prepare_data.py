"""prepare_data.py and its helpers against tiny stand-ins of each data set, served over local HTTP."""

import hashlib
import io
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image
from sacred.initialize import create_run
from scipy.io import savemat

import prepare_data
from utils.data import manifest
from utils.data.download import download, extract
from utils.errors import InputError

REPO = Path(__file__).resolve().parents[1]
PROXY_VARIABLES = ("http_proxy", "https_proxy", "ftp_proxy", "all_proxy", "no_proxy")
QUIET = {"--loglevel": "CRITICAL", "--capture": "no"}


@pytest.fixture(autouse=True)
def no_proxies(monkeypatch):
    # urllib would send the requests for 127.0.0.1 to a proxy set in the environment.
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


@pytest.fixture
def server():
    """An HTTP server on 127.0.0.1 serving `files` (name -> bytes), counting requests per name.

    It answers Range requests (`bytes=N-`) with 206 unless ranges is False, records each range asked for,
    and sends only the first `cut[name]` bytes of a file once (then closes), as a dropped connection does.
    """
    files: dict[str, bytes] = {}
    hits: Counter = Counter()
    state = SimpleNamespace(ranges=True, asked=[], cut={})

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            name = self.path.lstrip("/")
            hits[name] += 1
            if name not in files:
                self.send_error(404)
                return
            data, start = files[name], 0
            asked = self.headers.get("Range")
            if asked and state.ranges:
                state.asked.append(asked)
                start = int(asked.removeprefix("bytes=").rstrip("-"))
                if start >= len(data):
                    self.send_error(416)
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            self.send_header("Content-Length", str(len(data) - start))
            self.end_headers()
            self.wfile.write(data[start : start + state.cut.pop(name, len(data))])

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield SimpleNamespace(
        files=files, hits=hits, state=state, url=lambda name: f"http://127.0.0.1:{httpd.server_port}/{name}"
    )
    httpd.shutdown()
    httpd.server_close()


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def tar_bytes(files: dict[str, bytes], links: dict[str, tuple[bytes, str]] | None = None) -> bytes:
    """A .tgz of regular files plus links: name -> (tarfile.SYMTYPE or LNKTYPE, target)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, (kind, target) in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, target
            tar.addfile(info)
    return buffer.getvalue()


def zip_bytes(files: dict[str, bytes], symlinks: dict[str, str] | None = None) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zip_file:
        for name, data in files.items():
            zip_file.writestr(name, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zip_file.writestr(info, target)
    return buffer.getvalue()


def image_bytes(colour: int = 90, size: int = 8, format: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (colour, 2 * colour % 256, 200)).save(buffer, format=format)
    return buffer.getvalue()


JPEG = image_bytes()


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def run(experiment, **config) -> str:
    """The run's report; the stand-ins are tiny, so the published split counts are not insisted on unless given."""
    return experiment.run(config_updates={"expected": None, "workers": 2} | config, options=QUIET).result


# ---------------------------------------------------------------- download


def test_download_skips_a_file_with_the_right_checksum(server, tmp_path):
    server.files["a.bin"] = b"payload" * 1000
    for checksum in ({"md5": md5(server.files["a.bin"])}, {"sha256": hashlib.sha256(b"payload" * 1000).hexdigest()}):
        path = download(server.url("a.bin"), tmp_path / "a.bin", **checksum)
        assert path.read_bytes() == server.files["a.bin"]
    assert server.hits["a.bin"] == 1
    assert not (tmp_path / "a.bin.part").exists()


def test_download_refuses_an_existing_file_with_a_wrong_checksum(server, tmp_path):
    server.files["a.bin"] = b"right"
    (tmp_path / "a.bin").write_bytes(b"wrong")
    with pytest.raises(InputError, match="delete it and run again"):
        download(server.url("a.bin"), tmp_path / "a.bin", md5=md5(b"right"))
    assert server.hits["a.bin"] == 0


def test_download_of_a_wrong_file_leaves_nothing_behind(server, tmp_path):
    server.files["a.bin"] = b"other"
    with pytest.raises(InputError, match="sent another file"):
        download(server.url("a.bin"), tmp_path / "a.bin", md5=md5(b"right"))
    assert list(tmp_path.iterdir()) == []


def test_failed_download_says_where_to_put_the_file(server, tmp_path):
    url = server.url("missing.tgz")
    with pytest.raises(InputError) as error:
        download(url, tmp_path / "x.tgz", note="or ask a colleague")
    assert str(error.value) == (
        f"x.tgz not found and download failed ({url}: HTTP 404 Not Found): download it from "
        f"{url} to {tmp_path / 'x.tgz'}; or ask a colleague"
    )
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- extraction


@pytest.mark.parametrize(
    ("archive", "member"),
    [
        (lambda: tar_bytes({"../evil": b"x"}), "../evil"),
        (lambda: tar_bytes({"ok/../../evil": b"x"}), "ok/../../evil"),
        (lambda: tar_bytes({"/tmp/prepare_data_evil": b"x"}), "/tmp/prepare_data_evil"),
        (lambda: tar_bytes({}, {"link": (tarfile.SYMTYPE, "../evil")}), "link"),
        (lambda: tar_bytes({}, {"dir/link": (tarfile.SYMTYPE, "../../evil")}), "dir/link"),
        (lambda: tar_bytes({}, {"link": (tarfile.SYMTYPE, "/etc")}), "link"),
        (lambda: tar_bytes({}, {"hard": (tarfile.LNKTYPE, "../evil")}), "hard"),
        (lambda: zip_bytes({"../evil": b"x"}), "../evil"),
        (lambda: zip_bytes({"/tmp/prepare_data_evil": b"x"}), "/tmp/prepare_data_evil"),
        (lambda: zip_bytes({}, {"link": "../evil"}), "link"),
    ],
    ids=[
        "tar-parent",
        "tar-nested-parent",
        "tar-absolute",
        "tar-symlink",
        "tar-nested-symlink",
        "tar-absolute-symlink",
        "tar-hardlink",
        "zip-parent",
        "zip-absolute",
        "zip-symlink",
    ],
)
def test_extraction_refuses_members_escaping_the_target(tmp_path, archive, member):
    path = tmp_path / "archive"
    path.write_bytes(archive())
    target = tmp_path / "target"
    with pytest.raises(InputError, match=f"refusing to extract member {member!r}"):
        extract(path, target)
    assert not (tmp_path / "evil").exists() and not Path("/tmp/prepare_data_evil").exists()
    assert not any(child.is_symlink() for child in target.rglob("*"))
    assert not (target / ".archive.extracted").exists()


@pytest.mark.parametrize("kind", ["tar", "zip"])
def test_extraction_runs_once(tmp_path, kind):
    files = {"top/a.txt": b"a", "top/sub/b.txt": b"b"}
    archive = tmp_path / "archive"
    archive.write_bytes(tar_bytes(files) if kind == "tar" else zip_bytes(files))
    target = tmp_path / "target"
    assert extract(archive, target)
    assert (target / "top/sub/b.txt").read_bytes() == b"b"
    assert sorted(path.name for path in target.iterdir()) == [".archive.extracted", "top"]
    (target / "top/a.txt").write_bytes(b"edited")
    assert not extract(archive, target)
    assert (target / "top/a.txt").read_bytes() == b"edited"


def test_damaged_archive_is_reported(tmp_path):
    archive = tmp_path / "x.tgz"
    archive.write_bytes(tar_bytes({"a.txt": os.urandom(100_000)})[:50_000])
    with pytest.raises(InputError, match="damaged"):
        extract(archive, tmp_path / "target")


# ---------------------------------------------------------------- stand-ins of the data sets

CUB_IMAGES = [
    ("001.Albatross/a1.jpg", 1),
    ("001.Albatross/a2.jpg", 1),
    ("100.Pelican/p1.jpg", 100),
    ("101.Sparrow/s1.jpg", 101),
    ("200.Wren/w1.jpg", 200),
    ("200.Wren/w2.jpg", 200),
]


def cub_files(prefix: str) -> dict[str, bytes]:
    files = {
        f"{prefix}images.txt": "".join(f"{i} {path}\n" for i, (path, _) in enumerate(CUB_IMAGES, 1)).encode(),
        f"{prefix}image_class_labels.txt": "".join(f"{i} {c}\n" for i, (_, c) in enumerate(CUB_IMAGES, 1)).encode(),
        f"{prefix}classes.txt": b"1 001.Albatross\n100 100.Pelican\n101 101.Sparrow\n200 200.Wren\n",
    }
    return files | {f"{prefix}images/{path}": JPEG for path, _ in CUB_IMAGES}


CUB_TRAIN = [
    "CUB_200_2011/images/001.Albatross/a1.jpg,0",
    "CUB_200_2011/images/001.Albatross/a2.jpg,0",
    "CUB_200_2011/images/100.Pelican/p1.jpg,1",
]
CUB_TEST = [
    "CUB_200_2011/images/101.Sparrow/s1.jpg,0",
    "CUB_200_2011/images/200.Wren/w1.jpg,1",
    "CUB_200_2011/images/200.Wren/w2.jpg,1",
]


@pytest.fixture
def cub_archive(server):
    # The real archive holds CUB_200_2011/ and a top-level attributes.txt.
    server.files["CUB_200_2011.tgz"] = tar_bytes(cub_files("CUB_200_2011/") | {"attributes.txt": b"1 has_bill"})
    return {"urls": server.url("CUB_200_2011.tgz"), "md5": md5(server.files["CUB_200_2011.tgz"])}


def test_cub_is_downloaded_once_and_split_by_class(server, tmp_path, cub_archive):
    result = run(prepare_data.cub, data_path=str(tmp_path), expected={"train": [3, 2], "test": [3, 2]}, **cub_archive)
    assert lines(tmp_path / "train.txt") == CUB_TRAIN
    assert lines(tmp_path / "test.txt") == CUB_TEST
    assert result == (
        f"ready in {tmp_path}: train.txt 3 images / 2 classes, test.txt 3 images / 2 classes; every image decodes"
    )
    assert manifest.read(tmp_path)["complete"] is True
    run(prepare_data.cub, data_path=str(tmp_path), **cub_archive)
    assert server.hits["CUB_200_2011.tgz"] == 1
    # Deleted extracted files come back from the archive, still without a download.
    shutil.rmtree(tmp_path / "CUB_200_2011")
    run(prepare_data.cub, data_path=str(tmp_path), **cub_archive)
    assert server.hits["CUB_200_2011.tgz"] == 1
    assert lines(tmp_path / "test.txt") == CUB_TEST and (tmp_path / "CUB_200_2011/images/200.Wren/w2.jpg").is_file()


def test_cub_extracted_by_hand_needs_no_archive(tmp_path):
    for name, data in cub_files("").items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    run(prepare_data.cub, data_path=str(tmp_path), urls="http://127.0.0.1:9/unused", download=False)
    assert lines(tmp_path / "train.txt")[0] == "images/001.Albatross/a1.jpg,0"


def test_missing_images_are_reported(server, tmp_path):
    files = cub_files("CUB_200_2011/")
    del files["CUB_200_2011/images/200.Wren/w2.jpg"]
    server.files["CUB_200_2011.tgz"] = tar_bytes(files)
    with pytest.raises(InputError, match="1 of the 6 images listed .*first: CUB_200_2011/images/200.Wren/w2"):
        run(prepare_data.cub, data_path=str(tmp_path), urls=server.url("CUB_200_2011.tgz"), md5=None)
    assert not (tmp_path / "train.txt").exists()


def test_download_off_names_the_url_and_path(tmp_path):
    url = "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz"
    with pytest.raises(
        InputError,
        match=re.escape(
            f"CUB_200_2011.tgz not found and download=False: download {url} to {tmp_path}/CUB_200_2011.tgz"
        ),
    ):
        run(prepare_data.cub, data_path=str(tmp_path), download=False)


def cars_annotations(classes: list[int]) -> bytes:
    """cars_annos.mat: a 1 x N struct array `annotations` with the official fields, plus `class_names`."""
    fields = ["relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test"]
    annotations = np.zeros((1, len(classes)), dtype=[(field, "O") for field in fields])
    for i, label in enumerate(classes):
        annotations[0, i] = (f"car_ims/{i + 1:06d}.jpg", 1, 2, 30, 40, np.uint8(label), np.uint8(i % 2))
    buffer = io.BytesIO()
    savemat(buffer, {"annotations": annotations, "class_names": np.array(["AM General Hummer"], dtype=object)})
    return buffer.getvalue()


@pytest.fixture
def cars_files(server):
    classes = [1, 98, 99, 196, 1]
    server.files["car_ims.tgz"] = tar_bytes({f"car_ims/{i:06d}.jpg": JPEG for i in range(1, len(classes) + 1)})
    server.files["cars_annos.mat"] = cars_annotations(classes)
    return {
        "images_urls": server.url("car_ims.tgz"),
        "images_md5": md5(server.files["car_ims.tgz"]),
        "annotations_urls": server.url("cars_annos.mat"),
        "annotations_md5": md5(server.files["cars_annos.mat"]),
    }


def test_cars_split_by_class(server, tmp_path, cars_files):
    run(prepare_data.cars, data_path=str(tmp_path), **cars_files)
    assert lines(tmp_path / "train.txt") == ["car_ims/000001.jpg,0", "car_ims/000002.jpg,1", "car_ims/000005.jpg,0"]
    assert lines(tmp_path / "test.txt") == ["car_ims/000003.jpg,0", "car_ims/000004.jpg,1"]
    run(prepare_data.cars, data_path=str(tmp_path), **cars_files)
    assert server.hits == Counter({"car_ims.tgz": 1, "cars_annos.mat": 1})


def test_cars_failure_suggests_a_mirror(server, tmp_path, cars_files):
    del server.files["car_ims.tgz"]
    with pytest.raises(InputError, match="download failed .*place both in"):
        run(prepare_data.cars, data_path=str(tmp_path), **cars_files)


@pytest.fixture
def sop_archive(server):
    header = "image_id class_id super_class_id path\n"
    train = header + "1 1 1 bicycle_final/111_0.JPG\n2 1 1 bicycle_final/111_1.JPG\n3 5 2 chair_final/222_0.JPG\n"
    test = header + "4 11319 3 table_final/333_0.JPG\n5 11320 3 table_final/444_0.JPG\n"
    images = [
        "bicycle_final/111_0.JPG",
        "bicycle_final/111_1.JPG",
        "chair_final/222_0.JPG",
        "table_final/333_0.JPG",
        "table_final/444_0.JPG",
    ]
    files = {
        "Stanford_Online_Products/Ebay_train.txt": train.encode(),
        "Stanford_Online_Products/Ebay_test.txt": test.encode(),
    }
    server.files["sop.zip"] = zip_bytes(files | {f"Stanford_Online_Products/{path}": JPEG for path in images})
    return {"urls": server.url("sop.zip"), "md5": md5(server.files["sop.zip"])}


def test_sop_follows_the_official_lists(tmp_path, sop_archive):
    run(prepare_data.sop, data_path=str(tmp_path), **sop_archive)
    prefix = "Stanford_Online_Products/"
    assert lines(tmp_path / "train.txt") == [
        f"{prefix}bicycle_final/111_0.JPG,0",
        f"{prefix}bicycle_final/111_1.JPG,0",
        f"{prefix}chair_final/222_0.JPG,1",
    ]
    assert lines(tmp_path / "test.txt") == [f"{prefix}table_final/333_0.JPG,0", f"{prefix}table_final/444_0.JPG,1"]
    assert (tmp_path / "Stanford_Online_Products.zip").is_file()


INSHOP_LIST = """8
image_name item_id evaluation_status
img/WOMEN/Dresses/id_00000002/02_1_front.jpg           id_00000002 train
img/WOMEN/Dresses/id_00000002/02_2_side.jpg            id_00000002 train
img/MEN/Denim/id_00000005/01_1_front.jpg               id_00000005 train
img/MEN/Denim/id_00000007/01_1_front.jpg               id_00000007 query
img/MEN/Denim/id_00000007/01_2_side.jpg                id_00000007 gallery
img/WOMEN/Skirts/id_00000010/01_1_front.jpg            id_00000010 gallery
img/WOMEN/Skirts/id_00000010/01_2_side.jpg             id_00000010 query
img/MEN/Denim/id_00000009/01_1_front.jpg               id_00000009 query
"""
INSHOP_IMAGES = [line.split()[0] for line in INSHOP_LIST.splitlines()[2:]]


def test_inshop_from_placed_files_shares_query_and_gallery_labels(tmp_path):
    (tmp_path / "list_eval_partition.txt").write_text(INSHOP_LIST)
    for path in INSHOP_IMAGES:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_bytes(JPEG)
    run(prepare_data.inshop, data_path=str(tmp_path))
    assert [line[-2:] for line in lines(tmp_path / "train.txt")] == [",0", ",0", ",1"]
    assert lines(tmp_path / "test_query.txt") == [
        "img/MEN/Denim/id_00000007/01_1_front.jpg,0",
        "img/WOMEN/Skirts/id_00000010/01_2_side.jpg,2",
        "img/MEN/Denim/id_00000009/01_1_front.jpg,1",
    ]
    assert lines(tmp_path / "test_gallery.txt") == [
        "img/MEN/Denim/id_00000007/01_2_side.jpg,0",
        "img/WOMEN/Skirts/id_00000010/01_1_front.jpg,2",
    ]


def test_inshop_in_the_deepfashion_layout_is_unzipped(tmp_path):
    (tmp_path / "Eval").mkdir()
    (tmp_path / "Eval/list_eval_partition.txt").write_text(INSHOP_LIST)
    (tmp_path / "Img").mkdir()
    (tmp_path / "Img/img.zip").write_bytes(zip_bytes({path: JPEG for path in INSHOP_IMAGES}))
    run(prepare_data.inshop, data_path=str(tmp_path))
    assert len(lines(tmp_path / "test_gallery.txt")) == 2 and (tmp_path / INSHOP_IMAGES[0]).is_file()


def test_missing_inshop_says_what_to_place(tmp_path):
    with pytest.raises(InputError, match="list_eval_partition.txt not found .*In-shop Clothes Retrieval Benchmark"):
        run(prepare_data.inshop, data_path=str(tmp_path))
    (tmp_path / "list_eval_partition.txt").write_text(INSHOP_LIST)
    with pytest.raises(InputError, match=r"img/ \(or img.zip\) not found"):
        run(prepare_data.inshop, data_path=str(tmp_path))


# ---------------------------------------------------------------- the command line


def test_prepare_all_reports_every_data_set(server, tmp_path, capsys, cub_archive, cars_files, sop_archive):
    updates = {
        "cub": {"data_path": str(tmp_path / "cub"), "urls": server.url("gone.tgz")},
        "cars": {"data_path": str(tmp_path / "cars"), **cars_files},
        "sop": {"data_path": str(tmp_path / "sop"), **sop_archive},
        "inshop": {"data_path": str(tmp_path / "inshop")},
        "digits": {"data_path": str(tmp_path / "digits")},
    }
    updates = {name: {"expected": None} | update for name, update in updates.items()}
    del updates["digits"]["expected"]  # the published counts of the digits are the real ones
    assert prepare_data.prepare_all(updates) == 1  # cub and inshop are not ready
    report = capsys.readouterr().out.splitlines()
    assert report[0].startswith("cub: CUB_200_2011.tgz not found and download failed (")
    assert report[1].startswith(f"cars: ready in {tmp_path / 'cars'}: train.txt 3 images / 2 classes")
    assert [line.split(":")[0] for line in report] == ["cub", "cars", "sop", "inshop", "digits"]
    assert report[-1] == (
        f"digits: ready in {tmp_path / 'digits'}: train.txt 901 images / 5 classes, "
        f"test.txt 896 images / 5 classes; every image decodes"
    )
    assert sorted(path.name for path in tmp_path.iterdir()) == ["cars", "digits", "sop"]  # no empty folders


def command(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "prepare_data.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=os.environ | env,
        timeout=60,
    )


def test_without_arguments_every_data_set_is_prepared_or_explained(tmp_path):
    # Every proxy points at a closed port, so no download can leave the machine and each fails at once.
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        proxy = f"http://127.0.0.1:{closed.getsockname()[1]}"
        done = command(cwd=tmp_path, http_proxy=proxy, https_proxy=proxy, ftp_proxy=proxy, no_proxy="")
    assert done.returncode == 1, done.stderr
    report = done.stdout.splitlines()
    assert [line.split(":")[0] for line in report] == ["cub", "cars", "sop", "inshop", "digits"]
    assert "download failed" in report[0] and "to data/CUB_200_2011/CUB_200_2011.tgz" in report[0]
    assert "place both in data/CARS_196" in report[1]
    assert "In-shop Clothes Retrieval Benchmark" in report[3]
    assert report[4].startswith("digits: ready in data/digits")
    assert len(lines(tmp_path / "data/digits/train.txt")) == 901
    assert [path.name for path in (tmp_path / "data").iterdir()] == ["digits"]  # no empty folders


def test_one_data_set_runs_its_sacred_command_line(tmp_path):
    done = command("cub", "print_config", "with", "data_path=/x", cwd=tmp_path)
    assert done.returncode == 0 and "data_path = '/x'" in done.stdout
    done = command("cub", "with", "download=False", cwd=tmp_path)
    assert done.returncode == 1 and "CUB_200_2011.tgz not found and download=False" in done.stderr
    done = command("mnist", cwd=tmp_path)
    assert done.returncode == 2 and "choose one of cub, cars, sop, inshop, digits" in done.stderr


@pytest.mark.parametrize("name", ["cub", "cars", "sop", "inshop", "digits"])
def test_prepare_data_writes_where_training_reads(name):
    # Both read the data set's one specification: a folder or a split changed there moves both.
    from experiment import ex  # torch: only for this test

    prepared = create_run(prepare_data.EXPERIMENTS[name], "print_config", log_level="ERROR").config
    dataset = create_run(ex, "main", None, [f"dataset.{name}"], log_level="ERROR").config["dataset"]
    assert prepared["data_path"] == dataset["data_path"]
    split_files = {dataset["train_file"], dataset["test_file"], dataset["gallery_file"] or dataset["test_file"]}
    assert {f"{split}.txt" for split in prepared["expected"]} == split_files


@pytest.fixture
def gated_archive():
    """The CUB stand-in's archive over HTTP, each response held back until `gate` is set."""
    archive, gate = tar_bytes(cub_files("CUB_200_2011/")), threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            gate.wait(timeout=120)
            self.send_response(200)
            self.send_header("Content-Length", str(len(archive)))
            self.end_headers()
            self.wfile.write(archive)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield SimpleNamespace(url=f"http://127.0.0.1:{httpd.server_port}/CUB_200_2011.tgz", gate=gate)
    gate.set()
    httpd.shutdown()
    httpd.server_close()


def test_a_second_run_on_a_folder_being_prepared_is_refused_and_writes_nothing(tmp_path, gated_archive):
    data_path = tmp_path / "cub"
    words = ["cub", "with", f"data_path={data_path}", f"urls={gated_archive.url}", "md5=None", "expected=None"]
    first = subprocess.Popen(
        [sys.executable, str(REPO / "prepare_data.py"), *words], cwd=tmp_path, stdout=subprocess.PIPE, text=True
    )
    try:
        # The first run holds the lock while its download waits at the gate.
        lock = manifest.lock_path(data_path)
        deadline = time.monotonic() + 60
        while not (lock.exists() and lock.read_text().strip() == str(first.pid)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert lock.exists(), "the first run never took the lock"
        written = (data_path / manifest.MANIFEST).read_text()
        assert '"complete": false' in written

        second = command(*words, cwd=tmp_path)
        refusal = f"{data_path} is being prepared by another run of prepare_data.py (process {first.pid})"
        assert second.returncode == 1 and "Traceback" not in second.stderr
        assert refusal in second.stderr.strip().splitlines()[-1]
        assert (data_path / manifest.MANIFEST).read_text() == written

        gated_archive.gate.set()
        assert first.wait(timeout=60) == 0
    finally:
        first.kill()
        first.communicate()
    manifest.check_prepared(data_path)  # complete: the refused run left no mark behind
    assert manifest.read(data_path)["complete"] is True and not lock.exists()
    assert command(*words, cwd=tmp_path).returncode == 0  # and the lock is free again
