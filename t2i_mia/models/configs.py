"""The run config's model sub-configs (``ldm.vae``, ``ldm.unet``, ``dalle.bart`` ...),
checked by each model's own config class; the errors name the key."""

from __future__ import annotations

import copy

from t2i_mia.config import Config
from t2i_mia.errors import ConfigError
from t2i_mia.models import autoencoder_kl, clip, dallebart, schedulers, unet, vqgan


def check_model_configs(cfg: Config) -> Config:
    """Each model sub-config is checked by the model's own config class, naming the key."""
    checks = [
        ("ldm.vae", cfg.ldm.vae, autoencoder_kl.AutoencoderKLConfig),
        ("ldm.unet", cfg.ldm.unet, unet.UNet2DConditionConfig),
        ("ldm.text_encoder", cfg.ldm.text_encoder, clip.CLIPTextConfig),
        ("ldm.scheduler", cfg.ldm.scheduler, schedulers.SchedulerConfig),
        ("dalle.vqgan", cfg.dalle.vqgan, vqgan.VQGANConfig),
        ("dalle.bart", cfg.dalle.bart, dallebart.DalleBartConfig),
        ("adversary.encoder.clip", cfg.adversary.encoder.clip, clip.CLIPConfig),
    ]
    for key, d, cls in checks:
        if d:
            try:
                cls.from_dict(copy.deepcopy(d), where=f"config '{key}'")
            except ConfigError:
                raise
            except (TypeError, ValueError, KeyError) as e:
                raise ConfigError(f"config '{key}': {e}") from e
    return cfg
