"""Writing outputs so that nothing is ever left half-written, on disk or in a bucket.

On disk, a destination directory is built under a temporary name beside it and renamed into place
at the end; a file is written to a temporary name and `os.replace`d. If anything fails (or the
process is killed) the old output, if any, is still there untouched.

An object store (`gs://...`, `flax_d2v.paths`) has no rename, but each object appears whole or not
at all: a file is one object upload; a directory is built locally and uploaded with the file that
makes it recognisable (the weights) last (`paths.publish_dir`). ARCHITECTURE.md says how each
writer stays all-or-nothing there.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flax_d2v import paths
from flax_d2v.errors import D2VError


@contextlib.contextmanager
def atomic_dir(dst: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory that becomes `dst` when the block exits cleanly.

    A non-empty `dst` is refused unless `overwrite`; then it is replaced only after the new
    content is complete. A URL `dst` is built in a local temporary directory and published with
    `paths.publish_dir` (its weights file last).
    """
    if paths.is_url(dst):
        url = os.fspath(dst)
        if paths.is_nonempty_dir(url) and not overwrite:
            raise D2VError(f"{url}: destination is not empty (use --overwrite to replace it)")
        with tempfile.TemporaryDirectory(prefix=".d2v-upload-") as tmp:
            yield Path(tmp)
            paths.publish_dir(Path(tmp), url, replace=overwrite)
        return
    dst = Path(dst)
    if dst.exists() and not dst.is_dir():
        raise D2VError(f"{dst}: exists and is not a directory")
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        raise D2VError(f"{dst}: destination is not empty (use --overwrite to replace it)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    backup = None
    if dst.exists():
        backup = dst.parent / f".{dst.name}.old-{os.getpid()}"
        os.replace(dst, backup)
    os.replace(tmp, dst)
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """`data` as the file `path`: a temporary file renamed over it, or one object upload for a URL."""
    if paths.is_url(path):
        with paths.reporting(path, writing=True):
            paths.as_path(path).write_bytes(data)
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def read_json(path: str | os.PathLike) -> Any:
    """Parsed JSON of `path` (a file or a URL); a missing, unreadable or malformed file is a one-line `D2VError`."""
    path = paths.as_path(path)
    try:
        with paths.reporting(path):
            text = path.read_bytes().decode("utf-8")
        return json.loads(text)
    except FileNotFoundError:
        raise D2VError(f"{path}: no such file") from None
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        raise D2VError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise D2VError(f"{path}: cannot read ({e.strerror or e})") from None


def read_json_object(path: str | os.PathLike) -> dict[str, Any]:
    """`read_json` for files that must hold a JSON object (configs, vocabularies, settings)."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise D2VError(f"{path}: expected a JSON object")
    return data
