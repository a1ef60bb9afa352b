"""Where datasets, images and checkpoints live: a local directory or an S3-compatible prefix (``s3://bucket/prefix``).

A :class:`Store` is a "directory" addressed by ``/``-separated keys relative to its root. ``jpeglm prepare``
writes through one (shards uploaded as they are written, ``dataset.json`` last); data modules and sampling read
through one. :func:`open_store` picks :class:`LocalStore` for a path and :class:`S3Store` for an ``s3://`` URL.

S3 settings come from the standard AWS environment variables (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_ENDPOINT_URL``, ``AWS_DEFAULT_REGION``), or from :class:`S3Options` given in a recipe, which win.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from jpeglm.errors import UserError

__all__ = [
    "LocalStore",
    "S3Options",
    "S3Store",
    "Store",
    "cache_root",
    "fetch_dir",
    "fetch_inputs",
    "is_remote",
    "litdata_storage_options",
    "open_store",
    "scratch",
    "scratch_path",
]

CACHE_ENV = "JPEGLM_CACHE"
"""Environment variable naming the local cache of remote things (default ``~/.cache/jpeglm``)."""


def is_remote(path: str | Path) -> bool:
    """Whether ``path`` names object storage (``s3://...``) rather than a local path."""
    return isinstance(path, str) and path.startswith("s3://")


class Store:
    """A directory of objects addressed by ``/``-separated keys relative to :attr:`url`."""

    url: str

    def exists(self, key: str) -> bool:
        raise NotImplementedError

    def read_bytes(self, key: str) -> bytes:
        """The object's bytes; raises FileNotFoundError when there is none."""
        raise NotImplementedError

    def read_text(self, key: str) -> str:
        return self.read_bytes(key).decode()

    def write_bytes(self, key: str, data: bytes) -> None:
        """Write one object whole: a reader sees the old object or the new one, never part of one."""
        raise NotImplementedError

    def write_text(self, key: str, text: str) -> None:
        self.write_bytes(key, text.encode())

    def put_file(self, local: Path, key: str) -> None:
        """Store the local file ``local`` as ``key`` (whole, as :meth:`write_bytes`); ``local`` may be moved."""
        raise NotImplementedError

    def get_file(self, key: str, local: Path) -> None:
        """Copy object ``key`` to the local file ``local`` (its parent is created)."""
        raise NotImplementedError

    def list(self, prefix: str = "") -> list[str]:
        """Keys of every object under ``prefix`` (recursive), sorted."""
        raise NotImplementedError

    def delete(self, prefix: str) -> None:
        """Delete every object under ``prefix`` (nothing when there is none)."""
        raise NotImplementedError

    def child(self, key: str) -> str:
        """The URL or path of ``key``."""
        return f"{self.url.rstrip('/')}/{key}"


def scratch_path(path: Path) -> Path:
    """Where ``path`` is written before it is renamed into place: a hidden name of this host and process's own."""
    return path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def scratch(path: Path) -> bool:
    """Whether ``path`` is a temporary file (:func:`scratch_path`, and what boto3 appends to one while it
    downloads): not an object, whether its writer is still going or was killed."""
    return path.name.startswith(".") and ".tmp" in path.name


class LocalStore(Store):
    """A local directory: writes go to a temporary file renamed into place; :meth:`put_file` moves."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.url = str(self.root)

    def path(self, key: str) -> Path:
        return self.root / key

    def exists(self, key: str) -> bool:
        return self.path(key).exists()

    def read_bytes(self, key: str) -> bytes:
        return self.path(key).read_bytes()

    def write_bytes(self, key: str, data: bytes) -> None:
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        # A name of this process's own: two nodes writing one key at once on a shared file system each rename a
        # whole file of their own into place, and the last rename wins.
        tmp = scratch_path(target)
        try:
            tmp.write_bytes(data)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)

    def put_file(self, local: Path, key: str) -> None:
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(local, target)

    def get_file(self, key: str, local: Path) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.path(key), local)

    def list(self, prefix: str = "") -> list[str]:
        base = self.path(prefix) if prefix else self.root
        if base.is_file():
            return [prefix]
        if not base.is_dir():
            return []
        return sorted(p.relative_to(self.root).as_posix() for p in base.rglob("*") if p.is_file() and not scratch(p))

    def delete(self, prefix: str) -> None:
        target = self.path(prefix)
        if target.is_dir():
            shutil.rmtree(target, ignore_errors=True)
        elif target.exists():
            target.unlink()


@dataclass
class S3Options:
    """How to reach S3-compatible object storage; a field left None comes from the standard AWS environment.

    Give it in a recipe (``data: {init_args: {storage: {endpoint_url: ...}}}``) or on the command line
    (``--storage.endpoint_url``); keep secrets in the environment rather than in recipes.

    Args:
        endpoint_url: the server, e.g. ``http://minio:9000`` or ``https://<account>.r2.cloudflarestorage.com``
            (default ``AWS_ENDPOINT_URL``; unset: AWS itself).
        region: the region requests are signed for (default ``AWS_DEFAULT_REGION``, then ``AWS_REGION``;
            ``us-east-1`` for a custom endpoint).
        access_key_id: default ``AWS_ACCESS_KEY_ID`` (unset: boto3's own chain: profiles, instance roles).
        secret_access_key: default ``AWS_SECRET_ACCESS_KEY``.
    """

    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = field(default=None, repr=False)  # never printed (logs, errors)

    def resolved(self) -> S3Options:
        """These options with every unset field filled from the environment."""
        env = os.environ.get
        endpoint = self.endpoint_url or env("AWS_ENDPOINT_URL") or None
        region = self.region or env("AWS_DEFAULT_REGION") or env("AWS_REGION") or None
        return S3Options(
            endpoint_url=endpoint,
            region=region or ("us-east-1" if endpoint else None),
            access_key_id=self.access_key_id or env("AWS_ACCESS_KEY_ID") or None,
            secret_access_key=self.secret_access_key or env("AWS_SECRET_ACCESS_KEY") or None,
        )

    def client_kwargs(self) -> dict[str, str]:
        """Keyword arguments of ``boto3.client("s3", ...)`` for the resolved options (unset ones left out)."""
        options = self.resolved()
        kwargs = {
            "endpoint_url": options.endpoint_url,
            "region_name": options.region,
            "aws_access_key_id": options.access_key_id,
            "aws_secret_access_key": options.secret_access_key,
        }
        return {key: value for key, value in kwargs.items() if value}


def litdata_storage_options(options: S3Options | None = None) -> dict[str, str]:
    """litdata's ``StreamingDataset(storage_options=...)`` for these options (environment filled in).

    litdata 0.2.76 passes ``storage_options`` straight to ``boto3.Session().client("s3", config=..., **options)``
    (no s5cmd). It would download whole chunks through obstore when that is installed, which refuses a plain
    ``http://`` endpoint; this switches litdata to its boto3 client for chunks too, for the whole process
    (:func:`jpeglm._compat.boto3_chunk_downloads`), so every request goes to the endpoint given here.
    """
    from jpeglm._compat import boto3_chunk_downloads

    boto3_chunk_downloads()
    return (options or S3Options()).client_kwargs()


def _one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


class S3Store(Store):
    """An ``s3://bucket/prefix`` of an S3-compatible server, through boto3.

    Every object is written whole by one PUT (S3 makes an object visible only once it is complete), so a
    reader sees an old object or the new one. Failures a user can fix (credentials, a missing bucket, an
    endpoint that does not answer) raise :class:`~jpeglm.errors.UserError` with one line naming the URL;
    requests are retried up to 8 times (boto3's adaptive mode backs off when the server throttles), and a connect
    timeout of 3 s makes an endpoint that does not answer fail in about a minute (8 s when it refuses).

    Args:
        url: ``s3://bucket`` or ``s3://bucket/prefix``.
        options: endpoint, region and credentials (None: the AWS environment variables).

    Raises:
        UserError: the URL has no bucket.
    """

    page_size = 1000
    """Keys per listing request (S3's most)."""

    def __init__(self, url: str, options: S3Options | None = None) -> None:
        import boto3
        from botocore.config import Config

        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        if not bucket:
            raise UserError(f"{url}: no bucket in the URL; give s3://BUCKET/PREFIX")
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self.options = (options or S3Options()).resolved()
        # Adaptive retries ride out a busy server's throttling (503 SlowDown) and dropped connections at 128 nodes;
        # the short connect timeout still makes an endpoint that does not answer fail in well under a minute.
        config = Config(connect_timeout=3, read_timeout=60, retries={"max_attempts": 8, "mode": "adaptive"})
        self.client = boto3.session.Session().client("s3", config=config, **self.options.client_kwargs())

    def key(self, key: str) -> str:
        """The object key in the bucket of a key relative to the store."""
        return f"{self.prefix}/{key}".strip("/") if self.prefix else key.strip("/")

    @contextmanager
    def errors(self, key: str = "") -> Iterator[None]:
        """Turn boto3's failures a user can fix into one-line :class:`UserError` naming ``key``'s URL.

        A missing object becomes ``FileNotFoundError`` (the :class:`Store` contract).
        """
        from botocore import exceptions as boto

        url = self.child(key) if key else self.url
        try:
            yield
        except boto.ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            if code in ("NoSuchKey", "404", "NotFound"):
                raise FileNotFoundError(url) from e
            if code == "NoSuchBucket":
                raise UserError(f"{url}: bucket '{self.bucket}' does not exist") from e
            if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403", "Forbidden"):
                raise UserError(
                    f"{url}: access denied (check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY): {_one_line(e)}"
                ) from e
            raise UserError(f"{url}: {_one_line(e)}") from e
        except boto.NoCredentialsError as e:
            raise UserError(f"{url}: no credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY)") from e
        except (boto.EndpointConnectionError, boto.ConnectTimeoutError, boto.ConnectionClosedError) as e:
            endpoint = self.client.meta.endpoint_url
            raise UserError(f"{url}: cannot reach endpoint {endpoint} ({_one_line(e)})") from e

    def _first(self, prefix: str) -> str | None:
        """The first object key (in the bucket) that starts with ``prefix``, or None."""
        with self.errors(prefix.removeprefix(self.prefix).strip("/")):
            response = self.client.list_objects_v2(Bucket=self.bucket, Prefix=prefix, MaxKeys=1)
        contents = response.get("Contents") or []
        return contents[0]["Key"] if contents else None

    def exists(self, key: str) -> bool:
        """Whether ``key`` is an object, or a "directory" with objects under it."""
        full = self.key(key)
        return self._first(full) == full or self._first(f"{full}/" if full else "") is not None

    def read_bytes(self, key: str) -> bytes:
        with self.errors(key):
            return self.client.get_object(Bucket=self.bucket, Key=self.key(key))["Body"].read()

    def write_bytes(self, key: str, data: bytes) -> None:
        with self.errors(key):
            self.client.put_object(Bucket=self.bucket, Key=self.key(key), Body=data)

    def put_file(self, local: Path, key: str) -> None:
        """Upload ``local`` as ``key`` (whole: a multipart upload shows nothing until it completes), then delete
        ``local``, as :class:`LocalStore` moves it."""
        with self.errors(key):
            self.client.upload_file(str(local), self.bucket, self.key(key))
        Path(local).unlink()

    def get_file(self, key: str, local: Path) -> None:
        local = Path(local)
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = scratch_path(local)
        with self.errors(key):
            self.client.download_file(self.bucket, self.key(key), str(tmp))
        os.replace(tmp, local)

    def sizes(self, prefix: str = "") -> dict[str, int]:
        """``{key: size in bytes}`` of every object under ``prefix`` (recursive; paginated)."""
        full = self.key(prefix)
        found = {}
        with self.errors(prefix):
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=full, PaginationConfig={"PageSize": self.page_size}
            )
            for page in pages:
                for item in page.get("Contents") or []:
                    name = item["Key"]
                    if not full or name == full or name.startswith(full.rstrip("/") + "/"):
                        found[name[len(self.prefix) :].lstrip("/") if self.prefix else name] = item["Size"]
        return dict(sorted(found.items()))

    def list(self, prefix: str = "") -> list[str]:
        return list(self.sizes(prefix))

    def delete(self, prefix: str) -> None:
        keys = [self.key(key) for key in self.list(prefix)]
        for start in range(0, len(keys), 1000):  # the most one request deletes
            batch = {"Objects": [{"Key": key} for key in keys[start : start + 1000]], "Quiet": True}
            with self.errors(prefix):
                self.client.delete_objects(Bucket=self.bucket, Delete=batch)


def open_store(location: str | Path, options: S3Options | None = None) -> Store:
    """The store at ``location``: a local directory, or an ``s3://bucket/prefix`` (reached with ``options``)."""
    if is_remote(location):
        return S3Store(str(location), options)
    return LocalStore(Path(location).expanduser())


# ----------------------------------------------------------------------------------------------- local cache


def cache_root() -> Path:
    """Where remote things are cached locally: ``$JPEGLM_CACHE``, else ``~/.cache/jpeglm``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "jpeglm").expanduser()


def url_key(url: str) -> str:
    """A short, stable directory name for a URL."""
    return hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:20]


def fetch_dir(store: Store, keys: list[str], target: Path, extra: dict[str, bytes] | None = None) -> Path:
    """Copy the objects ``keys`` of ``store`` into the directory ``target`` (same relative layout), all or none.

    The objects land in a temporary sibling directory that is renamed to ``target`` once all are there, so a
    process never sees half a directory; when ``target`` exists already (another process, or an earlier call,
    fetched it) it is used as it is: give each version of the remote content its own ``target``. ``extra`` maps
    relative paths to bytes written there too (notes about the remote content, in the same all-or-none step).

    Raises:
        UserError: the store cannot be read (see :class:`S3Store`).
        FileNotFoundError: one of ``keys`` does not exist.
    """
    target = Path(target)
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        for key in keys:
            store.get_file(key, tmp / key)
        for name, data in (extra or {}).items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes(data)
        try:
            os.replace(tmp, target)
        except OSError:
            if not target.is_dir():  # not another process that got there first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def fetch_inputs(inputs: list[str], extensions: frozenset[str], options: S3Options | None = None) -> list[str]:
    """``inputs`` with every ``s3://`` URL replaced by a local copy (other inputs stay as they are).

    A URL naming an object becomes that file; a URL naming a prefix becomes a directory holding each object under
    it whose name ends with one of ``extensions`` (in its relative layout). Copies live under
    :func:`cache_root` ``/inputs``, keyed by the URL; an object already there with its size is not fetched again,
    and a copy of an object the store no longer lists is deleted, so the directory holds the current listing.

    Raises:
        UserError: the URL holds nothing (no such object, no such objects under the prefix) or cannot be read.
    """
    local = []
    for location in inputs:
        if not is_remote(location):
            local.append(location)
            continue
        bucket, _, prefix = location.removeprefix("s3://").partition("/")
        store, prefix = S3Store(f"s3://{bucket}", options), prefix.strip("/")
        sizes = store.sizes(prefix)
        base = cache_root() / "inputs" / url_key(location)
        if prefix and prefix in sizes:  # one object
            sizes = {prefix: sizes[prefix]}
            local.append(str(base / prefix))
        else:
            sizes = {key: size for key, size in sizes.items() if Path(key).suffix.lower() in extensions}
            local.append(str(base / prefix))
        if not sizes:
            raise UserError(f"{location}: no object there, and no {' '.join(sorted(extensions))} objects under it")
        for key, size in sizes.items():
            path = base / key
            if not (path.is_file() and path.stat().st_size == size):
                store.get_file(key, path)
        _prune(Path(local[-1]), {base / key for key in sizes})
    return local


def _prune(directory: Path, keep: set[Path]) -> None:
    """Delete the files under ``directory`` other than ``keep``: objects an earlier fetch copied that the store no
    longer lists (another process's download in progress, a :func:`scratch` file, is left alone)."""
    if not directory.is_dir():
        return
    for path in directory.rglob("*"):
        if path.is_file() and path not in keep and not scratch(path):
            path.unlink(missing_ok=True)
