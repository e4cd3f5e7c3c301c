"""The training arithmetic on the tiny profile, without Ray: the batch plan, the flow-matching draws, a checkpoint
that resumes bit for bit, and the adapter file (it loads through the safe loader and changes images)."""

from __future__ import annotations

import pyarrow as pa
import pytest
import torch

from factory.errors import ConfigError
from factory.model.generator import FluxGenerator, GenerationParams
from factory.model.lora import load_adapter
from factory.model.profiles import get_profile
from factory.model.training.adapter import check_lora_fits, convert_adapter, metadata_of
from factory.model.training.buckets import fit_to_bucket
from factory.model.training.cache import CACHE_SCHEMA, cache_row, read_samples
from factory.model.training.data import BatchPlan, seeded, split_held_out
from factory.model.training.encoders import TrainingEncoders
from factory.model.training.flow import FlowMatching
from factory.model.training.loop import TrainingData, TrainingSession
from factory.model.training.options import Bucket, TrainOptions
from tests.training import caption_of, photo

PROFILE = get_profile("tiny").generator
PHOTOS = ("astronaut", "cat", "chelsea", "coffee", "rocket", "colorwheel", "brick")


@pytest.fixture(scope="module")
def flux(tiny_path):
    return str(tiny_path / "flux")


@pytest.fixture(scope="module")
def samples(flux):
    """Real photos through the real tiny encoders, as the cache holds them."""
    import hashlib

    encoders = TrainingEncoders.from_pretrained(flux, PROFILE)
    bucket = Bucket(width=64, height=64)
    rows = []
    for name in PHOTOS:
        image = fit_to_bucket(photo(name), bucket)
        meta = {"id": name, "source_uri": name, "caption": caption_of(name),
                "image_sha256": hashlib.sha256(image.tobytes()).hexdigest(), "bucket_width": 64, "bucket_height": 64}
        rows.append(cache_row(meta, encoders.encode(image, caption_of(name))))
    return read_samples(pa.Table.from_pylist(rows, schema=CACHE_SCHEMA))


OPTIONS = TrainOptions(rank=4, steps=6, batch_size=2, learning_rate=3e-3, seed=3, caption_dropout=0.3,
                       timestep_sampling="flux_shift", lr_schedule="cosine", warmup_steps=2)


def _session(flux, samples, options=OPTIONS) -> TrainingSession:
    train, held = split_held_out(samples, 0.2)
    empty = (torch.zeros_like(samples[0].prompt_embeds), torch.zeros_like(samples[0].pooled_embeds))
    return TrainingSession.load(flux, PROFILE, options, TrainingData(train, held, empty))


def _lora(session: TrainingSession) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in session.transformer.named_parameters() if "lora_" in name}


def test_a_resumed_session_ends_bit_identical_to_an_uninterrupted_one(flux, samples, tmp_path):
    whole = _session(flux, samples)
    for _ in range(OPTIONS.steps):
        whole.train_step()

    first = _session(flux, samples)
    for _ in range(3):
        first.train_step()
    first.save(tmp_path / "ckpt", {"note": "half-way"})
    resumed = _session(flux, samples)
    resumed.restore(tmp_path / "ckpt")
    assert resumed.step == 3
    for _ in range(OPTIONS.steps - 3):
        resumed.train_step()

    assert resumed.progress.losses == whole.progress.losses
    assert resumed.progress.learning_rates == whole.progress.learning_rates
    ours, theirs = _lora(resumed), _lora(whole)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert any(bool(t.abs().sum()) for k, t in ours.items() if "lora_B" in k)  # it did train


def test_the_held_out_loss_is_the_same_figure_at_every_validation(flux, samples):
    session = _session(flux, samples)
    before = session.held_out_loss()
    assert session.held_out_loss() == before  # fixed noise and sigma per held-out image
    for _ in range(3):
        session.train_step()
    assert session.held_out_loss() != before
    assert session.progress.held_out[0] == before


def test_the_trained_adapter_loads_through_the_safe_loader_and_changes_images(flux, samples, tmp_path):
    session = _session(flux, samples)
    for _ in range(4):
        session.train_step()
    adapter = session.save(tmp_path / "ckpt", {"data_digest": "d" * 64, "steps": "4"})
    kohya = convert_adapter(adapter, tmp_path / "kohya.safetensors", OPTIONS, "kohya")

    generator = FluxGenerator.from_pretrained(flux, PROFILE)
    params = [GenerationParams("a photo of coffee", seed=1, steps=2, width=64, height=64, guidance=3.5)]
    base = generator.generate(params)[0].tobytes()
    for name, path in (("trained", adapter), ("kohya", kohya)):
        load_adapter(generator.pipe, str(path), name)
        assert generator.generate(params)[0].tobytes() != base, name
        generator.pipe.delete_adapters(name)
    assert generator.generate(params)[0].tobytes() == base
    assert metadata_of(adapter) == {"data_digest": "d" * 64, "steps": "4"} == metadata_of(kohya)


def test_a_target_or_rank_the_transformer_cannot_hold_is_refused_by_name(flux):
    from diffusers import FluxTransformer2DModel

    config = FluxTransformer2DModel.load_config(flux, subfolder="transformer")
    with torch.device("meta"):
        skeleton = FluxTransformer2DModel.from_config(config)
    check_lora_fits(skeleton, TrainOptions(rank=64))
    with pytest.raises(ConfigError, match=r"^options\.target_modules: 'to_qkv' is not a Linear layer .*to_out\.0"):
        check_lora_fits(skeleton, TrainOptions(target_modules=("to_q", "to_qkv")))
    with pytest.raises(ConfigError, match=r"^options\.rank: 65 is more than .* holds? in .*; at most 64"):
        check_lora_fits(skeleton, TrainOptions(rank=65))


def test_the_batch_plan_is_a_function_of_seed_and_step(samples):
    mixed = [s if i % 2 else type(s)(**{**s.__dict__, "bucket": (96, 64)}) for i, s in enumerate(samples)]
    plan = BatchPlan.of(mixed, batch_size=2, seed=5)
    epoch = [plan.global_batch(step) for step in range(plan.batches_per_epoch)]
    assert sorted({i for batch in epoch for i in batch}) == list(range(len(mixed)))  # everyone, every epoch
    assert all(len({mixed[i].bucket for i in batch}) == 1 and len(batch) == 2 for batch in epoch)
    again = BatchPlan.of(mixed, batch_size=2, seed=5)
    assert [again.global_batch(s) for s in range(9)] == [plan.global_batch(s) for s in range(9)]
    other = BatchPlan.of(mixed, batch_size=2, seed=6)
    assert [other.global_batch(s) for s in range(9)] != [plan.global_batch(s) for s in range(9)]


def test_held_out_images_are_chosen_by_digest_so_copies_stay_together(samples):
    copy = type(samples[0])(**{**samples[0].__dict__, "id": "zz-copy"})
    train, held = split_held_out([*samples, copy], 0.2)
    assert held and len(train) + len(held) == len(samples) + 1
    assert (samples[0] in held) == (copy in held)
    assert split_held_out(samples, 0.0) == (samples, [])


@pytest.mark.parametrize("sampling", ["uniform", "logit_normal", "mode", "flux_shift"])
def test_sigma_draws_are_in_range_and_repeat_with_their_seed(flux, sampling):
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(flux, subfolder="scheduler")
    flow = FlowMatching(scheduler, TrainOptions(timestep_sampling=sampling, caption_dropout=0.5), guidance=3.5)
    draws = [flow.draw((4, 8, 8), seeded(0, "t", i)) for i in range(64)]
    sigmas = torch.stack([d.sigma for d in draws])
    assert bool((sigmas > 0).all() and (sigmas <= 1).all())
    again = flow.draw((4, 8, 8), seeded(0, "t", 5))
    assert torch.equal(again.noise, draws[5].noise) and again.sigma == draws[5].sigma
    assert 0 < sum(d.drop_caption for d in draws) < 64
