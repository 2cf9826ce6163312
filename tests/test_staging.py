"""One contract suite for every staging area: `LocalStaging` in a temporary directory and
`S3Staging` against moto's S3 server (real boto3 over HTTP), plus what only one of them can do."""

from __future__ import annotations

import gc
import gzip
import hashlib
import re
import tracemalloc
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto.server import ThreadedMotoServer

from connectors.base import decode_line, window_dir
from connectors.local import LocalStaging
from connectors.s3 import S3Staging
from connectors.staging import StagedFileWriter
from core.config import LocalStagingConfig, S3StagingConfig
from core.errors import TerminalError, TransientError
from core.instants import format_instant
from core.ports import Batch, Document, Manifest, Rejection, StagedFile, StagingArea
from core.windows import Window
from tests.support import free_port

PIPELINE = "orders"
WINDOW = Window(datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 11, 1, 0, 15, tzinfo=UTC))
KEY_ENV = "WP_TEST_S3_KEY_ID"
SECRET_ENV = "WP_TEST_S3_SECRET"
MiB = 1024 * 1024


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_client(moto_url: str) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=moto_url,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


@pytest.fixture
def bucket(s3_client: Any, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(KEY_ENV, "testing")
    monkeypatch.setenv(SECRET_ENV, "testing")
    name = f"staging-{uuid.uuid4().hex[:12]}"
    s3_client.create_bucket(Bucket=name)
    return name


@dataclass
class StagingKit:
    """A way to build one kind of staging area, and to read what it stored behind its back."""

    make: Callable[..., StagingArea]
    """`make(max_file_bytes=..., multipart_chunk_bytes=...)`; S3-only keys ignored locally."""
    raw: Callable[[str], bytes]
    """The stored bytes at a path relative to the staging root."""
    exists: Callable[[str], bool]
    store: Callable[[str, bytes], object]
    """Overwrite the stored bytes at a path (to corrupt a file)."""


def _s3_config(url: str, bucket: str, **overrides: Any) -> S3StagingConfig:
    values: dict[str, Any] = {
        "type": "s3",
        "bucket": bucket,
        "prefix": "staging/",
        "endpoint_url": url,
        "region": "us-east-1",
        "access_key_id_env": KEY_ENV,
        "secret_access_key_env": SECRET_ENV,
    }
    values.update(overrides)
    return S3StagingConfig(**values)


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.integration)])
def kit(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StagingKit]:
    made: list[StagingArea] = []
    if request.param == "local":
        root = tmp_path / "staging-dir"

        def make_local(**options: Any) -> StagingArea:
            options.pop("multipart_chunk_bytes", None)
            staging = LocalStaging(
                LocalStagingConfig(type="local", path=str(root), prefix="staging/", **options)
            )
            made.append(staging)
            return staging

        yield StagingKit(
            make=make_local,
            raw=lambda path: (root / "staging" / path).read_bytes(),
            exists=lambda path: (root / "staging" / path).is_file(),
            store=lambda path, data: (root / "staging" / path).write_bytes(data),
        )
    else:
        url = request.getfixturevalue("moto_url")
        name = request.getfixturevalue("bucket")
        client = request.getfixturevalue("s3_client")

        def make_s3(**options: Any) -> StagingArea:
            staging = S3Staging(_s3_config(url, name, **options))
            made.append(staging)
            return staging

        def exists(path: str) -> bool:
            listed = client.list_objects_v2(Bucket=name, Prefix=f"staging/{path}")
            return any(item["Key"] == f"staging/{path}" for item in listed.get("Contents", []))

        yield StagingKit(
            make=make_s3,
            raw=lambda path: client.get_object(Bucket=name, Key=f"staging/{path}")["Body"].read(),
            exists=exists,
            store=lambda path, data: client.put_object(
                Bucket=name, Key=f"staging/{path}", Body=data
            ),
        )
    for staging in made:
        staging.close()


# --- helpers ----------------------------------------------------------------------------------


def doc(i: int, body: dict[str, Any] | None = None) -> Document:
    return Document(
        id=f"d{i:07d}",
        timestamp=WINDOW.start + timedelta(milliseconds=i),
        body=body if body is not None else {"n": i, "name": "order"},
    )


def batches(total: int, size: int = 1000, body: Callable[[int], dict[str, Any]] | None = None):
    """`total` documents in batches of `size`, generated lazily (the test holds no window)."""
    for first in range(0, total, size):
        yield Batch(
            documents=[
                doc(i, body(i) if body else None) for i in range(first, min(first + size, total))
            ]
        )


def staged_documents(staging: StagingArea, manifest: Manifest) -> Iterator[dict[str, Any]]:
    """Every staged line of a manifest's files, decoded, file by file."""
    for staged in manifest.files:
        for line in staging.iter_lines(staged.path):
            if line.strip():
                yield decode_line(line)


def staged_ids(staging: StagingArea, manifest: Manifest) -> list[str]:
    return [line["id"] for line in staged_documents(staging, manifest)]


# --- the contract -----------------------------------------------------------------------------


def test_staging_satisfies_the_protocol(kit: StagingKit) -> None:
    assert isinstance(kit.make(), StagingArea)


def test_documents_round_trip_with_unicode_and_megabyte_bodies(kit: StagingKit) -> None:
    big = "ünïcødé €𝄞 日本語 " * 50_000  # about 1.3 MB of UTF-8
    documents = [
        doc(0, {"text": "plain"}),
        doc(1, {"text": big, "nested": {"list": [1, 2.5, None, True], "emoji": "🚀"}}),
        doc(2, {"text": big[::-1]}),
        doc(3, {"quote": 'a "quoted"\nline\twith\\escapes'}),
    ]
    staging = kit.make()

    manifest = staging.write_window(PIPELINE, WINDOW, "r1", [Batch(documents=documents)])

    assert manifest.rows == 4
    lines = list(staged_documents(staging, manifest))
    assert [line["id"] for line in lines] == ["d0000000", "d0000001", "d0000002", "d0000003"]
    assert [line["doc"] for line in lines] == [d.body for d in documents]
    assert lines[1]["ts"] == format_instant(documents[1].timestamp)


def test_iter_lines_yields_each_line_without_its_newline(kit: StagingKit) -> None:
    staging = kit.make()
    manifest = staging.write_window(PIPELINE, WINDOW, "r1", batches(3))

    lines = list(staging.iter_lines(manifest.files[0].path))

    assert len(lines) == 3
    assert all(isinstance(line, bytes) and not line.endswith(b"\n") for line in lines)
    assert decode_line(lines[2])["id"] == "d0000002"


def test_parts_roll_at_max_file_bytes_of_uncompressed_ndjson(kit: StagingKit) -> None:
    staging = kit.make(max_file_bytes=2048)

    manifest = staging.write_window(PIPELINE, WINDOW, "r1", batches(500, size=64))

    assert len(manifest.files) > 5
    assert sum(f.rows for f in manifest.files) == manifest.rows == 500
    for staged in manifest.files:
        ndjson = gzip.decompress(kit.raw(staged.path))
        assert len(ndjson) <= 2048
        assert ndjson.count(b"\n") == staged.rows
    assert staged_ids(staging, manifest) == [f"d{i:07d}" for i in range(500)]


def test_a_line_longer_than_max_file_bytes_gets_a_part_of_its_own(kit: StagingKit) -> None:
    staging = kit.make(max_file_bytes=1024)
    documents = [doc(0), doc(1, {"text": "x" * 5000}), doc(2)]

    manifest = staging.write_window(PIPELINE, WINDOW, "r1", [Batch(documents=documents)])

    assert [f.rows for f in manifest.files] == [1, 1, 1]
    assert staged_ids(staging, manifest) == ["d0000000", "d0000001", "d0000002"]


def test_manifest_sha256_and_bytes_match_the_stored_files(kit: StagingKit) -> None:
    staging = kit.make(max_file_bytes=4096)

    manifest = staging.write_window(PIPELINE, WINDOW, "r1", batches(300))

    for staged in manifest.files:
        stored = kit.raw(staged.path)
        assert staged.bytes == len(stored)
        assert staged.sha256 == hashlib.sha256(stored).hexdigest()
    assert Manifest.from_json(kit.raw(manifest.path)) == manifest
    assert staging.read_manifest(manifest.path) == manifest


@pytest.mark.parametrize(
    "rejected_ids",
    [[], ["plain", "accentu\u00e9"], ["undecodable \udcff"]],
    ids=["none", "non-ASCII", "lone surrogate"],
)
def test_a_manifest_survives_its_json_whatever_ids_it_rejected(rejected_ids: list[str]) -> None:
    # orjson writes it; an id with a lone surrogate (undecodable source bytes) falls back to
    # the stdlib encoder, which escapes it. Every field comes back, keys sorted and indented.
    manifest = Manifest(
        pipeline=PIPELINE,
        window_start=WINDOW.start,
        window_end=WINDOW.end,
        run="f00000007",
        files=[StagedFile("p/part-00000.ndjson.gz", rows=2, bytes=40, sha256="ab" * 32)],
        rows=2,
        rejected={"not UTF-8": len(rejected_ids)} if rejected_ids else {},
        rejected_ids=rejected_ids,
        path="p/manifest-f00000007.json",
        checksum="00000000000000ff",
    )
    raw = manifest.to_json()
    assert Manifest.from_json(raw) == manifest
    assert raw.startswith(b'{\n  "checksum": ')
    keys = re.findall(rb'^  "([a-z_]+)":', raw, flags=re.MULTILINE)
    assert keys == sorted(keys) and len(keys) == len(Manifest.__slots__)


def test_layout_is_pipeline_date_window_run_part_and_free_of_equals_signs(kit: StagingKit) -> None:
    staging = kit.make(max_file_bytes=1024)

    manifest = staging.write_window(PIPELINE, WINDOW, "17", batches(100))

    directory = "orders/2026/11/01/20261101T000000Z_20261101T001500Z"
    assert directory == window_dir(PIPELINE, WINDOW)
    assert manifest.path == f"{directory}/manifest-17.json"
    for index, staged in enumerate(manifest.files):
        assert staged.path == f"{directory}/17-part-{index:05d}.ndjson.gz"
    paths = staging.list_files(PIPELINE, WINDOW)
    assert paths == sorted([f.path for f in manifest.files] + [manifest.path])
    assert all("=" not in path and path.startswith(f"{directory}/") for path in paths)
    # Relative to the staging root: the configured prefix is where the bytes are, not in the path.
    assert all(not path.startswith("staging/") and kit.exists(path) for path in paths)


def test_rewriting_a_window_with_a_new_run_replaces_the_old_runs_files(kit: StagingKit) -> None:
    staging = kit.make(max_file_bytes=1024)
    first = staging.write_window(PIPELINE, WINDOW, "1", batches(200))
    assert len(first.files) > 2

    second = staging.write_window(PIPELINE, WINDOW, "2", batches(10))

    expected = sorted([f.path for f in second.files] + [second.path])
    assert staging.list_files(PIPELINE, WINDOW) == expected
    assert all(not kit.exists(f.path) for f in first.files)
    assert not kit.exists(first.path)
    assert staged_ids(staging, second) == [f"d{i:07d}" for i in range(10)]


def test_rewriting_with_the_same_run_and_fewer_parts_leaves_no_extra_parts(kit: StagingKit) -> None:
    staging = kit.make(max_file_bytes=1024)
    staging.write_window(PIPELINE, WINDOW, "5", batches(200))

    again = staging.write_window(PIPELINE, WINDOW, "5", batches(5))

    assert len(again.files) == 1
    assert staging.list_files(PIPELINE, WINDOW) == [again.files[0].path, again.path]


def test_an_empty_window_writes_a_manifest_with_no_files(kit: StagingKit) -> None:
    staging = kit.make()
    staging.write_window(PIPELINE, WINDOW, "1", batches(20))

    manifest = staging.write_window(PIPELINE, WINDOW, "2", [Batch(), Batch()])

    assert manifest.files == [] and manifest.rows == 0
    assert staging.list_files(PIPELINE, WINDOW) == [manifest.path]
    assert staging.read_manifest(manifest.path) == manifest
    assert list(staged_documents(staging, manifest)) == []


def test_rejections_are_counted_by_reason_in_the_manifest(kit: StagingKit) -> None:
    staging = kit.make()
    rejected = [Rejection(f"bad{i}", "unparseable timestamp") for i in range(150)]
    rejected += [Rejection(None, "missing timestamp"), Rejection("big", "oversized document")]
    pages = [Batch(documents=[doc(0)], rejected=rejected[:100]), Batch(rejected=rejected[100:])]

    manifest = staging.write_window(PIPELINE, WINDOW, "1", pages)

    assert manifest.rejected == {
        "missing timestamp": 1,
        "oversized document": 1,
        "unparseable timestamp": 150,
    }
    assert manifest.rejected_count == 152
    assert manifest.rejected_ids == [f"bad{i}" for i in range(100)]
    assert staging.read_manifest(manifest.path).rejected == manifest.rejected
    assert manifest.rows == 1


def test_staged_documents_are_exactly_the_written_ids(kit: StagingKit) -> None:
    staging = kit.make(max_file_bytes=8192)

    manifest = staging.write_window(PIPELINE, WINDOW, "1", batches(2500, size=333))

    ids = staged_ids(staging, manifest)
    assert ids == [f"d{i:07d}" for i in range(2500)]
    assert len(set(ids)) == manifest.rows == 2500


def test_a_failed_write_leaves_no_manifest_and_removes_its_parts(kit: StagingKit) -> None:
    staging = kit.make(max_file_bytes=1024)
    kept = staging.write_window(PIPELINE, WINDOW, "1", batches(10))

    def failing() -> Iterator[Batch]:
        yield from batches(200)
        raise TransientError("source went away")

    with pytest.raises(TransientError, match="source went away"):
        staging.write_window(PIPELINE, WINDOW, "2", failing())

    assert staging.list_files(PIPELINE, WINDOW) == sorted([kept.files[0].path, kept.path])


def test_delete_window_removes_every_file_and_counts_them(kit: StagingKit) -> None:
    staging = kit.make(max_file_bytes=1024)
    other = Window(WINDOW.end, WINDOW.end + timedelta(minutes=15))
    manifest = staging.write_window(PIPELINE, WINDOW, "1", batches(100))
    staging.write_window(PIPELINE, other, "1", batches(5))

    assert staging.delete_window(PIPELINE, WINDOW) == len(manifest.files) + 1

    assert staging.list_files(PIPELINE, WINDOW) == []
    assert len(staging.list_files(PIPELINE, other)) == 2
    assert staging.delete_window(PIPELINE, WINDOW) == 0


def test_reading_a_missing_manifest_is_terminal(kit: StagingKit) -> None:
    staging = kit.make()

    with pytest.raises(TerminalError):
        staging.read_manifest(f"{window_dir(PIPELINE, WINDOW)}/manifest-404.json")


def test_a_truncated_staged_file_is_terminal(kit: StagingKit) -> None:
    staging = kit.make()
    manifest = staging.write_window(PIPELINE, WINDOW, "1", batches(500))
    path = manifest.files[0].path
    kit.store(path, kit.raw(path)[:-100])

    with pytest.raises(TerminalError, match="not valid gzip"):
        list(staging.iter_lines(path))


def test_an_unsafe_run_name_is_refused(kit: StagingKit) -> None:
    staging = kit.make()

    with pytest.raises(ValueError, match="run"):
        staging.write_window(PIPELINE, WINDOW, "a=b/c", batches(1))


def test_writing_keeps_memory_flat_as_the_window_grows(kit: StagingKit) -> None:
    # Compressible documents keep what moto (in this process) stores small; the writer's own
    # footprint is one line plus the compressor's and one part's upload buffers.
    staging = kit.make(max_file_bytes=MiB)

    def peak(total: int, run: str) -> int:
        gc.collect()
        tracemalloc.start()
        try:
            manifest = staging.write_window(PIPELINE, WINDOW, run, batches(total, size=2000))
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
            assert manifest.rows == total

    peak(10, "0")  # warm up: builds the S3 client (botocore's service models are large)
    small = peak(20_000, "1")
    large = peak(200_000, "2")

    ndjson_bytes = 200_000 * len(b'{"id":"d0000000","ts":"2026-11-01T00:00:00Z","doc":{}}')
    assert ndjson_bytes > 10 * MiB
    assert large - small < 3 * MiB, (small, large)


# --- the writer on its own --------------------------------------------------------------------


class _MemorySink:
    def __init__(self, store: dict[str, bytes], path: str) -> None:
        self.store, self.path, self.data = store, path, bytearray()

    def write(self, data: bytes) -> None:
        self.data += data

    def commit(self) -> None:
        self.store[self.path] = bytes(self.data)

    def abort(self) -> None:
        self.data.clear()


def test_writer_output_is_deterministic_for_the_same_lines() -> None:
    outputs = []
    for _ in range(2):
        store: dict[str, bytes] = {}

        def open_part(path: str, store: dict[str, bytes] = store) -> _MemorySink:
            return _MemorySink(store, path)

        writer = StagedFileWriter("p/d", "1", 1024, open_part)
        for batch in batches(50):
            writer.add(batch)
        outputs.append((writer.finish(), store))
    assert outputs[0] == outputs[1]


def test_writer_opens_no_part_without_documents() -> None:
    store: dict[str, bytes] = {}
    writer = StagedFileWriter("p/d", "1", 1024, lambda path: _MemorySink(store, path))
    writer.add(Batch(rejected=[Rejection("x", "not UTF-8")]))

    assert writer.finish() == [] and store == {}
    assert writer.rejected == {"not UTF-8": 1} and writer.rejected_ids == ["x"]


# --- S3 only ----------------------------------------------------------------------------------


@pytest.mark.integration
def test_s3_file_larger_than_a_chunk_goes_up_as_a_multipart_upload(
    moto_url: str, bucket: str, s3_client: Any
) -> None:
    import base64
    import os

    staging = S3Staging(_s3_config(moto_url, bucket, multipart_chunk_bytes=5 * MiB))

    def random_body(i: int) -> dict[str, Any]:
        return {"blob": base64.b64encode(os.urandom(96 * 1024)).decode()}

    # ~16 MB of base64 NDJSON in one part file: about 12 MB of gzip, more than two chunks.
    manifest = staging.write_window(PIPELINE, WINDOW, "1", batches(125, size=5, body=random_body))

    [staged] = manifest.files
    assert staged.bytes > 2 * 5 * MiB
    head = s3_client.head_object(Bucket=bucket, Key=f"staging/{staged.path}")
    assert head["ContentLength"] == staged.bytes
    assert head["ETag"].strip('"').endswith("-3")  # S3's mark of a 3-part multipart upload
    stored = s3_client.get_object(Bucket=bucket, Key=f"staging/{staged.path}")["Body"].read()
    assert hashlib.sha256(stored).hexdigest() == staged.sha256
    assert staged_ids(staging, manifest) == [f"d{i:07d}" for i in range(125)]
    assert s3_client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    staging.close()


@pytest.mark.integration
def test_s3_failed_multipart_upload_is_aborted(moto_url: str, bucket: str, s3_client: Any) -> None:
    import base64
    import os

    staging = S3Staging(_s3_config(moto_url, bucket, multipart_chunk_bytes=5 * MiB))

    def failing() -> Iterator[Batch]:
        body = {"blob": base64.b64encode(os.urandom(1024 * 1024)).decode()}
        yield Batch(documents=[doc(i, body) for i in range(8)])
        raise TransientError("source went away")

    with pytest.raises(TransientError):
        staging.write_window(PIPELINE, WINDOW, "1", failing())

    assert s3_client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    assert staging.list_files(PIPELINE, WINDOW) == []
    staging.close()


@pytest.mark.integration
def test_s3_missing_bucket_is_terminal(moto_url: str, bucket: str) -> None:
    staging = S3Staging(_s3_config(moto_url, "no-such-bucket-here"))

    with pytest.raises(TerminalError, match=r"NoSuchBucket") as caught:
        staging.write_window(PIPELINE, WINDOW, "1", batches(3))
    assert "\n" not in str(caught.value) and "testing" not in str(caught.value)
    with pytest.raises(TerminalError, match=r"NoSuchBucket"):
        staging.list_files(PIPELINE, WINDOW)


@pytest.mark.integration
def test_s3_unreachable_endpoint_is_transient(bucket: str) -> None:
    staging = S3Staging(_s3_config(f"http://127.0.0.1:{free_port()}", bucket))

    with pytest.raises(TransientError, match=r"S3 (upload|list)") as caught:
        staging.write_window(PIPELINE, WINDOW, "1", batches(3))
    assert "\n" not in str(caught.value)


@pytest.mark.integration
def test_s3_uses_the_default_credential_chain_without_env_names(
    moto_url: str, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "chain")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "chain")
    staging = S3Staging(
        _s3_config(moto_url, bucket, access_key_id_env=None, secret_access_key_env=None)
    )

    manifest = staging.write_window(PIPELINE, WINDOW, "1", batches(3))

    assert staged_ids(staging, manifest) == ["d0000000", "d0000001", "d0000002"]
    staging.close()


@pytest.mark.integration
def test_s3_client_is_built_lazily_and_once(moto_url: str, bucket: str) -> None:
    staging = S3Staging(_s3_config(moto_url, bucket))
    assert staging._client is None

    first = staging.client
    staging.list_files(PIPELINE, WINDOW)

    assert staging.client is first
    staging.close()
    assert staging._client is None


@pytest.mark.integration
def test_s3_prefix_is_normalized_to_a_folder(moto_url: str, bucket: str, s3_client: Any) -> None:
    staging = S3Staging(_s3_config(moto_url, bucket, prefix="/nested/orders"))

    manifest = staging.write_window(PIPELINE, WINDOW, "1", batches(1))

    keys = [o["Key"] for o in s3_client.list_objects_v2(Bucket=bucket)["Contents"]]
    assert sorted(keys) == sorted(
        f"nested/orders/{p}" for p in [manifest.path, manifest.files[0].path]
    )


# --- local only -------------------------------------------------------------------------------


def test_local_staging_creates_its_directory_and_leaves_no_temporaries(tmp_path: Path) -> None:
    root = tmp_path / "not" / "yet"
    staging = LocalStaging(LocalStagingConfig(type="local", path=str(root), max_file_bytes=1024))
    assert root.is_dir()

    manifest = staging.write_window(PIPELINE, WINDOW, "1", batches(50))

    on_disk = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    assert on_disk == sorted([f.path for f in manifest.files] + [manifest.path])
    assert not any(re.search(r"\.tmp$", p) for p in on_disk)


def test_local_delete_window_sweeps_a_dead_writers_temporaries(tmp_path: Path) -> None:
    staging = LocalStaging(LocalStagingConfig(type="local", path=str(tmp_path)))
    staging.write_window(PIPELINE, WINDOW, "1", batches(5))
    directory = tmp_path / window_dir(PIPELINE, WINDOW)
    (directory / ".2-part-00000.ndjson.gz.abc123.tmp").write_bytes(b"half")

    assert staging.delete_window(PIPELINE, WINDOW) == 2

    assert not directory.exists()
    assert tmp_path.is_dir()
