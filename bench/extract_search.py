"""7. Extraction at the source's speed: windowpipe's extract of one large window from the
OpenSearch source (opensearch-py on osmem-server) against a bare point-in-time loop that only
counts the hits, on the same server in the same run; then `slices = 1, 2, 4`.

- windowpipe: what the extract stage does, in-process: `OpenSearchSource.iter_batches` (count,
  open a PIT, `search_after` pages sorted by `[@timestamp, _shard_doc]`, each hit checked and
  turned into a document) through `LocalStaging.write_window` (gzip NDJSON parts, a manifest) into
  a local staging directory.
- bare loop: the same opensearch-py client library, the same page size, query and sort, one PIT
  and `search_after` until a short page; it counts the hits and does nothing else. With
  `slices = N`, N such loops over one PIT, one slice each, in N threads at once: what the
  server gives N concurrent readers, i.e. where the server is the limit. The client is built
  as a user would by default, so it decodes replies with opensearch-py's `JSONSerializer`
  (the stdlib's `json.loads`); windowpipe's source decodes them with orjson
  (`connectors.elasticsearch.opensearch_serializer`).
- bare loop (orjson), slices = 1 only: the bare loop with the client given windowpipe's
  serializer, so the reader sees how much of the difference is the decoding alone.

Runs alternate (bare, bare (orjson) at slices = 1, windowpipe, bare, ...). The server's CPU time
comes from `/proc/<pid>/stat` of the osmem-server process, so the note says whether it used more
than one core. Standalone: `python -m bench.extract_search [--quick]`.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
from opensearchpy import OpenSearch
from osmem_server import OsmemServer

from bench.common import Row, log, median
from connectors.elasticsearch import OpenSearchSource, opensearch_serializer, range_query
from connectors.local import LocalStaging
from core.config import LocalStagingConfig, OpenSearchSourceConfig
from core.windows import Window

BENCHMARK = "7. extract (search)"
DOCS = 100_000
QUICK_DOCS = 20_000
PAGE_SIZE = 5000
"""Hits per page for both sides. osmem scans the whole index for every page (a page of a
100,000-document index costs the server ~0.5-1 s whatever its size), so small pages make the
run quadratic; 5,000 keeps a run at 10-30 s."""
SLICES = (1, 2, 4)
RUNS = 3
QUICK_RUNS = 2
TARGET_RATIO = 0.9
"""Goal: windowpipe's extract >= 0.9x the bare loop (issue 14)."""
INDEX = "events"
START = datetime(2026, 3, 1, tzinfo=UTC)
WINDOW = Window(START, START + timedelta(minutes=15))
TIMESTAMP = "@timestamp"
PIPELINE = "bench7"


# --- the server ---------------------------------------------------------------------------------


class ServerCpu:
    """CPU seconds (user + system) the osmem-server process has used, from /proc."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.tick = os.sysconf("SC_CLK_TCK")

    def seconds(self) -> float:
        try:
            fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / self.tick

    def threads(self) -> int:
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("Threads:"):
                    return int(line.split()[1])
        except OSError:
            pass
        return 0


def seed(client: OpenSearch, documents: int) -> None:
    """One window of `documents` documents spread evenly over 15 minutes (many share a
    millisecond), each ~150 bytes: a timestamp, a user id, a kind, a payload."""
    client.indices.create(
        index=INDEX,
        body={
            # Only the timestamp is searched; the rest is kept in _source, as in a log index
            # whose other fields are not queried (and it keeps seeding osmem quick).
            "mappings": {"dynamic": False, "properties": {TIMESTAMP: {"type": "date"}}},
        },
    )
    step = 900_000 / documents  # milliseconds between documents
    kinds = ("view", "click", "order", "refund")
    lines: list[bytes] = []
    for n in range(documents):
        stamp = START + timedelta(milliseconds=int(n * step))
        lines.append(orjson.dumps({"index": {"_index": INDEX, "_id": str(n)}}))
        lines.append(
            orjson.dumps(
                {
                    TIMESTAMP: stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                    "user_id": (n * 7919) % 100_000,
                    "kind": kinds[n % 4],
                    "payload": f"payload {n:08x}{n * 2654435761 % 2**32:08x} " + "x" * 40,
                }
            )
        )
        if len(lines) >= 20_000:
            _bulk(client, lines)
            lines = []
    if lines:
        _bulk(client, lines)
    client.indices.refresh(index=INDEX)
    counted = int(client.count(index=INDEX)["count"])
    if counted != documents:
        raise RuntimeError(f"seeded {counted} documents, expected {documents}")


def _bulk(client: OpenSearch, lines: list[bytes]) -> None:
    reply = client.bulk(body=b"\n".join(lines) + b"\n")
    if reply.get("errors"):
        raise RuntimeError(f"bulk indexing failed: {str(reply)[:500]}")


# --- the two sides ------------------------------------------------------------------------------


def bare_loop(client: OpenSearch, slices: int) -> int:
    """PIT + `search_after` with the source's page size, query and sort, counting hits only;
    with `slices > 1`, one thread per slice over one PIT, all at once. Hits counted."""
    pit_id = str(client.create_pit(index=INDEX, params={"keep_alive": "5m"})["pit_id"])
    query = range_query(TIMESTAMP, WINDOW)
    counts = [0] * slices
    errors: list[BaseException] = []

    def read(slice_id: int | None) -> None:
        search_after: list[Any] | None = None
        total = 0
        while True:
            body: dict[str, Any] = {
                "size": PAGE_SIZE,
                "query": query,
                "pit": {"id": pit_id, "keep_alive": "5m"},
                "sort": [
                    {TIMESTAMP: {"order": "asc", "unmapped_type": "date"}},
                    {"_shard_doc": "asc"},
                ],
                "track_total_hits": False,
            }
            if slice_id is not None:
                body["slice"] = {"id": slice_id, "max": slices}
            if search_after is not None:
                body["search_after"] = search_after
            hits = client.search(body=body)["hits"]["hits"]
            total += len(hits)
            if len(hits) < PAGE_SIZE:
                break
            search_after = hits[-1]["sort"]
        counts[slice_id or 0] = total

    def guarded(slice_id: int | None) -> None:
        try:
            read(slice_id)
        except BaseException as error:  # re-raised in the caller below
            errors.append(error)

    try:
        if slices == 1:
            read(None)
        else:
            threads = [threading.Thread(target=guarded, args=(i,)) for i in range(slices)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            if errors:
                raise errors[0]
    finally:
        client.delete_pit(body={"pit_id": [pit_id]})
    return sum(counts)


def windowpipe_extract(url: str, staging_dir: Path, slices: int, run: int) -> int:
    """The extract stage's work for the window: the source's batches into the local staging.
    A fresh source (client) per run, as a worker builds once; documents staged."""
    source = OpenSearchSource(
        OpenSearchSourceConfig(
            type="opensearch",
            hosts=[url],
            index=INDEX,
            page_size=PAGE_SIZE,
            slices=slices,
            request_timeout=120,
        )
    )
    staging = LocalStaging(LocalStagingConfig(type="local", path=str(staging_dir)))
    try:
        manifest = staging.write_window(
            PIPELINE, WINDOW, f"f{run:08d}", source.iter_batches(WINDOW)
        )
    finally:
        source.close()
    if manifest.rejected_count:
        raise RuntimeError(f"extract rejected {manifest.rejected_count} documents")
    return manifest.rows


def _timed(call: Callable[[], int], documents: int, cpu: ServerCpu) -> tuple[float, float, float]:
    """(docs/s, server CPU cores busy on average, this process's CPU cores busy on average:
    the client, all its threads) of one run of `call`."""
    cpu_before, client_before = cpu.seconds(), time.process_time()
    began = time.perf_counter()
    got = call()
    elapsed = time.perf_counter() - began
    if got != documents:
        raise RuntimeError(f"read {got} documents, expected {documents}")
    return (
        documents / elapsed,
        (cpu.seconds() - cpu_before) / elapsed,
        (time.process_time() - client_before) / elapsed,
    )


def _cores(values: list[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


def run(quick: bool) -> list[Row]:
    """Rows for benchmark 7 (starts and stops its own osmem-server)."""
    documents = QUICK_DOCS if quick else DOCS
    runs = QUICK_RUNS if quick else RUNS
    workdir = Path(tempfile.mkdtemp(prefix="windowpipe-bench7-"))
    server = OsmemServer.start(addr="127.0.0.1:0", japanese=False)
    # A kept-alive connection per thread, as the source keeps one per slice.
    client = OpenSearch(hosts=[server.url], timeout=120, pool_maxsize=max(SLICES))
    # The same, decoding replies as windowpipe's source does (orjson).
    orjson_client = OpenSearch(
        hosts=[server.url],
        timeout=120,
        pool_maxsize=max(SLICES),
        serializer=opensearch_serializer(),
    )
    cpu = ServerCpu(server.process.pid)
    rows: list[Row] = []
    try:
        log(f"7: seeding {documents:,} documents into osmem-server")
        began = time.monotonic()
        seed(client, documents)
        log(f"7: seeded in {time.monotonic() - began:.0f}s")
        # One untimed read each to warm both clients and the server.
        bare_loop(client, 1)
        bare_loop(orjson_client, 1)
        windowpipe_extract(server.url, workdir / "staging", 1, 0)
        rates: dict[int, tuple[list[float], list[float]]] = {}
        busy: dict[int, tuple[list[float], list[float]]] = {}
        client_busy: dict[int, tuple[list[float], list[float]]] = {}
        threads: dict[int, int] = {}
        bare_orjson: list[float] = []
        bare_orjson_cpu: list[float] = []
        bare_orjson_client: list[float] = []
        number = 1
        for slices in SLICES:
            ours: list[float] = []
            bare: list[float] = []
            ours_cpu: list[float] = []
            bare_cpu: list[float] = []
            ours_client: list[float] = []
            bare_client: list[float] = []
            for _ in range(runs):
                rate, cores, own = _timed(lambda n=slices: bare_loop(client, n), documents, cpu)
                bare.append(rate)
                bare_cpu.append(cores)
                bare_client.append(own)
                threads[slices] = max(threads.get(slices, 0), cpu.threads())
                if slices == 1:
                    rate, cores, own = _timed(lambda: bare_loop(orjson_client, 1), documents, cpu)
                    bare_orjson.append(rate)
                    bare_orjson_cpu.append(cores)
                    bare_orjson_client.append(own)
                rate, cores, own = _timed(
                    lambda n=slices, r=number: windowpipe_extract(
                        server.url, workdir / "staging", n, r
                    ),
                    documents,
                    cpu,
                )
                number += 1
                ours.append(rate)
                ours_cpu.append(cores)
                ours_client.append(own)
                also = f", bare (orjson) {bare_orjson[-1]:,.0f}" if slices == 1 else ""
                log(
                    f"7: slices={slices}: bare {bare[-1]:,.0f} docs/s{also}, windowpipe {rate:,.0f}"
                )
            rates[slices] = (ours, bare)
            busy[slices] = (ours_cpu, bare_cpu)
            client_busy[slices] = (ours_client, bare_client)
        setup = (
            f"one window of {documents:,} documents (~150 B each) in osmem-server "
            f"(in-memory, one index, `dynamic: false` but for @timestamp), opensearch-py, "
            f"page_size {PAGE_SIZE:,}, {runs} runs each, alternating bare | (slices=1: bare "
            f"decoding with orjson |) windowpipe; "
            f"windowpipe = OpenSearchSource.iter_batches -> LocalStaging.write_window, replies "
            f"decoded by orjson; bare = the client as built by default, replies decoded by "
            f"the stdlib's json.loads"
        )
        ours, bare = rates[1]
        ratio = median(ours) / median(bare)
        rows.append(
            Row(
                BENCHMARK,
                f"docs/s, one window of {documents:,}, slices=1 vs a bare PIT loop",
                median(ours),
                median(bare),
                ratio,
                f">= {TARGET_RATIO}x",
                ratio >= TARGET_RATIO,
                ours,
                bare,
                f"{setup}; server CPU (cores busy, from /proc) windowpipe [{_cores(busy[1][0])}], "
                f"bare [{_cores(busy[1][1])}]; client process CPU (cores busy) windowpipe "
                f"[{_cores(client_busy[1][0])}], bare [{_cores(client_busy[1][1])}]",
            )
        )
        ours = rates[1][0]
        rows.append(
            Row(
                BENCHMARK,
                "docs/s, slices=1 vs a bare PIT loop decoding with orjson too (windowpipe's "
                "serializer)",
                median(ours),
                median(bare_orjson),
                median(ours) / median(bare_orjson),
                "report",
                None,
                ours,
                bare_orjson,
                f"the bare loop's client given connectors.elasticsearch.opensearch_serializer(), "
                f"run between the default bare loop and windowpipe; server CPU (cores busy) "
                f"[{_cores(bare_orjson_cpu)}], client CPU [{_cores(bare_orjson_client)}]",
            )
        )
        one_ours, one_bare = median(rates[1][0]), median(rates[1][1])
        for slices in SLICES[1:]:
            ours, bare = rates[slices]
            ratio = median(ours) / median(bare)
            rows.append(
                Row(
                    BENCHMARK,
                    f"docs/s, slices={slices} vs {slices} concurrent bare sliced loops",
                    median(ours),
                    median(bare),
                    ratio,
                    f">= {TARGET_RATIO}x",
                    ratio >= TARGET_RATIO,
                    ours,
                    bare,
                    f"speed-up over slices=1: windowpipe {median(ours) / one_ours:.2f}x, "
                    f"bare {median(bare) / one_bare:.2f}x; server CPU (cores busy) windowpipe "
                    f"[{_cores(busy[slices][0])}], bare [{_cores(busy[slices][1])}]; client "
                    f"CPU (cores busy) windowpipe [{_cores(client_busy[slices][0])}], bare "
                    f"[{_cores(client_busy[slices][1])}]; osmem threads {threads[slices]}; "
                    f"{os.cpu_count()} cores on this machine",
                )
            )
            rows.append(
                Row(
                    BENCHMARK,
                    f"speed-up slices={slices} over slices=1 (windowpipe, bare)",
                    median(ours) / one_ours,
                    median(bare) / one_bare,
                    (median(ours) / one_ours) / (median(bare) / one_bare),
                    "report",
                    None,
                )
            )
    finally:
        client.close()
        orjson_client.close()
        server.close()
        shutil.rmtree(workdir, ignore_errors=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    for row in run("--quick" in args):
        ratio = f"{row.ratio:.2f}x" if row.ratio is not None else "-"
        print(f"{row.metric}: {row.windowpipe:,.2f} vs {row.baseline or 0:,.2f} = {ratio}")
        if row.note:
            print(f"  {row.note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
