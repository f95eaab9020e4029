"""A real GCS JSON API server for the tests: `gcp-storage-emulator`, in-process, in memory.

    server, env = start_emulator()          # env: what a client process needs before it imports
    subprocess.run([...], env={**os.environ, **env})
    server.stop()

Two things are added to the emulator:
- its media downloads send no `x-goog-generation` header, which tensorstore's OCDBT reads (orbax's
  format) need ("Malformed StorageGeneration" otherwise): the download handler is wrapped to set it
  (both routes: `/download/...` and the JSON API's `?alt=media`, which tensorstore uses);
- two buckets that answer like real GCS does to a user it refuses: `PRIVATE_BUCKET` answers every
  request with 401 (what an anonymous caller, i.e. no credentials, gets from a private bucket) and
  `READ_ONLY_BUCKET` answers writes with 403 (a bucket this account may read but not write).
  The error bodies are GCS's own wording.

The emulator ignores generation preconditions, so these tests check single-writer behaviour only.
"""

from __future__ import annotations

import functools
import socket
from http import HTTPStatus
from typing import Any

BUCKET = "bucket"
PRIVATE_BUCKET = "private-bucket"
READ_ONLY_BUCKET = "read-only-bucket"
_WRITES = ("POST", "PUT", "PATCH", "DELETE")


def client_env(port: int) -> dict[str, str]:
    """What a process needs in its environment *before* importing jax/tensorstore/gcsfs to use the server."""
    url = f"http://localhost:{port}"
    return {
        "STORAGE_EMULATOR_HOST": url,  # gcsfs, google-cloud-storage
        "TENSORSTORE_GCS_HTTP_URL": url,  # tensorstore (orbax)
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "dummy",  # tensorstore: no credential lookup
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # gcsfs: no 60 s gRPC bucket-type probe
        "EPATH_USE_TF": "false",  # etils.epath: fsspec/gcsfs, not tf.io.gfile (which ignores the emulator)
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _refusing(handler: Any) -> Any:
    """`handler` with PRIVATE_BUCKET and READ_ONLY_BUCKET answering as GCS refuses a caller."""

    @functools.wraps(handler)
    def wrapped(request, response, storage, *args, **kwargs):
        bucket = (request.params or {}).get("bucket_name")
        if bucket == PRIVATE_BUCKET:
            response.status = HTTPStatus.UNAUTHORIZED
            message = (
                "Anonymous caller does not have storage.objects.get access to the Google Cloud Storage object. "
                "Permission 'storage.objects.get' denied on resource (or it may not exist)."
            )
            response.json({"error": {"code": 401, "message": message, "errors": [{"reason": "required"}]}})
            return None
        if bucket == READ_ONLY_BUCKET and request.method in _WRITES:
            response.status = HTTPStatus.FORBIDDEN
            message = (
                "reader@example.iam.gserviceaccount.com does not have storage.objects.create access to the "
                "Google Cloud Storage object. Permission 'storage.objects.create' denied on resource."
            )
            response.json({"error": {"code": 403, "message": message, "errors": [{"reason": "forbidden"}]}})
            return None
        return handler(request, response, storage, *args, **kwargs)

    return wrapped


def _with_generation(download: Any) -> Any:
    """The emulator's download plus the `x-goog-generation` header real GCS sends (tensorstore needs it)."""

    @functools.wraps(download)
    def wrapped(request, response, storage, *args, **kwargs):
        download(request, response, storage, *args, **kwargs)
        if response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT):
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
            response["x-goog-generation"] = str(obj["generation"])
            response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))

    return wrapped


_patched = False


def _patch_handlers() -> None:
    global _patched
    if _patched:
        return
    from gcp_storage_emulator import server as emu
    from gcp_storage_emulator.handlers import objects

    original = objects.download
    objects.download = _with_generation(original)  # also what `objects.get` calls for `?alt=media` (tensorstore)
    for _, handlers in emu.HANDLERS:
        for method, fn in list(handlers.items()):
            handlers[method] = _refusing(objects.download if fn is original else fn)
    _patched = True


def start_emulator(port: int | None = None) -> tuple[Any, dict[str, str]]:
    """(server, client environment) of a fresh in-memory server with buckets BUCKET, PRIVATE_BUCKET and
    READ_ONLY_BUCKET."""
    import logging

    from gcp_storage_emulator.handlers import buckets
    from gcp_storage_emulator.server import create_server

    logging.getLogger("gcp_storage_emulator").setLevel(logging.CRITICAL)
    _patch_handlers()
    port = port or _free_port()
    server = create_server("localhost", port, in_memory=True, default_bucket=BUCKET)
    for name in (PRIVATE_BUCKET, READ_ONLY_BUCKET):
        buckets.create_bucket(name, server._storage)
    server.start()
    return server, client_env(port)


# ---------------------------------------------------------------------------------------- test-side client
# The test process talks to the server over its HTTP API with urllib: it never imports gcsfs or
# tensorstore, so their environment (client_env) only has to be right in the processes it starts.
class Bucket:
    """Upload, download and list objects of the emulator's BUCKET from the test process."""

    def __init__(self, env: dict[str, str], name: str = BUCKET) -> None:
        self.base = env["STORAGE_EMULATOR_HOST"]
        self.name = name

    def url(self, key: str) -> str:
        return f"gs://{self.name}/{key}"

    def put(self, key: str, data: bytes) -> str:
        import urllib.parse
        import urllib.request

        q = urllib.parse.urlencode({"uploadType": "media", "name": key})
        req = urllib.request.Request(f"{self.base}/upload/storage/v1/b/{self.name}/o?{q}", data=data, method="POST")
        req.add_header("Content-Type", "application/octet-stream")
        urllib.request.urlopen(req).read()
        return self.url(key)

    def get(self, key: str) -> bytes | None:
        import urllib.error
        import urllib.parse
        import urllib.request

        quoted = urllib.parse.quote(key, safe="")
        try:
            return urllib.request.urlopen(f"{self.base}/download/storage/v1/b/{self.name}/o/{quoted}?alt=media").read()
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return None
            raise

    def keys(self, prefix: str = "") -> list[str]:
        import json
        import urllib.parse
        import urllib.request

        out, token = [], None
        while True:
            q = {"prefix": prefix, **({"pageToken": token} if token else {})}
            page = json.loads(
                urllib.request.urlopen(f"{self.base}/storage/v1/b/{self.name}/o?{urllib.parse.urlencode(q)}").read()
            )
            out += [item["name"] for item in page.get("items", [])]
            token = page.get("nextPageToken")
            if not token:
                return sorted(out)

    def put_tree(self, local: Any, key: str) -> str:
        """Every file under the local directory `local` as objects under `key/`."""
        from pathlib import Path

        local = Path(local)
        for p in sorted(local.rglob("*")):
            if p.is_file():
                self.put(f"{key}/{p.relative_to(local).as_posix()}", p.read_bytes())
        return self.url(key)


# ---------------------------------------------------------------------------------------- fixture
def serve() -> Any:
    """The body of a test module's fixture: `yield from serve()` gives a running emulator with `.env` (the
    client environment), `.bucket` (a `Bucket` of BUCKET) and `.server`, stopped after the module."""
    from types import SimpleNamespace

    server, env = start_emulator()
    try:
        yield SimpleNamespace(server=server, env=env, bucket=Bucket(env))
    finally:
        server.stop()


if __name__ == "__main__":  # a server in its own process: `python tests/gcs_emulator.py PORT` (bench/gcs_read.py)
    import sys
    import time

    srv, _ = start_emulator(int(sys.argv[1]))
    print("ready", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        srv.stop()
