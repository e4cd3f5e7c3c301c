"""COCO captions, VQAv2 and TextCaps documents in their published layouts (fields the factory does not read
included), for the readers' unit tests and the benchmark job's integration test."""

from __future__ import annotations

import json


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
