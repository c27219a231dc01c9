"""Download files from an ordered list of mirrors and extract archives that cannot reach outside their folder."""

import errno
import hashlib
import http.client
import os
import shutil
import stat
import tarfile
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import IO

from tqdm import tqdm

from utils.errors import InputError

CHUNK = 1 << 20
# What an archive may expand to: MAX_RATIO times its own size (photographs barely compress, so a real data
# set's archive expands about 1:1), at least RATIO_FLOOR (small archives of text), at most MAX_BYTES.
MAX_RATIO = 10
RATIO_FLOOR = 16 << 20
MAX_BYTES = 64 << 30
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def file_digest(path: Path, algorithm: str) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, algorithm).hexdigest()


def disk_full(error: OSError, doing: str) -> InputError | None:
    """The one-line error for a full disk (or quota) while `doing`; None for any other OSError."""
    if error.errno not in DISK_FULL:
        return None
    return InputError(f"disk full while {doing}: free some space (or point data_path elsewhere) and run again")


def download(
    urls: str | Sequence[str],
    path: str | Path,
    md5: str | None = None,
    sha256: str | None = None,
    *,
    note: str = "",
    timeout: float = 60,
) -> Path:
    """Fetch path from the first of urls (mirrors of one file, in order) that serves it with the right checksum.

    Nothing is fetched when path exists (its checksum is still checked). The data goes to path + ".part"
    first, so an interrupted download never looks complete, and a later call resumes it with an HTTP Range
    request where the server allows. Raises InputError when no mirror delivers the file, with each mirror's
    reason and how to get the file by hand (plus `note`).
    """
    if md5 is not None and sha256 is not None:
        raise ValueError("give md5 or sha256, not both")
    urls = [urls] if isinstance(urls, str) else list(urls)
    path = Path(path)
    expected = ("md5", md5.lower()) if md5 else ("sha256", sha256.lower()) if sha256 else None
    if path.is_file():
        if wrong := _mismatch(path, expected):
            raise InputError(
                f"{path} has {wrong}: the file is damaged, incomplete or another version; "
                f"delete it and run again to download it afresh"
            )
        return path
    part = path.with_name(path.name + ".part")
    path.parent.mkdir(parents=True, exist_ok=True)
    reasons = []
    for url in urls:
        reason = _try_mirror(url, part, expected, timeout)
        if reason is None:
            part.replace(path)
            return path
        reasons.append(f"{url}: {reason}")
    if part.is_file() and part.stat().st_size == 0:
        part.unlink()
    manual = f"download it from {urls[0]} to {path}" + (f"; {note}" if note else "")
    raise InputError(f"{path.name} not found and download failed ({'; '.join(reasons)}): {manual}")


def _try_mirror(url: str, part: Path, expected: tuple[str, str] | None, timeout: float) -> str | None:
    """Fetch url into part (resuming it); None on success, else why this mirror failed."""
    try:
        _fetch(url, part, timeout)
    except OSError as error:
        if full := disk_full(error, f"downloading {url} to {part}"):
            raise full from None
        return _reason(error)
    except (ValueError, http.client.HTTPException) as error:
        return _reason(error)
    if wrong := _mismatch(part, expected):
        part.unlink()  # a wrong file must not be resumed from the next mirror
        return f"it sent another file ({wrong})"
    return None


def _fetch(url: str, part: Path, timeout: float) -> None:
    have = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url)
    if have and url.startswith(("http://", "https://")):
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as error:
        if error.code != 416 or not have:
            raise
        part.unlink()  # the partial file does not fit this server's copy: start afresh
        return _fetch(url, part, timeout)
    with response:
        # 206: the server continues the partial file; anything else sends the whole file again.
        resumed = have if response.status == 206 and _range_start(response) == have else 0
        size = response.headers.get("Content-Length")
        total = resumed + int(size) if size else None
        with (
            open(part, "ab" if resumed else "wb") as file,
            tqdm(
                total=total, initial=resumed, desc=part.stem, unit="B", unit_scale=True, unit_divisor=1024, leave=False
            ) as bar,
        ):
            for chunk in iter(lambda: response.read(CHUNK), b""):
                file.write(chunk)
                bar.update(len(chunk))
    if total is not None and part.stat().st_size != total:
        raise OSError(f"the connection closed after {part.stat().st_size:,} of {total:,} bytes; run again to resume")


def _range_start(response: http.client.HTTPResponse) -> int | None:
    """The first byte of a 206 response's Content-Range (`bytes 100-199/200`)."""
    content_range = response.headers.get("Content-Range", "")
    start = content_range.removeprefix("bytes ").split("-", 1)[0]
    return int(start) if start.isascii() and start.isdigit() else None


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


# ---------------------------------------------------------------- extraction


def marker(archive: Path, target: Path) -> Path:
    """The file that says archive was completely extracted into target (written by extract alone)."""
    return target / f".{archive.name}.extracted"


def is_extracted(archive: Path, target: Path) -> bool:
    """Whether extract(archive, target) has completed before."""
    return marker(archive, target).is_file()


def is_reserved(name: str) -> bool:
    """Names of our own bookkeeping files, which no archive may ship."""
    return name == "manifest.json" or name.startswith(".") and name.endswith((".extracted", ".partial"))


def extract(
    archive: str | Path,
    target: str | Path,
    force: bool = False,
    *,
    max_ratio: float = MAX_RATIO,
    max_bytes: int = MAX_BYTES,
) -> bool:
    """Extract a tar (.tgz, .tar.gz, .tar) or zip archive into target; False when it was done before.

    Members go to a temporary folder in target, whose top-level entries are moved into place (replacing
    any older copy) only once every member is written; then a marker makes the next call a no-op, unless
    force. Refuses, with an InputError naming the member, absolute paths, `..`, links of any kind (the
    data sets' archives hold none), special files, our own bookkeeping names, and expansion (members and
    tar's extended headers together) beyond max(max_ratio x the archive's size, RATIO_FLOOR) or max_bytes.
    """
    archive, target = Path(archive), Path(target)
    if is_extracted(archive, target) and not force:
        return False
    target.mkdir(parents=True, exist_ok=True)
    partial = target / f".{archive.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)  # left by an interrupted run
    limit = min(max_bytes, max(int(max_ratio * archive.stat().st_size), RATIO_FLOOR))
    try:
        partial.mkdir()
        _extract_members(archive, partial, limit)
        marker(archive, target).unlink(missing_ok=True)
        for entry in partial.iterdir():
            _replace(entry, target / entry.name)
        marker(archive, target).touch()
    except OSError as error:
        raise disk_full(error, f"extracting {archive} into {target}") or error from None
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return True


def _replace(source: Path, destination: Path) -> None:
    if destination.is_dir() and not destination.is_symlink():
        shutil.rmtree(destination)
    source.replace(destination)


def _extract_members(archive: Path, partial: Path, limit: int) -> None:
    try:
        if zipfile.is_zipfile(archive):
            _extract_zip(archive, partial, limit)
        elif _is_tar(archive, limit):
            _extract_tar(archive, partial, limit)
        else:
            raise InputError(f"{archive} is neither a tar nor a zip archive: delete it and run again")
    except (tarfile.ReadError, tarfile.CompressionError, zipfile.BadZipFile, EOFError, zlib.error) as error:
        raise InputError(f"{archive} is damaged ({error}): delete it and run again") from None
    except OSError as error:
        if error.errno in DISK_FULL:
            raise
        # gzip's BadGzipFile and other read errors of a damaged archive are OSErrors without an errno.
        raise InputError(f"{archive} is damaged ({error}): delete it and run again") from None


def _refuse(archive: Path, member: str, why: str) -> InputError:
    return InputError(
        f"{archive}: refusing to extract member {member!r}: {why}; the archive is unsafe, get a trustworthy copy"
    )


def _member_path(archive: Path, root: Path, name: str) -> Path | None:
    """Where member `name` goes under root; None for the root itself. Refuses names that would leave root."""
    if PurePosixPath(name).is_absolute() or PureWindowsPath(name).drive or PureWindowsPath(name).root:
        raise _refuse(archive, name, "its path is absolute")
    parts = [part for part in PurePosixPath(name).parts if part != "."]
    if ".." in parts:
        raise _refuse(archive, name, "its path contains '..'")
    if parts and is_reserved(parts[0]):
        raise _refuse(archive, name, "its name is one of prepare_data's own bookkeeping files")
    return root.joinpath(*parts) if parts else None


def _inside(archive: Path, root: Path, name: str, folder: Path) -> None:
    """Refuse unless folder (existing) really is under root: strict resolution, every link followed."""
    if not Path(os.path.realpath(folder, strict=True)).is_relative_to(root):
        raise _refuse(archive, name, "its folder resolves outside the target folder")


class _Budget:
    """Bytes an archive may still write; refuses the member that would go beyond."""

    def __init__(self, archive: Path, limit: int) -> None:
        self.archive, self.left, self.limit = archive, limit, limit

    def take(self, name: str, size: int) -> None:
        self.left -= size
        if self.left < 0:
            raise InputError(
                f"{self.archive} expands beyond {self.limit:,} bytes (at member {name!r}): it is not "
                f"the data set's archive or is a decompression bomb; get a trustworthy copy"
            )


# Extended headers (PAX records, GNU long names) describe the member after them, and tarfile reads each one
# whole into memory: they count against the archive's budget, checked before tarfile reads them.
EXTENDED_HEADERS = (
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
)


def _budgeted_members(budget: _Budget) -> type[tarfile.TarInfo]:
    """A TarInfo class for tarfile.open(tarinfo=...) that takes every extended header's size from budget."""

    class BudgetedTarInfo(tarfile.TarInfo):
        def _proc_member(self, tar: tarfile.TarFile) -> tarfile.TarInfo:
            # tarfile's hook for each header it parses, called before an extended header's data is read.
            if self.type in EXTENDED_HEADERS:
                budget.take(f"{self.name} (an extended header)", self.size)
            return super()._proc_member(tar)

    return BudgetedTarInfo


def _is_tar(archive: Path, limit: int) -> bool:
    """tarfile.is_tarfile, whose opening reads the first member's extended headers, within the budget."""
    try:
        with tarfile.open(archive, tarinfo=_budgeted_members(_Budget(archive, limit))):
            return True
    except tarfile.TarError:
        return False


def _write(archive: Path, root: Path, name: str, source: IO[bytes], budget: _Budget) -> None:
    path = _member_path(archive, root, name)
    if path is None:
        raise _refuse(archive, name, "it is a file without a name")
    path.parent.mkdir(parents=True, exist_ok=True)
    _inside(archive, root, name, path.parent)
    try:
        # O_EXCL and O_NOFOLLOW: never write through anything that already exists, a link least of all.
        handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    except FileExistsError:
        raise _refuse(archive, name, "it is listed twice") from None
    with os.fdopen(handle, "wb") as file:
        for chunk in iter(lambda: source.read(CHUNK), b""):
            budget.take(name, len(chunk))
            file.write(chunk)


def _mkdir(archive: Path, root: Path, name: str) -> None:
    path = _member_path(archive, root, name)
    if path is not None:
        path.mkdir(parents=True, exist_ok=True)
        _inside(archive, root, name, path)


@contextmanager
def _progress(archive: Path, total: int | None = None) -> Iterator[tqdm]:
    with tqdm(total=total, desc=f"extracting {archive.name}", unit=" files", leave=False) as bar:
        yield bar


def _extract_tar(archive: Path, partial: Path, limit: int) -> None:
    root, budget = partial.resolve(strict=True), _Budget(archive, limit)
    # Member by member in one pass: listing a compressed archive first would decompress it twice.
    with tarfile.open(archive, tarinfo=_budgeted_members(budget)) as tar, _progress(archive) as bar:
        for member in tar:
            if member.issym() or member.islnk():
                raise _refuse(
                    archive, member.name, f"it is a link (to {member.linkname!r}); the data sets' archives hold none"
                )
            if member.isdir():
                _mkdir(archive, root, member.name)
            elif member.isreg():
                with tar.extractfile(member) as source:
                    _write(archive, root, member.name, source, budget)
            else:
                raise _refuse(archive, member.name, "it is a device, fifo or other special file")
            bar.update()


def _extract_zip(archive: Path, partial: Path, limit: int) -> None:
    root, budget = partial.resolve(strict=True), _Budget(archive, limit)
    with zipfile.ZipFile(archive) as zip_file, _progress(archive, len(zip_file.infolist())) as bar:
        for info in zip_file.infolist():
            if info.flag_bits & 0x1:
                raise InputError(f"{archive} is password-protected: unzip it by hand into {partial.parent}")
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise _refuse(archive, info.filename, "it is a symbolic link; the data sets' archives hold none")
            if info.is_dir():
                _mkdir(archive, root, info.filename)
            elif stat.S_IFMT(mode) and not stat.S_ISREG(mode):  # writers that set no type write files
                raise _refuse(archive, info.filename, "it is a device, fifo or other special file")
            else:
                with zip_file.open(info) as source:  # checks the CRC as it reads
                    _write(archive, root, info.filename, source, budget)
            bar.update()
