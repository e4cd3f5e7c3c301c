"""How a chunk's requests become replica calls: ordered by adapter, cut into single-adapter batches."""

from __future__ import annotations

from factory.jobs.engine.model_stage import Batcher
from factory.jobs.engine.source import Item
from factory.jobs.sources.manifests.source import ordered_by_adapter
from factory.routing.requests import Task, TaskRequest


def requests(adapters: str) -> list[tuple[int, TaskRequest]]:
    return [(line, TaskRequest(id=f"r{line}", tenant="t", task=Task.GENERATE, prompt="p",
                               adapter=None if name == "-" else name))
            for line, name in enumerate(adapters, start=1)]


def adapters_of(items) -> str:
    return "".join(request.adapter or "-" for _, request in items)


def batches_by_adapter(items: list[tuple[int, TaskRequest]], size: int, calls: int = 1) -> list[list]:
    """The model stage's batches of a chunk's items, handed to the batcher one by one as the chunk is read."""
    batcher, batches = Batcher(size), []
    for line, request in items:
        item = Item(row_id=request.id, tenant=request.tenant, adapter=request.adapter, calls=calls,
                    data=(line, request))
        batches.extend(batcher.add(item))
    if batcher.batch:
        batches.append(batcher.rest())
    return [[item.data for item in batch] for batch in batches]


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


def test_an_item_of_two_calls_counts_twice_against_the_size():
    # An archive image with a question is a caption call and a question call: 4 calls hold two images.
    assert [len(batch) for batch in batches_by_adapter(requests("-----"), 4, calls=2)] == [2, 2, 1]
    assert [len(batch) for batch in batches_by_adapter(requests("---"), 3, calls=2)] == [1, 1, 1]


def test_a_full_batch_is_handed_out_at_once_not_when_the_next_item_comes():
    batcher = Batcher(2)
    first, second = (Item(row_id=f"r{n}", tenant="t") for n in range(2))
    assert batcher.add(first) == []
    assert batcher.add(second) == [[first, second]] and batcher.batch == []
