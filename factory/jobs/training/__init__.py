"""`factory train`: a tenant's (and region's) style adapter trained from captioned images. Stage 1 encodes every
image and caption once on Ray Data actors holding only the encoders; stage 2 trains a LoRA on the profile's
transformer with Ray Train from that cache, checkpointing and validating as it goes; the adapter is then written,
reported and registered for the tenant like any other."""
