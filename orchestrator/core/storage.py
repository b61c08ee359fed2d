"""The one place that turns a URL plus options into a filesystem.

``s3://`` goes through s3fs with an optional custom endpoint (a local moto or
MinIO server, or any S3-compatible store); ``file://``, plain paths and every
other fsspec protocol work the same. Credentials come from ``StorageOptions``
or the standard AWS environment / instance role, never from code, and
``redact`` strips them from any text that could reach a log or an exception.

Retrying has two layers, neither of which reads error text. botocore retries each S3
request itself (``retries.mode`` standard or adaptive: exponential backoff with jitter,
``max_attempts`` per request). Above it, every read and write here is retried as a whole
(which also covers a body cut off mid-download, which botocore never sees) with full-jitter
backoff until ``retry_budget_s`` (60 s by default) is spent, when botocore's own checkers,
s3fs's list of retryable types or a connection/timeout type say the error is transient. A
missing object, bucket or a permission problem fails at once with an error that names the
URL; an endpoint that refuses connections, once the budget is spent, is reported as
unreachable, naming the endpoint.
"""

from __future__ import annotations

import logging
import os
import posixpath
import time
from dataclasses import dataclass, field

import fsspec

from orchestrator.core import retry
from orchestrator.core.errors import USER_MISTAKE, FlowppError
from orchestrator.core.redact import redact, strip_userinfo

log = logging.getLogger(__name__)

_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID")


class StorageError(FlowppError, RuntimeError):
    """A storage operation failed; the message names the URL and never a credential."""


class StorageNotFoundError(StorageError, FileNotFoundError):
    """A missing object or bucket: the URL the user gave names nothing (exit code 2)."""

    exit_code = USER_MISTAKE


class StorageTransientError(StorageError):
    """Still failing after every retry."""


class StorageUnreachableError(StorageTransientError):
    """The endpoint refused or timed out every connection for the whole retry budget; names it."""


class PreconditionFailed(StorageError):
    """A conditional write or delete found the object other than expected: it exists (a create),
    or it changed or vanished since it was read (S3's 412 Precondition Failed)."""


@dataclass(frozen=True)
class StorageOptions:
    endpoint_url: str | None = None
    """S3-compatible endpoint (e.g. http://127.0.0.1:9000); default: AWS_ENDPOINT_URL or AWS itself."""
    region: str | None = None
    anon: bool = False
    max_attempts: int = 3
    """botocore's attempts per S3 request (its ``total_max_attempts``), before this module retries."""
    retry_mode: str = "standard"
    """botocore's retry mode: ``standard`` or ``adaptive`` (adds client-side rate limiting)."""
    retry_budget_s: float = 60.0
    """Total time a read or write keeps being retried on transient errors before it fails."""
    backoff_s: float = 0.2
    """Cap of the first retry delay; the cap doubles each time (to 10 s), the delay is uniform below it."""
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0
    key: str | None = field(default=None, repr=False)
    """Access key; normally left unset so that the AWS environment or instance role is used."""
    secret: str | None = field(default=None, repr=False)

    def resolved_endpoint(self) -> str | None:
        return self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")

    def fsspec_kwargs(self, protocol: str) -> dict:
        if protocol not in ("s3", "s3a"):
            return {}
        config = {
            "retries": {"mode": self.retry_mode, "total_max_attempts": max(1, self.max_attempts)},
            "connect_timeout": self.connect_timeout_s,
            "read_timeout": self.read_timeout_s,
        }
        kw: dict = {"anon": self.anon, "config_kwargs": config}
        if self.resolved_endpoint():
            kw["endpoint_url"] = self.resolved_endpoint()
        if self.region:
            kw["client_kwargs"] = {"region_name": self.region}
        if self.key:
            kw["key"] = self.key
        if self.secret:
            kw["secret"] = self.secret
        return kw

    def secrets(self) -> list[str]:
        values = [self.key, self.secret, *(os.environ.get(k) for k in _SECRET_ENV)]
        return [v for v in values if v and len(v) >= 4]


def protocol_of(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else "file"


_FS_CACHE: dict = {}
_BOTOCORE_LOADER = None


def _s3_session():
    """A new aiobotocore session whose botocore data loader is shared by the process tree.

    The loader holds the parsed S3 service model and endpoint rules: building an S3 client
    from a cold one takes 50-120 ms, from a warm one 4 ms. Every forked DataLoader worker
    opens its own client each epoch, and inherits the warm loader. Only the loader is shared;
    credentials, clients and connections stay with each session.
    """
    global _BOTOCORE_LOADER
    from aiobotocore.session import AioSession

    session = AioSession()
    if _BOTOCORE_LOADER is None:
        _BOTOCORE_LOADER = session.get_component("data_loader")
    else:
        session.register_component("data_loader", _BOTOCORE_LOADER)
    return session


def filesystem(url: str, options: StorageOptions | None = None):
    """(fs, path) for ``url``. s3 filesystems leave retrying to this module."""
    options = options or StorageOptions()
    protocol = protocol_of(url)
    cache_key = (protocol, options, os.getpid())
    if cache_key not in _FS_CACHE:
        kwargs = options.fsspec_kwargs(protocol)
        if protocol in ("s3", "s3a"):
            kwargs["session"] = _s3_session()
        fs = fsspec.filesystem(protocol, **kwargs)
        if hasattr(fs, "retries"):
            fs.retries = 1
        _FS_CACHE[cache_key] = fs
    fs = _FS_CACHE[cache_key]
    return fs, fs._strip_protocol(url)


def join(base: str, *parts: str) -> str:
    """Join URL parts; an absolute part (with a scheme or a leading /) wins."""
    out = base
    for part in parts:
        out = part if ("://" in part or part.startswith("/")) else posixpath.join(out, part)
    return out


def _causes(exc: BaseException):
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or cur.__context__


def _botocore_says_retry(exc: BaseException) -> bool:
    """botocore's own standard-mode checkers (transient status/code/exception, throttling)."""
    from types import SimpleNamespace

    from botocore.exceptions import ClientError
    from botocore.retries.standard import RetryContext, ThrottledRetryableChecker, TransientRetryableChecker

    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        ctx = RetryContext(1, parsed_response=exc.response, http_response=SimpleNamespace(status_code=status))
    else:
        ctx = RetryContext(1, caught_exception=exc)
    return TransientRetryableChecker().is_retryable(ctx) or ThrottledRetryableChecker().is_retryable(ctx)


def _is_transient(exc: BaseException) -> bool:
    """By type only: botocore's checkers, s3fs's retryable types, connection and timeout errors."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        from s3fs.core import S3_RETRYABLE_ERRORS as s3fs_retryable
    except ImportError:  # pragma: no cover - s3fs is a dependency
        s3fs_retryable = ()
    for cause in _causes(exc):
        if isinstance(cause, FileNotFoundError | PermissionError | IsADirectoryError | NotADirectoryError):
            return False
        if isinstance(cause, ClientError | BotoCoreError):
            return _botocore_says_retry(cause)
        if isinstance(cause, (ConnectionError, TimeoutError, *s3fs_retryable)):
            return True
    return False


def _is_unreachable(exc: BaseException) -> bool:
    """No connection could be made at all (refused, no route, connect timeout)."""
    from botocore.exceptions import ConnectTimeoutError, EndpointConnectionError

    return any(
        isinstance(c, EndpointConnectionError | ConnectTimeoutError | ConnectionRefusedError) for c in _causes(exc)
    )


def _endpoint_name(url: str, options: StorageOptions) -> str:
    endpoint = options.resolved_endpoint()
    if endpoint:
        return strip_userinfo(endpoint)
    return "the default AWS S3 endpoint" if protocol_of(url) in ("s3", "s3a") else protocol_of(url)


def _with_retries(what: str, url: str, options: StorageOptions, fn):
    """``fn()``, retried on transient errors with full-jitter backoff until ``retry_budget_s`` is spent;
    what fails comes out as a ``StorageError`` that names the URL (and the endpoint, when unreachable)."""
    started, attempts = time.monotonic(), [1]

    def warn(attempt: int, delay: float, left: float, exc: BaseException) -> None:
        attempts[0] = attempt + 1
        detail = redact(f"{type(exc).__name__}: {exc}", options.secrets())
        log.warning("%s %s: transient error, retry %d in %.2fs (%.0f s of the budget left): %s",
                    what, url, attempt, delay, left, detail)  # fmt: skip

    try:
        return retry.call(fn, budget_s=options.retry_budget_s, transient=_is_transient,
                          first_backoff_s=options.backoff_s, max_backoff_s=10.0, on_retry=warn)  # fmt: skip
    except PreconditionFailed:
        raise
    except Exception as exc:  # noqa: BLE001 - classified below
        if _precondition_failed(exc):
            raise PreconditionFailed(f"{what} {url}: the object is not as expected (a condition failed)") from None
        detail = redact(f"{type(exc).__name__}: {exc}", options.secrets())
        if isinstance(exc, FileNotFoundError):
            raise StorageNotFoundError(f"{what} {url}: not found ({detail})") from None
        if isinstance(exc, PermissionError):
            raise StorageError(f"{what} {url}: permission denied ({detail})") from None
        if not _is_transient(exc):
            raise StorageError(f"{what} {url}: {detail}") from None
        spent = f"{attempts[0]} attempts over {time.monotonic() - started:.1f} s"
        if _is_unreachable(exc):
            raise StorageUnreachableError(
                f"{what} {url}: the endpoint {_endpoint_name(url, options)} is unreachable "
                f"(still failing after {spent}: {detail})"
            ) from None
        raise StorageTransientError(f"{what} {url}: still failing after {spent} ({detail})") from None


def read_bytes(url: str, options: StorageOptions | None = None) -> bytes:
    options = options or StorageOptions()
    fs, path = filesystem(url, options)
    return _with_retries("reading", url, options, lambda: fs.cat_file(path))


def write_bytes(url: str, data: bytes, options: StorageOptions | None = None) -> None:
    options = options or StorageOptions()
    fs, path = filesystem(url, options)

    def put():
        if protocol_of(url) == "file":
            fs.makedirs(posixpath.dirname(path), exist_ok=True)
        fs.pipe_file(path, data)

    _with_retries("writing", url, options, put)


# -- conditional writes ---------------------------------------------------------------------
# An object changed only if it is as this process last saw it: S3's conditional requests
# (If-None-Match: * on a create, If-Match: ETag on a put or delete, 412 when the condition fails);
# on local files, a create by hard link (it fails if the name exists) and, for a replace or
# delete, a compare under an exclusive flock of a sidecar file. A version is the ETag on S3 and a
# hash of the bytes on files.

_CONDITION_CODES = {"PreconditionFailed", "ConditionalRequestConflict"}


def _precondition_failed(exc: BaseException) -> bool:
    from botocore.exceptions import ClientError

    for cause in _causes(exc):
        if isinstance(cause, PreconditionFailed):
            return True
        if isinstance(cause, ClientError):
            error = cause.response.get("Error", {})
            status = cause.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            return error.get("Code") in _CONDITION_CODES or status == 412
    return False


def _no_such_key(exc: BaseException) -> bool:
    """S3's answer that the key does not exist (also its answer to If-Match on a missing key)."""
    return any(getattr(c, "response", {}).get("Error", {}).get("Code") in ("NoSuchKey", "404") for c in _causes(exc))


def _is_s3(url: str) -> bool:
    return protocol_of(url) in ("s3", "s3a")


def _s3_call(fs, method: str, **kwargs):
    """One S3 request through the filesystem's own client (its loop and credentials); the response."""
    from fsspec.asyn import sync

    async def call():
        await fs.set_session()
        out = await getattr(fs.s3, method)(**kwargs)
        if "Body" in out:
            async with out["Body"] as body:
                out["Body"] = await body.read()
        return out

    return sync(fs.loop, call)


def _local_version(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()[:32]


LOCAL_LOCK_WAIT_S = 10.0
"""How long a local replace or delete waits for another process's compare-and-act (a few system
calls) before it fails with a transient error, retried within the retry budget."""


class _LocalLock:
    """An exclusive flock on ``PATH.flock`` for the compare-and-act of a local replace or delete,
    held for a few system calls only (the new bytes are written and synced before it is taken).
    A holder frozen inside that window (a stopped process) keeps others waiting ``wait_s`` at
    most: they then fail with a transient error instead of hanging."""

    def __init__(self, path: str, wait_s: float | None = None):
        self.path, self.wait_s = path + ".flock", LOCAL_LOCK_WAIT_S if wait_s is None else wait_s

    def __enter__(self):
        import fcntl

        os.makedirs(posixpath.dirname(self.path) or ".", exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + self.wait_s
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return self
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(self.fd)
                    raise TimeoutError(f"{self.path}: held by another process for over {self.wait_s:g} s") from None
                time.sleep(0.005)

    def __exit__(self, *exc):
        os.close(self.fd)  # closing releases the flock


def _local_current(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return _local_version(f.read())
    except FileNotFoundError:
        return None


def _local_stage(path: str, data: bytes) -> str:
    """``data`` written and synced beside ``path`` under a name of its own; returns that name."""
    import tempfile

    os.makedirs(posixpath.dirname(path) or ".", exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=posixpath.dirname(path) or ".", prefix=".tmp-cond-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


def read_versioned(url: str, options: StorageOptions | None = None) -> tuple[bytes, str] | None:
    """The object's bytes and version (its ETag on S3), or None if it does not exist."""
    options = options or StorageOptions()
    fs, path = filesystem(url, options)

    def read():
        if _is_s3(url):
            bucket, key, _ = fs.split_path(path)
            try:
                out = _s3_call(fs, "get_object", Bucket=bucket, Key=key)
            except Exception as exc:  # noqa: BLE001 - a missing key is an answer
                if _no_such_key(exc):
                    return None
                raise
            return out["Body"], out["ETag"]
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        return data, _local_version(data)

    return _with_retries("reading", url, options, read)


def create_exclusive(url: str, data: bytes, options: StorageOptions | None = None) -> str:
    """Write a new object; ``PreconditionFailed`` if one exists already. Returns its version."""
    options = options or StorageOptions()
    fs, path = filesystem(url, options)

    def create():
        if _is_s3(url):
            bucket, key, _ = fs.split_path(path)
            return _s3_call(fs, "put_object", Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")["ETag"]
        tmp = _local_stage(path, data)
        try:
            os.link(tmp, path)  # atomic, and fails if the name exists: no lock needed
        except FileExistsError:
            raise PreconditionFailed(f"creating {url}: it exists") from None
        finally:
            os.unlink(tmp)
        return _local_version(data)

    return _with_retries("creating", url, options, create)


def replace_if(url: str, data: bytes, version: str, options: StorageOptions | None = None) -> str:
    """Overwrite the object only if it is still at ``version``; ``PreconditionFailed`` if it
    changed or vanished. Returns the new version."""
    options = options or StorageOptions()
    fs, path = filesystem(url, options)

    def replace():
        if _is_s3(url):
            bucket, key, _ = fs.split_path(path)
            try:
                return _s3_call(fs, "put_object", Bucket=bucket, Key=key, Body=data, IfMatch=version)["ETag"]
            except Exception as exc:  # noqa: BLE001 - S3 answers 404 to If-Match on a missing key
                if _no_such_key(exc):
                    raise PreconditionFailed(f"replacing {url}: it vanished") from None
                raise
        tmp = _local_stage(path, data)
        try:
            with _LocalLock(path):
                if _local_current(path) != version:
                    raise PreconditionFailed(f"replacing {url}: it changed")
                os.replace(tmp, path)
                tmp = ""
        finally:
            if tmp:
                os.unlink(tmp)
        return _local_version(data)

    return _with_retries("replacing", url, options, replace)


def delete_if(url: str, version: str, options: StorageOptions | None = None) -> None:
    """Delete the object only if it is still at ``version``; ``PreconditionFailed`` if it changed.
    A missing object is no error (it is gone either way)."""
    options = options or StorageOptions()
    fs, path = filesystem(url, options)

    def delete():
        if _is_s3(url):
            bucket, key, _ = fs.split_path(path)
            _s3_call(fs, "delete_object", Bucket=bucket, Key=key, IfMatch=version)
            return
        with _LocalLock(path):
            current = _local_current(path)
            if current is not None and current != version:
                raise PreconditionFailed(f"deleting {url}: it changed")
            if current is not None:
                os.unlink(path)

    _with_retries("deleting", url, options, delete)


def honours_conditions(prefix: str, options: StorageOptions | None = None) -> bool:
    """Whether the store under ``prefix`` enforces conditional writes: a probe object is created,
    created again (must fail), replaced at a wrong version (must fail), then deleted."""
    import uuid

    if protocol_of(prefix) == "file":
        return True  # local files: a hard link and an flock, always (no probe file left behind)
    options = options or StorageOptions()
    probe = join(prefix, f".probe-{uuid.uuid4().hex}")
    version = create_exclusive(probe, b"probe", options)
    try:
        for attempt in (lambda: create_exclusive(probe, b"again", options),
                        lambda: replace_if(probe, b"again", '"not-its-etag"', options)):  # fmt: skip
            try:
                attempt()
            except PreconditionFailed:
                continue
            return False
        return True
    finally:
        try:
            delete_if(probe, version, options)
        except PreconditionFailed:  # a store that ignored a condition rewrote it
            fs, path = filesystem(probe, options)
            fs.rm_file(path)


def object_size(url: str, options: StorageOptions | None = None) -> int | None:
    """Size in bytes, or None if the object does not exist."""
    options = options or StorageOptions()
    fs, path = filesystem(url, options)

    def size():
        try:
            return fs.size(path)
        except FileNotFoundError:
            return None

    return _with_retries("checking", url, options, size)


def check_bucket(url: str, options: StorageOptions | None = None) -> None:
    """Fail early, naming the bucket, if an s3:// URL's bucket does not exist."""
    if protocol_of(url) not in ("s3", "s3a"):
        return
    options = options or StorageOptions()
    fs, path = filesystem(url, options)
    bucket = path.split("/", 1)[0]

    def exists() -> bool:
        # not fs.exists(): it answers False for an endpoint it cannot reach, too
        try:
            fs.info(bucket)
        except FileNotFoundError:
            return False
        return True

    if not _with_retries("checking bucket of", url, options, exists):
        raise StorageNotFoundError(f"bucket s3://{bucket} does not exist (for {url})")


def register_webdataset_s3(options: StorageOptions | None = None) -> None:
    """Let plain ``webdataset.WebDataset("s3://...")`` read through this module's filesystem."""
    import importlib

    gopen = importlib.import_module("webdataset.gopen")  # the module, not the function of that name

    def open_s3(url, mode="rb", bufsize=8192, **kw):
        fs, path = filesystem(url, options)
        return fs.open(path, mode)

    gopen.gopen_schemes["s3"] = open_s3


def pyarrow_filesystem(url: str, options: StorageOptions | None = None):
    """(pyarrow filesystem or None, path) for Ray's ``RunConfig(storage_path=...)``.

    Local paths become absolute; s3:// gets an explicit S3FileSystem when a custom
    endpoint is set (credentials still from the environment or instance role).
    """
    options = options or StorageOptions()
    protocol = protocol_of(url)
    if protocol == "file":
        path = url.removeprefix("file://")
        return None, os.path.abspath(path)
    endpoint = options.resolved_endpoint()
    if protocol in ("s3", "s3a") and endpoint:
        from pyarrow import fs as pafs

        scheme, _, host = endpoint.partition("://")
        s3 = pafs.S3FileSystem(
            endpoint_override=host,
            scheme=scheme or "https",
            region=options.region or "us-east-1",
            access_key=options.key,
            secret_key=options.secret,
            anonymous=options.anon,
        )
        return s3, url.split("://", 1)[1]
    return None, url
