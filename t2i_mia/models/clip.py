"""CLIP two-tower model (text transformer + ViT), parameter-compatible with HF FlaxCLIPModel.

Parameter trees match Hugging Face ``transformers`` Flax checkpoints key for key:

- ``FlaxCLIPModel`` (``flax_model.msgpack`` of openai/clip-vit-*):
  ``text_model/...``, ``vision_model/...``, ``text_projection/kernel``,
  ``visual_projection/kernel``, ``logit_scale``.
- ``FlaxCLIPTextModel`` (Stable Diffusion's ``text_encoder/``): ``text_model/...`` only.

Variables are passed around as flax variable dicts ``{"params": tree}``, i.e. exactly what
``module.apply`` takes as its first argument.  For :class:`CLIPTextModel` the tree is the
inner text transformer (``embeddings``, ``encoder``, ``final_layer_norm``); the
``text_model/`` prefix of the HF text-encoder file is added/removed by
:func:`save_clip_text` / :func:`load_clip_text`.

Pooling of the text tower takes the hidden state at ``argmax(input_ids)`` as transformers
4.25 does (the end-of-text token has the highest id in the CLIP vocabulary).  Our
:class:`t2i_mia.models.tokenizer.TextTokenizer` guarantees the same for tokenizers it
trains, so the pooled position is always the (first) eos token.

Images enter the vision tower as NHWC float32, already normalised with the CLIP mean/std
(see :func:`preprocess_images`); HF's NCHW ``pixel_values`` must be transposed
``(0, 2, 3, 1)`` first.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from PIL import Image

from t2i_mia.errors import ConfigError, DataError
from t2i_mia.models import formats
from t2i_mia.models.precision import Typed

PyTree = Any

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "flax_model.msgpack"

# CLIP's image normalisation (openai/clip preprocess, HF CLIPImageProcessor defaults).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

HIDDEN_ACTS = ("quick_gelu", "gelu")

# Keys of a transformers PretrainedConfig that carry no computation for CLIP: generation
# defaults, label maps, export/bookkeeping flags.  Ignored on load, on purpose.
_IGNORED_SUBCONFIG_KEYS = frozenset({
    "add_cross_attention", "architectures", "bad_words_ids", "begin_suppress_tokens",
    "bos_token_id", "chunk_size_feed_forward", "cross_attention_hidden_size",
    "decoder_start_token_id", "diversity_penalty", "do_sample", "dtype", "early_stopping",
    "encoder_no_repeat_ngram_size", "eos_token_id", "exponential_decay_length_penalty",
    "finetuning_task", "forced_bos_token_id", "forced_eos_token_id", "gradient_checkpointing",
    "id2label", "is_decoder", "is_encoder_decoder", "label2id", "length_penalty",
    "max_length", "min_length", "no_repeat_ngram_size", "num_beam_groups", "num_beams",
    "num_return_sequences", "output_attentions", "output_hidden_states", "output_scores",
    "pad_token_id", "prefix", "problem_type", "remove_invalid_values", "repetition_penalty",
    "return_dict", "return_dict_in_generate", "sep_token_id", "suppress_tokens",
    "task_specific_params", "temperature", "tf_legacy_loss", "tie_encoder_decoder",
    "tie_word_embeddings", "tokenizer_class", "top_k", "top_p", "torch_dtype", "torchscript",
    "transformers_version", "typical_p", "use_bfloat16",
})
_IGNORED_TOP_KEYS = frozenset({"architectures", "transformers_version", "torch_dtype", "dtype",
                               "text_config_dict", "vision_config_dict"})


def _pos_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _pos_float(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _zero(v) -> bool:
    # Dropout is not implemented: only checkpoints trained/used without it are supported.
    return _number(v) and v == 0


def _empty(v) -> bool:
    # Pruned heads would change tensor shapes per layer; not implemented.
    return not v


_SUB_RULES = {
    "hidden_size": _pos_int,
    "intermediate_size": _pos_int,
    "projection_dim": _pos_int,
    "num_hidden_layers": _pos_int,
    "num_attention_heads": _pos_int,
    "hidden_act": HIDDEN_ACTS,
    "layer_norm_eps": _pos_float,
    "attention_dropout": _zero,
    # HF's CLIP modules never read `dropout`; any value computes the same function.
    "dropout": _number,
    "initializer_range": _pos_float,
    "initializer_factor": _pos_float,
    "pruned_heads": _empty,
}


def _from_fields(cls, d: Mapping[str, Any], where: str, rules: Mapping[str, Any],
                 model_type: str):
    if not isinstance(d, Mapping):
        raise ConfigError(f"{where}: expected a JSON object, got {type(d).__name__}")
    if d.get("model_type", model_type) != model_type:
        raise ConfigError(f"{where}: 'model_type' = {d['model_type']!r}, expected "
                          f"{model_type!r}")
    rules = dict(rules)
    rules["model_type"] = (model_type,)
    formats.check_config_keys(d, rules, where, _IGNORED_SUBCONFIG_KEYS)
    names = {f.name for f in dataclasses.fields(cls)}
    kw = {k: v for k, v in d.items() if k in names}
    for k in ("layer_norm_eps", "initializer_range", "initializer_factor", "attention_dropout",
              "dropout"):
        if k in kw:
            kw[k] = float(kw[k])
    out = cls(**kw)
    if out.hidden_size % out.num_attention_heads:
        raise ConfigError(f"{where}: 'hidden_size' = {out.hidden_size} is not divisible by "
                          f"'num_attention_heads' = {out.num_attention_heads}")
    return out


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """HF ``CLIPTextConfig`` (``model_type`` clip_text_model); defaults are HF's."""
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    attention_dropout: float = 0.0
    dropout: float = 0.0
    initializer_range: float = 0.02
    initializer_factor: float = 1.0

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "text_config") -> "CLIPTextConfig":
        """Validates a text config dict; ConfigError names an unsupported key/value."""
        rules = dict(_SUB_RULES, vocab_size=_pos_int, max_position_embeddings=_pos_int)
        return _from_fields(cls, d, where, rules, "clip_text_model")

    def to_dict(self) -> dict:
        """A dict that transformers' CLIPTextConfig loads to the same model.

        ``eos_token_id`` = 2 is written on purpose: transformers >= 4.31 pools at the first
        ``eos_token_id`` unless it is 2, in which case it keeps the 4.25 argmax pooling
        that this module implements.
        """
        d = dataclasses.asdict(self)
        d.update(model_type="clip_text_model", bos_token_id=0, pad_token_id=1, eos_token_id=2)
        return d


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """HF ``CLIPVisionConfig`` (``model_type`` clip_vision_model); defaults are HF's."""
    hidden_size: int = 768
    intermediate_size: int = 3072
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    attention_dropout: float = 0.0
    dropout: float = 0.0
    initializer_range: float = 0.02
    initializer_factor: float = 1.0

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "vision_config") -> "CLIPVisionConfig":
        """Validates a vision config dict; ConfigError names an unsupported key/value."""
        rules = dict(_SUB_RULES, num_channels=_pos_int, image_size=_pos_int,
                     patch_size=_pos_int)
        out = _from_fields(cls, d, where, rules, "clip_vision_model")
        if out.image_size % out.patch_size:
            raise ConfigError(f"{where}: 'image_size' = {out.image_size} is not a multiple of "
                              f"'patch_size' = {out.patch_size}")
        return out

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["model_type"] = "clip_vision_model"
        return d

    @property
    def num_positions(self) -> int:
        """Patches plus the class token."""
        return (self.image_size // self.patch_size) ** 2 + 1


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    """HF ``CLIPConfig`` (``model_type`` clip)."""
    text_config: CLIPTextConfig = dataclasses.field(default_factory=CLIPTextConfig)
    vision_config: CLIPVisionConfig = dataclasses.field(default_factory=CLIPVisionConfig)
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592
    initializer_factor: float = 1.0

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "config.json") -> "CLIPConfig":
        """Validates a full CLIP config.json.

        Older openai configs carry ``text_config_dict``/``vision_config_dict``; as in
        transformers, their entries override ``text_config``/``vision_config``.
        """
        if not isinstance(d, Mapping):
            raise ConfigError(f"{where}: expected a JSON object, got {type(d).__name__}")
        if d.get("model_type", "clip") != "clip":
            raise ConfigError(f"{where}: 'model_type' = {d['model_type']!r}, expected 'clip'")
        rules = {
            "model_type": ("clip",),
            "projection_dim": _pos_int,
            "logit_scale_init_value": _number,
            "initializer_factor": _pos_float,
            "text_config": lambda v: v is None or isinstance(v, Mapping),
            "vision_config": lambda v: v is None or isinstance(v, Mapping),
        }
        formats.check_config_keys(d, rules, where, _IGNORED_TOP_KEYS)
        subs = {}
        for name, sub_cls in (("text", CLIPTextConfig), ("vision", CLIPVisionConfig)):
            merged = dict(d.get(f"{name}_config") or {})
            override = d.get(f"{name}_config_dict")
            if override is not None:
                if not isinstance(override, Mapping):
                    raise ConfigError(f"{where}: '{name}_config_dict' must be an object")
                merged.update(override)
            subs[name] = sub_cls.from_dict(merged, f"{where}: {name}_config")
        kw = {k: d[k] for k in ("projection_dim", "initializer_factor") if k in d}
        if "logit_scale_init_value" in d:
            kw["logit_scale_init_value"] = float(d["logit_scale_init_value"])
        if "initializer_factor" in kw:
            kw["initializer_factor"] = float(kw["initializer_factor"])
        return cls(text_config=subs["text"], vision_config=subs["vision"], **kw)

    def to_dict(self) -> dict:
        """A config.json that transformers' CLIPModel / FlaxCLIPModel loads."""
        return {
            "model_type": "clip",
            "architectures": ["CLIPModel"],
            "projection_dim": self.projection_dim,
            "logit_scale_init_value": self.logit_scale_init_value,
            "initializer_factor": self.initializer_factor,
            "text_config": self.text_config.to_dict(),
            "vision_config": self.vision_config.to_dict(),
        }


# ----------------------------------------------------------------------------- modules


def quick_gelu(x):
    return x * jax.nn.sigmoid(1.702 * x)


def _activation(name: str):
    if name == "quick_gelu":
        return quick_gelu
    if name == "gelu":
        return lambda x: nn.gelu(x, approximate=False)  # HF "gelu" is the exact erf form
    raise ConfigError(f"hidden_act = {name!r} is not implemented (supported: {list(HIDDEN_ACTS)})")


def _dense_init(cfg):
    return nn.initializers.normal(cfg.initializer_range * cfg.initializer_factor)


class CLIPAttention(Typed):
    """Multi-head self-attention (q/k/v/out projections with bias, as HF)."""
    cfg: Any  # CLIPTextConfig | CLIPVisionConfig

    @nn.compact
    def __call__(self, x, mask=None):
        """x: f32[B,L,D]; mask: bool[B,1|H,L,L] (True = attend) or None -> f32[B,L,D]."""
        cfg = self.cfg
        heads = cfg.num_attention_heads
        head_dim = cfg.hidden_size // heads
        dense = lambda name: self.dense(cfg.hidden_size, name, kernel_init=_dense_init(cfg))  # noqa: E731
        split = lambda t: t.reshape(t.shape[:2] + (heads, head_dim))  # noqa: E731
        q = split(dense("q_proj")(x))
        q = q / jnp.sqrt(head_dim).astype(q.dtype)
        k = split(dense("k_proj")(x))
        v = split(dense("v_proj")(x))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)
        if mask is not None:
            # A masked score becomes the most negative float (HF adds finfo.min): weight 0.
            scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
        weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(x.shape)
        return dense("out_proj")(out)


class CLIPMLP(Typed):
    cfg: Any

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        x = self.dense(cfg.intermediate_size, "fc1", kernel_init=_dense_init(cfg))(x)
        x = _activation(cfg.hidden_act)(x)
        return self.dense(cfg.hidden_size, "fc2", kernel_init=_dense_init(cfg))(x)


class CLIPEncoderLayer(Typed):
    """Pre-LN transformer block; the residual stream stays float32."""
    cfg: Any

    @nn.compact
    def __call__(self, x, mask=None):
        eps = self.cfg.layer_norm_eps
        h = self.layer_norm("layer_norm1", eps)(x)
        x = x + CLIPAttention(self.cfg, name="self_attn", **self.policy)(h, mask)
        h = self.layer_norm("layer_norm2", eps)(x)
        return x + CLIPMLP(self.cfg, name="mlp", **self.policy)(h)


class _LayerCollection(Typed):
    # Exists only so that parameter paths read encoder/layers/<i>/..., as in HF.
    cfg: Any

    @nn.compact
    def __call__(self, x, mask=None):
        for i in range(self.cfg.num_hidden_layers):
            x = CLIPEncoderLayer(self.cfg, name=str(i), **self.policy)(x, mask)
        return x


class CLIPEncoder(Typed):
    cfg: Any

    @nn.compact
    def __call__(self, x, mask=None):
        return _LayerCollection(self.cfg, name="layers", **self.policy)(x, mask)


class CLIPTextEmbeddings(Typed):
    cfg: CLIPTextConfig

    @nn.compact
    def __call__(self, input_ids):
        cfg = self.cfg
        init = nn.initializers.normal(cfg.initializer_factor * 0.02)
        embed = functools.partial(nn.Embed, features=cfg.hidden_size, embedding_init=init,
                                  dtype=jnp.float32, param_dtype=self.param_dtype)
        tok = embed(cfg.vocab_size, name="token_embedding")(input_ids)
        pos = embed(cfg.max_position_embeddings,
                    name="position_embedding")(jnp.arange(input_ids.shape[1])[None])
        return tok + pos


class CLIPTextModel(Typed):
    """CLIP text transformer (HF ``text_model``): causal, pre-LN, final layer norm.
    ``dtype``/``param_dtype``: the precision policy (:mod:`t2i_mia.models.precision`)."""
    config: CLIPTextConfig

    @nn.compact
    def __call__(self, input_ids, attention_mask=None):
        """input_ids, attention_mask: int32[B,L] (mask 1 = token, 0 = padding; None = all 1).

        Returns (last_hidden_state f32[B,L,D] after the final layer norm,
        pooled f32[B,D] = last_hidden_state at argmax(input_ids), the eos position).
        """
        cfg = self.config
        b, length = input_ids.shape
        if length > cfg.max_position_embeddings:
            raise DataError(f"text length {length} exceeds max_position_embeddings = "
                            f"{cfg.max_position_embeddings}")
        input_ids = input_ids.astype(jnp.int32)
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        causal = jnp.tril(jnp.ones((length, length), bool))
        mask = causal[None, None] & (attention_mask > 0)[:, None, None, :]
        x = CLIPTextEmbeddings(cfg, name="embeddings", **self.policy)(input_ids)
        x = CLIPEncoder(cfg, name="encoder", **self.policy)(x, mask)
        x = self.layer_norm("final_layer_norm", cfg.layer_norm_eps)(x)
        # transformers 4.25 pooling: eos has the highest id, so argmax finds it.
        pooled = x[jnp.arange(b), jnp.argmax(input_ids, axis=-1)]
        return x, pooled


class CLIPVisionEmbeddings(Typed):
    cfg: CLIPVisionConfig

    @nn.compact
    def __call__(self, pixel_values):
        cfg = self.cfg
        p = cfg.patch_size
        cls = self.param("class_embedding", nn.initializers.normal(0.02), (cfg.hidden_size,),
                         self.param_dtype).astype(jnp.float32)
        patches = self.conv(cfg.hidden_size, (p, p), "patch_embedding", strides=(p, p),
                            padding="VALID", use_bias=False,
                            kernel_init=_dense_init(cfg))(pixel_values).astype(jnp.float32)
        b = patches.shape[0]
        patches = patches.reshape(b, -1, cfg.hidden_size)  # row-major patches, as HF
        x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, cfg.hidden_size)), patches], axis=1)
        pos = nn.Embed(cfg.num_positions, cfg.hidden_size,
                       embedding_init=nn.initializers.normal(0.02), dtype=jnp.float32,
                       param_dtype=self.param_dtype,
                       name="position_embedding")(jnp.arange(cfg.num_positions)[None])
        return x + pos


class CLIPVisionModel(Typed):
    """CLIP ViT (HF ``vision_model``). ``dtype``/``param_dtype``: the precision policy."""
    config: CLIPVisionConfig

    @nn.compact
    def __call__(self, pixel_values):
        """pixel_values: f32[B,S,S,C] NHWC, CLIP-normalised, S = image_size.

        Returns (last_hidden_state f32[B,1+P,D] (encoder output, before post_layernorm),
        pooled f32[B,D] = post_layernorm(class token)).
        """
        cfg = self.config
        want = (cfg.image_size, cfg.image_size, cfg.num_channels)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != want:
            raise DataError(f"pixel_values shape {tuple(pixel_values.shape)}: expected NHWC "
                            f"[B, {want[0]}, {want[1]}, {want[2]}]")
        x = CLIPVisionEmbeddings(cfg, name="embeddings", **self.policy)(
            pixel_values.astype(jnp.float32))
        x = self.layer_norm("pre_layrnorm", cfg.layer_norm_eps)(x)  # HF's spelling
        x = CLIPEncoder(cfg, name="encoder", **self.policy)(x)
        pooled = self.layer_norm("post_layernorm", cfg.layer_norm_eps)(x[:, 0])
        return x, pooled


def _l2_normalize(x):
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


class CLIPModel(Typed):
    """The two towers, their projections and the learned temperature (HF FlaxCLIPModel).
    ``dtype``/``param_dtype``: the precision policy; features come out float32."""
    config: CLIPConfig

    def setup(self):
        cfg = self.config
        self.text_model = CLIPTextModel(cfg.text_config, **self.policy)
        self.vision_model = CLIPVisionModel(cfg.vision_config, **self.policy)
        self.text_projection = nn.Dense(cfg.projection_dim, use_bias=False,
                                        kernel_init=_dense_init(cfg.text_config), **self.policy)
        self.visual_projection = nn.Dense(cfg.projection_dim, use_bias=False,
                                          kernel_init=_dense_init(cfg.vision_config),
                                          **self.policy)
        self.logit_scale = self.param(
            "logit_scale", nn.initializers.constant(cfg.logit_scale_init_value), (),
            self.param_dtype)

    def get_text_features(self, input_ids, attention_mask=None):
        """int32[B,L] ids + mask -> f32[B,P] projected (unnormalised) text features."""
        pooled = self.text_model(input_ids, attention_mask)[1]
        return self.text_projection(pooled).astype(jnp.float32)

    def get_image_features(self, pixel_values):
        """f32[B,S,S,3] NHWC normalised pixels -> f32[B,P] projected image features."""
        return self.visual_projection(self.vision_model(pixel_values)[1]).astype(jnp.float32)

    def __call__(self, pixel_values, input_ids, attention_mask=None):
        """Returns dict: image_embeds f32[Bi,P], text_embeds f32[Bt,P] (L2-normalised),
        logits_per_image f32[Bi,Bt] = exp(logit_scale) * image . text, logits_per_text."""
        image_embeds = _l2_normalize(self.get_image_features(pixel_values))
        text_embeds = _l2_normalize(self.get_text_features(input_ids, attention_mask))
        scale = jnp.exp(self.logit_scale.astype(jnp.float32))
        logits_per_text = scale * text_embeds @ image_embeds.T
        return {"image_embeds": image_embeds, "text_embeds": text_embeds,
                "logits_per_image": logits_per_text.T, "logits_per_text": logits_per_text}


# ----------------------------------------------------------------------------- helpers


def _dummy_inputs(cfg: CLIPConfig):
    v = cfg.vision_config
    return (jnp.zeros((1, v.image_size, v.image_size, v.num_channels), jnp.float32),
            jnp.zeros((1, cfg.text_config.max_position_embeddings), jnp.int32),
            jnp.ones((1, cfg.text_config.max_position_embeddings), jnp.int32))


# Jitted (op-by-op initialisation dispatches hundreds of tiny kernels) and cached per config.
@functools.partial(jax.jit, static_argnums=0)
def _init_clip(cfg: CLIPConfig, key: jax.Array) -> PyTree:
    return CLIPModel(cfg).init(key, *_dummy_inputs(cfg))


@functools.partial(jax.jit, static_argnums=0)
def _init_clip_text(cfg: CLIPTextConfig, key: jax.Array) -> PyTree:
    ids = jnp.zeros((1, cfg.max_position_embeddings), jnp.int32)
    return CLIPTextModel(cfg).init(key, ids, jnp.ones_like(ids))


def init_clip(cfg: CLIPConfig, key: jax.Array) -> PyTree:
    """Fresh variables {"params": ...} for CLIPModel(cfg)."""
    return _init_clip(cfg, key)


def init_clip_text(cfg: CLIPTextConfig, key: jax.Array) -> PyTree:
    """Fresh variables {"params": ...} for CLIPTextModel(cfg)."""
    return _init_clip_text(cfg, key)


def _unwrap(params: PyTree) -> PyTree:
    # Accept both variables {"params": tree} and the bare tree.
    if isinstance(params, Mapping) and set(params) == {"params"}:
        return params["params"]
    return params


def _to_device(tree):
    return {"params": jax.tree.map(jnp.asarray, tree)}


def load_clip(folder: str | os.PathLike) -> tuple[CLIPConfig, PyTree]:
    """Reads an HF FlaxCLIPModel folder (config.json + flax_model.msgpack).

    Returns (config, variables {"params": ...}) for ``CLIPModel(config).apply``.
    Raises ConfigError / CheckpointError naming the key or tensor at fault.
    """
    folder = os.fspath(folder)
    cfg_path = os.path.join(folder, CONFIG_NAME)
    cfg = CLIPConfig.from_dict(formats.read_json(cfg_path), cfg_path)
    w_path = os.path.join(folder, WEIGHTS_NAME)
    raw = formats.read_msgpack(w_path)
    expected = jax.eval_shape(lambda: init_clip(cfg, jax.random.key(0)))["params"]
    return cfg, _to_device(formats.match_tree(raw, expected, w_path))


def save_clip(folder: str | os.PathLike, cfg: CLIPConfig, params: PyTree) -> None:
    """Writes config.json + flax_model.msgpack that transformers' FlaxCLIPModel loads."""
    folder = os.fspath(folder)
    tree = _unwrap(params)
    expected = jax.eval_shape(lambda: init_clip(cfg, jax.random.key(0)))["params"]
    tree = formats.match_tree(jax.device_get(tree), expected, f"save_clip({folder})")
    os.makedirs(folder, exist_ok=True)
    formats.write_json(os.path.join(folder, CONFIG_NAME), cfg.to_dict())
    formats.write_msgpack(os.path.join(folder, WEIGHTS_NAME), tree)


def load_clip_text(folder: str | os.PathLike) -> tuple[CLIPTextConfig, PyTree]:
    """Reads an HF FlaxCLIPTextModel folder (e.g. Stable Diffusion's ``text_encoder/``).

    The file holds ``text_model/...``; the returned variables {"params": ...} are the inner
    tree that ``CLIPTextModel(config).apply`` expects.
    """
    folder = os.fspath(folder)
    cfg_path = os.path.join(folder, CONFIG_NAME)
    cfg = CLIPTextConfig.from_dict(formats.read_json(cfg_path), cfg_path)
    w_path = os.path.join(folder, WEIGHTS_NAME)
    raw = formats.read_msgpack(w_path)
    expected = {"text_model": jax.eval_shape(
        lambda: init_clip_text(cfg, jax.random.key(0)))["params"]}
    return cfg, _to_device(formats.match_tree(raw, expected, w_path)["text_model"])


def save_clip_text(folder: str | os.PathLike, cfg: CLIPTextConfig, params: PyTree) -> None:
    """Writes the text tower as transformers' FlaxCLIPTextModel (config.json + msgpack)."""
    folder = os.fspath(folder)
    expected = jax.eval_shape(lambda: init_clip_text(cfg, jax.random.key(0)))["params"]
    tree = formats.match_tree(jax.device_get(_unwrap(params)), expected,
                              f"save_clip_text({folder})")
    os.makedirs(folder, exist_ok=True)
    d = cfg.to_dict()
    d["architectures"] = ["CLIPTextModel"]
    formats.write_json(os.path.join(folder, CONFIG_NAME), d)
    formats.write_msgpack(os.path.join(folder, WEIGHTS_NAME), {"text_model": tree})


def preprocess_images(images: np.ndarray, image_size: int) -> np.ndarray:
    """uint8[B,H,W,3] -> f32[B,S,S,3] NHWC, CLIP-normalised (S = image_size).

    Images of another size are resized as HF's CLIPImageProcessor does: shortest side to S
    (bicubic, PIL), then a centre crop to SxS.
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise DataError(f"preprocess_images: expected uint8[B,H,W,3], got "
                        f"{images.dtype}{list(images.shape)}")
    if not _pos_int(image_size):
        raise ConfigError(f"preprocess_images: image_size = {image_size!r} must be a positive int")
    if images.shape[1:3] != (image_size, image_size):
        out = []
        for img in images:
            h, w = img.shape[:2]
            # HF's size rule: short side -> S, long side -> int(S * long / short).
            if h <= w:
                nh, nw = image_size, int(image_size * w / h)
            else:
                nh, nw = int(image_size * h / w), image_size
            r = np.asarray(Image.fromarray(img).resize((nw, nh), Image.BICUBIC))
            top, left = (nh - image_size) // 2, (nw - image_size) // 2
            out.append(r[top:top + image_size, left:left + image_size])
        images = np.stack(out)
    x = images.astype(np.float32) / 255.0
    return (x - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)


def clip_contrastive_loss(params: PyTree, model: CLIPModel, images, input_ids,
                          attention_mask) -> jax.Array:
    """Symmetric InfoNCE over a batch of matching pairs (pair i is image i, caption i).

    images: f32[B,S,S,3] normalised NHWC; input_ids, attention_mask: int32[B,L].
    The temperature exp(logit_scale) is capped at 100 as in CLIP training.
    Returns the scalar mean of image->text and text->image cross-entropies.
    """
    out = model.apply(params, images, input_ids, attention_mask)
    scale = jnp.exp(jnp.minimum(_unwrap(params)["logit_scale"], jnp.log(100.0)))
    logits = scale * out["image_embeds"] @ out["text_embeds"].T
    labels = jnp.arange(logits.shape[0])
    li = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    lt = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean()
    return 0.5 * (li + lt)
