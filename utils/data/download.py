"""Download files with a checksum check and extract archives without letting any member escape."""

import hashlib
import http.client
import stat
import tarfile
import urllib.error
import urllib.request
import zipfile
import zlib
from pathlib import Path, PurePosixPath, PureWindowsPath

from tqdm import tqdm

from utils.errors import InputError

CHUNK = 1 << 20


def file_digest(path: Path, algorithm: str) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, algorithm).hexdigest()


def download(url: str, path: str | Path, md5: str | None = None, sha256: str | None = None, *,
             note: str = "", timeout: float = 60) -> Path:
    """Fetch url into path unless path already exists; check its md5 or sha256 when one is given.

    The data goes to path + ".part" first, so an interrupted download never looks complete. Raises
    InputError when the download fails (saying how to get the file by hand, plus `note`) or when the
    file's checksum is wrong.
    """
    if md5 is not None and sha256 is not None:
        raise ValueError("give md5 or sha256, not both")
    path = Path(path)
    expected = ("md5", md5.lower()) if md5 else ("sha256", sha256.lower()) if sha256 else None
    if path.is_file():
        if wrong := _mismatch(path, expected):
            raise InputError(f"{path} has {wrong}: the file is damaged, incomplete or another version; "
                             f"delete it and run again to download it afresh")
        return path
    part = path.with_name(path.name + ".part")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        _fetch(url, part, timeout)
    except (OSError, ValueError, http.client.HTTPException) as error:
        part.unlink(missing_ok=True)
        manual = f"download {url} to {path}" + (f"; {note}" if note else "")
        raise InputError(f"{path.name} not found and download failed ({_reason(error)}): {manual}") from None
    if wrong := _mismatch(part, expected):
        part.unlink()
        raise InputError(f"the download from {url} has {wrong}: the server sent another file; "
                         f"get the right one by hand and place it at {path}")
    part.replace(path)
    return path


def _fetch(url: str, part: Path, timeout: float) -> None:
    with urllib.request.urlopen(url, timeout=timeout) as response, open(part, "wb") as file:
        size = response.headers.get("Content-Length")
        with tqdm(total=int(size) if size else None, desc=part.stem, unit="B", unit_scale=True, unit_divisor=1024,
                  leave=False) as bar:
            for chunk in iter(lambda: response.read(CHUNK), b""):
                file.write(chunk)
                bar.update(len(chunk))
    if size and part.stat().st_size != int(size):
        raise OSError(f"the connection closed after {part.stat().st_size} of {size} bytes")


def _mismatch(path: Path, expected: tuple[str, str] | None) -> str | None:
    """'md5 <actual>, expected <expected>' when the checksum is wrong; None when right or unchecked."""
    if expected is None:
        return None
    algorithm, value = expected
    actual = file_digest(path, algorithm)
    return None if actual == value else f"{algorithm} {actual}, expected {value}"


def _reason(error: Exception) -> str:
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} {error.reason}"
    if isinstance(error, urllib.error.URLError):
        return str(error.reason)
    return str(error) or type(error).__name__


def is_extracted(archive: Path, target: Path) -> bool:
    """Whether extract(archive, target) has completed before."""
    return _marker(archive, target).is_file()


def _marker(archive: Path, target: Path) -> Path:
    return target / f".{archive.name}.extracted"


def extract(archive: str | Path, target: str | Path, force: bool = False) -> bool:
    """Extract a tar (.tgz, .tar.gz, .tar) or zip archive into target; False when it was done before.

    Refuses (InputError naming the member) absolute paths, paths that leave target, links that point
    outside it and special files. A marker written after the last member makes the next call a no-op,
    unless force (the extracted files were deleted since).
    """
    archive, target = Path(archive), Path(target)
    if is_extracted(archive, target) and not force:
        return False
    target.mkdir(parents=True, exist_ok=True)
    try:
        if zipfile.is_zipfile(archive):
            _extract_zip(archive, target)
        elif tarfile.is_tarfile(archive):
            _extract_tar(archive, target)
        else:
            raise InputError(f"{archive} is neither a tar nor a zip archive: delete it and run again")
    except (tarfile.ReadError, tarfile.CompressionError, zipfile.BadZipFile, EOFError, zlib.error) as error:
        raise InputError(f"{archive} is damaged ({error}): delete it and run again") from None
    _marker(archive, target).touch()
    return True


def _escapes(root: Path, path: str, start: Path) -> bool:
    """Whether path, taken relative to the folder start, ends up outside root (both resolved)."""
    if PurePosixPath(path).is_absolute() or PureWindowsPath(path).drive:
        return True
    return not (start / path).resolve().is_relative_to(root)


def _refuse(archive: Path, member: str, why: str) -> InputError:
    return InputError(f"{archive}: refusing to extract member {member!r}: {why}; the archive is unsafe, "
                      f"get a trustworthy copy")


def _check_member(archive: Path, root: Path, name: str, symlink: str | None = None, hardlink: str | None = None
                  ) -> None:
    if _escapes(root, name, root):
        raise _refuse(archive, name, "its path leaves the target folder")
    # A symlink resolves from its own folder, a hard link from the archive's root.
    if symlink is not None and _escapes(root, symlink, (root / name).parent):
        raise _refuse(archive, name, f"it links to {symlink!r}, outside the target folder")
    if hardlink is not None and _escapes(root, hardlink, root):
        raise _refuse(archive, name, f"it hard-links to {hardlink!r}, outside the target folder")


def _extract_tar(archive: Path, target: Path) -> None:
    root = target.resolve()
    with tarfile.open(archive) as tar:
        # Member by member in one pass: listing a compressed archive first would decompress it twice.
        for member in tqdm(tar, desc=f"extracting {archive.name}", unit=" files", leave=False):
            _check_member(archive, root, member.name, member.linkname if member.issym() else None,
                          member.linkname if member.islnk() else None)
            try:
                # The "data" filter re-checks every member as written and refuses devices and fifos.
                tar.extract(member, root, filter="data")
            except tarfile.FilterError as error:
                raise _refuse(archive, member.name, str(error)) from None


def _extract_zip(archive: Path, target: Path) -> None:
    root = target.resolve()
    with zipfile.ZipFile(archive) as zip_file:
        members = zip_file.infolist()
        for info in members:
            if info.flag_bits & 0x1:
                raise InputError(f"{archive} is password-protected: unzip it by hand into {target}")
            is_link = stat.S_ISLNK(info.external_attr >> 16)
            # zipfile writes a symlink as a file holding its target, so only an escaping target is refused:
            # it is the mark of a crafted archive.
            _check_member(archive, root, info.filename, zip_file.read(info).decode() if is_link else None)
        for info in tqdm(members, desc=f"extracting {archive.name}", unit=" files", leave=False):
            zip_file.extract(info, root)
