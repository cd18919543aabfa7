"""Models given by the user (``--target-dir``, ``--shadow-dir``, ``--null-target-dir``).

One function per question an audit of a given checkpoint asks: what image size does it
make (read from its config files, before the query sets are decoded and before any model
is loaded), and the model itself behind the target protocol.

Folders by kind:

* ``ldm``: a Stable Diffusion folder, Flax or diffusers PyTorch layout
  (:func:`t2i_mia.models.ldm.load_stable_diffusion`); the image size is the VAE's
  ``sample_size``;
* ``dalle-mini``: ``vqgan/``, ``dallebart/``, ``tokenizer/``; the image size is the token
  grid's side times the VQGAN's downsampling factor;
* ``generations``: ``<id>/<j>.png`` images made elsewhere; the image size is that of the
  first image found.
"""

from __future__ import annotations

import math
import os

from jax.sharding import Mesh

from t2i_mia.config import Config
from t2i_mia.errors import CheckpointError, ConfigError, DataError
from t2i_mia.models import formats
from t2i_mia.models import vqgan as vq
from t2i_mia.models.ldm import check_not_lora_or_single_file, load_stable_diffusion
from t2i_mia.models.precision import policy_of
from t2i_mia.parallel.mesh import config_rules
from t2i_mia.targets.dalle_mini import DalleMiniTarget, load_dalle_mini
from t2i_mia.targets.generations import GenerationsTarget, first_image_size
from t2i_mia.targets.ldm import LDMTarget


def checkpoint_image_size(kind: str, folder: str) -> int:
    """The side in pixels of the images the model in ``folder`` makes (config files only)."""
    if not folder or not os.path.exists(folder):
        raise ConfigError(f"--target-dir {folder}: no such folder (a {kind} checkpoint)")
    if kind == "ldm":
        check_not_lora_or_single_file(folder)
        path = os.path.join(folder, "vae", "config.json")
        if not os.path.isfile(path):
            raise CheckpointError(f"{path}: missing (a Stable Diffusion folder has vae/ with "
                                  f"its config.json)")
        size = formats.read_json(path).get("sample_size")
        if not isinstance(size, int) or size < 8:
            raise CheckpointError(f"{path}: 'sample_size' must be the image side in pixels "
                                  f"(an integer >= 8), got {size!r}")
        return size
    if kind == "dalle-mini":
        b_path = os.path.join(folder, "dallebart", "config.json")
        v_path = os.path.join(folder, "vqgan", "config.json")
        for p in (b_path, v_path):
            if not os.path.isfile(p):
                raise CheckpointError(f"{p}: missing (a DALL-E mini folder has vqgan/, "
                                      f"dallebart/ and tokenizer/)")
        length = formats.read_json(b_path).get("image_length")
        side = math.isqrt(length) if isinstance(length, int) and length > 0 else 0
        if side * side != length or side == 0:
            raise CheckpointError(f"{b_path}: 'image_length' must be a square number of "
                                  f"image tokens, got {length!r}")
        vq_cfg = vq.VQGANConfig.from_dict(formats.read_json(v_path), v_path)
        return side * vq_cfg.downsample_factor
    if kind == "generations":
        return first_image_size(folder)
    raise ConfigError(f"--target {kind}: expected one of ldm, dalle-mini, generations")


def load_model(kind: str, folder: str, cfg: Config, image_size: int, seed: int, mesh: Mesh,
               name: str):
    """The model in ``folder`` behind the target protocol; ``name`` labels it in logs and
    errors (``target``, ``shadow``, ``null``). A model whose image size differs from
    ``image_size`` (the audited one's) is an error naming the folder."""
    if kind == "ldm":
        model = LDMTarget(load_stable_diffusion(folder), cfg.ldm.sample, seed=seed, mesh=mesh,
                          name=name, rules=config_rules(cfg), policy=policy_of(cfg))
    elif kind == "dalle-mini":
        model = DalleMiniTarget.from_components(load_dalle_mini(folder), cfg.dalle.sample,
                                                seed=seed, mesh=mesh, name=name,
                                                rules=config_rules(cfg), policy=policy_of(cfg))
    elif kind == "generations":
        model = GenerationsTarget(folder, image_size)
    else:
        raise ConfigError(f"--target {kind}: expected one of ldm, dalle-mini, generations")
    if model.image_size != image_size:
        raise DataError(f"{folder} ({name}): the model makes {model.image_size}px images but "
                        f"the audited target makes {image_size}px (give models of one size)")
    return model


def sampler_note(kind: str, folder: str | None, cfg: Config) -> str | None:
    """What the report says of how a model is sampled: an LDM always with DDIM (the
    folder's scheduler config gives the noise schedule only, whatever its class)."""
    if kind == "ldm":
        s = cfg.ldm.sample
        note = (f"DDIM, {s.num_inference_steps} steps, guidance {s.guidance_scale}, eta "
                f"{s.eta}")
        path = os.path.join(folder, "scheduler", "scheduler_config.json") if folder else None
        if path and os.path.isfile(path):
            cls = formats.read_json(path).get("_class_name", "unnamed")
            note += (f"; the checkpoint's scheduler config ({cls}) gives the noise schedule"
                     + (", its sampler is not used" if cls not in ("DDIMScheduler",
                                                                   "FlaxDDIMScheduler")
                        else ""))
        return note
    if kind == "dalle-mini":
        s = cfg.dalle.sample
        return (f"super-conditioned token sampling, condition scale {s.condition_scale}, "
                f"top-k {s.top_k or 'off'}, top-p {s.top_p}, temperature {s.temperature}")
    return None
