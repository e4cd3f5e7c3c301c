"""COCO captions, VQAv2 and TextCaps files, in their published layouts, read as manifest rows."""

from __future__ import annotations

import pytest

from factory.errors import InputError
from factory.quality.benchmarks import coco_caption_rows, textcaps_rows, vqa_rows
from factory.quality.captions import bleu, bleu_counts, tokenize
from factory.quality.vqa import vqa_accuracy
from tests.benchmark_files import coco_captions, textcaps, vqa_annotations, vqa_questions


def test_coco_captions_become_one_caption_row_per_image_with_its_references():
    rows = coco_caption_rows(coco_captions(), "/data/coco/val2014", tenant="bench")
    assert rows[0] == {
        "id": "391895", "tenant": "bench", "task": "caption",
        "image": "/data/coco/val2014/COCO_val2014_000000391895.jpg",
        "references": ["A man with a red helmet on a small moped on a dirt road. ",
                       "Man riding a motor bike on a dirt road on the countryside.",
                       "A man riding on the back of a motorcycle."],
    }
    assert rows[1]["references"] == ["A woman wearing a net on her head cutting a cake. "]
    # No file name in `images`: COCO's naming; no captions: a caption row with nothing to score against.
    assert rows[2] == {"id": "184613", "tenant": "bench", "task": "caption",
                       "image": "/data/coco/val2014/COCO_val2014_000000184613.jpg"}


def test_coco_images_named_by_the_2017_convention_and_found_under_s3():
    document = coco_captions()
    document["images"] = []
    rows = coco_caption_rows(document, "s3://datasets/coco/val2017/", tenant="t", file_pattern="%012d.jpg")
    assert [row["image"] for row in rows] == ["s3://datasets/coco/val2017/000000391895.jpg",
                                              "s3://datasets/coco/val2017/000000522418.jpg"]


def test_vqa_questions_and_annotations_become_vqa_rows_with_ten_answers():
    rows = vqa_rows(vqa_questions(), vqa_annotations(), "/data/coco/val2014", tenant="bench")
    assert rows[0] == {
        "id": "262148000", "tenant": "bench", "task": "vqa", "question": "Where is he looking?",
        "image": "/data/coco/val2014/COCO_val2014_000000262148.jpg",
        "answers": ["down", "down", "at table", "skateboard", "down", "table", "down", "down", "down", "down"],
    }
    assert len(rows[1]["answers"]) == 10
    assert vqa_accuracy("Two", rows[1]["answers"]) == pytest.approx(1.0)
    assert vqa_accuracy("3", rows[1]["answers"]) == pytest.approx(0.3)


def test_vqa_test_split_questions_have_no_answers():
    rows = vqa_rows(vqa_questions(), None, "/images", tenant="bench")
    assert [set(row) for row in rows] == [{"id", "tenant", "task", "question", "image"}] * 2


def test_a_question_without_annotation_is_named():
    annotations = vqa_annotations()
    annotations["annotations"].pop()
    with pytest.raises(InputError, match="^vqa annotations: no answers for question 262148001$"):
        vqa_rows(vqa_questions(), annotations, "/images", tenant="bench")


def test_textcaps_entries_become_one_row_per_image():
    rows = textcaps_rows(textcaps(), "/data/textvqa", tenant="bench")
    assert [row["id"] for row in rows] == ["0a0bc91825468c45", "011e7e629fb9ae7b"]
    assert rows[0]["image"] == "/data/textvqa/train/0a0bc91825468c45.jpg"
    assert rows[0]["references"] == ["A bottle of Coca-Cola next to a can.", "A red can that says Coca-Cola.",
                                     "Coca-Cola bottle on a table."]
    flat = textcaps_rows(textcaps(), "/data/textvqa/train_images", tenant="bench", flat=True)
    assert flat[1]["image"] == "/data/textvqa/train_images/011e7e629fb9ae7b.jpg"


def test_caption_rows_feed_the_caption_scores():
    row = textcaps_rows(textcaps(), "/images", tenant="bench")[1]
    references = [tokenize(reference) for reference in row["references"]]
    assert bleu(bleu_counts(tokenize("A stop sign on a pole!"), references))[3] == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d["annotations"][1].pop("caption"), r"^captions: annotations\[1\]\.caption: required$"),
        (lambda d: d["images"][0].update(id="first"), r"^captions: images\[0\]\.id: .*integer"),
        (lambda d: d.pop("annotations"), r"^captions: annotations: required$"),
        (lambda d: d["images"][0].update(file_name="../../etc/passwd"), r"^captions: image 391895: .*would leave"),
    ],
)
def test_malformed_files_are_one_line_errors_naming_the_field(mutate, message):
    document = coco_captions()
    mutate(document)
    with pytest.raises(InputError, match=message):
        coco_caption_rows(document, "/images", tenant="bench")


def test_malformed_vqa_and_textcaps_files_name_the_file_and_field():
    questions = vqa_questions()
    del questions["questions"][0]["question"]
    with pytest.raises(InputError, match=r"^vqa questions: questions\[0\]\.question: required$"):
        vqa_rows(questions, None, "/images", tenant="bench")
    document = textcaps()
    document["data"][0]["reference_strs"] = "not a list"
    with pytest.raises(InputError, match=r"^textcaps: data\[0\]\.reference_strs: "):
        textcaps_rows(document, "/images", tenant="bench")
