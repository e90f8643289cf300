"""Every path a user gives lmjax, local or `gs://`, read and written through one layer:
`etils.epath` (which orbax also uses) over fsspec, whose gcsfs backend serves `gs://`.

Never `open`, `os.path`, `glob` or `pathlib` on a user path (tests/unit/test_io_layer.py reads
the package's source and fails on one): they silently turn `gs://b/x` into a local `./gs:/b/x`.

`STORAGE_EMULATOR_HOST` (the convention of Google's client libraries and gcsfs), when set, sends
every Cloud Storage access of the process to that server: gcsfs reads it itself; tensorstore
(orbax's array writer) is given `TENSORSTORE_GCS_HTTP_URL` and a test token; epath is kept off
TensorFlow's GCS client (`EPATH_USE_TF=false` always), whose endpoints cannot be redirected.
`follow_emulator` sets these; it runs when this module is imported (before any client exists)
and again at every `path` call, so a process that sets the variable later is followed too.
"""

from __future__ import annotations

import contextlib
import glob as _glob
import os
import shutil
import tempfile
import uuid
from typing import Iterator

import fsspec
from etils import epath

PathLike = str | os.PathLike


def follow_emulator() -> None:
    """Points every Cloud Storage client of this process at $STORAGE_EMULATOR_HOST, if set."""
    # epath caches its backend choice on first use, and its TensorFlow backend would reach
    # the real storage.googleapis.com whatever the emulator setting.
    os.environ["EPATH_USE_TF"] = "false"
    host = os.environ.get("STORAGE_EMULATOR_HOST", "")
    if host in ("", "default"):
        return
    url = host if "://" in host else f"http://{host}"
    os.environ["TENSORSTORE_GCS_HTTP_URL"] = url
    # tensorstore asks for a token even from an emulator, which ignores it.
    os.environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")
    # gcsfs's default class probes each bucket's layout through the Storage Control API,
    # which no emulator serves: its plain JSON-API class does everything lmjax needs.
    for protocol in ("gs", "gcs"):
        fsspec.register_implementation(protocol, "gcsfs.core.GCSFileSystem", clobber=True)


# Several processes share a workdir (process 0 writes what the others wait for), so a
# listing must never come from a cache.
for _protocol in ("gs", "gcs"):
    fsspec.config.conf.setdefault(_protocol, {})["use_listings_cache"] = False
follow_emulator()


def is_url(p: PathLike) -> bool:
    """Whether `p` names remote storage (`gs://...`) rather than a local file."""
    return "://" in os.fspath(p)


def path(p: PathLike) -> epath.Path:
    """`p` as an epath.Path: a URL kept as it is, a local path made absolute."""
    follow_emulator()
    p = os.fspath(p)
    return epath.Path(p if is_url(p) else os.path.abspath(p))


def join(base: PathLike, *names: str) -> str:
    """`base/names...` as a string, for a URL or a local path alike."""
    return os.path.join(os.fspath(base), *names)


def glob(pattern: str) -> list[str]:
    """Sorted paths matching `pattern` (`*`, `?`, `[..]`; local or gs://)."""
    if not is_url(pattern):
        return sorted(_glob.glob(pattern))
    follow_emulator()
    fs, _ = fsspec.core.url_to_fs(pattern)
    return sorted(fs.unstrip_protocol(p) for p in fs.glob(pattern))


def read_text_or_none(p: PathLike) -> str | None:
    """The text of file `p`, or None when it does not exist."""
    try:
        return path(p).read_text()
    except FileNotFoundError:
        return None


@contextlib.contextmanager
def local_copy(p: PathLike) -> Iterator[str]:
    """A local file holding `p`'s bytes, for readers that need one (mmap, C libraries): `p`
    itself when local, else a download into a temporary directory removed on exit."""
    if not is_url(p):
        yield os.path.abspath(p)
        return
    with tempfile.TemporaryDirectory(prefix="lmjax-") as tmp:
        local = os.path.join(tmp, os.path.basename(os.fspath(p)))
        with path(p).open("rb") as src, open(local, "wb") as dst:
            shutil.copyfileobj(src, dst, 16 << 20)
        yield local


@contextlib.contextmanager
def staged(p: PathLike) -> Iterator[str]:
    """A local filename for a writer that needs one: `p` itself when local, else a temporary
    file uploaded to `p` when the block ends without an error."""
    if not is_url(p):
        yield os.path.abspath(p)
        return
    with tempfile.TemporaryDirectory(prefix="lmjax-") as tmp:
        local = os.path.join(tmp, os.path.basename(os.fspath(p)))
        yield local
        upload(local, p)


def upload(local: str, p: PathLike) -> None:
    """Copies the local file `local` to `p` (one object write on gs://)."""
    with open(local, "rb") as src, path(p).open("wb") as dst:
        shutil.copyfileobj(src, dst, 16 << 20)


def upload_tree(local: str, p: PathLike) -> None:
    """Copies every file under the local directory `local` to the same relative name under
    `p` (one object write per file on gs://)."""
    for root, _, files in os.walk(local):  # a local directory by contract
        rel = os.path.relpath(root, local)
        for name in files:
            parts = (name,) if rel == "." else (*rel.split(os.sep), name)
            upload(os.path.join(root, name), join(p, *parts))


def write_atomic(p: PathLike, data: bytes) -> None:
    """Writes `data` to `p` so that a concurrent reader sees all of it or nothing: one object
    write on gs:// (atomic there), a temporary file renamed over `p` locally. The temporary
    name is random (pids repeat across containers sharing a disk) and the file is removed
    when the write or the rename fails (a full disk)."""
    if is_url(p):
        path(p).write_bytes(data)
        return
    tmp = f"{os.path.abspath(p)}.tmp-{uuid.uuid4().hex}"
    try:
        path(tmp).write_bytes(data)
        os.replace(tmp, os.path.abspath(p))
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def rename(src: PathLike, dst: PathLike) -> None:
    """Moves the file or directory `src` to the new name `dst`: one rename locally; on gs://,
    which has neither folders nor renames, a copy of each object, then its deletion (not
    atomic: a kill in between leaves both copies, never neither)."""
    if not is_url(src):
        path(src).rename(path(dst))
        return
    fs, _ = fsspec.core.url_to_fs(os.fspath(src))
    fs.mv(os.fspath(src), os.fspath(dst), recursive=True)
