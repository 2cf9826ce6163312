"""The demo's source data: synthetic events over the last whole hours, one hour left empty,
bulk-indexed into osmem with opensearch-py's bulk helper.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from typing import Any

from core.instants import format_instant
from windowpipe.demo.processes import DemoError

INDEX = "demo-events"
"""The source index in osmem."""

WINDOW = timedelta(hours=1)
"""The pipeline's window size."""

BULK_DOCUMENTS = 5000
"""Documents per `_bulk` request when seeding."""


def empty_window_index(hours: int) -> int:
    """Which hour of the data gets no events (its window is `skipped`)."""
    return hours // 2


def synthetic_events(
    count: int, start: datetime, hours: int, *, seed: int = 7
) -> Iterator[dict[str, Any]]:
    """`count` events over `[start, start + hours)`, none in the empty hour.

    Busier in the day than at night, like real traffic; timestamps are whole seconds, so many
    events share one (the source must page through ties exactly).
    """
    rng = random.Random(seed)
    empty = empty_window_index(hours)
    slots = [hour for hour in range(hours) if hour != empty]
    # Quietest at 04:00 UTC, busiest at 16:00.
    weights = [
        1.2 + math.sin(math.pi * (((start + hour * WINDOW).hour - 4) % 24) / 24) for hour in slots
    ]
    actions = ("view", "click", "add_to_cart", "purchase", "refund")
    countries = ("DE", "FR", "JP", "US", "BR", "IN", "NG")
    hours_of = rng.choices(slots, weights=weights, k=count)
    for number, hour in enumerate(hours_of):
        instant = start + hour * WINDOW + timedelta(seconds=rng.randrange(3600))
        yield {
            "@timestamp": format_instant(instant),
            "event_id": f"evt-{number:08d}",
            "user": f"user-{rng.randrange(5000):04d}",
            "action": rng.choice(actions),
            "country": rng.choice(countries),
            "amount": round(rng.uniform(1, 500), 2),
        }


def window_of(timestamp: str, start: datetime) -> datetime:
    """The start of the hour window holding an event's `@timestamp`."""
    instant = datetime.fromisoformat(timestamp)
    return start + ((instant - start) // WINDOW) * WINDOW


def seed_source(
    url: str,
    events: Iterator[dict[str, Any]],
    total: int,
    start: datetime,
    on_batch: Callable[[int], object],
) -> Counter[datetime]:
    """Bulk-index the events into INDEX; the number of events per window start."""
    from opensearchpy import OpenSearch, helpers
    from opensearchpy.exceptions import OpenSearchException

    client = OpenSearch(hosts=[url], timeout=120)
    per_window: Counter[datetime] = Counter()

    def actions() -> Iterator[dict[str, Any]]:
        for event in events:
            per_window[window_of(event["@timestamp"], start)] += 1
            yield {"_index": INDEX, "_id": event["event_id"], "_source": event}

    try:
        # Only what the pipeline queries is indexed; the rest stays in `_source` (and reaches
        # the warehouse) but costs osmem nothing: indexing every field, numbers above all,
        # halves the seeding rate.
        client.indices.create(
            index=INDEX,
            body={
                "mappings": {
                    "dynamic": False,
                    "properties": {
                        "@timestamp": {"type": "date"},
                        "action": {"type": "keyword"},
                    },
                }
            },
        )
        # streaming_bulk is the loop inside helpers.bulk, one result per document: the
        # progress moves per request of BULK_DOCUMENTS, and a refused document stops the seeding.
        results = helpers.streaming_bulk(client, actions(), chunk_size=BULK_DOCUMENTS)
        for done, _ in enumerate(results, start=1):
            if done % BULK_DOCUMENTS == 0 or done == total:
                on_batch(done)
        client.indices.refresh(index=INDEX)
        count = client.count(index=INDEX)["count"]
    except (OpenSearchException, helpers.BulkIndexError) as error:
        raise DemoError(f"osmem: seeding failed: {error}") from None
    finally:
        client.close()
    if count != total:
        raise DemoError(f"osmem holds {count} events after seeding {total}")
    return per_window
