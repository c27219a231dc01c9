"""Hostile and damaged archives, interrupted and mirrored downloads, recovery after a failed preparation."""

import io
import os
import subprocess
import sys
import tarfile
import threading
import tracemalloc
import zipfile
from pathlib import Path

import pytest

import prepare_data
from tests.conftest import REPO
from tests.test_prepare_data import CUB_TEST, JPEG, cub_files, lines, md5, no_proxies, run, server, tar_bytes, zip_bytes
from utils.data import manifest
from utils.data.download import download, extract
from utils.errors import InputError

__all__ = ["no_proxies", "server"]  # fixtures shared with test_prepare_data

# ---------------------------------------------------------------- downloads


def test_an_interrupted_download_resumes_where_it_stopped(server, tmp_path):
    data = os.urandom(300_000)
    server.files["big.zip"] = data
    server.state.cut["big.zip"] = 100_000
    with pytest.raises(InputError, match="connection closed after 100,000 of 300,000 bytes; run again to resume"):
        download(server.url("big.zip"), tmp_path / "big.zip", md5=md5(data))
    assert (tmp_path / "big.zip.part").stat().st_size == 100_000 and not (tmp_path / "big.zip").exists()
    download(server.url("big.zip"), tmp_path / "big.zip", md5=md5(data))
    assert server.state.asked == ["bytes=100000-"]
    assert (tmp_path / "big.zip").read_bytes() == data and not (tmp_path / "big.zip.part").exists()


def test_a_server_without_ranges_sends_the_whole_file_again(server, tmp_path):
    data = os.urandom(50_000)
    server.files["big.zip"], server.state.ranges = data, False
    (tmp_path / "big.zip.part").write_bytes(data[:20_000])
    download(server.url("big.zip"), tmp_path / "big.zip", md5=md5(data))
    assert (tmp_path / "big.zip").read_bytes() == data


def test_a_partial_file_longer_than_the_servers_copy_starts_afresh(server, tmp_path):
    data = b"right file"
    server.files["a.bin"] = data
    (tmp_path / "a.bin.part").write_bytes(b"x" * 100)  # 416 Range Not Satisfiable
    download(server.url("a.bin"), tmp_path / "a.bin", md5=md5(data))
    assert (tmp_path / "a.bin").read_bytes() == data


def test_mirrors_are_tried_in_order_with_one_checksum(server, tmp_path):
    data = b"the archive"
    server.files["wrong.tgz"], server.files["good.tgz"] = b"another file", data
    urls = [server.url("gone.tgz"), server.url("wrong.tgz"), server.url("good.tgz"), server.url("unused.tgz")]
    assert download(urls, tmp_path / "a.tgz", md5=md5(data)).read_bytes() == data
    assert [server.hits[name] for name in ("gone.tgz", "wrong.tgz", "good.tgz", "unused.tgz")] == [1, 1, 1, 0]


def test_when_every_mirror_fails_each_reason_is_named(server, tmp_path):
    server.files["wrong.tgz"] = b"another file"
    with pytest.raises(InputError) as error:
        download([server.url("gone.tgz"), server.url("wrong.tgz")], tmp_path / "a.tgz", md5=md5(b"the archive"))
    message = str(error.value)
    assert "\n" not in message
    assert f"({server.url('gone.tgz')}: HTTP 404 Not Found; {server.url('wrong.tgz')}: it sent another file" in message
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_during_a_download_is_one_line(server, tmp_path):
    server.files["a.bin"] = b"payload"
    (tmp_path / "a.bin.part").symlink_to("/dev/full")  # every write fails with ENOSPC
    with pytest.raises(InputError, match="^disk full while downloading .*free some space"):
        download(server.url("a.bin"), tmp_path / "a.bin")


# ---------------------------------------------------------------- hostile archives


def cve_2025_4517_tar(outside: Path) -> bytes:
    """The shape of CVE-2025-4517: nested long directory names, each shadowed by a short symlink, so that the
    lexical path through the symlinks is short but its resolution overflows PATH_MAX, where a non-strict
    realpath stops resolving; then a symlink out of the tree, a hard link through it and a file written
    through the hard link."""
    long_name, steps, folder = "d" * 247, "abcdefghijklmnop", ""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:

        def add(name: str, kind: bytes, link: str = "", data: bytes = b"") -> None:
            info = tarfile.TarInfo(name)
            info.type, info.linkname, info.size = kind, link, len(data)
            tar.addfile(info, io.BytesIO(data))

        for step in steps:
            add(os.path.join(folder, long_name), tarfile.DIRTYPE)
            add(os.path.join(folder, step), tarfile.SYMTYPE, long_name)
            folder = os.path.join(folder, long_name)
        deep_link = os.path.join(*steps, "l" * 254)
        add(deep_link, tarfile.SYMTYPE, "../" * len(steps))
        add("escape", tarfile.SYMTYPE, f"{deep_link}/{'../' * 16}{outside.parent.relative_to('/')}")
        add("victim_link", tarfile.LNKTYPE, f"escape/{outside.name}/victim")
        add("victim_link", tarfile.REGTYPE, data=b"overwritten")
        add(f"escape/{outside.name}/created", tarfile.REGTYPE, data=b"created")
    return buffer.getvalue()


def test_the_cve_2025_4517_shape_is_refused_and_touches_nothing_outside(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_bytes(b"precious")
    archive = tmp_path / "evil.tar"
    archive.write_bytes(cve_2025_4517_tar(outside))
    with pytest.raises(InputError, match="refusing to extract member 'a': it is a link"):
        extract(archive, tmp_path / "target")
    assert (outside / "victim").read_bytes() == b"precious"
    assert [path.name for path in outside.iterdir()] == ["victim"]
    assert list((tmp_path / "target").iterdir()) == []  # not even the temporary folder is left


def plain_tar(*members: tuple[str, bytes, bytes]) -> bytes:
    """An uncompressed tar of (name, type, data) members, in order, duplicates allowed."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, kind, data in members:
            info = tarfile.TarInfo(name)
            info.type, info.size = kind, len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("archive", "member", "why"),
    [
        (lambda: tar_bytes({}, {"ok": (tarfile.SYMTYPE, "sub/inside.txt")}), "ok", "it is a link"),
        (lambda: tar_bytes({"a.txt": b"x"}, {"hard": (tarfile.LNKTYPE, "a.txt")}), "hard", "it is a link"),
        (lambda: plain_tar(("member", tarfile.CHRTYPE, b"")), "member", "device, fifo"),
        (lambda: plain_tar(("member", tarfile.FIFOTYPE, b"")), "member", "device, fifo"),
        (lambda: tar_bytes({"C:/evil": b"x"}), "C:/evil", "absolute"),
        (lambda: tar_bytes({"manifest.json": b'{"complete": true}'}), "manifest.json", "bookkeeping"),
        (lambda: tar_bytes({".archive.extracted": b""}), ".archive.extracted", "bookkeeping"),
        (
            lambda: plain_tar(("a.txt", tarfile.REGTYPE, b"x"), ("a.txt", tarfile.REGTYPE, b"y")),
            "a.txt",
            "listed twice",
        ),
        (lambda: zip_bytes({".archive.partial/x": b""}), ".archive.partial/x", "bookkeeping"),
    ],
    ids=[
        "tar-inner-symlink",
        "tar-inner-hardlink",
        "tar-device",
        "tar-fifo",
        "tar-drive",
        "tar-manifest",
        "tar-marker",
        "tar-duplicate",
        "zip-partial-folder",
    ],
)
def test_links_special_files_and_our_own_names_are_refused(tmp_path, archive, member, why):
    path = tmp_path / "archive"
    path.write_bytes(archive())
    target = tmp_path / "target"
    with pytest.raises(InputError, match=f"refusing to extract member {member!r}: .*{why}"):
        extract(path, target)
    assert list(target.iterdir()) == []


def test_an_archive_expanding_beyond_the_limit_is_refused(tmp_path):
    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zip_file:
        zip_file.writestr("zeros", bytes(3 << 20))
    assert archive.stat().st_size < 10_000
    with pytest.raises(InputError, match=r"bomb.zip expands beyond 1,048,576 bytes \(at member 'zeros'\)"):
        extract(archive, tmp_path / "target", max_ratio=10, max_bytes=1 << 20)
    assert list((tmp_path / "target").iterdir()) == []


def test_the_expansion_ratio_is_measured_against_the_archive(tmp_path, monkeypatch):
    monkeypatch.setattr("utils.data.download.RATIO_FLOOR", 100_000)
    archive = tmp_path / "bomb.tgz"
    archive.write_bytes(tar_bytes({"zeros": bytes(5 << 20)}))
    with pytest.raises(InputError, match=f"expands beyond {100 * archive.stat().st_size:,} bytes"):
        extract(archive, tmp_path / "target", max_ratio=100)


@pytest.mark.parametrize("tar_format", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_a_huge_extended_header_counts_against_the_limit_before_it_is_read(tmp_path, tar_format):
    """64 MiB of PAX record (or GNU long name) gzipped to a fraction of that: tarfile would read it whole into
    memory, and none of it is member data, which is all the limit counted."""
    archive = tmp_path / "header.tgz"
    huge = "x" * (64 << 20)
    with tarfile.open(archive, "w:gz", format=tar_format) as tar:
        member = tarfile.TarInfo("a" * 99 + huge if tar_format == tarfile.GNU_FORMAT else "small.txt")
        member.pax_headers = {"comment": huge} if tar_format == tarfile.PAX_FORMAT else {}
        member.size = 5
        tar.addfile(member, io.BytesIO(b"hello"))
    del huge
    assert archive.stat().st_size < 1 << 20
    tracemalloc.start()
    try:
        with pytest.raises(InputError, match=r"header.tgz expands beyond 16,777,216 bytes .*an extended header"):
            extract(archive, tmp_path / "target")
        assert tracemalloc.get_traced_memory()[1] < 16 << 20  # the header was never read into memory
    finally:
        tracemalloc.stop()
    assert list((tmp_path / "target").iterdir()) == []


# ---------------------------------------------------------------- recovery


def test_a_truncated_archive_leaves_nothing_and_delete_and_run_again_works(server, tmp_path):
    good = tar_bytes(cub_files("CUB_200_2011/"))
    server.files["CUB_200_2011.tgz"] = good[: len(good) * 2 // 3]
    config = {"data_path": str(tmp_path), "urls": server.url("CUB_200_2011.tgz"), "md5": None}
    with pytest.raises(InputError, match="CUB_200_2011.tgz is damaged .*delete it and run again"):
        run(prepare_data.cub, **config)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["CUB_200_2011.tgz", "manifest.json"]
    assert manifest.read(tmp_path)["complete"] is False
    # Following the advice: the half-extracted folder must not pass for one extracted by hand.
    (tmp_path / "CUB_200_2011.tgz").unlink()
    server.files["CUB_200_2011.tgz"] = good
    assert run(prepare_data.cub, **config).startswith("ready")
    assert lines(tmp_path / "test.txt") == CUB_TEST and manifest.read(tmp_path)["complete"] is True


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_an_image_that_does_not_decode_stops_the_preparation(tmp_path, damage):
    for name, data in cub_files("").items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    (tmp_path / "images/200.Wren/w2.jpg").write_bytes(JPEG[: len(JPEG) // 2] if damage == "truncated" else b"")
    with pytest.raises(InputError, match=r"^1 of the 6 images do not decode \(first: image .*w2.jpg cannot be read"):
        run(prepare_data.cub, data_path=str(tmp_path), download=False)
    assert not (tmp_path / "train.txt").exists()
    assert manifest.read(tmp_path)["reason"].startswith("failed: 1 of the 6 images do not decode")


def test_an_image_claiming_too_many_pixels_stops_the_preparation(tmp_path):
    from tests.test_image_limits import claiming_jpeg

    for name, data in cub_files("").items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    claiming_jpeg(tmp_path / "images/200.Wren/w2.jpg", 65_000, 65_000)
    with pytest.raises(InputError, match=r"^1 of the 6 images do not decode \(first: image .*w2.jpg claims 4,225,"):
        run(prepare_data.cub, data_path=str(tmp_path), download=False)
    assert not (tmp_path / "train.txt").exists()


def test_split_counts_other_than_the_published_ones_are_refused(tmp_path):
    for name, data in cub_files("").items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    with pytest.raises(
        InputError,
        match="^train.txt would have 3 images / 2 classes, the published split 5,864 "
        "images / 100 classes: .*set `expected`",
    ):
        prepare_data.cub.run(
            config_updates={"data_path": str(tmp_path), "download": False},
            options={"--loglevel": "CRITICAL", "--capture": "no"},
        )
    assert not (tmp_path / "train.txt").exists()


def test_a_full_disk_while_writing_the_splits_is_one_line(tmp_path):
    for name, data in cub_files("").items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    # utils.files.atomic_write's temporary for this process and thread, pointing at a device that is always full.
    (tmp_path / f".train.txt.{os.getpid()}.{threading.get_ident()}.tmp").symlink_to("/dev/full")
    with pytest.raises(InputError, match=f"^disk full while preparing {tmp_path}: free some space"):
        run(prepare_data.cub, data_path=str(tmp_path), download=False)


def test_a_failed_preparation_leaves_no_new_folder(tmp_path):
    with pytest.raises(InputError, match="download=False"):
        run(prepare_data.sop, data_path=str(tmp_path / "sop"), download=False)
    assert list(tmp_path.iterdir()) == []


def test_training_refuses_a_folder_marked_incomplete(experiment, dataset_copy):
    from tests.conftest import SHRINK, assert_input_error

    root = dataset_copy("cub")
    manifest.mark_incomplete(root, "cub", "interrupted")
    outcome = experiment("with dataset.cub model.small_cnn", f"dataset.data_path={root}", *SHRINK)
    assert_input_error(
        outcome, f"data folder {root} is not completely prepared (interrupted): run `python prepare_data.py cub`"
    )


@pytest.fixture
def small_disk(tmp_path):
    """A 64 KiB tmpfs (mounting needs root: skipped elsewhere)."""
    mount_point = tmp_path / "small_disk"
    mount_point.mkdir()
    mounted = (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount_point)], capture_output=True
        ).returncode
        == 0
    )
    if not mounted:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount_point
    subprocess.run(["umount", str(mount_point)], check=True)


def test_a_full_disk_during_extraction_is_one_line_and_leaves_nothing(tmp_path, small_disk):
    archive = tmp_path / "big.tgz"
    archive.write_bytes(tar_bytes({"data/a.bin": os.urandom(100_000), "data/b.bin": os.urandom(100_000)}))
    with pytest.raises(InputError, match=f"^disk full while extracting {archive} into {small_disk}: free some space"):
        extract(archive, small_disk)
    assert list(small_disk.iterdir()) == []


def test_prepare_data_refuses_a_hostile_archive_from_a_mirror(server, tmp_path):
    # The command line, with the checksum off (md5=None), as a user with a mirror of their own would run it.
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_bytes(b"precious")
    server.files["CUB_200_2011.tgz"] = cve_2025_4517_tar(outside)
    data_path = tmp_path / "data/CUB_200_2011"
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "prepare_data.py"),
            "cub",
            "with",
            f"data_path={data_path}",
            f"urls={server.url('CUB_200_2011.tgz')}",
            "md5=None",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env=os.environ | {"no_proxy": "127.0.0.1"},
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert (
        done.stderr.strip()
        .splitlines()[-1]
        .startswith(
            f"utils.errors.InputError: {data_path / 'CUB_200_2011.tgz'}: refusing to extract member 'a': it is a link"
        )
    )
    assert (outside / "victim").read_bytes() == b"precious" and [path.name for path in outside.iterdir()] == ["victim"]
    assert manifest.read(data_path)["complete"] is False
    assert sorted(path.name for path in data_path.iterdir()) == ["CUB_200_2011.tgz", "manifest.json"]


def test_a_second_preparation_of_the_same_split_files_is_not_decoded_again(tmp_path):
    for name, data in cub_files("").items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    run(prepare_data.cub, data_path=str(tmp_path), download=False)
    first = manifest.read(tmp_path)
    run(prepare_data.cub, data_path=str(tmp_path), download=False)
    assert manifest.read(tmp_path) == first  # the same verification, vouching for the same split files
    (tmp_path / "images.txt").write_text((tmp_path / "images.txt").read_text().replace("w2.jpg", "w1.jpg"))
    run(prepare_data.cub, data_path=str(tmp_path), download=False)
    assert manifest.read(tmp_path)["verified"] != first["verified"]
