"""Connectors: one module per external system, by role (source, stage, target), and a registry."""
