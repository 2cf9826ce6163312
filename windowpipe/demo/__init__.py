"""`windowpipe demo`: the whole pipeline on this machine, with no outside service.

`run` is the demo itself (`run_demo`); `processes` supervises what it starts; `services` starts
Redis, the source, the target and Celery; `seeding` makes and indexes the events; `fakesnow`
is the Snowflake emulator's server; `view` draws the progress and the audit.
"""
