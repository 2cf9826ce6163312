"""An order-independent checksum of a window's document ids, the same in Python and in SQL.

What extract read and what the target holds are compared by count and by this checksum: the
sum, modulo 2**64, of a 64-bit hash per document id, where the hash is the first 8 bytes of
the MD5 of the id's UTF-8 text, read as a big-endian unsigned integer. A sum does not depend
on the order rows are read in, and every target can compute it where the rows are:

- PostgreSQL: `sum(('x' || substr(md5(doc_id), 1, 16))::bit(64)::bigint)` (signed, but
  congruent modulo 2**64 with the unsigned sum; reduced by `reduce_sum`);
- Snowflake: `SUM(MD5_NUMBER_UPPER64(doc_id))` (the same 64 bits, unsigned, in NUMBER(38));
- SQLite and any other database: the window's ids are read back and hashed here
  (`ids_checksum`): one id per row over the wire, no SQL function to register.

MD5 is not there for security (nobody chooses ids to collide): it is the one hash every
target has built in. A sum of hashes can collide (two different id sets with the same sum)
with a chance of about 2**-64 per comparison; with the count compared too, a wrong load goes
unseen only by such an accident.

Cost: extract hashes each staged id once as it streams past (CPython's own `_md5`, about half
the time of `hashlib.md5`'s OpenSSL call for short inputs); see docs/BENCHMARKS.md.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

try:  # CPython's built-in MD5: much less per-call overhead than OpenSSL's for short ids
    from _md5 import md5 as _md5
except ImportError:  # pragma: no cover - another Python implementation
    from hashlib import md5 as _md5

MODULUS = 1 << 64
"""Checksums are sums modulo 2**64."""

_UPPER64 = struct.Struct(">Q").unpack_from


def id_hash(doc_id: str) -> int:
    """The 64-bit hash of one document id: the first 8 bytes of MD5(UTF-8 id), big-endian."""
    value: int = _UPPER64(_md5(doc_id.encode()).digest())[0]
    return value


def ids_sum(ids: Iterable[str]) -> int:
    """The sum of `id_hash` over `ids`, not yet reduced (add sums, then `reduce_sum`)."""
    return sum([_UPPER64(_md5(doc_id.encode()).digest())[0] for doc_id in ids])


def reduce_sum(total: int) -> int:
    """A sum of id hashes (possibly of signed 64-bit ones, as PostgreSQL's bigint holds them)
    as the checksum: modulo 2**64, in [0, 2**64)."""
    return total % MODULUS


def checksum_text(value: int) -> str:
    """A checksum as it is recorded and shown: 16 lower-case hex digits."""
    return f"{reduce_sum(value):016x}"


def ids_checksum(ids: Iterable[str]) -> str:
    """The checksum of `ids`, as `checksum_text` shows it."""
    return checksum_text(ids_sum(ids))


EMPTY_CHECKSUM = checksum_text(0)
"""The checksum of no ids."""
