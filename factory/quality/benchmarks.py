"""Public benchmark files read as manifest rows: COCO captions, VQAv2 questions + annotations, TextCaps.

Each reader takes the parsed JSON document (reading the bytes, local or s3://, is the caller's: `io.storage`) and
the folder its images are in, and returns row dicts in the factory's manifest shape: caption rows carry
`references`, VQA rows `question` and `answers`, which is what the scores of `factory.quality` compare against.
They live here rather than in `io` because they speak the vocabulary of those scores, not of storage.

The formats are those the datasets publish; fields the factory does not use are ignored, and a field it needs
that is missing or of the wrong type is a one-line error naming the file and the field.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from factory.errors import InputError, one_line, validation_problems
from factory.io.storage import join

# MS-COCO 2014 image names (VQAv2 and the 2014 caption splits use them); 2017 splits name files "%012d.jpg".
COCO_VAL2014 = "COCO_val2014_%012d.jpg"


class _Published(BaseModel):
    # Published files carry fields the factory does not read (licenses, urls, tokens, confidences): ignore them.
    model_config = ConfigDict(extra="ignore", frozen=True)


class _CocoImage(_Published):
    id: int
    file_name: str | None = None


class _CocoCaption(_Published):
    image_id: int
    caption: str


class _CocoCaptions(_Published):
    images: list[_CocoImage] = []
    annotations: list[_CocoCaption]


class _VqaQuestion(_Published):
    question_id: int
    image_id: int
    question: str


class _VqaQuestions(_Published):
    questions: list[_VqaQuestion]


class _VqaAnswer(_Published):
    answer: str


class _VqaAnnotation(_Published):
    question_id: int
    answers: list[_VqaAnswer]


class _VqaAnnotations(_Published):
    annotations: list[_VqaAnnotation]


class _TextCapsEntry(_Published):
    image_id: str
    image_path: str | None = None
    image_name: str | None = None
    caption_str: str | None = None
    reference_strs: list[str] | None = None


class _TextCaps(_Published):
    data: list[_TextCapsEntry]


def _parse(model: type[_Published], document: Any, source: str):
    try:
        return model.model_validate(document)
    except ValidationError as error:
        raise InputError(f"{source}: {one_line(validation_problems(error))}") from None


def _image_uri(images: str, name: str, source: str, what: str) -> str:
    try:
        return join(images, name)
    except InputError as error:
        raise InputError(f"{source}: {what}: {error}") from None


def coco_caption_rows(document: Mapping[str, Any], images: str, *, tenant: str, source: str = "captions",
                      file_pattern: str = COCO_VAL2014) -> list[dict[str, Any]]:
    """One caption row per image of a COCO captions file (`captions_val2014.json`), its captions the references.
    Images are found by the `file_name` the file gives them, else by `file_pattern % image_id`; images listed
    without captions become rows without references."""
    parsed = _parse(_CocoCaptions, document, source)
    names = {image.id: image.file_name or file_pattern % image.id for image in parsed.images}
    references: dict[int, list[str]] = {image_id: [] for image_id in names}
    for annotation in parsed.annotations:
        references.setdefault(annotation.image_id, []).append(annotation.caption)
    rows = []
    for image_id, captions in references.items():
        name = names.get(image_id, file_pattern % image_id)
        row = {"id": str(image_id), "tenant": tenant, "task": "caption",
               "image": _image_uri(images, name, source, f"image {image_id}")}
        if captions:
            row["references"] = captions
        rows.append(row)
    return rows


def vqa_rows(questions: Mapping[str, Any], annotations: Mapping[str, Any] | None, images: str, *, tenant: str,
             source: str = "vqa", file_pattern: str = COCO_VAL2014) -> list[dict[str, Any]]:
    """One VQA row per question of a VQAv2 questions file, with the ten human answers of its annotations file
    (None for a test split, which publishes none). VQAv2 names no image files: `file_pattern % image_id`."""
    parsed = _parse(_VqaQuestions, questions, f"{source} questions")
    answers: dict[int, list[str]] = {}
    if annotations is not None:
        for annotation in _parse(_VqaAnnotations, annotations, f"{source} annotations").annotations:
            answers[annotation.question_id] = [answer.answer for answer in annotation.answers]
    rows = []
    for question in parsed.questions:
        image = _image_uri(images, file_pattern % question.image_id, source, f"question {question.question_id}")
        row = {"id": str(question.question_id), "tenant": tenant, "task": "vqa", "question": question.question,
               "image": image}
        if annotations is not None:
            if not answers.get(question.question_id):
                raise InputError(f"{source} annotations: no answers for question {question.question_id}")
            row["answers"] = answers[question.question_id]
        rows.append(row)
    return rows


def textcaps_rows(document: Mapping[str, Any], images: str, *, tenant: str, source: str = "textcaps",
                  flat: bool = False) -> list[dict[str, Any]]:
    """One caption row per image of a TextCaps file (`TextCaps_0.1_val.json`: one entry per caption, each with
    all of its image's captions as `reference_strs`). The image is `image_path` under `images` (e.g.
    `train/<id>.jpg`); `flat` finds it by file name alone (TextVQA's `train_images/` folder holds them flat)."""
    parsed = _parse(_TextCaps, document, source)
    entries: dict[str, list[_TextCapsEntry]] = {}
    for entry in parsed.data:
        entries.setdefault(entry.image_id, []).append(entry)
    rows = []
    for image_id, group in entries.items():
        first = group[0]
        path = first.image_path or f"{first.image_name or image_id}.jpg"
        if flat:
            path = path.rsplit("/", 1)[-1]
        row = {"id": image_id, "tenant": tenant, "task": "caption",
               "image": _image_uri(images, path, source, f"image {image_id}")}
        references = first.reference_strs or [entry.caption_str for entry in group if entry.caption_str]
        if references:
            row["references"] = references
        rows.append(row)
    return rows
