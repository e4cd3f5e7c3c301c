"""The flow-matching objective FLUX is trained with, as diffusers' `train_dreambooth_lora_flux.py` computes it:
noisy latents (1 - sigma) x + sigma * noise, packed into FLUX's 2x2 patches, and the velocity target noise - x.

Sigma is drawn per sample with diffusers' `compute_density_for_timestep_sampling` (uniform, logit-normal, mode)
and looked up in the scheduler's training sigmas, as the script does; `flux_shift` (kohya, ai-toolkit) draws the
logit-normal and shifts it with the scheduler's own `time_shift` by the `calculate_shift` of the image's token
count, which is how FLUX's sampler shifts at inference. Every draw takes a generator of its own, so a sample's
noise, sigma and caption dropout depend only on (seed, step, its place in the global batch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from factory.model.training.options import TrainOptions

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Draw:
    """One sample's randomness at one step."""

    noise: torch.Tensor  # like the sample's latents
    sigma: torch.Tensor  # scalar
    drop_caption: bool


class FlowMatching:
    def __init__(self, scheduler: Any, options: TrainOptions, guidance: float | None):
        self.scheduler = scheduler
        self.options = options
        self.guidance = guidance  # None: the transformer has no guidance embedding

    def draw(self, latent_shape: tuple[int, ...], generator: torch.Generator) -> Draw:
        """Caption dropout, then sigma, then noise, always in this order from `generator`."""
        import torch
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift
        from diffusers.training_utils import compute_density_for_timestep_sampling

        options = self.options
        drop = bool(torch.rand((), generator=generator) < options.caption_dropout)
        scheme = "logit_normal" if options.timestep_sampling == "flux_shift" else options.timestep_sampling
        u = compute_density_for_timestep_sampling(
            weighting_scheme=scheme, batch_size=1, logit_mean=options.logit_mean, logit_std=options.logit_std,
            mode_scale=options.mode_scale, generator=generator,
        )
        config = self.scheduler.config
        if options.timestep_sampling == "flux_shift":
            tokens = (latent_shape[-2] // 2) * (latent_shape[-1] // 2)
            mu = calculate_shift(tokens, config.base_image_seq_len, config.max_image_seq_len,
                                 config.base_shift, config.max_shift)
            sigma = self.scheduler.time_shift(mu, 1.0, u.clamp(1e-5, 1 - 1e-5))
        else:
            # u can reach 1.0 under mode sampling; the script's index would run one past the table.
            index = (u * config.num_train_timesteps).long().clamp(max=config.num_train_timesteps - 1)
            sigma = self.scheduler.sigmas[index]
        noise = torch.randn(latent_shape, generator=generator)
        return Draw(noise=noise, sigma=sigma.reshape(()).float(), drop_caption=drop)

    def losses(self, model: Any, latents: torch.Tensor, prompt_embeds: torch.Tensor, pooled: torch.Tensor,
               noise: torch.Tensor, sigmas: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Per-sample mean squared error of the predicted velocity (batch,); `model` may be DDP-wrapped.
        The loss is taken on packed tensors: packing only reorders elements, so the mean is the script's."""
        import torch
        from diffusers import FluxPipeline

        batch, channels, height, width = latents.shape
        device = latents.device
        s = sigmas.view(batch, 1, 1, 1)
        noisy = (1.0 - s) * latents + s * noise
        packed = FluxPipeline._pack_latents(noisy, batch, channels, height, width).to(dtype)
        target = FluxPipeline._pack_latents(noise - latents, batch, channels, height, width)
        # The pipeline's ids: one per packed patch, on the (height / 2, width / 2) grid generation uses.
        image_ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, device, dtype)
        text_ids = torch.zeros(prompt_embeds.shape[1], 3, device=device, dtype=dtype)
        guidance = None if self.guidance is None else torch.full((batch,), self.guidance, device=device)
        prediction = model(
            hidden_states=packed, timestep=sigmas.to(dtype), guidance=guidance,
            pooled_projections=pooled.to(dtype), encoder_hidden_states=prompt_embeds.to(dtype),
            txt_ids=text_ids, img_ids=image_ids, return_dict=False,
        )[0]
        return ((prediction.float() - target.float()) ** 2).mean(dim=(1, 2))
