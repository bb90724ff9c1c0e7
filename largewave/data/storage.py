"""Where shard sets live: local folders, http(s) prefixes, S3 buckets and ``pipe:`` commands.

A shard set's *root* (``data.shards``, ``data.codes``) names a folder of objects — the tar shards,
``manifest.json`` and, for code sets, receipts. Four kinds of root are understood:

==========================================  =========  =============================================
root                                        access     how
==========================================  =========  =============================================
``data/piano/audio``, ``/abs/path``,        read/write the filesystem (a shared one on a cluster)
``file:///abs/path``
``s3://bucket/prefix``                      read/write boto3; credentials and endpoint the AWS way
``https://host/prefix``, ``http://…``       read       urllib (HTTP GET of ``root/name``)
``pipe:CMD … {name} …``                     read       a shell command that writes the object named
                                                       ``{name}`` to its standard output
==========================================  =========  =============================================

S3-compatible servers (MinIO, Ceph, a cloud's own) are reached through the standard AWS settings:
``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` for the endpoint, ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` or a profile for credentials, ``AWS_DEFAULT_REGION`` (default
``us-east-1``). Nothing S3-specific is stored in configs, so a run's signature does not depend on
which endpoint served its shards. A ``pipe:`` root must contain ``{name}``, e.g.
``pipe:aws s3 cp s3://bucket/piano/audio/{name} -`` or ``pipe:gsutil cat gs://bucket/audio/{name}``.

    store = open_store("s3://lw-data/piano/audio")
    store.read_bytes("manifest.json")
    store.put_file("train-000000.tar", "/tmp/train-000000.tar")
    with open_url(store.url("train-000000.tar")) as f: ...

Readers see :class:`NotFound` for an absent object and :class:`StorageError` for every other
failure (unreachable endpoint, no credentials, a command that fails), each with a message that
names the URL.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO, Iterator, Optional
from urllib.parse import urlparse


class StorageError(OSError):
    """A shard-set location that cannot be read or written (the message names the URL)."""


class NotFound(StorageError):
    """The object does not exist at that location."""


def kind(root: str) -> str:
    """``"local"``, ``"s3"``, ``"http"``, ``"pipe"`` or ``"other"`` (a scheme left to WebDataset)."""
    if root.startswith("pipe:"):
        return "pipe"
    if root.startswith("file:") or "://" not in root:
        return "local"
    scheme = root.split("://", 1)[0].lower()
    if scheme == "s3":
        return "s3"
    if scheme in ("http", "https"):
        return "http"
    return "other"


def is_remote(root: str) -> bool:
    return kind(root) != "local"


def local_path(root: str) -> str:
    return urlparse(root).path if root.startswith("file:") else root


# --------------------------------------------------------------------------------------------
# S3
# --------------------------------------------------------------------------------------------

_S3 = {"pid": None, "client": None}


def s3_endpoint() -> Optional[str]:
    """The S3 endpoint from the environment (``AWS_ENDPOINT_URL_S3``, then ``AWS_ENDPOINT_URL``), or None."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def s3_client():
    """One boto3 S3 client per process (clients are not shared across fork)."""
    if _S3["client"] is not None and _S3["pid"] == os.getpid():
        return _S3["client"]
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise StorageError("s3:// shard sets need boto3: pip install boto3") from None
    client = boto3.session.Session().client(
        "s3", endpoint_url=s3_endpoint(),
        region_name=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        config=Config(retries={"max_attempts": 4, "mode": "standard"}, connect_timeout=15, read_timeout=120))
    _S3.update(pid=os.getpid(), client=client)
    return client


def _split_s3(url: str) -> tuple[str, str]:
    p = urlparse(url)
    if not p.netloc:
        raise StorageError(f"{url}: an S3 URL is s3://bucket/key")
    return p.netloc, p.path.lstrip("/")


def _s3_error(url: str, e: BaseException) -> StorageError:
    """A boto3 exception as a StorageError that says what to do."""
    name = type(e).__name__
    code = ""
    resp = getattr(e, "response", None)
    if isinstance(resp, dict):
        code = str(resp.get("Error", {}).get("Code", ""))
    if code in ("404", "NoSuchKey", "NotFound"):
        return NotFound(f"{url}: no such object")
    if code == "NoSuchBucket":
        return StorageError(f"{url}: the bucket does not exist")
    if name in ("NoCredentialsError", "PartialCredentialsError"):
        return StorageError(f"{url}: no AWS credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                            "or AWS_PROFILE)")
    if name in ("EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError"):
        where = s3_endpoint() or "the AWS default endpoint"
        return StorageError(f"{url}: cannot reach {where} ({e}); set AWS_ENDPOINT_URL_S3 for an "
                            "S3-compatible server")
    if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
        return StorageError(f"{url}: access denied ({code}); check the credentials and the bucket policy")
    return StorageError(f"{url}: {name}: {e}")


# --------------------------------------------------------------------------------------------
# Reading one URL
# --------------------------------------------------------------------------------------------


class _PipeReader:
    """The standard output of a shell command; a non-zero exit is an error at close."""

    def __init__(self, url: str):
        self.url = url
        self.cmd = url[len("pipe:"):]
        self.proc = subprocess.Popen(self.cmd, shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def read(self, n: int = -1) -> bytes:
        return self.proc.stdout.read(n)

    def close(self, check: bool = True) -> None:
        if self.proc.poll() is None and not check:
            self.proc.kill()
        self.proc.stdout.close()
        err = self.proc.stderr.read().decode(errors="replace").strip()
        self.proc.stderr.close()
        rc = self.proc.wait()
        if check and rc != 0:
            tail = err.splitlines()[-1] if err else "no message"
            raise StorageError(f"{self.url}: the command exited with status {rc} ({tail})")


@contextlib.contextmanager
def open_url(url: str) -> Iterator[IO[bytes]]:
    """Open one object for reading, whatever its kind (see the module docstring)."""
    k = kind(url)
    if k == "local":
        path = local_path(url)
        try:
            f = open(path, "rb")
        except FileNotFoundError:
            raise NotFound(f"{path}: no such file") from None
        with f:
            yield f
    elif k == "s3":
        bucket, key = _split_s3(url)
        try:
            body = s3_client().get_object(Bucket=bucket, Key=key)["Body"]
        except StorageError:
            raise
        except Exception as e:  # botocore's exceptions: translated into what to do
            raise _s3_error(url, e) from None
        try:
            yield body
        finally:
            body.close()
    elif k == "http":
        try:
            r = urllib.request.urlopen(url, timeout=60)
        except urllib.error.HTTPError as e:
            if e.code == 404:
                raise NotFound(f"{url}: HTTP 404") from None
            raise StorageError(f"{url}: HTTP {e.code} {e.reason}") from None
        except (urllib.error.URLError, OSError) as e:
            raise StorageError(f"{url}: cannot fetch ({getattr(e, 'reason', e)})") from None
        with r:
            yield r
    elif k == "pipe":
        p = _PipeReader(url)
        ok = False
        try:
            yield p
            ok = True
        finally:
            p.close(check=ok)
    else:
        from webdataset.gopen import gopen

        try:
            f = gopen(url, "rb")
        except Exception as e:
            raise StorageError(f"{url}: cannot open ({e})") from None
        with f:
            yield f


def download(url: str, dest: str | os.PathLike, progress=None) -> tuple[int, str]:
    """Stream the object at ``url`` into the file ``dest``; returns (bytes, sha256 hex digest).
    ``progress``, when given, is called with the size of each block written."""
    import hashlib

    h = hashlib.sha256()
    n = 0
    with open_url(url) as src, open(dest, "wb") as out:
        while block := src.read(1 << 22):
            h.update(block)
            out.write(block)
            n += len(block)
            if progress is not None:
                progress(len(block))
    return n, h.hexdigest()


def read_url(url: str) -> bytes:
    """The whole object at ``url`` (for small ones: manifests, receipts)."""
    try:
        with open_url(url) as f:
            return f.read()
    except StorageError:
        raise
    except Exception as e:  # a stream that failed half-way (network reset, …)
        raise StorageError(f"{url}: read failed ({type(e).__name__}: {e})") from None


# --------------------------------------------------------------------------------------------
# A root: a folder of objects
# --------------------------------------------------------------------------------------------


class Store:
    """The objects under one root. Subclasses: :class:`LocalStore`, :class:`S3Store`,
    :class:`ReadOnlyStore` (http(s), ``pipe:``, other WebDataset schemes)."""

    writable = False

    def __init__(self, root: str):
        self.root = root

    def url(self, name: str) -> str:
        return self.root.rstrip("/") + "/" + name

    def read_bytes(self, name: str) -> bytes:
        return read_url(self.url(name))

    def size(self, name: str) -> Optional[int]:
        """Bytes of object ``name``, or None when it does not exist (None also where unknown)."""
        return None

    def names(self) -> Optional[list[str]]:
        """Object names under the root (one level), or None where the kind cannot list."""
        return None

    def _refuse(self, what: str):
        raise StorageError(f"{self.root}: {kind(self.root)} locations are read-only here ({what}); "
                           "write to a local folder or an s3:// prefix")

    def checksum(self, name: str) -> Optional[str]:
        """The sha256 of object ``name`` where it is known cheaply (local: computed; S3: the
        ``sha256`` metadata that :meth:`put_file` stores), else None."""
        return None

    def put_file(self, name: str, path: str | os.PathLike, sha256: Optional[str] = None) -> None:
        self._refuse(f"writing {name}")

    def put_bytes(self, name: str, data: bytes) -> None:
        self._refuse(f"writing {name}")

    def delete(self, name: str) -> None:
        self._refuse(f"deleting {name}")


class LocalStore(Store):
    writable = True

    def __init__(self, root: str):
        super().__init__(root)
        self.folder = Path(local_path(root))

    def url(self, name: str) -> str:
        return str(self.folder / name)

    def size(self, name: str) -> Optional[int]:
        try:
            return (self.folder / name).stat().st_size
        except FileNotFoundError:
            return None

    def names(self) -> Optional[list[str]]:
        return sorted(p.name for p in self.folder.iterdir()) if self.folder.is_dir() else []

    def checksum(self, name: str) -> Optional[str]:
        from largewave.data.manifest import sha256_file

        p = self.folder / name
        return sha256_file(p) if p.is_file() else None

    def put_file(self, name: str, path: str | os.PathLike, sha256: Optional[str] = None) -> None:
        """Copy ``path`` in under a temporary name, then rename: a reader never sees half a file."""
        self.folder.mkdir(parents=True, exist_ok=True)
        dest = self.folder / name
        if Path(path).resolve() == dest.resolve():
            return
        tmp = dest.with_name(f".{name}.{os.getpid()}.tmp")
        try:
            shutil.copyfile(path, tmp)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)

    def put_bytes(self, name: str, data: bytes) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        dest = self.folder / name
        tmp = dest.with_name(f".{name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)

    def delete(self, name: str) -> None:
        (self.folder / name).unlink(missing_ok=True)


class S3Store(Store):
    """``s3://bucket/prefix``. A PUT is atomic (a reader sees the old object or the new one)."""

    writable = True

    def __init__(self, root: str):
        super().__init__(root.rstrip("/"))
        self.bucket, self.prefix = _split_s3(self.root + "/")
        self.prefix = self.prefix.rstrip("/")

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def _call(self, name: str, fn, **kw):
        try:
            return fn(Bucket=self.bucket, **kw)
        except StorageError:
            raise
        except Exception as e:
            raise _s3_error(self.url(name), e) from None

    def size(self, name: str) -> Optional[int]:
        try:
            return int(self._call(name, s3_client().head_object, Key=self._key(name))["ContentLength"])
        except NotFound:
            return None

    def names(self) -> Optional[list[str]]:
        out: list[str] = []
        token = None
        while True:
            kw = {"Prefix": self._key(""), "Delimiter": "/"}
            if token:
                kw["ContinuationToken"] = token
            r = self._call("", s3_client().list_objects_v2, **kw)
            out += [o["Key"].rsplit("/", 1)[-1] for o in r.get("Contents", [])]
            if not r.get("IsTruncated"):
                return sorted(out)
            token = r.get("NextContinuationToken")

    def checksum(self, name: str) -> Optional[str]:
        try:
            head = self._call(name, s3_client().head_object, Key=self._key(name))
        except NotFound:
            return None
        return head.get("Metadata", {}).get("sha256")

    def put_file(self, name: str, path: str | os.PathLike, sha256: Optional[str] = None) -> None:
        extra = {"Metadata": {"sha256": sha256}} if sha256 else None
        try:
            s3_client().upload_file(os.fspath(path), self.bucket, self._key(name), ExtraArgs=extra)
        except StorageError:
            raise
        except Exception as e:
            raise _s3_error(self.url(name), e) from None

    def put_bytes(self, name: str, data: bytes) -> None:
        self._call(name, s3_client().put_object, Key=self._key(name), Body=data)

    def delete(self, name: str) -> None:
        self._call(name, s3_client().delete_object, Key=self._key(name))


class PipeStore(Store):
    """``pipe:CMD`` with ``{name}`` where the object's name goes (read-only)."""

    def __init__(self, root: str):
        super().__init__(root)
        if "{name}" not in root:
            raise StorageError(f"{root!r}: a pipe: location needs {{name}} where the object's name goes, "
                               "e.g. 'pipe:aws s3 cp s3://bucket/set/{name} -'")

    def url(self, name: str) -> str:
        return self.root.replace("{name}", name)  # names are the set's own ([A-Za-z0-9._-])


def open_store(root: str | os.PathLike) -> Store:
    """The :class:`Store` for a root (see the module docstring for the kinds)."""
    root = os.fspath(root)
    k = kind(root)
    if k == "local":
        return LocalStore(root)
    if k == "s3":
        return S3Store(root)
    if k == "pipe":
        return PipeStore(root)
    return Store(root)
