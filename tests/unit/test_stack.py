"""All three tasks through the real tiny stack on real images."""

from __future__ import annotations

import numpy as np
from PIL import Image

from factory.model.generator import GenerationParams
from factory.routing.executor import TaskExecutor, encode_png
from factory.routing.local import profile_defaults
from factory.routing.parser import parse_request
from factory.routing.requests import Status


def params(seed: int, prompt: str = "a red bicycle", **overrides) -> GenerationParams:
    values = {"prompt": prompt, "seed": seed, "steps": 2, "width": 128, "height": 128, "guidance": 3.5} | overrides
    return GenerationParams(**values)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(int)


def test_same_seed_same_bytes_and_other_seeds_differ(stack):
    first, again, other = stack.generate([params(7)]), stack.generate([params(7)]), stack.generate([params(8)])
    assert encode_png(first[0]) == encode_png(again[0])
    assert encode_png(first[0]) != encode_png(other[0])
    assert first[0].size == (128, 128)


def test_a_row_does_not_depend_on_its_batch_neighbours(stack):
    row = params(7)
    with_some = stack.generate([params(1, "a cat"), row, params(2, "winter sale"), params(3, "sky")])[1]
    with_others = stack.generate([row, params(11, "long prompt about shoes"), params(12, "x"), params(13, "y")])[0]
    # Same batch size, different neighbours and positions: bit-identical.
    assert encode_png(with_some) == encode_png(with_others)
    # Alone, fp32 kernels for another batch size may round differently, by at most one level of 255.
    alone = stack.generate([row])[0]
    assert np.abs(pixels(alone) - pixels(with_some)).max() <= 1


def test_mixed_sizes_in_one_batch_come_back_in_order(stack):
    batch = [params(1, width=128, height=64), params(2, width=64, height=128), params(3, width=128, height=64)]
    images = stack.generate(batch)
    assert [image.size for image in images] == [(128, 64), (64, 128), (128, 64)]
    assert encode_png(images[0]) == encode_png(stack.generate([batch[0], batch[2]])[0])


def test_caption_and_answer_real_images_in_one_batch(stack, sample_images):
    images = [Image.open(sample_images[name]).convert("RGB") for name in ("astronaut", "chelsea", "coffee")]
    captions = stack.caption(images)
    answers = stack.answer(images[:2], ["What animal is this?", "How many cups?"])
    assert len(captions) == 3 and all(isinstance(c, str) and c for c in captions)
    assert len(answers) == 2 and all(a for a in answers)
    assert stack.caption(images[:1]) == stack.caption(images[:1])  # greedy decoding is deterministic


def test_executor_runs_all_three_tasks_with_one_call_each(stack, sample_images):
    defaults = profile_defaults(stack.profile)
    rows = [
        {"id": "g1", "tenant": "acme", "prompt": "a red bicycle", "seed": 1, "width": 64, "height": 64, "steps": 2},
        {"id": "c1", "tenant": "acme", "prompt": "Describe: the product", "image": str(sample_images["coffee"])},
        {"id": "q1", "tenant": "beta", "prompt": "Question: what animal is it?", "image": str(sample_images["chelsea"])},
        {"id": "g2", "tenant": "beta", "prompt": "a blue car", "seed": 2, "width": 64, "height": 64, "steps": 2},
    ]
    requests = [parse_request(row, defaults) for row in rows]
    images = [None if r.image is None else Image.open(r.image).convert("RGB") for r in requests]
    calls = []
    for name in ("generate", "caption", "answer"):
        original = getattr(stack, name)
        def spy(*args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)
        setattr(stack, name, spy)
    try:
        results = TaskExecutor(stack).run(requests, images)
    finally:
        for name in ("generate", "caption", "answer"):
            delattr(stack, name)
    assert sorted(calls) == ["answer", "caption", "generate"]
    assert [r.id for r in results] == ["g1", "c1", "q1", "g2"]
    assert all(r.status is Status.OK for r in results)
    assert results[0].image_png and Image.open(__import__("io").BytesIO(results[0].image_png)).size == (64, 64)
    assert results[1].caption and results[1].prompt == "the product" and results[1].image_png is None
    assert results[2].answer and results[2].question == "what animal is it?"
    assert results[3].seed == 2 and results[0].model_version == stack.model_version
