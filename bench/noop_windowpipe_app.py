"""A decomposition of the orchestration gap: windowpipe's own app (`workers.celery_app.create_app`,
with its time limits, structured logging, liveness bootsteps and every windowpipe task
registered) running the bare chain's four no-op tasks (`bench.noop_tasks.register_noop_tasks`).

`celery -A bench.noop_windowpipe_app worker -Q <stage>`: what windowpipe's Celery plumbing
costs without a stage's work, so bench 1 can tell the app's share of the gap from the stages'.
"""

from __future__ import annotations

from bench.noop_tasks import register_noop_tasks
from core.config import load_config
from workers.celery_app import create_app

config = load_config()
app = create_app(config)
register_noop_tasks(app, config.settings.redis_url)
