"""The one place that turns a URL plus options into a filesystem.

``s3://`` goes through s3fs with an optional custom endpoint (a local moto or
MinIO server, or any S3-compatible store); ``file://``, plain paths and every
other fsspec protocol work the same. Credentials come from ``StorageOptions``
or the standard AWS environment / instance role, never from code, and
``redact`` strips them from any text that could reach a log or an exception.

Reads and writes are retried with exponential backoff on transient errors
(connection resets, 5xx, SlowDown, timeouts); a missing object, bucket or a
permission problem fails at once with an error that names the URL.
"""

from __future__ import annotations

import logging
import os
import posixpath
import time
from dataclasses import dataclass, field

import fsspec

from orchestrator.errors import USER_MISTAKE, FlowppError

log = logging.getLogger(__name__)

_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID")
_TRANSIENT_MARKERS = (
    "SlowDown",
    "reduce your request rate",
    "ServiceUnavailable",
    "InternalError",
    "RequestTimeout",
    "Throttl",
    "Connection reset",
    "ConnectionReset",
    "Connection aborted",
    "Server disconnected",
    "500",
    "502",
    "503",
    "504",
    "timed out",
    "Timeout",
    "EndpointConnectionError",
    "ClientPayloadError",
    "IncompleteRead",
    "Connection closed",
)


class StorageError(FlowppError, RuntimeError):
    """A storage operation failed; the message names the URL and never a credential."""


class StorageNotFoundError(StorageError, FileNotFoundError):
    """A missing object or bucket: the URL the user gave names nothing (exit code 2)."""

    exit_code = USER_MISTAKE


class StorageTransientError(StorageError):
    """Still failing after every retry."""


@dataclass(frozen=True)
class StorageOptions:
    endpoint_url: str | None = None
    """S3-compatible endpoint (e.g. http://127.0.0.1:9000); default: AWS_ENDPOINT_URL or AWS itself."""
    region: str | None = None
    anon: bool = False
    max_attempts: int = 5
    """Attempts per read or write before a transient error becomes fatal."""
    backoff_s: float = 0.2
    """First retry delay; doubles each attempt (with jitter-free, deterministic timing)."""
    key: str | None = field(default=None, repr=False)
    """Access key; normally left unset so that the AWS environment or instance role is used."""
    secret: str | None = field(default=None, repr=False)

    def resolved_endpoint(self) -> str | None:
        return self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")

    def fsspec_kwargs(self, protocol: str) -> dict:
        if protocol not in ("s3", "s3a"):
            return {}
        kw: dict = {"anon": self.anon, "config_kwargs": {"retries": {"max_attempts": 1, "mode": "standard"}}}
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


def redact(text: str, options: StorageOptions | None = None) -> str:
    """``text`` with every known credential value replaced by ***."""
    for secret in (options or StorageOptions()).secrets():
        text = text.replace(secret, "***")
    return text


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


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, FileNotFoundError | PermissionError | IsADirectoryError | NotADirectoryError):
        return False
    if isinstance(exc, ConnectionError | TimeoutError):
        return True
    text = f"{type(exc).__name__}: {exc}"
    return any(marker in text for marker in _TRANSIENT_MARKERS)


def _with_retries(what: str, url: str, options: StorageOptions, fn):
    delay = options.backoff_s
    for attempt in range(1, options.max_attempts + 1):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - classified below
            detail = redact(f"{type(exc).__name__}: {exc}", options)
            if isinstance(exc, FileNotFoundError):
                raise StorageNotFoundError(f"{what} {url}: not found ({detail})") from None
            if isinstance(exc, PermissionError):
                raise StorageError(f"{what} {url}: permission denied ({detail})") from None
            if not _is_transient(exc):
                raise StorageError(f"{what} {url}: {detail}") from None
            if attempt == options.max_attempts:
                raise StorageTransientError(
                    f"{what} {url}: still failing after {attempt} attempts ({detail})"
                ) from None
            log.warning(
                "%s %s: transient error, retry %d/%d in %.1fs: %s",
                what,
                url,
                attempt,
                options.max_attempts - 1,
                delay,
                detail,
            )
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


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
