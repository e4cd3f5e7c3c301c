"""COCO captions, VQAv2 and TextCaps files, in their published layouts, read as manifest rows."""

from __future__ import annotations

import json

import pytest

from factory.errors import InputError
from factory.quality.benchmarks import coco_caption_rows, textcaps_rows, vqa_rows
from factory.quality.captions import bleu, bleu_counts, tokenize
from factory.quality.vqa import vqa_accuracy


def _published(document: dict) -> dict:
    """The document as a JSON file gives it back (keys and numbers as json.load makes them)."""
    return json.loads(json.dumps(document))


def coco_captions() -> dict:
    """`captions_val2014.json`: images with their file names, one annotation per human caption."""
    return _published({
        "info": {"description": "COCO 2014 Dataset", "version": "1.0", "year": 2014},
        "licenses": [{"url": "http://creativecommons.org/licenses/by-nc-sa/2.0/", "id": 1, "name": "BY-NC-SA"}],
        "images": [
            {"license": 4, "file_name": "COCO_val2014_000000391895.jpg", "coco_url": "http://x/391895.jpg",
             "height": 360, "width": 640, "date_captured": "2013-11-14 11:18:45", "id": 391895},
            {"license": 1, "file_name": "COCO_val2014_000000522418.jpg", "height": 480, "width": 640, "id": 522418},
            {"license": 1, "height": 480, "width": 640, "id": 184613},
        ],
        "annotations": [
            {"image_id": 391895, "id": 770337, "caption": "A man with a red helmet on a small moped on a dirt road. "},
            {"image_id": 522418, "id": 775020, "caption": "A woman wearing a net on her head cutting a cake. "},
            {"image_id": 391895, "id": 771687, "caption": "Man riding a motor bike on a dirt road on the countryside."},
            {"image_id": 391895, "id": 772707, "caption": "A man riding on the back of a motorcycle."},
        ],
    })


def vqa_questions() -> dict:
    """`v2_OpenEnded_mscoco_val2014_questions.json`."""
    return _published({
        "info": {"description": "This is v2.0 of the VQA dataset."}, "task_type": "Open-Ended",
        "data_type": "mscoco", "license": {"url": "http://creativecommons.org/licenses/by/4.0/"},
        "data_subtype": "val2014",
        "questions": [
            {"image_id": 262148, "question": "Where is he looking?", "question_id": 262148000},
            {"image_id": 262148, "question": "How many people are in the photo?", "question_id": 262148001},
        ],
    })


def _answers(*answers: str) -> list[dict]:
    return [{"answer": answer, "answer_confidence": "yes", "answer_id": i + 1} for i, answer in enumerate(answers)]


def vqa_annotations() -> dict:
    """`v2_mscoco_val2014_annotations.json`: ten human answers per question."""
    return _published({
        "info": {}, "license": {}, "data_subtype": "val2014", "data_type": "mscoco",
        "annotations": [
            {"question_type": "none of the above", "multiple_choice_answer": "down",
             "answers": _answers("down", "down", "at table", "skateboard", "down", "table", "down", "down", "down",
                                 "down"),
             "image_id": 262148, "answer_type": "other", "question_id": 262148000},
            {"question_type": "how many", "multiple_choice_answer": "2",
             "answers": _answers(*["2"] * 6, "two", "3", "2", "1"),
             "image_id": 262148, "answer_type": "number", "question_id": 262148001},
        ],
    })


def textcaps() -> dict:
    """`TextCaps_0.1_val.json`: one entry per caption, each with all of its image's captions as references."""
    images = {"0a0bc91825468c45": ["A bottle of Coca-Cola next to a can.", "A red can that says Coca-Cola.",
                                   "Coca-Cola bottle on a table."],
              "011e7e629fb9ae7b": ["A sign that says STOP in white letters.", "A stop sign on a pole."]}
    return _published({
        "dataset_type": "val", "dataset_name": "textcaps", "dataset_version": "0.1",
        "data": [
            {"image_id": image_id, "image_classes": ["Bottle"], "flickr_original_url": "https://x/o.jpg",
             "flickr_300k_url": "https://x/300k.jpg", "image_width": 1024, "image_height": 768, "set_name": "val",
             "image_name": image_id, "image_path": f"train/{image_id}.jpg", "caption_id": number,
             "caption_str": caption, "caption_tokens": caption.lower().split(), "reference_strs": captions,
             "reference_tokens": [c.lower().split() for c in captions]}
            for image_id, captions in images.items() for number, caption in enumerate(captions)
        ],
    })


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
