"""Getting ``{_id, text}`` out of a database into the JSONL that ``embed`` reads (MongoDB, BigQuery).

Each exporter streams into :class:`~tweet_embed.export.jsonl_writer.ResumableJsonlWriter`, which writes a
hidden partial file with commit points and renames it at the end, so re-running an interrupted export
continues where the last commit left off. Database clients are optional extras and imported lazily.
"""

from __future__ import annotations

from tweet_embed.export.jsonl_writer import ExportError, ExportResult, ResumableJsonlWriter

__all__ = ["ExportError", "ExportResult", "ResumableJsonlWriter"]
