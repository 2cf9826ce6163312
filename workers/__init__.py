"""Celery workers: `celery -A workers worker -Q <precheck|extract|load|audit|control>`."""

from workers import audit, control, extract, load, precheck
from workers.celery_app import QUEUES, app

__all__ = ["QUEUES", "app", "audit", "control", "extract", "load", "precheck"]
