"""windowpipe's user-facing commands: the `windowpipe` command line and the demo.

The top layer: it may import `workers`, `connectors` and `core`; nothing imports it.
"""
