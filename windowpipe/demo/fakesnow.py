"""fakesnow's Snowflake server, taught the COPY the Snowflake target runs.

`python -m windowpipe.demo.fakesnow PORT STAGE_ROOT` is the server the demo starts; the tests
of the Snowflake target call `teach_fakesnow_metadata_copy` in their own process.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

FAKESNOW_STAGE_ROOTS: list[Path] = []
"""Directories behind fakesnow `file://` stages, to name a staged file relative to its stage."""


def teach_fakesnow_metadata_copy(staging_root: Path) -> None:
    """Let fakesnow 0.12 run `COPY INTO t (v, source_file, file_row) FROM (SELECT $1,
    METADATA$FILENAME, METADATA$FILE_ROW_NUMBER FROM @stage/dir/) ...` for JSON files.

    fakesnow cannot translate a transforming COPY; the Snowflake target uses this one select
    list to keep each row's lineage. Only that exact select list is rewritten (the file's JSON
    value, its path relative to the stage root, its 1-based line); every other part of the
    COPY (stage resolution, FILES=, gzip JSON, transactions) is fakesnow's own. The tests of
    the Snowflake target use this too. Calling it again adds a stage root.
    """
    from urllib.parse import unquote, urlparse

    import fakesnow.copy_into
    import sqlglot
    from sqlglot import exp

    FAKESNOW_STAGE_ROOTS.append(staging_root.resolve())
    original = fakesnow.copy_into._inserts
    if getattr(original, "_windowpipe", False):
        return

    def relative(url: str) -> str:
        path = Path(unquote(urlparse(url).path))
        for root in FAKESNOW_STAGE_ROOTS:
            if path.is_relative_to(root):
                return path.relative_to(root).as_posix()
        return path.as_posix()

    def inserts(expr: exp.Copy, params: Any, urls: list[str], parquet_info: Any = None) -> Any:
        source = expr.args["files"][0]
        if isinstance(source, exp.Subquery) and isinstance(source.this, exp.Select):
            columns = [e.sql(dialect="snowflake").upper() for e in source.this.expressions]
            if columns == ["$1", "METADATA$FILENAME", "METADATA$FILE_ROW_NUMBER"]:
                return [
                    exp.Insert(
                        this=expr.this,
                        expression=sqlglot.parse_one(
                            f"SELECT json, '{relative(url)}', ROW_NUMBER() OVER () "
                            f"FROM read_json_objects('{url}')",
                            read="duckdb",
                        ),
                    )
                    for url in urls
                ]
        return original(expr, params, urls, parquet_info)

    inserts._windowpipe = True  # type: ignore[attr-defined]
    fakesnow.copy_into._inserts = inserts


def serve_fakesnow(port: int, staging_root: Path) -> None:
    """fakesnow's Snowflake HTTP server on 127.0.0.1:`port` until SIGTERM."""
    import importlib

    import uvicorn

    teach_fakesnow_metadata_copy(staging_root)
    # `fakesnow.server` is also the name of a function in fakesnow's package: import by path.
    app = importlib.import_module("fakesnow.server").app
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


if __name__ == "__main__":
    serve_fakesnow(int(sys.argv[1]), Path(sys.argv[2]))
