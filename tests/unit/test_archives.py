"""Archive sources without Ray: listing, member safety, image rules, chunk planning and resume of a listing."""

from __future__ import annotations

import tarfile

import pytest
from PIL import Image

from factory.errors import ConfigError, InputError
from factory.io.archives import (
    expand_braces, list_folder, list_prefix, member_problem, read_folder_entries, read_prefix_entries,
    read_tar_entries, read_zip_entries, resolve_sources, zip_member_count,
)
from factory.io.images import fit_size, prepare_image
from factory.io.layout import OutputLayout
from factory.io.storage import Storage
from factory.jobs.engine.writers import dataset_stem
from factory.jobs.sources.archives.listing import PlanContext, check_sources, list_source, read_plan
from factory.jobs.sources.archives.rows import caption_instruction
from factory.jobs.sources.archives.source import caption_spec
from tests.archives import bad_files, build_folder, build_tar_shards, build_zip, good_images


def test_brace_patterns_expand_like_webdataset():
    assert expand_braces("shard-{000..003}.tar") == [f"shard-{n:03d}.tar" for n in range(4)]
    assert expand_braces("s3://b/{train,val}/x-{8..10}.tar") == [
        "s3://b/train/x-8.tar", "s3://b/train/x-9.tar", "s3://b/train/x-10.tar",
        "s3://b/val/x-8.tar", "s3://b/val/x-9.tar", "s3://b/val/x-10.tar"]
    assert expand_braces("plain.tar") == ["plain.tar"]


@pytest.mark.parametrize(("name", "reason"), [
    ("../x.jpg", "climbs out"), ("a/../../x.jpg", "climbs out"), ("a\\..\\x.jpg", "climbs out"),
    ("/etc/passwd", "absolute path"), ("C:/x.jpg", "absolute path"), ("a\x00b.jpg", "control characters"),
    ("", "empty name"),
])
def test_unsafe_member_names_are_refused(name, reason):
    assert reason in member_problem(name)


@pytest.mark.parametrize("name", ["a.jpg", "dir/sub/a..b.jpg", "..hidden.png", "x/.y.jpg"])
def test_ordinary_member_names_pass(name):
    assert member_problem(name) is None


@pytest.mark.parametrize(("name", "rule"), [(name, rule) for name, (_, rule) in good_images().items()])
def test_every_image_kind_is_converted_by_its_rule(name, rule):
    data, _ = good_images()[name]
    prepared = prepare_image(data, name, budget_pixels=64 * 64)
    assert prepared.rule == rule
    assert prepared.image.mode == "RGB" and prepared.image.size[0] * prepared.image.size[1] <= 64 * 64


def test_rules_do_what_they_say():
    goods = good_images()
    rotated = prepare_image(goods["phone-rotated.jpg"][0], "r")
    assert (rotated.width, rotated.height) == (100, 150) and rotated.image.size == (100, 150)
    logo = prepare_image(goods["logo-alpha.png"][0], "l")
    # Half-transparent pixels over white are lighter than the same pixels over black would be.
    assert min(logo.image.getpixel((0, 0))) >= 127
    scan = prepare_image(goods["scan-16bit.png"][0], "s")
    original = Image.open(__import__("io").BytesIO(goods["camera-gray.png"][0])).convert("RGB")
    assert scan.image.getpixel((10, 10)) == original.getpixel((10, 10))  # v*257 scaled back is v, not clipped


@pytest.mark.parametrize(("name", "reason"), [(name, reason) for name, (_, reason) in bad_files().items()])
def test_bad_images_are_refused_with_their_reason(name, reason):
    data, _ = bad_files()[name]
    with pytest.raises(InputError) as error:
        prepare_image(data, name)
    assert reason in str(error.value)


def test_fit_size_keeps_the_aspect_and_never_enlarges():
    assert fit_size(4000, 3000, 448 * 448) == (517, 387) and 517 * 387 <= 448 * 448
    assert fit_size(100, 50, 448 * 448) == (100, 50)


def test_folder_listing_is_sorted_resumable_and_never_follows_links(tmp_path):
    expected = build_folder(tmp_path)
    names = list(list_folder(str(tmp_path)))
    assert names == sorted(names, key=lambda n: n.split("/"))
    assert set(names) == set(expected) | {"photos/chelsea.txt"}
    assert list(list_folder(str(tmp_path), after="bad/truncated.jpg")) == [n for n in names if n.startswith("photos/")]
    entries = {e.name: e for e in read_folder_entries(str(tmp_path), names, 1 << 20)}
    assert entries["photos/chelsea.txt"].companion
    assert "symbolic link" in entries["bad/link-out.jpg"].problem and entries["bad/link-out.jpg"].data is None
    assert "FIFO" in entries["bad/pipe.jpg"].problem
    assert entries["photos/chelsea.jpg"].data == good_images()["chelsea.jpg"][0]


def test_byte_cap_refuses_large_files_without_reading_them(tmp_path):
    (tmp_path / "big.png").write_bytes(b"\x00" * 5000)
    [entry] = read_folder_entries(str(tmp_path), ["big.png"], 1000)
    assert "larger than the 1000 byte limit" in entry.problem and entry.data is None


def test_tar_members_stream_with_every_unsafe_kind_refused(tmp_path):
    [shard], expected = build_tar_shards(tmp_path, shards=1)
    entries = list(read_tar_entries(Storage(), str(shard), 1 << 25))
    names = {e.name for e in entries}
    assert {f"{shard.name}/{e.name}" for e in entries} == set(expected)
    assert not any(name.endswith(".txt") for name in names) and "dir" not in names
    problems = {e.name: e.problem for e in entries if e.problem}
    assert set(problems) == {"../escape.jpg", "/etc/absolute.jpg", "soft.jpg", "hard.jpg", "dev.jpg", "fifo.jpg"}
    # Committed members are passed over without their bytes being read.
    skipped = list(read_tar_entries(Storage(), str(shard), 1 << 25, skip=frozenset({"000000.jpg"})))
    assert "000000.jpg" not in {e.name for e in skipped}


def test_a_truncated_tar_keeps_what_came_before_and_says_where_it_broke(tmp_path):
    [shard], _ = build_tar_shards(tmp_path, shards=1)
    data = shard.read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) // 2])
    entries = list(read_tar_entries(Storage(), str(cut), 1 << 25))
    assert entries[0].name == "000000.jpg" and entries[0].data
    assert entries[-1].name == "" and "truncated or corrupt after member" in entries[-1].problem
    not_tar = tmp_path / "not.tar"
    not_tar.write_bytes(b"hello" * 300)
    [entry] = list(read_tar_entries(Storage(), str(not_tar), 1 << 25))
    assert "not a tar archive" in entry.problem


def test_zip_members_by_range_with_unsafe_ones_refused(tmp_path):
    expected = build_zip(tmp_path / "a.zip")
    storage = Storage()
    count = zip_member_count(storage, str(tmp_path / "a.zip"))
    assert count == 9
    entries = list(read_zip_entries(storage, str(tmp_path / "a.zip"), 0, count - 1, 1 << 25))
    assert {f"a.zip/{e.name}" for e in entries} == set(expected)
    assert "symbolic link" in next(e for e in entries if e.name == "imgs/link.png").problem
    first_two = list(read_zip_entries(storage, str(tmp_path / "a.zip"), 0, 1, 1 << 25))
    assert [e.name for e in first_two] == ["imgs/chelsea.jpg", "imgs/coffee.png"]


def test_zip_bomb_members_are_capped_by_their_real_size(tmp_path):
    import zipfile

    with zipfile.ZipFile(tmp_path / "bomb.zip", "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("zeros.png", b"\x00" * 2_000_000)
    [entry] = list(read_zip_entries(Storage(), str(tmp_path / "bomb.zip"), 0, 0, 100_000))
    assert "larger than the 100000 byte limit" in entry.problem


def test_sources_resolve_by_kind_and_missing_paths_stop_the_run(tmp_path):
    build_folder(tmp_path / "f")
    build_tar_shards(tmp_path, shards=2)
    build_zip(tmp_path / "a.zip")
    sources = resolve_sources([str(tmp_path / "shard-{000..002}.tar"), str(tmp_path / "f"), str(tmp_path / "a.zip"),
                               "s3://bucket/prefix/"], Storage())
    assert [s.kind for s in sources] == ["tar", "tar", "tar", "folder", "zip", "prefix"]
    assert sources[0].label == "shard-000.tar"
    with pytest.raises(ConfigError, match="no such file or folder"):
        resolve_sources([str(tmp_path / "typo")], Storage())


def test_listing_plans_chunks_saves_them_and_resumes_after_the_last(tmp_path):
    build_folder(tmp_path / "src")
    storage, layout = Storage(), OutputLayout(str(tmp_path / "out"))
    sources = resolve_sources([str(tmp_path / "src")], storage)
    ctx = PlanContext(storage=storage, layout=layout, sources=tuple(sources), chunk_objects=6)
    listing = list_source(ctx, 0, None, 0, 0)
    first, second = next(listing), next(listing)  # an interrupted listing: two chunks saved, no `listed` file
    saved = read_plan(storage, layout)
    assert [c.id for c in saved.chunks[0]] == [first.id, second.id] and saved.listed == set()
    rest = list(list_source(ctx, 0, second.names[-1], second.seq + 1, second.offset + len(second.names)))
    saved = read_plan(storage, layout)
    assert saved.listed == {0}
    names = [name for chunk in saved.chunks[0] for name in chunk.names]
    assert names == list(list_folder(str(tmp_path / "src")))  # every object once, in order, none twice
    assert [c.seq for c in saved.chunks[0]] == list(range(2 + len(rest)))
    # The same listing again gives the same chunk ids (so a re-run finds their markers).
    again = list(list_source(PlanContext(storage, OutputLayout(str(tmp_path / "o2")), tuple(sources), 6), 0, None, 0, 0))
    assert [c.id for c in again] == [c.id for c in saved.chunks[0]]


def test_a_run_refuses_other_sources(tmp_path):
    storage, layout = Storage(), OutputLayout(str(tmp_path / "out"))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    check_sources(storage, layout, resolve_sources([str(tmp_path / "a")], storage), 10)
    check_sources(storage, layout, resolve_sources([str(tmp_path / "a")], storage), 10)
    with pytest.raises(ConfigError, match="other archive sources"):
        check_sources(storage, layout, resolve_sources([str(tmp_path / "b")], storage), 10)


def test_prefix_listing_pages_lazily_and_starts_after_a_key(s3_endpoint):
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="listing")
    for index in range(25):
        s3.put_object(Bucket="listing", Key=f"imgs/{index:03d}.jpg", Body=good_images()["chelsea.jpg"][0])
    s3.put_object(Bucket="listing", Key="imgs/folder/", Body=b"")
    storage = Storage()
    names = list(list_prefix(storage, "s3://listing/imgs"))
    assert names == [f"{i:03d}.jpg" for i in range(25)]
    assert list(list_prefix(storage, "s3://listing/imgs/", after="020.jpg")) == [f"{i:03d}.jpg" for i in range(21, 25)]
    entries = list(read_prefix_entries(storage, "s3://listing/imgs", names[:10], 1 << 20))
    assert [e.name for e in entries] == names[:10] and all(e.data for e in entries)


def test_dataset_names_are_safe_and_unique():
    assert dataset_stem("../../etc/passwd", "ab" * 32) == "passwd-abababababab"
    assert dataset_stem("a b/ü?.jpg", "cd" * 32) == "image-cdcdcdcdcdcd"
    stem = dataset_stem("dir/My Photo (1).JPG", "0123456789abcdef" * 4)
    assert stem == "My_Photo_1-0123456789ab" and "/" not in stem


def test_caption_instruction_and_spec():
    assert caption_instruction("Describe: a short alt text") == "a short alt text"
    assert caption_instruction("Write alt text") == "Write alt text"
    spec = caption_spec(["/data/imgs"], "/out", question="Is it red?", sidecars=True,
                        overrides=["archive.chunk_objects=50", "serve.max_batch_size=8"])
    assert spec.archive.sources == ["/data/imgs"] and spec.archive.chunk_objects == 50 and spec.inputs == []
    with pytest.raises(ConfigError, match="archive.chunk_objects"):
        caption_spec(["/data"], "/out", overrides=["archive.chunk_objects=0"])
    with pytest.raises(ConfigError, match="unknown field"):
        caption_spec(["/data"], "/out", overrides=["archive.chunk_objcts=5"])


def test_tar_member_kinds_are_detected_from_headers(tmp_path):
    path = tmp_path / "k.tar"
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("blk.jpg")
        info.type = tarfile.BLKTYPE
        tar.addfile(info)
    [entry] = list(read_tar_entries(Storage(), str(path), 100))
    assert "device" in entry.problem


def test_the_caption_job_spec_loads():
    from pathlib import Path

    from factory.jobs.spec import load_spec

    spec = load_spec(Path(__file__).resolve().parents[2] / "jobs" / "caption-archive.yaml")
    assert spec.archive is not None and spec.archive.sidecars and spec.inputs == []
    assert spec.archive.sources[0].endswith("jobs/data/images")


def test_an_output_inside_the_source_folder_is_never_listed_as_input(tmp_path):
    build_folder(tmp_path / "src")
    (tmp_path / "src" / "out" / "run" / "dataset").mkdir(parents=True)
    (tmp_path / "src" / "out" / "run" / "dataset" / "x.png").write_bytes(good_images()["coffee.png"][0])
    storage, layout = Storage(), OutputLayout(str(tmp_path / "src" / "out" / "run"))
    sources = resolve_sources([str(tmp_path / "src")], storage)
    ctx = PlanContext(storage, layout, tuple(sources), 100, output=str(tmp_path / "src" / "out"))
    names = [name for chunk in list_source(ctx, 0, None, 0, 0) for name in chunk.names]
    assert names and not any(name.startswith("out/") for name in names)


def test_vlm_max_pixels_goes_to_a_qwen_processor_and_bounds_its_visual_tokens():
    from types import SimpleNamespace

    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from factory.model.profiles import get_profile
    from factory.model.vlm import bound_processor_pixels

    budget = get_profile("flux-dev").vlm.max_pixels
    assert budget == 448 * 448
    image_processor = Qwen2VLImageProcessorPil()
    unbounded = image_processor(images=[Image.new("RGB", (2000, 1500))], return_tensors="pt")["image_grid_thw"]
    assert bound_processor_pixels(SimpleNamespace(image_processor=image_processor), budget)
    bounded = image_processor(images=[Image.new("RGB", (2000, 1500))], return_tensors="pt")["image_grid_thw"]
    patches = int(bounded.prod())  # 14x14-pixel patches; 4 make one visual token
    assert patches * 14 * 14 <= budget < int(unbounded.prod()) * 14 * 14
    assert patches // 4 <= 256


def test_processors_without_a_pixel_bound_get_resized_images(stack):
    from factory.model.vlm import bound_processor_pixels

    assert not bound_processor_pixels(stack.vlm.processor, 320 * 320)  # the tiny CLIP processor: resized instead
    assert stack.vlm.profile.max_pixels == 320 * 320
    seen = []
    processor = stack.vlm.processor
    original = type(processor).__call__

    def spy(self, *args, **kwargs):
        seen.extend(image.size for image in kwargs.get("images") or [])
        return original(self, *args, **kwargs)

    type(processor).__call__ = spy
    try:
        assert stack.vlm.caption([Image.new("RGB", (1600, 1200), (200, 30, 30))])
    finally:
        type(processor).__call__ = original
    assert seen and seen[0][0] * seen[0][1] <= 320 * 320 and abs(seen[0][0] / seen[0][1] - 4 / 3) < 0.02
