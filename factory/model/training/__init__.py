"""LoRA training of a profile's FLUX transformer: options, the encoders' cache, the batch plan, the flow-matching
objective, the training step and its checkpoints, and validation images. Ray-free; `factory.jobs.training`
runs it on Ray Data and Ray Train."""
