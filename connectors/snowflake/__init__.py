"""Snowflake as the target: SQL built in `sql`, the session in `client`, loading in `target`."""

from connectors.snowflake.target import SnowflakeTarget

__all__ = ["SnowflakeTarget"]
