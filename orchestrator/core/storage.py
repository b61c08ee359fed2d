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
    except Exception as exc:  # noqa: BLE001 - classified below
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
