"""A tenant's (and region's) style adapter, trained from captioned images: the second stage of a training run.

The first stage is the run's model stage (`factory.jobs.sources.training`: every image and caption encoded once
by actors holding only the encoders, latents committed chunk by chunk); then, from the same driver
(`factory.jobs.run.run_job`), Ray Train trains a LoRA on the profile's transformer from those latents,
checkpointing and validating as it goes (`train`, `fit`), and the adapter is written, reported and registered for
the tenant like any other (`registry`). `factory train SPEC.yaml` is a job spec with a `train:` section (`spec`).
"""
