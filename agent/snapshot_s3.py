"""S3-compatible bucket access for snapshots: boto3 in worker threads, never on the event loop.

boto3 (≈27 MB resident with one client) is imported only when a bucket is first used, so agents
that never snapshot never load it. Credentials come from boto3's standard chain (environment,
shared profile, instance role); nothing here stores or sends them. Retries use botocore's
``standard`` mode (backoff with jitter on 5xx, throttling and connection errors); objects above
:data:`MULTIPART_THRESHOLD` go up as multipart uploads. Errors are mapped to
:class:`BucketError` with a ``kind`` the status can show: ``auth`` (no or wrong credentials,
access denied), ``no_bucket``, ``unreachable`` (connection refused, timeouts, 5xx after the
retries), ``other``.
"""

from __future__ import annotations

import asyncio
import io
import logging
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlparse

from qmoi_sync.agent.snapshot_format import SnapshotError

log = logging.getLogger("qmoi_sync.snapshot.s3")

MiB = 1024 * 1024
MULTIPART_THRESHOLD = 8 * MiB
MULTIPART_CHUNK = 8 * MiB
DEFAULT_CONCURRENCY = 8
#: Requests in flight while restoring: a GET spends most of its time waiting for the server's
#: first byte (measured against moto: the worker threads sit in ``_read_status``), so more of
#: them overlap better; each holds at most one object (≤ 8 MiB) in memory.
RESTORE_CONCURRENCY = 16
DEFAULT_REGION = "us-east-1"
T = TypeVar("T")


class BucketError(SnapshotError):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class TargetConfig:
    """Where a space's snapshots live (part of the space's shared configuration)."""

    url: str  # s3://bucket/prefix
    endpoint_url: str | None = None
    region: str | None = None
    path_style: bool = False

    @property
    def bucket(self) -> str:
        return urlparse(self.url).netloc

    @property
    def prefix(self) -> str:
        """The key prefix, "" or ending with "/"."""
        p = urlparse(self.url).path.strip("/")
        return f"{p}/" if p else ""

    @property
    def key(self) -> str:
        """Identifies this target in local records (endpoint + bucket + prefix)."""
        return f"{self.endpoint_url or 'aws'}|{self.bucket}|{self.prefix}"

    @classmethod
    def parse(
        cls,
        url: str,
        endpoint_url: str | None = None,
        region: str | None = None,
        path_style: bool = False,
    ) -> TargetConfig:
        u = urlparse(url)
        if u.scheme != "s3" or not u.netloc:
            raise SnapshotError(f"snapshot target must look like s3://bucket/prefix (got {url!r})")
        if u.query or u.fragment or u.params:
            raise SnapshotError("snapshot target URL takes no query or fragment")
        if endpoint_url is not None:
            e = urlparse(endpoint_url)
            if e.scheme not in ("http", "https") or not e.netloc:
                raise SnapshotError(
                    f"--endpoint-url must be http(s)://host[:port] (got {endpoint_url!r})"
                )
        return cls(url=url, endpoint_url=endpoint_url, region=region, path_style=path_style)

    def to_json(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "endpoint_url": self.endpoint_url,
            "region": self.region,
            "path_style": self.path_style,
        }

    @classmethod
    def from_json(cls, raw: Any) -> TargetConfig | None:
        if not isinstance(raw, dict) or not isinstance(raw.get("url"), str):
            return None
        endpoint = raw.get("endpoint_url")
        region = raw.get("region")
        try:
            return cls.parse(
                raw["url"],
                endpoint if isinstance(endpoint, str) else None,
                region if isinstance(region, str) else None,
                bool(raw.get("path_style", False)),
            )
        except SnapshotError:
            return None


@dataclass(frozen=True)
class ListedObject:
    key: str
    size: int
    modified: float  # unix seconds


def _map_error(exc: BaseException, what: str) -> BucketError:
    """Translate botocore's exceptions into a BucketError with a readable message."""
    from botocore import exceptions as bx

    if isinstance(exc, bx.NoCredentialsError | bx.PartialCredentialsError):
        return BucketError(
            "auth",
            "no S3 credentials found: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile "
            "(AWS_PROFILE) or an instance role",
        )
    if isinstance(exc, bx.ClientError):
        err = exc.response.get("Error", {})
        code = str(err.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("NoSuchBucket",) or (what.startswith("check") and code in ("404", "NotFound")):
            return BucketError("no_bucket", f"{what}: the bucket does not exist ({code})")
        if code in (
            "InvalidAccessKeyId",
            "SignatureDoesNotMatch",
            "AccessDenied",
            "ExpiredToken",
            "InvalidToken",
            "403",
            "Forbidden",
        ):
            return BucketError("auth", f"{what}: S3 refused the credentials ({code})")
        if isinstance(status, int) and status >= 500:
            return BucketError("unreachable", f"{what}: S3 error {status} {code}")
        return BucketError("other", f"{what}: S3 error {code}: {err.get('Message', '')}".strip())
    if isinstance(
        exc,
        bx.EndpointConnectionError
        | bx.ConnectTimeoutError
        | bx.ReadTimeoutError
        | bx.ConnectionClosedError
        | bx.ConnectionError,
    ):
        return BucketError("unreachable", f"{what}: S3 endpoint unreachable ({exc})")
    if isinstance(exc, bx.BotoCoreError | OSError):
        return BucketError("unreachable", f"{what}: {exc}")
    return BucketError("other", f"{what}: {exc!r}")


class Bucket:
    """Async facade over one boto3 client. Every call runs in a bounded thread pool."""

    def __init__(self, target: TargetConfig, concurrency: int = DEFAULT_CONCURRENCY) -> None:
        self.target = target
        self.concurrency = max(1, concurrency)
        self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="qmoi-s3")
        self._client: Any = None
        self._client_lock = threading.Lock()
        self._transfer_config: Any = None
        self.bytes_up = 0
        self.bytes_down = 0
        self.requests = 0

    @property
    def prefix(self) -> str:
        return self.target.prefix

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _get_client(self) -> Any:
        with self._client_lock:
            if self._client is None:
                import boto3  # lazy: ~27 MB, only where snapshots run
                from boto3.s3.transfer import TransferConfig
                from botocore.config import Config

                t = self.target
                options: dict[str, Any] = {
                    "retries": {"mode": "standard", "max_attempts": 5},
                    "s3": {"addressing_style": "path" if t.path_style else "auto"},
                    "max_pool_connections": self.concurrency * 2,
                    "connect_timeout": 5,
                    "read_timeout": 60,
                    "signature_version": "s3v4",
                    # Every object is authenticated (AEAD) on our side; botocore's own CRC32
                    # of each body only costs CPU (and some S3-compatible servers reject it).
                    "request_checksum_calculation": "when_required",
                    "response_checksum_validation": "when_required",
                }
                try:
                    config = Config(**options)
                except TypeError:  # botocore < 1.36 has neither option (and computes no CRC)
                    del options["request_checksum_calculation"]
                    del options["response_checksum_validation"]
                    config = Config(**options)
                session = boto3.session.Session()
                self._client = session.client(
                    "s3",
                    endpoint_url=t.endpoint_url,
                    region_name=t.region or session.region_name or DEFAULT_REGION,
                    config=config,
                )
                self._transfer_config = TransferConfig(
                    multipart_threshold=MULTIPART_THRESHOLD,
                    multipart_chunksize=MULTIPART_CHUNK,
                    max_concurrency=4,
                    use_threads=True,
                )
            return self._client

    async def _run(self, what: str, fn: Callable[[], T]) -> T:
        def call() -> T:
            try:
                return fn()
            except BucketError:
                raise
            except ModuleNotFoundError as exc:
                raise BucketError(
                    "other",
                    f"snapshots need boto3 ({exc.name} is missing): "
                    "pip install 'qmoi-sync[snapshots]'",
                ) from None
            except Exception as exc:
                raise _map_error(exc, what) from None

        self.requests += 1
        return await asyncio.get_running_loop().run_in_executor(self._pool, call)

    # -- operations ------------------------------------------------------------------------
    async def check(self) -> None:
        """Raise BucketError unless the bucket exists and the credentials may use it."""
        t = self.target

        def fn() -> None:
            self._get_client().head_bucket(Bucket=t.bucket)

        await self._run(f"check s3://{t.bucket}", fn)

    async def put(self, key: str, data: bytes) -> None:
        t = self.target

        def fn() -> None:
            client = self._get_client()
            if len(data) > MULTIPART_THRESHOLD:
                client.upload_fileobj(io.BytesIO(data), t.bucket, key, Config=self._transfer_config)
            else:
                client.put_object(Bucket=t.bucket, Key=key, Body=data)

        await self._run(f"upload {key}", fn)
        self.bytes_up += len(data)

    async def get(self, key: str) -> bytes | None:
        """The object's bytes, or None if there is no such object."""
        t = self.target

        def fn() -> bytes | None:
            from botocore.exceptions import ClientError

            try:
                resp = self._get_client().get_object(Bucket=t.bucket, Key=key)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                    return None
                raise
            body = resp["Body"]
            try:
                return bytes(body.read())
            finally:
                body.close()

        data = await self._run(f"download {key}", fn)
        if data is not None:
            self.bytes_down += len(data)
        return data

    async def head(self, key: str) -> int | None:
        """The object's size, or None if it does not exist."""
        t = self.target

        def fn() -> int | None:
            from botocore.exceptions import ClientError

            try:
                resp = self._get_client().head_object(Bucket=t.bucket, Key=key)
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                    return None
                raise
            return int(resp["ContentLength"])

        return await self._run(f"check {key}", fn)

    async def list(self, prefix: str) -> list[ListedObject]:
        t = self.target

        def fn() -> list[ListedObject]:
            out: list[ListedObject] = []
            paginator = self._get_client().get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=t.bucket, Prefix=prefix):
                for item in page.get("Contents", []) or []:
                    out.append(
                        ListedObject(
                            str(item["Key"]), int(item["Size"]), item["LastModified"].timestamp()
                        )
                    )
            return out

        return await self._run(f"list s3://{t.bucket}/{prefix}", fn)

    async def delete(self, keys: Iterable[str]) -> None:
        t = self.target
        todo = list(keys)

        def fn(batch: list[str]) -> None:
            resp = self._get_client().delete_objects(
                Bucket=t.bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True}
            )
            errors = resp.get("Errors") or []
            if errors:
                first = errors[0]
                detail = f"{first.get('Code')} {first.get('Message')}"
                raise BucketError("other", f"delete {first.get('Key')}: {detail}")

        for i in range(0, len(todo), 1000):
            batch = todo[i : i + 1000]
            await self._run(f"delete {len(batch)} object(s)", lambda b=batch: fn(b))  # type: ignore[misc]
