# A pinned base (a patch release, not a moving `3.11`; pin its digest too where your registry
# is reachable: `FROM python:3.11.7-slim-bookworm@sha256:...`) and pinned, hash-checked
# dependencies (requirements.lock), so a rebuild of the same commit installs the same code.
FROM python:3.11.7-slim-bookworm
WORKDIR /app
COPY requirements.lock ./
RUN pip install --no-cache-dir --require-hashes -r requirements.lock
COPY pyproject.toml README.md beat_schedule.py ./
COPY core ./core
COPY connectors ./connectors
COPY workers ./workers
COPY windowpipe ./windowpipe
# The dependencies are installed above: windowpipe itself only.
RUN pip install --no-cache-dir --no-deps .
# 65534 (nobody), as the Kubernetes pods' runAsUser; the root filesystem may be read-only.
USER 65534:65534
