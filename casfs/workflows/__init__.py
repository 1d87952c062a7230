"""Workflows that do not start from a mounted tree: import, export, retention, compaction."""
