"""The DALL-E mini target: text -> DalleBart image tokens (KV cache, super-conditioning) ->
VQGAN ``decode_code`` -> uint8 images.

Implements the target protocol. Tokens, decoding and quantisation to uint8 are one jitted
function sharded over the mesh's ``data`` axis, run in batches of one fixed size (the last
one padded), so it compiles once. The j-th image of query ``id`` draws its token at
position t with ``fold_in(fold_in(fold_in(root, id), j), t)``, so images depend neither on
batch size, order nor device count.

Text: captions go through dalle-mini's normalisation (:func:`normalize_text`) when the
DalleBart config says ``normalize_text`` (the public checkpoints do), exactly as dalle-mini's
processor; models trained here set it false, since the synthetic and folder captions are
plain lower-case text that the tokenizer's own normaliser (lower-case, whitespace) already
handles, and training and sampling share :func:`tokenize_captions` either way. A caption
longer than ``max_text_length`` tokens (begin/end ids included) is truncated to it, ending
in the end-of-text id, with a logged warning (:func:`fit_token_ids`). The unconditional
input of super-conditioning is the empty caption tokenised without normalisation (as
dalle-mini's processor makes it); models trained here see it through caption dropout.

Folder layout (:func:`load_dalle_mini` / :func:`save_dalle_mini`): ``vqgan/`` (vqgan-jax
``config.json`` + ``flax_model.msgpack``), ``dallebart/`` (dalle-mini ``config.json`` +
``flax_model.msgpack``) and ``tokenizer/`` (:class:`TextTokenizer` files: ``tokenizer.json``
or dalle-mini's ``vocab.json`` + ``merges.txt``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import tempfile
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from t2i_mia.config import DalleSampleConfig
from t2i_mia.errors import ConfigError, DataError
from t2i_mia.models import dallebart as db
from t2i_mia.models import vqgan as vq
from t2i_mia.models.precision import FLOAT32, cast_params
from t2i_mia.models.text_normalize import fit_token_ids, normalize_text
from t2i_mia.models.tokenizer import TextTokenizer
from t2i_mia.parallel.batching import batched_apply, round_batch
from t2i_mia.parallel.mesh import DEFAULT_RULES, Rules, batch_sharding, place_params
from t2i_mia.targets.ldm import to_uint8
from t2i_mia.targets.protocol import image_keys
from t2i_mia.training.dalle_train import encode_tokens, token_nll

log = logging.getLogger(__name__)
PyTree = Any

# Used while DalleConfig has no ``caption_dropout`` key (LDMConfig's default).
CAPTION_DROPOUT = 0.1


@dataclasses.dataclass
class DalleMiniComponents:
    """Everything a DALL-E mini model consists of."""
    vqgan_cfg: vq.VQGANConfig
    vqgan_params: PyTree
    bart_cfg: db.DalleBartConfig
    bart_params: PyTree
    tokenizer: TextTokenizer


def check_components(vqgan_cfg: vq.VQGANConfig, bart_cfg: db.DalleBartConfig,
                     tokenizer: TextTokenizer, where: str = "dalle-mini") -> int:
    """ConfigError unless the parts fit together; returns the image side in pixels."""
    if bart_cfg.image_vocab_size > vqgan_cfg.n_embed:
        raise ConfigError(f"{where}: dallebart image_vocab_size = {bart_cfg.image_vocab_size} "
                          f"exceeds the VQGAN codebook (n_embed = {vqgan_cfg.n_embed})")
    side = math.isqrt(bart_cfg.image_length)
    if side * side != bart_cfg.image_length:
        raise ConfigError(f"{where}: dallebart image_length = {bart_cfg.image_length} is not a "
                          "square token grid (the VQGAN decodes h x h codes)")
    if tokenizer.vocab_size > bart_cfg.encoder_vocab_size:
        raise ConfigError(f"{where}: the tokenizer has {tokenizer.vocab_size} ids but dallebart "
                          f"encoder_vocab_size = {bart_cfg.encoder_vocab_size}")
    return side * vqgan_cfg.downsample_factor


def with_max_length(tokenizer: TextTokenizer, max_length: int) -> TextTokenizer:
    """A copy of ``tokenizer`` that builds rows of ``max_length`` (through its own files)."""
    with tempfile.TemporaryDirectory(prefix="t2i_mia_tok_") as d:
        tokenizer.save(d)
        return TextTokenizer.from_folder(d, max_length=max_length)


def tokenize_captions(captions: Sequence[str], tokenizer: TextTokenizer,
                      cfg: db.DalleBartConfig, *, normalize: bool | None = None,
                      long_tokenizer: TextTokenizer | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
    """captions -> (ids int32[N, max_text_length], mask int32[N, max_text_length]).

    Normalised with dalle-mini's rules when ``normalize`` (default: ``cfg.normalize_text``).
    Rows longer than ``max_text_length`` are truncated with a warning (fit_token_ids).
    ``long_tokenizer``: ``tokenizer`` with max_length = max_text_length + 1 (made here if
    None; pass one to avoid re-making it at every call).
    """
    if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
        raise DataError("tokenize_captions: expected a list of str captions")
    captions = list(captions)
    if normalize if normalize is not None else cfg.normalize_text:
        captions = [normalize_text(c) for c in captions]
    L = cfg.max_text_length
    long_tok = long_tokenizer or with_max_length(tokenizer, L + 1)
    ids, mask = long_tok.encode(captions)  # one more column than allowed: detects overflow
    over = np.flatnonzero(mask.sum(axis=1) > L)
    out_ids, out_mask = ids[:, :L].copy(), mask[:, :L].copy()
    for i in over:
        out_ids[i], out_mask[i] = fit_token_ids(
            ids[i][mask[i] > 0], L, eos_token_id=long_tok.eos_id,
            pad_token_id=long_tok.pad_id, where=f"caption {i} ({captions[i][:48]!r}...)")
    return out_ids, out_mask


def empty_caption(tokenizer: TextTokenizer, cfg: db.DalleBartConfig
                  ) -> tuple[np.ndarray, np.ndarray]:
    """The unconditional input int32[max_text_length] x 2: "" tokenised, not normalised."""
    ids, mask = tokenize_captions([""], tokenizer, cfg, normalize=False)
    return ids[0], mask[0]


class DalleMiniTarget:
    """A DALL-E mini model behind the black-box boundary.

    Args:
      vqgan_cfg, vqgan_params, bart_cfg, bart_params, tokenizer: the model.
      sample: top_k (0 = off), top_p (1 = off), temperature, condition_scale (1 = no
        super-conditioning), batch_size (rows per compiled call, rounded to the mesh).
      seed: root seed of the per-image keys.
      mesh: device mesh; rows are sharded over its ``data`` axis.
      rules: how its ``model`` axis splits the parameters (``mesh.rules``).
      policy: the precision (``dtype``, ``param_dtype``; :mod:`t2i_mia.models.precision`).
    """
    def __init__(self, vqgan_cfg: vq.VQGANConfig, vqgan_params: PyTree,
                 bart_cfg: db.DalleBartConfig, bart_params: PyTree, tokenizer: TextTokenizer,
                 sample: DalleSampleConfig, seed: int, mesh: Mesh, name: str = "dalle-mini",
                 rules: Rules = DEFAULT_RULES, policy: dict = FLOAT32):
        self.image_size = check_components(vqgan_cfg, bart_cfg, tokenizer, f"target {name}")
        if sample.top_k < 0:
            raise ConfigError(f"dalle.sample.top_k = {sample.top_k}: expected >= 0 (0 = off)")
        if not 0.0 < sample.top_p <= 1.0:
            raise ConfigError(f"dalle.sample.top_p = {sample.top_p}: expected (0, 1]")
        if not sample.temperature > 0:
            raise ConfigError(f"dalle.sample.temperature = {sample.temperature}: expected > 0")
        self.vqgan_cfg, self.bart_cfg = vqgan_cfg, bart_cfg
        self.tokenizer = tokenizer
        self.sample_cfg = sample
        self.mesh = mesh
        self.name = name
        self.root_key = jax.random.PRNGKey(seed)
        self.batch_size = round_batch(sample.batch_size, mesh)
        self._long_tok = with_max_length(tokenizer, bart_cfg.max_text_length + 1)
        self.uncond = empty_caption(tokenizer, bart_cfg)
        self.rules, self.policy = rules, policy
        self.params = place_params(cast_params({"vqgan": vqgan_params, "bart": bart_params},
                                               policy["param_dtype"]), mesh, rules)
        self.param_shardings = jax.tree.map(lambda x: x.sharding, self.params)
        self._sample = self._build_sampler()
        self._nll = None

    @classmethod
    def from_components(cls, comps: DalleMiniComponents, sample: DalleSampleConfig, seed: int,
                        mesh: Mesh, name: str = "dalle-mini", rules: Rules = DEFAULT_RULES,
                        policy: dict = FLOAT32) -> "DalleMiniTarget":
        return cls(comps.vqgan_cfg, comps.vqgan_params, comps.bart_cfg, comps.bart_params,
                   comps.tokenizer, sample, seed, mesh, name, rules, policy)

    def encode_text(self, captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """captions -> (ids, mask) int32[N, max_text_length], as the model was trained."""
        return tokenize_captions(captions, self.tokenizer, self.bart_cfg,
                                 long_tokenizer=self._long_tok)

    def _build_sampler(self):
        s, bcfg = self.sample_cfg, self.bart_cfg
        top_k = s.top_k if s.top_k > 0 else None
        top_p = s.top_p if s.top_p < 1.0 else None
        guided = s.condition_scale != 1.0
        u_ids, u_mask = (jnp.asarray(a)[None] for a in self.uncond)
        model = vq.VQModel(self.vqgan_cfg, **self.policy)
        dtype = self.policy["dtype"]

        def sample(params, ids, mask, keys):
            """ids/mask int32[B,L], keys uint32[B,2] -> (uint8[B,H,W,3], int32[B,n])."""
            kw = {}
            if guided:
                kw = dict(uncond_input_ids=u_ids, uncond_attention_mask=u_mask,
                          condition_scale=s.condition_scale)
            seq = db.generate(params["bart"], bcfg, ids, mask, keys, top_k=top_k, top_p=top_p,
                              temperature=s.temperature, dtype=dtype, **kw)
            tokens = seq[:, 1:]
            images = model.apply({"params": params["vqgan"]}, tokens,
                                 method=vq.VQModel.decode_code).astype(jnp.float32)
            return to_uint8(images), tokens

        bs = batch_sharding(self.mesh, 2)
        return jax.jit(sample, in_shardings=(self.param_shardings, bs, bs, bs),
                       out_shardings=(batch_sharding(self.mesh, 4), bs))

    def generate_with_tokens(self, captions: Sequence[str], ids: Sequence[int], k: int,
                             progress: bool = True) -> tuple[jax.Array, jax.Array]:
        """(uint8[N,k,H,W,3], int32[N,k,image_length]) on device: images and their tokens."""
        if len(captions) != len(ids):
            raise DataError(f"generate: {len(captions)} captions for {len(ids)} ids")
        if not isinstance(k, (int, np.integer)) or k < 1:
            raise DataError(f"generate: k = {k!r}, expected an integer >= 1")
        n = len(ids)
        tok_ids, tok_mask = self.encode_text(captions)
        keys = np.asarray(image_keys(self.root_key, ids, k)).reshape(n * k, 2)
        tok_ids = np.repeat(tok_ids, k, axis=0)
        tok_mask = np.repeat(tok_mask, k, axis=0)
        h = self.image_size
        empty = (jnp.zeros((0, h, h, 3), jnp.uint8),
                 jnp.zeros((0, self.bart_cfg.image_length), jnp.int32))
        # fixed-size batches (the last one padded) so the sampler compiles once
        images, tokens = batched_apply(self._sample, self.params, (tok_ids, tok_mask, keys),
                                       self.batch_size, self.mesh, to_host=False, empty=empty,
                                       desc=f"generate[{self.name}]" if progress else None)
        return (images.reshape((n, k) + images.shape[1:]),
                tokens.reshape(n, k, tokens.shape[-1]))

    def generate(self, captions: Sequence[str], ids: Sequence[int], k: int,
                 progress: bool = True) -> jax.Array:
        """uint8[N,k,H,W,3] on device: k images per caption (the target protocol)."""
        return self.generate_with_tokens(captions, ids, k, progress)[0]

    def white_box_loss(self, images: np.ndarray, captions: Sequence[str],
                       ids: Sequence[int]) -> np.ndarray:
        """f32[N]: teacher-forced NLL per image token of the query's VQGAN tokens given its
        caption (no guidance, no randomness; ``ids`` only for the protocol). Lower = more
        member-like. Outside the black-box threat model: a labelled upper-bound reference."""
        if not len(images) == len(captions) == len(ids):
            raise DataError(f"white_box_loss: {len(images)} images, {len(captions)} captions, "
                            f"{len(ids)} ids; expected equal counts")
        images = np.asarray(images)
        if images.shape[1:3] != (self.image_size, self.image_size):
            raise DataError(f"white_box_loss: images {images.shape}, expected "
                            f"[N, {self.image_size}, {self.image_size}, 3] (the model's size)")
        tokens = encode_tokens(self.vqgan_cfg, self.params["vqgan"], images, self.mesh,
                               rules=self.rules, policy=self.policy)
        tok_ids, tok_mask = self.encode_text(captions)
        if self._nll is None:
            bs = batch_sharding(self.mesh, 2)
            cfg, policy = self.bart_cfg, self.policy
            self._nll = jax.jit(lambda p, i, m, t: token_nll(cfg, p, i, m, t, policy=policy),
                                in_shardings=(self.param_shardings["bart"], bs, bs, bs),
                                out_shardings=batch_sharding(self.mesh, 1))
        return batched_apply(self._nll, self.params["bart"], (tok_ids, tok_mask, tokens),
                             self.batch_size, self.mesh, empty=np.zeros((0,), np.float32))


# ----------------------------------------------------------------------------- folders

VQGAN_DIR, BART_DIR, TOKENIZER_DIR = "vqgan", "dallebart", "tokenizer"


def load_dalle_mini(folder: str | os.PathLike) -> DalleMiniComponents:
    """Reads ``vqgan/``, ``dallebart/`` and ``tokenizer/`` of a DALL-E mini folder. The
    tokenizer builds rows of the model's ``max_text_length``. Errors name the file at fault."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise ConfigError(f"{folder}: not a folder (expected a DALL-E mini folder with "
                          f"{VQGAN_DIR}/, {BART_DIR}/ and {TOKENIZER_DIR}/)")
    for sub in (VQGAN_DIR, BART_DIR, TOKENIZER_DIR):
        if not os.path.isdir(os.path.join(folder, sub)):
            raise ConfigError(f"{folder}: no {sub}/ sub-folder (a DALL-E mini folder holds "
                              f"{VQGAN_DIR}/, {BART_DIR}/ and {TOKENIZER_DIR}/)")
    vqgan_cfg, vqgan_params = vq.load_vqgan(os.path.join(folder, VQGAN_DIR))
    bart_cfg, bart_params = db.load_dallebart(os.path.join(folder, BART_DIR))
    tokenizer = TextTokenizer.from_folder(os.path.join(folder, TOKENIZER_DIR),
                                          max_length=bart_cfg.max_text_length)
    check_components(vqgan_cfg, bart_cfg, tokenizer, folder)
    return DalleMiniComponents(vqgan_cfg, vqgan_params, bart_cfg, bart_params, tokenizer)


def save_dalle_mini(folder: str | os.PathLike, comps: DalleMiniComponents) -> None:
    """Writes the three sub-folders (each file atomically)."""
    folder = os.fspath(folder)
    check_components(comps.vqgan_cfg, comps.bart_cfg, comps.tokenizer, folder)
    vq.save_vqgan(os.path.join(folder, VQGAN_DIR), comps.vqgan_cfg, comps.vqgan_params)
    db.save_dallebart(os.path.join(folder, BART_DIR), comps.bart_cfg, comps.bart_params)
    comps.tokenizer.save(os.path.join(folder, TOKENIZER_DIR))
