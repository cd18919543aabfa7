"""Stable Diffusion folders: load the Flax and the PyTorch (safetensors) layouts of
diffusers, save the Flax one.

  <folder>/model_index.json
  <folder>/unet/{config.json, diffusion_flax_model.msgpack | diffusion_pytorch_model.safetensors}
  <folder>/vae/{config.json, diffusion_flax_model.msgpack | diffusion_pytorch_model.safetensors}
  <folder>/text_encoder/{config.json, flax_model.msgpack | model.safetensors}
  <folder>/tokenizer/...  (tokenizer.json, or CLIP's vocab.json + merges.txt)
  <folder>/scheduler/scheduler_config.json

The layout is detected from the files present (``.safetensors`` weights: PyTorch layout, read
with the safetensors numpy API and mapped by :mod:`t2i_mia.models.torch_format`; fp16 /
bf16 tensors and ``*.fp16.safetensors`` variants are upcast to float32). ``safety_checker/``
and ``feature_extractor/`` are ignored. Public Stable Diffusion 1.x/2.x folders load as they
are; our own trained models are saved in the Flax layout. Every file is written atomically.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax

from t2i_mia.errors import CheckpointError
from t2i_mia.models import autoencoder_kl, formats, unet
from t2i_mia.models.autoencoder_kl import AutoencoderKLConfig, load_vae, save_vae
from t2i_mia.models.clip import CLIPTextConfig, init_clip_text, load_clip_text, save_clip_text
from t2i_mia.models.schedulers import (
    SCHEDULER_CONFIG,
    SchedulerConfig,
    load_scheduler_config,
    save_scheduler_config,
)
from t2i_mia.models.tokenizer import TextTokenizer
from t2i_mia.models.torch_format import is_torch_sd_folder, read_component, torch_to_flax
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
    folder = os.fspath(folder)
    check_not_lora_or_single_file(folder)
    index_path = os.path.join(folder, MODEL_INDEX)
    index = formats.read_json(index_path)
    for name in COMPONENTS:
        if name not in index:
            raise CheckpointError(f"{index_path}: no '{name}' entry (a Stable Diffusion folder "
                                  f"lists {list(COMPONENTS)})")
        if not os.path.isdir(os.path.join(folder, name)):
            raise CheckpointError(f"{os.path.join(folder, name)}: missing folder (listed in {index_path})")
    if is_torch_sd_folder(folder):
        vae_cfg, vae_params, unet_cfg, unet_params, text_cfg, text_params = _load_torch(folder)
    else:
        vae_cfg, vae_params = load_vae(os.path.join(folder, "vae"))
        unet_cfg, unet_params = load_unet(os.path.join(folder, "unet"))
        text_cfg, text_params = load_clip_text(os.path.join(folder, "text_encoder"))
    tokenizer = TextTokenizer.from_folder(os.path.join(folder, "tokenizer"))
    scheduler_cfg = load_scheduler_config(os.path.join(folder, "scheduler", SCHEDULER_CONFIG))
    comps = LDMComponents(vae_cfg, vae_params, unet_cfg, unet_params, text_cfg, text_params,
                          tokenizer, scheduler_cfg)
    check_compatible(comps, folder)
    return comps


def check_not_lora_or_single_file(folder: str) -> None:
    if os.path.isfile(folder) and folder.endswith((".safetensors", ".ckpt", ".pt", ".bin")):
        raise CheckpointError(
            f"{folder}: a single-file checkpoint; convert it to a diffusers folder first "
            "(diffusers: StableDiffusionPipeline.from_single_file(path).save_pretrained(DIR))")
    lora = [f for f in ("pytorch_lora_weights.safetensors", "adapter_model.safetensors")
            if os.path.isfile(os.path.join(folder, f))]
    if lora and not os.path.isdir(os.path.join(folder, "unet")):
        raise CheckpointError(
            f"{folder}: holds LoRA weights only ({lora[0]}); merge them into their base model "
            "and save the whole pipeline (diffusers: pipe.load_lora_weights(DIR); "
            "pipe.fuse_lora(); pipe.save_pretrained(OUT))")


def _load_torch(folder: str):
    """(vae_cfg, vae_params, unet_cfg, unet_params, text_cfg, text_params) of a PyTorch-layout
    folder, every tensor mapped and shape-checked."""
    def component(name, config_cls, stem):
        sub = os.path.join(folder, name)
        cfg_path = os.path.join(sub, "config.json")
        return sub, config_cls.from_dict(formats.read_json(cfg_path), cfg_path), \
            read_component(sub, stem)

    sub, vae_cfg, state = component("vae", AutoencoderKLConfig, "diffusion_pytorch_model")
    vae_params = torch_to_flax(state, autoencoder_kl.param_shapes(vae_cfg), sub)
    sub, unet_cfg, state = component("unet", UNet2DConditionConfig, "diffusion_pytorch_model")
    # the torch U-Net's numerics (see UNet2DConditionConfig.transformer_norm_eps)
    unet_cfg = dataclasses.replace(unet_cfg, transformer_norm_eps=1e-6, exact_gelu=True)
    unet_params = torch_to_flax(state, unet.param_shapes(unet_cfg), sub)
    sub, text_cfg, state = component("text_encoder", CLIPTextConfig, "model")
    expected = jax.eval_shape(lambda: init_clip_text(text_cfg, jax.random.key(0)))["params"]
    text_params = torch_to_flax(state, expected, sub, strip_prefix="text_model.",
                                ignore=("position_ids",))
    # as load_clip_text returns it: the variables CLIPTextModel.apply takes, on device
    text_params = {"params": jax.tree.map(jax.numpy.asarray, text_params)}
    return vae_cfg, vae_params, unet_cfg, unet_params, text_cfg, text_params


def save_stable_diffusion(folder: str | os.PathLike, comps: LDMComponents) -> None:
    """Writes ``comps`` as a Stable Diffusion Flax folder (each file atomically;
    ``model_index.json`` last, so a folder that has it is complete)."""
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
