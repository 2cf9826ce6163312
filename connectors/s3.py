"""The `s3` staging: gzip NDJSON files and a manifest per window in a bucket (AWS, MinIO, moto).

Each part file streams into S3 as it is compressed: its bytes collect in a buffer of
`multipart_chunk_bytes`; a file that stays below one chunk is sent with one `PutObject`, a
larger one becomes a multipart upload whose parts are sent as the buffer fills (and which is
aborted if the run fails). Memory per writer is about one chunk, whatever the window's size.
A crashed process can leave an incomplete multipart upload behind: a bucket lifecycle rule
(`AbortIncompleteMultipartUpload`) reclaims those.

boto3 is imported when the client is first needed; the client is built once per process for
every staging area with the same endpoint, region and keys (`connectors.shared`).
SDK errors become `TransientError` (throttling, 5xx, connection trouble, timeouts) or
`TerminalError` (access denied, no such bucket, bad keys, anything else), in one line.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any, BinaryIO, cast

from connectors.shared import Lease, lease
from connectors.staging import ObjectStaging, PartSink, normalize_prefix
from core.config import S3StagingConfig, resolve_secret
from core.errors import (
    ConfigError,
    StagedDataLostError,
    TerminalError,
    TransientError,
    WindowpipeError,
    one_line,
)
from core.retry import SDK_RETRIES, as_time_limit

TRANSIENT_ERROR_CODES = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestThrottledException",
        "TooManyRequestsException",
        "ProvisionedThroughputExceededException",
        "RequestLimitExceeded",
        "BandwidthLimitExceeded",
        "SlowDown",
        "RequestTimeout",
        "RequestTimeoutException",
        "InternalError",
        "ServiceUnavailable",
        "PriorRequestNotComplete",
    }
)
"""S3 error codes worth retrying (with any HTTP 429 or 5xx); every other code is terminal."""

DELETE_BATCH = 1000
"""S3's limit of keys per `DeleteObjects` request."""

CLIENT_RETRIES = {"mode": "standard", "total_max_attempts": SDK_RETRIES + 1}
"""botocore's own retries off: one attempt per request. (In a client `Config`, botocore reads
`max_attempts` as *retries*, so `{"max_attempts": 1}` would still mean two attempts;
`total_max_attempts` counts the first one.) Every retry is counted in core/retry.py's budget
instead; and botocore would take a soft time limit raised mid-request for an HTTPClientError
and retry it."""


def translate_s3_error(exc: Exception, action: str, where: str) -> WindowpipeError | None:
    """The windowpipe error for a botocore exception, or None if `exc` is not one.

    The message is one line naming the action, the object and the error code; never the
    credentials (botocore's messages do not carry them). A soft time limit, raw or wrapped by
    botocore into an HTTPClientError, is `StageTimeLimitError` (transient), never terminal.
    """
    from botocore import exceptions as bex

    limit = as_time_limit(exc, f"S3 {action} {where}")
    if limit is not None:
        return limit

    if isinstance(exc, bex.ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code") or "Unknown")
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        message = one_line(str(error.get("Message") or ""))
        text = f"S3 {action} {where} failed: {code} (HTTP {status})" + (
            f": {message}" if message else ""
        )
        transient = code in TRANSIENT_ERROR_CODES or status == 429 or status >= 500
        return (TransientError if transient else TerminalError)(text)
    transient_types: tuple[type[Exception], ...] = (
        bex.ConnectionError,  # endpoint unreachable, connect timeout, proxy, TLS handshake
        bex.HTTPClientError,  # connection closed, read timeout, response streaming broke off
        bex.IncompleteReadError,
    )
    if isinstance(exc, transient_types):
        return TransientError(f"S3 {action} {where} failed: {one_line(str(exc))}")
    if isinstance(exc, bex.BotoCoreError):
        # No credentials, bad parameters, no region: retrying changes nothing.
        return TerminalError(f"S3 {action} {where} failed: {one_line(str(exc))}")
    return None


@contextmanager
def _s3_errors(action: str, where: str) -> Iterator[None]:
    try:
        yield
    except WindowpipeError:
        raise
    except Exception as exc:
        translated = translate_s3_error(exc, action, where)
        if translated is None:
            raise
        raise translated from exc


class _MultipartSink:
    """One S3 object fed in chunks: `PutObject` if it stays under a chunk, else multipart."""

    def __init__(self, client: Any, bucket: str, key: str, chunk_bytes: int) -> None:
        self._client = client
        self._bucket = bucket
        self._key = key
        self._where = f"s3://{bucket}/{key}"
        self._chunk_bytes = chunk_bytes
        self._buffer = bytearray()
        self._upload_id: str | None = None
        self._parts: list[dict[str, Any]] = []

    def write(self, data: bytes) -> None:
        self._buffer += data
        while len(self._buffer) >= self._chunk_bytes:
            self._send_part(bytes(self._buffer[: self._chunk_bytes]))
            del self._buffer[: self._chunk_bytes]

    def _send_part(self, body: bytes) -> None:
        with _s3_errors("upload", self._where):
            if self._upload_id is None:
                created = self._client.create_multipart_upload(
                    Bucket=self._bucket, Key=self._key, ContentType="application/gzip"
                )
                self._upload_id = str(created["UploadId"])
            number = len(self._parts) + 1
            sent = self._client.upload_part(
                Bucket=self._bucket,
                Key=self._key,
                UploadId=self._upload_id,
                PartNumber=number,
                Body=body,
            )
            self._parts.append({"PartNumber": number, "ETag": sent["ETag"]})

    def commit(self) -> None:
        if self._upload_id is None:
            with _s3_errors("upload", self._where):
                self._client.put_object(
                    Bucket=self._bucket,
                    Key=self._key,
                    Body=bytes(self._buffer),
                    ContentType="application/gzip",
                )
            self._buffer.clear()
            return
        if self._buffer:
            self._send_part(bytes(self._buffer))
            self._buffer.clear()
        with _s3_errors("upload", self._where):
            self._client.complete_multipart_upload(
                Bucket=self._bucket,
                Key=self._key,
                UploadId=self._upload_id,
                MultipartUpload={"Parts": self._parts},
            )
        self._upload_id = None

    def abort(self) -> None:
        self._buffer.clear()
        if self._upload_id is None:
            return
        upload_id, self._upload_id = self._upload_id, None
        # Best effort: a bucket lifecycle rule reclaims whatever this leaves behind.
        with contextlib.suppress(Exception):
            self._client.abort_multipart_upload(
                Bucket=self._bucket, Key=self._key, UploadId=upload_id
            )


class S3Staging(ObjectStaging):
    """Staged files under `s3://<bucket>/<prefix>`."""

    def __init__(self, config: S3StagingConfig) -> None:
        self.config = config
        self.max_file_bytes = config.max_file_bytes
        self.gzip_level = config.gzip_level
        self.bucket = config.bucket
        self.prefix = normalize_prefix(config.prefix)
        """Keys are `prefix + path`; `Manifest.path` and `StagedFile.path` never include it."""
        self._lease: Lease[Any] | None = None
        self._client_lock = threading.Lock()

    @property
    def _client(self) -> Any:
        """The leased client, or None before first use and after `close()`."""
        held = self._lease
        return held.client if held is not None else None

    @property
    def client(self) -> Any:
        """The boto3 S3 client, leased on first use (boto3 is imported only then): one per
        process for every staging area with the same endpoint, region and keys
        (`connectors.shared`). A botocore client is safe to share between threads."""
        with self._client_lock:
            if self._lease is None:
                key_id, secret = self._credentials()
                key = ("s3", self.config.endpoint_url, self.config.region, key_id, secret)
                self._lease = lease(key, lambda: self._build_client(key_id, secret), _close_client)
            return self._lease.client

    def _credentials(self) -> tuple[str | None, str | None]:
        key_id = resolve_secret(self.config.access_key_id_env)
        secret = resolve_secret(self.config.secret_access_key_env)
        if (key_id is None) != (secret is None):
            raise ConfigError(
                "s3 staging: set both access_key_id_env and secret_access_key_env, or neither "
                "(to use the default credential chain)"
            )
        return key_id, secret

    def _build_client(self, key_id: str | None, secret: str | None) -> Any:
        import boto3
        from botocore.config import Config

        options: dict[str, Any] = {
            "connect_timeout": 10,
            "read_timeout": 60,
            "retries": dict(CLIENT_RETRIES),
        }
        if self.config.endpoint_url:
            # MinIO, moto and friends answer on one host: address buckets by path.
            options["s3"] = {"addressing_style": "path"}
        # A session of our own: boto3's default session is not safe to share across threads.
        session = boto3.session.Session(
            aws_access_key_id=key_id,
            aws_secret_access_key=secret,
            region_name=self.config.region,
        )
        return session.client("s3", endpoint_url=self.config.endpoint_url, config=Config(**options))

    def close(self) -> None:
        """Give the client back (the last staging area using it closes it); leased again on next
        use."""
        with self._client_lock:
            held, self._lease = self._lease, None
        if held is not None:
            held.release()

    def _key(self, path: str) -> str:
        return self.prefix + path

    def _where(self, path: str) -> str:
        return f"s3://{self.bucket}/{self._key(path)}"

    def _open_part(self, path: str) -> PartSink:
        return _MultipartSink(
            self.client, self.bucket, self._key(path), self.config.multipart_chunk_bytes
        )

    def _put(self, path: str, data: bytes) -> None:
        with _s3_errors("write", self._where(path)):
            self.client.put_object(
                Bucket=self.bucket, Key=self._key(path), Body=data, ContentType="application/json"
            )

    @contextmanager
    def _open_body(self, path: str) -> Iterator[BinaryIO]:
        where = self._where(path)
        with _s3_errors("read", where):
            try:
                response = self.client.get_object(Bucket=self.bucket, Key=self._key(path))
            except Exception as exc:
                if _error_code(exc) in {"NoSuchKey", "404"}:
                    raise StagedDataLostError(f"S3 read {where} failed: no such object") from exc
                raise
        body = response["Body"]
        try:
            yield cast(BinaryIO, body)
        finally:
            body.close()

    def _open_read(self, path: str) -> AbstractContextManager[BinaryIO]:
        return self._open_body(path)

    def _read_errors(self, action: str, path: str) -> AbstractContextManager[None]:
        return _s3_errors(action, self._where(path))

    def _list(self, directory: str) -> list[str]:
        listing_prefix = self._key(directory) + "/"
        paths: list[str] = []
        with _s3_errors("list", f"s3://{self.bucket}/{listing_prefix}"):
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=listing_prefix
            )
            for page in pages:
                for item in page.get("Contents", []):
                    paths.append(str(item["Key"])[len(self.prefix) :])
        return paths

    def _delete(self, paths: list[str]) -> int:
        deleted = 0
        for start in range(0, len(paths), DELETE_BATCH):
            batch = paths[start : start + DELETE_BATCH]
            with _s3_errors("delete", self._where(batch[0])):
                response = self.client.delete_objects(
                    Bucket=self.bucket,
                    Delete={"Objects": [{"Key": self._key(p)} for p in batch], "Quiet": True},
                )
            errors = response.get("Errors", [])
            if errors:
                first = errors[0]
                code = str(first.get("Code") or "Unknown")
                kind = TransientError if code in TRANSIENT_ERROR_CODES else TerminalError
                raise kind(
                    f"S3 delete s3://{self.bucket}/{first.get('Key')} failed: {code} "
                    f"({len(errors)} of {len(batch)} keys not deleted)"
                )
            deleted += len(batch)
        return deleted


def _error_code(exc: Exception) -> str | None:
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        code = response.get("Error", {}).get("Code")
        return str(code) if code is not None else None
    return None


def _close_client(client: Any) -> None:
    client.close()
