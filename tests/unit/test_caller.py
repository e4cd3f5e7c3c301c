"""How a chunk's requests become replica calls: ordered by adapter, cut into single-adapter batches."""

from __future__ import annotations

from factory.jobs.caller import batches_by_adapter, ordered_by_adapter
from factory.routing.requests import Task, TaskRequest


def requests(adapters: str) -> list[tuple[int, TaskRequest]]:
    return [(line, TaskRequest(id=f"r{line}", tenant="t", task=Task.GENERATE, prompt="p",
                               adapter=None if name == "-" else name))
            for line, name in enumerate(adapters, start=1)]


def adapters_of(items) -> str:
    return "".join(request.adapter or "-" for _, request in items)


def test_a_chunk_is_ordered_by_adapter_stably_in_windows_or_whole():
    items = requests("ab-ab-ba")  # "-": the base model
    assert adapters_of(ordered_by_adapter(items, None)) == "--aaabbb"
    assert [line for line, _ in ordered_by_adapter(items, None)] == [3, 6, 1, 4, 8, 2, 5, 7]  # stable
    assert adapters_of(ordered_by_adapter(items, 3)) == "-ab-abab"
    assert adapters_of(ordered_by_adapter(items, 1)) == "ab-ab-ba"  # manifest order kept


def test_batches_share_one_adapter_and_respect_the_size():
    batches = batches_by_adapter(requests("aaaaab--b"), 2)
    assert [adapters_of(batch) for batch in batches] == ["aa", "aa", "a", "b", "--", "b"]
    assert sum(len(batch) for batch in batches) == 9
