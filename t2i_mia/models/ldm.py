"""Stable Diffusion folders: load and save the Flax layout diffusers uses.

  <folder>/model_index.json
  <folder>/unet/{config.json, diffusion_flax_model.msgpack}
  <folder>/vae/{config.json, diffusion_flax_model.msgpack}
  <folder>/text_encoder/{config.json, flax_model.msgpack}
  <folder>/tokenizer/...
  <folder>/scheduler/scheduler_config.json

Public Stable Diffusion 1.x/2.x Flax folders load as they are; our own trained models are
saved in the same layout. Every file is written atomically.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from t2i_mia.errors import CheckpointError
from t2i_mia.models import formats
from t2i_mia.models.autoencoder_kl import AutoencoderKLConfig, load_vae, save_vae
from t2i_mia.models.schedulers import SCHEDULER_CONFIG, SchedulerConfig, load_scheduler_config, \
    save_scheduler_config
from t2i_mia.models.unet import UNet2DConditionConfig, load_unet, save_unet

PyTree = Any

MODEL_INDEX = "model_index.json"
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


@dataclasses.dataclass
class LDMComponents:
    """Everything a latent diffusion text-to-image model needs (params are nested dicts)."""

    vae_cfg: AutoencoderKLConfig
    vae_params: PyTree
    unet_cfg: UNet2DConditionConfig
    unet_params: PyTree
    text_cfg: Any  # t2i_mia.models.clip.CLIPTextConfig
    text_params: PyTree
    tokenizer: Any  # t2i_mia.models.tokenizer.TextTokenizer
    scheduler_cfg: SchedulerConfig


def check_compatible(comps: LDMComponents, where: str) -> None:
    """The parts must fit together: latent channels and the text width."""
    if comps.unet_cfg.in_channels != comps.vae_cfg.latent_channels:
        raise CheckpointError(
            f"{where}: unet in_channels = {comps.unet_cfg.in_channels} but vae latent_channels = "
            f"{comps.vae_cfg.latent_channels}")
    if comps.unet_cfg.out_channels != comps.vae_cfg.latent_channels:
        raise CheckpointError(
            f"{where}: unet out_channels = {comps.unet_cfg.out_channels} but vae latent_channels = "
            f"{comps.vae_cfg.latent_channels}")
    width = comps.text_cfg.hidden_size
    if comps.unet_cfg.cross_attention_dim != width:
        raise CheckpointError(
            f"{where}: unet cross_attention_dim = {comps.unet_cfg.cross_attention_dim} but the text "
            f"encoder's hidden_size = {width}")


def load_stable_diffusion(folder: str | os.PathLike) -> LDMComponents:
    """Reads a Stable Diffusion Flax folder.

    Raises CheckpointError / ConfigError naming the missing or bad file, key or tensor.
    """
    from t2i_mia.models.clip import load_clip_text
    from t2i_mia.models.tokenizer import TextTokenizer

    folder = os.fspath(folder)
    index_path = os.path.join(folder, MODEL_INDEX)
    index = formats.read_json(index_path)
    for name in COMPONENTS:
        if name not in index:
            raise CheckpointError(f"{index_path}: no '{name}' entry (a Stable Diffusion folder "
                                  f"lists {list(COMPONENTS)})")
        if not os.path.isdir(os.path.join(folder, name)):
            raise CheckpointError(f"{os.path.join(folder, name)}: missing folder (listed in {index_path})")
    vae_cfg, vae_params = load_vae(os.path.join(folder, "vae"))
    unet_cfg, unet_params = load_unet(os.path.join(folder, "unet"))
    text_cfg, text_params = load_clip_text(os.path.join(folder, "text_encoder"))
    tokenizer = TextTokenizer.from_folder(os.path.join(folder, "tokenizer"))
    scheduler_cfg = load_scheduler_config(os.path.join(folder, "scheduler", SCHEDULER_CONFIG))
    comps = LDMComponents(vae_cfg, vae_params, unet_cfg, unet_params, text_cfg, text_params,
                          tokenizer, scheduler_cfg)
    check_compatible(comps, folder)
    return comps


def save_stable_diffusion(folder: str | os.PathLike, comps: LDMComponents) -> None:
    """Writes ``comps`` as a Stable Diffusion Flax folder (each file atomically;
    ``model_index.json`` last, so a folder that has it is complete)."""
    from t2i_mia.models.clip import save_clip_text

    folder = os.fspath(folder)
    check_compatible(comps, folder)
    for name in COMPONENTS:
        os.makedirs(os.path.join(folder, name), exist_ok=True)
    save_unet(os.path.join(folder, "unet"), comps.unet_cfg, comps.unet_params)
    save_vae(os.path.join(folder, "vae"), comps.vae_cfg, comps.vae_params)
    save_clip_text(os.path.join(folder, "text_encoder"), comps.text_cfg, comps.text_params)
    comps.tokenizer.save(os.path.join(folder, "tokenizer"))
    save_scheduler_config(os.path.join(folder, "scheduler", SCHEDULER_CONFIG), comps.scheduler_cfg)
    formats.write_json(os.path.join(folder, MODEL_INDEX), {
        "_class_name": "FlaxStableDiffusionPipeline",
        "unet": ["diffusers", "FlaxUNet2DConditionModel"],
        "vae": ["diffusers", "FlaxAutoencoderKL"],
        "text_encoder": ["transformers", "FlaxCLIPTextModel"],
        # our tokenizers are saved as tokenizer.json (what PreTrainedTokenizerFast reads)
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
        "scheduler": ["diffusers", "FlaxDDIMScheduler"],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
    })
