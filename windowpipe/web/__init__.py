"""`windowpipe web`: the windows in a browser, server-rendered (Starlette, Jinja2, uvicorn).

The parts: `reading` (the queries: one grouped query for the pipelines page, the grid's cells
with only the columns it draws, one record), `layout` (pure: freshness against the newest due
window, the grid's rows, sorting), `security` (basic auth, read-only mode, CSRF tokens) and
`app` (the pages and the one action, the re-run, which is `windowpipe enqueue --force`'s own
code path: windowpipe/enqueue.py). The templates autoescape every value.
"""
