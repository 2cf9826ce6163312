"""Decoding the SDKs' replies with orjson, exactly (`orjson_exact`), else the SDK's fallback."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any

import orjson


def _digit_table() -> bytes:
    """A `bytes.translate` table: an ASCII digit becomes `0`, `-` stays, any other byte becomes
    a space; a run of digits is then a run of `0`s that `in` finds at C speed."""
    table = bytearray(b" " * 256)
    table[ord("-")] = ord("-")
    for digit in b"0123456789":
        table[digit] = ord("0")
    return bytes(table)


_DIGITS_ONLY = _digit_table()
_LONG_POSITIVE = b"0" * 20
_LONG_NEGATIVE = b"-" + b"0" * 19


def orjson_exact(data: bytes) -> bool:
    """False when orjson might decode `data` differently from the stdlib's `json`: it turns an
    integer outside [-2**63, 2**64 - 1] into a float where `json` keeps the exact int. Such an
    integer has 20 digits or more, or is negative with 19; any such run of digits in the reply
    (in a string too: this does not parse) sends it to `json`. About 1 ms for a 1 MB page."""
    digits = data.translate(_DIGITS_ONLY)
    return _LONG_POSITIVE not in digits and _LONG_NEGATIVE not in digits


def decode_reply(data: bytes | str, fallback: Callable[[Any], Any]) -> Any:
    """A search engine's JSON reply, decoded by orjson (about 2.5x faster than `json.loads`),
    or by `fallback` (the SDK's own stdlib decoding) wherever the two could differ: a reply with
    an integer beyond 64 bits (`orjson_exact`), and any reply orjson refuses (NaN, Infinity or
    an overflowing number, a lone surrogate, nesting deeper than 1024, malformed JSON). So the
    values are the ones `json` gives, and a reply `json` cannot decode fails with the SDK's own
    error, as before."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    if orjson_exact(raw):
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass
    return fallback(data)


@functools.cache
def opensearch_serializer() -> Any:
    """opensearch-py's `JSONSerializer` (requests encoded by the stdlib as before) whose replies
    are decoded by `decode_reply`; opensearch-py has no orjson serializer of its own."""
    from opensearchpy.serializer import JSONSerializer

    class OrjsonDecodingSerializer(JSONSerializer):
        def loads(self, s: str) -> Any:
            return decode_reply(s, super().loads)

    return OrjsonDecodingSerializer()


@functools.cache
def elasticsearch_serializer() -> Any:
    """elasticsearch-py's own `OrjsonSerializer` (requests and replies through orjson), its
    decoding made exact by `decode_reply` with the stdlib `json.loads` of its `JsonSerializer`
    as the fallback (the SDK's wrapping into `SerializationError` is unchanged)."""
    from elasticsearch.serializer import OrjsonSerializer

    class ExactOrjsonSerializer(OrjsonSerializer):
        def json_loads(self, data: bytes) -> Any:
            return decode_reply(data, json.loads)

    return ExactOrjsonSerializer()
