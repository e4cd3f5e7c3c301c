"""The archives' duplicates policy: exact copies (same sha256 of the bytes) are captioned once per run, claimed
during the model stage and linked after it.

The first copy to claim a digest (`_dedup/<sha[:2]>/<sha>`, a conditional put naming its row id and chunk) is
captioned; every other copy is held, and at the end of its chunk waits for that row to be committed and gets a
row of its own with the same caption, answer and verdict, `duplicate_of` set to the captioned row's id and no
model time. A copy still waiting after `dedup_wait_s` (its owner's chunk not running, on a resume) is captioned
itself.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable

import structlog

from factory.jobs.engine.resume import committed_parts, read_committed
from factory.jobs.engine.source import ChunkDuplicates, Item, RunContext
from factory.jobs.sources.archives.listing import ArchiveChunk
from factory.jobs.sources.archives.rows import ArchiveObject, ArchiveRows

log = structlog.get_logger(__name__)


class DigestClaims(ChunkDuplicates):
    """The policy for one chunk: see the module docstring."""

    def __init__(self, run: RunContext, rows: ArchiveRows, chunk: ArchiveChunk):
        self.run, self.rows, self.chunk = run, rows, chunk
        self.tenant, self.wait_s = rows.archive.tenant, rows.archive.dedup_wait_s
        self.owners: dict[str, tuple[str, str]] = {}  # digests this chunk has met -> (row id, chunk) captioning it

    def hold(self, item: Item) -> bool:
        """Claim the image's digest for this row, or find the row that claimed it (then this is a copy)."""
        assert item.digest is not None
        owner = self.owners.get(item.digest)
        if owner is None:
            storage, uri = self.run.storage, self.run.layout.sha_claim(item.digest)
            mine = {"id": item.row_id, "chunk": self.chunk.id}
            if storage.put_if_absent(uri, json.dumps(mine).encode()):
                claimed = mine
            else:
                claimed = json.loads(storage.read_bytes(uri))
            owner = (claimed["id"], claimed["chunk"])
            self.owners[item.digest] = owner
        if owner == (item.row_id, self.chunk.id):
            return False
        obj: ArchiveObject = item.data
        obj.owner = owner
        return True

    async def link(self, held: list[Item], commit: Callable[[dict], None],
                   run_themselves: Callable[[list[Item]], Awaitable[None]]) -> None:
        """Rows for this chunk's copies, from the rows of the images they copy (waiting for them to be
        committed); copies whose image is not captioned within dedup_wait_s are captioned themselves."""
        deadline = time.monotonic() + self.wait_s
        owners: dict[str, dict[str, dict]] = {}
        waiting = list(held)
        delay = 0.2
        while waiting:
            for owner_chunk in {item.data.owner[1] for item in waiting}:
                owners[owner_chunk] = await asyncio.to_thread(self._committed_rows, owner_chunk)
            still = []
            for item in waiting:
                row_id, owner_chunk = item.data.owner
                found = owners.get(owner_chunk, {}).get(row_id)
                if found is None:
                    still.append(item)
                else:
                    commit(self.rows.copy_row(self.chunk.uri, item.row_id, item.data, found))
            waiting = still
            if not waiting or time.monotonic() >= deadline:
                break
            await asyncio.sleep(delay)
            delay = min(2.0, delay * 1.5)
        if waiting:
            log.info("copies captioned themselves: their image's row was not committed in time", job=self.run.job,
                     run_id=self.run.run_id, chunk=self.chunk.id, rows=len(waiting))
            await run_themselves(waiting)

    def _committed_rows(self, chunk_id: str) -> dict[str, dict]:
        storage, layout = self.run.storage, self.run.layout
        table = read_committed(storage, committed_parts(storage, layout, chunk_id, [self.tenant]), drop_failed=False)
        return {row["id"]: row for row in table.to_pylist()}
