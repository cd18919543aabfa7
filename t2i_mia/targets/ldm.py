"""The latent diffusion target: text -> DDIM with classifier-free guidance -> VAE decode.

Implements the target protocol. The whole sampler (text encoding, the DDIM loop, decoding
and quantisation to uint8) is one jitted function, sharded over the mesh's ``data`` axis;
each image's starting noise and DDIM noise come from its own key
``fold_in(fold_in(root, id), j)``, so images do not depend on batch size or device count.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from t2i_mia.config import DiffusionSampleConfig
from t2i_mia.models import autoencoder_kl, schedulers
from t2i_mia.models import unet as unet_lib
from t2i_mia.models.clip import CLIPTextModel
from t2i_mia.models.ldm import LDMComponents
from t2i_mia.models.precision import FLOAT32, cast_params
from t2i_mia.parallel.batching import batched_apply, round_batch
from t2i_mia.parallel.mesh import DEFAULT_RULES, Rules, batch_sharding, place_params
from t2i_mia.targets.protocol import image_keys
from t2i_mia.training.ldm_train import diffusion_loss, encode_latents

log = logging.getLogger(__name__)
PyTree = Any


def to_uint8(images: jax.Array) -> jax.Array:
    """f32 in [-1, 1] -> uint8 (round half to even, clipped)."""
    return jnp.clip(jnp.round((images + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


class LDMTarget:
    """A latent diffusion model behind the black-box boundary.

    Args:
      comps: the model (see :func:`t2i_mia.models.ldm.load_stable_diffusion`).
      sample: DDIM steps, guidance scale, eta, batch size.
      seed: root seed of the per-image keys.
      mesh: device mesh; prompts are sharded over its ``data`` axis.
      rules: how its ``model`` axis splits the parameters (``mesh.rules``).
      policy: the precision (``dtype``, ``param_dtype``; :mod:`t2i_mia.models.precision`);
        the parameters are stored in ``param_dtype`` on the devices.
    """

    def __init__(self, comps: LDMComponents, sample: DiffusionSampleConfig, seed: int,
                 mesh: Mesh, name: str = "ldm", rules: Rules = DEFAULT_RULES,
                 policy: dict = FLOAT32):
        self.comps = comps
        self.sample_cfg = sample
        self.mesh = mesh
        self.name = name
        self.root_key = jax.random.PRNGKey(seed)
        self.image_size = comps.vae_cfg.sample_size
        self.batch_size = round_batch(sample.batch_size, mesh)
        self.timesteps = jnp.asarray(
            schedulers.ddim_timesteps(comps.scheduler_cfg, sample.num_inference_steps))
        text_params = comps.text_params
        if isinstance(text_params, dict) and set(text_params) == {"params"}:
            text_params = text_params["params"]  # variables or the bare tree
        self.rules, self.policy = rules, policy
        self.params = place_params(cast_params({"unet": comps.unet_params, "text": text_params,
                                                "vae": comps.vae_params},
                                               policy["param_dtype"]), mesh, rules)
        self.param_shardings = jax.tree.map(lambda x: x.sharding, self.params)
        u_ids, u_mask = comps.tokenizer.encode([""])
        self.uncond = (jnp.asarray(u_ids[0]), jnp.asarray(u_mask[0]))
        self._sample = self._build_sampler()
        self._loss = None

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        f = self.comps.vae_cfg.downsample_factor
        return (self.image_size // f, self.image_size // f, self.comps.unet_cfg.in_channels)

    def _build_sampler(self):
        c = self.comps
        text = CLIPTextModel(c.text_cfg, **self.policy)
        unet = unet_lib.UNet2DConditionModel(c.unet_cfg, **self.policy)
        vae = autoencoder_kl.AutoencoderKL(c.vae_cfg, **self.policy)
        shape = self.latent_shape
        g, eta = self.sample_cfg.guidance_scale, self.sample_cfg.eta
        sched, timesteps = c.scheduler_cfg, self.timesteps
        scale = c.vae_cfg.scaling_factor
        u_ids, u_mask = self.uncond

        def sample(params, ids, mask, keys):
            """ids/mask int32[B,L], keys uint32[B,2] -> uint8[B,H,W,3]."""
            b = ids.shape[0]
            ctx, _ = text.apply({"params": params["text"]}, ids, mask)
            uctx, _ = text.apply({"params": params["text"]},
                                 jnp.broadcast_to(u_ids, ids.shape),
                                 jnp.broadcast_to(u_mask, mask.shape))
            k_init = jax.vmap(lambda k: jax.random.fold_in(k, 0))(keys)
            k_noise = jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)
            x_t = jax.vmap(lambda k: jax.random.normal(k, shape))(k_init)

            def eps_fn(x, t, context):
                return unet.apply({"params": params["unet"]}, x, t, context)

            z0 = schedulers.ddim_sample(eps_fn, sched, x_t, ctx, uctx if g != 1.0 else None,
                                        g, timesteps, eta, k_noise)
            images = vae.apply({"params": params["vae"]}, z0 / scale, method="decode")
            assert images.shape[0] == b
            return to_uint8(images)

        bs = batch_sharding(self.mesh, 2)
        return jax.jit(sample, in_shardings=(self.param_shardings, bs, bs, bs),
                       out_shardings=batch_sharding(self.mesh, 4))

    def generate(self, captions: Sequence[str], ids: Sequence[int], k: int,
                 progress: bool = True) -> jax.Array:
        """uint8[N,k,H,W,3] on device: k images per caption (the target protocol)."""
        if len(captions) != len(ids):
            raise ValueError(f"generate: {len(captions)} captions for {len(ids)} ids")
        n = len(ids)
        tok_ids, tok_mask = self.comps.tokenizer.encode(list(captions))
        keys = np.asarray(image_keys(self.root_key, ids, k)).reshape(n * k, 2)
        tok_ids = np.repeat(tok_ids, k, axis=0)
        tok_mask = np.repeat(tok_mask, k, axis=0)
        h = self.image_size
        # fixed-size batches (the last one padded) so the sampler compiles once
        images = batched_apply(self._sample, self.params, (tok_ids, tok_mask, keys),
                               self.batch_size, self.mesh, to_host=False,
                               empty=jnp.zeros((0, h, h, 3), jnp.uint8),
                               desc=f"generate[{self.name}]" if progress else None)
        return images.reshape((n, k) + images.shape[1:])

    def white_box_loss(self, images: np.ndarray, captions: Sequence[str], ids: Sequence[int],
                       n_timesteps: int = 10) -> np.ndarray:
        """f32[N]: the denoising loss averaged over ``n_timesteps`` evenly spaced t with fixed
        per-id noise (lower = more member-like). Outside the black-box threat model: a labelled
        upper-bound reference only."""
        c = self.comps
        latents = encode_latents(c.vae_cfg, self.params["vae"], np.asarray(images), self.mesh,
                                 rules=self.rules, policy=self.policy)
        tok_ids, tok_mask = c.tokenizer.encode(list(captions))
        T = c.scheduler_cfg.num_train_timesteps
        ts = jnp.asarray(np.linspace(0, T - 1, n_timesteps + 2)[1:-1].round().astype(np.int32))
        if self._loss is None:
            def loss(params, lat, tid, tmask, keys):
                def one_t(t):
                    noise = jax.vmap(lambda kk: jax.random.normal(
                        jax.random.fold_in(kk, t), lat.shape[1:]))(keys)
                    return diffusion_loss(c.unet_cfg, c.text_cfg, c.scheduler_cfg, params, lat,
                                          tid, tmask, jnp.full((lat.shape[0],), t), noise,
                                          self.policy)
                return jnp.mean(jax.lax.map(one_t, ts), axis=0)
            self._loss = jax.jit(loss)
        keys = np.asarray(image_keys(jax.random.fold_in(self.root_key, 2**31 - 1), ids, 1)
                          ).reshape(len(ids), 2)
        return batched_apply(self._loss, self.params, (latents, tok_ids, tok_mask, keys),
                             self.batch_size, self.mesh, empty=np.zeros((0,), np.float32))
