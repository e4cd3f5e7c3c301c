"""Moved: committing a chunk's output is `factory.jobs.engine.commit`. Kept, re-exporting the names
`factory.jobs.training` imports from here, until it imports them from there."""

from factory.jobs.engine.commit import (  # noqa: F401
    REJECT_SCHEMA, parquet_bytes, publish_once, read_parquet_bytes, read_table,
)
