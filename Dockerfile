FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md beat_schedule.py ./
COPY core ./core
COPY connectors ./connectors
COPY workers ./workers
COPY windowpipe ./windowpipe
RUN pip install --no-cache-dir '.[all]'
USER nobody
