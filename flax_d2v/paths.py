"""Local paths and object-store URLs (`gs://`, `s3://`, ...) behind one interface.

Every path a command takes may be a URL: a TPU pod's hosts share no file system, so data,
checkpoints and exports live in a bucket. URLs go through `etils.epath` (what orbax uses; fsspec
and gcsfs underneath), never a storage client of our own. A local path stays a `pathlib.Path`, so
nothing changes for files on disk.

- `as_path(p)`: a `pathlib.Path` for a local path, an `epath.Path` for a URL; both have
  `read_bytes`, `write_bytes`, `open`, `exists`, `is_file`, `is_dir`, `iterdir`, `/`, `name`.
- `resolve(base, p)`: `p` relative to the directory `base` (a relative audio path in a `gs://`
  manifest resolves against the manifest's URL).
- `localize(p)`: a local copy of a URL's file or directory tree (libraries that only open local
  files: safetensors' memory map, torch, KenLM), downloaded once per process.
- `publish_dir(local, url)`: a built directory uploaded so that it is never seen half-written (see
  ARCHITECTURE.md, "Writing to object stores").
- `reporting(url)`: turns what the storage client raises into one `D2VError` line naming the URL:
  no credentials, no such bucket, no such object, a bucket that refuses writes.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import posixpath
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Union

from etils import epath

from flax_d2v.errors import D2VError

AnyPath = Union[Path, epath.Path]  # noqa: UP007 - a runtime alias
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")

# The file a reader looks for to recognise a model directory: written after every other file, so a
# directory is recognised only once it is complete (sharded weights: the index after its shards).
COMMIT_LAST = (
    "flax_model.safetensors",
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
CREDENTIALS_HINT = "run `gcloud auth application-default login` or set GOOGLE_APPLICATION_CREDENTIALS"


def is_url(path: Any) -> bool:
    """True for `scheme://...` (gs, s3, az, hf, memory...); False for local paths and `file://`."""
    if isinstance(path, os.PathLike):
        path = os.fspath(path)
    return isinstance(path, str) and bool(_URL.match(path)) and not path.startswith("file://")


def as_path(path: str | os.PathLike) -> AnyPath:
    """`pathlib.Path` for a local path, `epath.Path` for a URL."""
    if is_url(path):
        _quiet_clients()
        return epath.Path(os.fspath(path))
    return path if isinstance(path, Path) else Path(os.fspath(path))


def join(base: str | os.PathLike, *parts: str) -> str:
    """`base/part/...` as a string (no normalisation of a URL's `//`)."""
    return os.fspath(as_path(base).joinpath(*parts))


def resolve(base_dir: str | os.PathLike, path: str) -> str:
    """`path` if absolute or a URL, else `base_dir/path` normalised (`..` allowed), URL or local."""
    if is_url(path) or os.path.isabs(path):
        return path
    base = os.fspath(base_dir)
    if is_url(base):
        scheme, rest = base.split("://", 1)
        return f"{scheme}://" + posixpath.normpath(posixpath.join("/" + rest, path)).lstrip("/")
    return os.path.normpath(os.path.join(base, path))


def parent(path: str | os.PathLike) -> str:
    """The directory holding `path` (URL or local), as a string."""
    return os.fspath(as_path(path).parent)


def _quiet_clients() -> None:
    """gcsfs logs a traceback for every refused request before raising; our one line says it instead."""
    logging.getLogger("gcsfs").setLevel(logging.CRITICAL)
    logging.getLogger("fsspec").setLevel(logging.CRITICAL)


# ---------------------------------------------------------------------------------------- errors
def bucket_of(url: str) -> str:
    return url.split("://", 1)[1].split("/", 1)[0]


def url_error(url: str, exc: BaseException, writing: bool = False) -> D2VError:
    """One line for what reading (or `writing`) `url` raised: credentials, bucket, object, refusal."""
    code = getattr(exc, "code", None)
    text = str(exc)
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(exc).__name__)
    if _is_auth_error(exc) or code == 401 or "UNAUTHENTICATED" in text:
        return D2VError(f"{url}: no credentials for {url.split('://')[0]}:// ({first[:240]}); {CREDENTIALS_HINT}")
    refused = code == 403 or isinstance(exc, PermissionError) or text.startswith("Forbidden")
    if refused or "PERMISSION_DENIED" in text:
        reason = next((line.strip() for line in text.splitlines()[1:] if line.strip()), first)
        if writing:
            return D2VError(f"{url}: the bucket refuses writes ({reason[:200]})")
        return D2VError(f"{url}: access refused ({reason[:200]})")
    if isinstance(exc, FileNotFoundError) or code == 404 or "NOT_FOUND" in text:
        if not bucket_exists(url):
            return D2VError(f"{url}: no such bucket {bucket_of(url)!r}")
        return D2VError(f"{url}: no such file or object")
    return D2VError(f"{url}: cannot {'write' if writing else 'read'} ({type(exc).__name__}: {first[:200]})")


def _is_auth_error(exc: BaseException) -> bool:
    try:
        import google.auth.exceptions as gae
    except ImportError:  # pragma: no cover - google-auth comes with gcsfs
        return False
    return isinstance(exc, gae.GoogleAuthError)


def bucket_exists(url: str) -> bool:
    """Whether the bucket of `url` exists (a refusal to say counts as existing: the caller reports that)."""
    scheme = url.split("://", 1)[0]
    try:
        return bool(epath.Path(f"{scheme}://{bucket_of(url)}").exists())
    except FileNotFoundError:
        return False
    except Exception:  # noqa: BLE001 - any other answer: the bucket is there, or we cannot tell
        return True


@contextlib.contextmanager
def reporting(url: str | os.PathLike, writing: bool = False) -> Iterator[None]:
    """Storage errors inside the block become `url_error`'s one line (local paths: unchanged)."""
    try:
        yield
    except D2VError:
        raise
    except Exception as e:
        if not is_url(url):
            raise
        raise url_error(os.fspath(url), e, writing) from None


def check_writable(url: str | os.PathLike) -> None:
    """Write and delete a probe object under the directory `url`: a run fails at once, in one line,
    on a missing bucket, missing credentials or a bucket that refuses writes, not at its first save."""
    if not is_url(url):
        return
    probe = as_path(url) / f".d2v-write-check-{os.getpid()}"
    with reporting(os.fspath(url), writing=True):
        probe.write_bytes(b"")
        probe.unlink()


# ---------------------------------------------------------------------------------------- reading
def read_bytes(path: str | os.PathLike) -> bytes:
    """The bytes of a local file or an object (errors: `D2VError` for URLs, `OSError` for local files)."""
    with reporting(path):
        return as_path(path).read_bytes()


_LOCAL_COPIES: dict[str, str] = {}
_LOCAL_ROOT: list[str] = []


def _local_root() -> str:
    if not _LOCAL_ROOT:
        root = tempfile.mkdtemp(prefix="d2v-url-")
        atexit.register(shutil.rmtree, root, True)
        _LOCAL_ROOT.append(root)
    return _LOCAL_ROOT[0]


def localize(path: str | os.PathLike) -> str:
    """A local path holding what `path` holds: `path` itself when local, else a downloaded copy of the
    object, or of every object under the directory URL (once per process; removed at exit)."""
    name = os.fspath(path)
    if not is_url(name):
        return name
    name = name.rstrip("/")
    if name in _LOCAL_COPIES:
        return _LOCAL_COPIES[name]
    src = as_path(name)
    with reporting(name):
        if src.is_file():
            dst = Path(tempfile.mkdtemp(dir=_local_root())) / src.name
            dst.write_bytes(src.read_bytes())
        elif src.is_dir():
            dst = Path(tempfile.mkdtemp(dir=_local_root())) / src.name
            _download_tree(src, dst)
        else:
            raise FileNotFoundError(name)
    _LOCAL_COPIES[name] = os.fspath(dst)
    return os.fspath(dst)


def _download_tree(src: epath.Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for child in src.iterdir():
        if child.is_dir():
            _download_tree(child, dst / child.name)
        else:
            (dst / child.name).write_bytes(child.read_bytes())


# ---------------------------------------------------------------------------------------- writing
def _files(root: Path) -> list[str]:
    return sorted(os.path.relpath(p, root) for p in root.rglob("*") if p.is_file())


def _objects(url: epath.Path) -> list[epath.Path]:
    out = []
    for child in url.iterdir():
        out.extend(_objects(child) if child.is_dir() else [child])
    return out


def publish_dir(local: Path, url: str, replace: bool = False) -> None:
    """Upload the directory `local` to `url` so that it is never seen half-written.

    An object store has no rename. Each object appears whole or not at all, so the order carries the
    atomicity: an existing directory first loses its `COMMIT_LAST` file (no reader takes it for a model
    any more), then its other objects; the new files follow, the `COMMIT_LAST` one last. A reader
    (ours, transformers) that finds the weights file finds every other file beside it.
    """
    dst = as_path(url)
    with reporting(url, writing=True):
        if replace and dst.is_dir():
            old = _objects(dst)
            for obj in sorted(old, key=lambda p: p.name not in COMMIT_LAST):
                obj.unlink()
        names = _files(local)
        for rel in sorted(names, key=lambda r: (os.path.basename(r) in COMMIT_LAST, r)):
            target = dst.joinpath(*rel.split(os.sep))
            target.write_bytes((local / rel).read_bytes())


def is_nonempty_dir(path: str | os.PathLike) -> bool:
    p = as_path(path)
    with reporting(path):
        return p.is_dir() and any(True for _ in p.iterdir())
