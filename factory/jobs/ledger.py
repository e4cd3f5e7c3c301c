"""Which rows of a run are new, already committed, or duplicates: one small Ray actor per run.

Validation runs in parallel Ray Data tasks, so "have we seen this id?" needs one owner. The ledger starts
from what earlier attempts of the run committed (read back from the output), so a resumed run skips those
rows and still reports a second copy of a committed id as a duplicate.
"""

from __future__ import annotations

NEW, COMMITTED, DUPLICATE = "new", "committed", "duplicate"


class RowLedger:
    def __init__(self, committed_rows: dict[str, str], committed_rejects: set[str]):
        # id -> "manifest#line" of the copy that owns the id
        self.owners: dict[str, str] = dict(committed_rows)
        self.committed_ids = set(committed_rows)
        self.committed_rejects = set(committed_rejects)

    def claim(self, rows: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """For each (id, source key): (verdict, owner key). The first copy of an id owns it."""
        verdicts = []
        for row_id, key in rows:
            owner = self.owners.setdefault(row_id, key)
            if owner != key:
                verdicts.append((DUPLICATE, owner))
            elif row_id in self.committed_ids:
                verdicts.append((COMMITTED, owner))
            else:
                verdicts.append((NEW, owner))
        return verdicts

    def new_rejects(self, keys: list[str]) -> list[bool]:
        """False for rejects an earlier attempt already recorded, so they are not recorded twice."""
        fresh = []
        for key in keys:
            fresh.append(key not in self.committed_rejects)
            self.committed_rejects.add(key)
        return fresh
