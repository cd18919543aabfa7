"""DALL-E mini / mega's DalleBart (dalle-mini 0.1.5), natively in Flax linen.

A BART-style encoder-decoder: text tokens -> encoder; image tokens (VQGAN codes, plus one
special id) -> causal decoder with cross-attention -> logits over image_vocab_size + 1.
The parameter tree of :class:`DalleBart` matches the public ``flax_model.msgpack`` of
dalle-mini / dalle-mega key for key (``model/encoder/layers/FlaxBartEncoderLayer_0/
GLU_0/Dense_0/kernel``, ``lm_head/kernel``, ...). Checkpoints saved with ``use_scan``
hold each per-layer tensor stacked along a leading layer axis under
``layers/FlaxBartEncoderLayers`` (``...DecoderLayers``); :func:`load_dallebart` unstacks
them, :func:`save_dallebart` stacks them again when the config says ``use_scan``.

Supported architecture: dalle-mini/mega's defaults - layernorm, NormFormer positions
(LayerNorm before attention and GLU, LayerNorm after attention and inside the GLU; the
LayerNorms that feed a linear layer have no scale unless ``force_ln_scale``), GLU
feed-forward, no biases, final layer norms in encoder and decoder, absolute position
embeddings, untied lm_head. Any other value of an architecture key is a ConfigError
naming key and value.

Block (encoder; the decoder adds cross-attention between LayerNorm_2 and LayerNorm_3)::

    x = x + LN_1(SelfAttn(LN_0(x)))
    x = x + Dense_2(LN(act(Dense_0(LN(x))) * Dense_1(LN(x))))   # GLU_0

Special ids come from the config (dalle-mini's defaults: bos = eos = pad = decoder start =
image_vocab_size). Generation emits exactly image_length tokens after the decoder start;
the eos id is masked out at every step (dalle-mini's min_length = image_length + 1 does the
same). Randomness is per row: the token at sequence position t of row b is drawn with
``fold_in(key_per_row[b], t)``, so a row's tokens do not depend on the batch it is in.

Dropout (training) runs when a module is built with ``deterministic=False`` and a
``"dropout"`` rng is passed to ``apply``; ``gradient_checkpointing`` rematerialises each
layer in that mode.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from t2i_mia.errors import CheckpointError, ConfigError, DataError
from t2i_mia.models import formats
from t2i_mia.models.precision import module_policy

PyTree = Any

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "flax_model.msgpack"

# Hugging Face boilerplate and generation defaults: no computation in this model (our
# generate() takes its sampling options as arguments).
_IGNORED_KEYS = frozenset({
    "transformers_version", "architectures", "torch_dtype", "name_or_path",
    "do_sample", "num_beams", "temperature", "top_k", "top_p", "typical_p",
    "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "early_stopping", "num_return_sequences",
    "bad_words_ids", "diversity_penalty", "num_beam_groups", "output_scores",
    "return_dict_in_generate", "remove_invalid_values", "exponential_decay_length_penalty",
    "suppress_tokens", "begin_suppress_tokens", "use_cache", "return_dict",
    "output_hidden_states", "output_attentions", "torchscript", "use_bfloat16",
    "pruned_heads", "chunk_size_feed_forward", "tf_legacy_loss", "problem_type",
    "id2label", "label2id", "finetuning_task", "tokenizer_class", "prefix",
    "sep_token_id", "task_specific_params", "is_decoder", "add_cross_attention",
    "cross_attention_hidden_size", "tie_encoder_decoder",
})

_ACTIVATIONS = {
    # transformers' Flax ACT2FN
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}

_NEG = -1e30  # masked attention score: exp() underflows to 0; a fully masked row stays finite


@dataclasses.dataclass(frozen=True)
class DalleBartConfig:
    """dalle-mini ``config.json``; field names are its keys, defaults are dalle-mini's.

    Special ids left as None resolve to ``image_vocab_size``; ``min_length`` and
    ``max_length`` to ``image_length + 1``; ``use_scan`` to True (dalle-mini's rule for
    non-swinv2 models).
    """

    normalize_text: bool = False
    encoder_vocab_size: int = 50264
    image_vocab_size: int = 16384
    image_length: int = 256
    max_text_length: int = 64
    encoder_layers: int = 12
    encoder_ffn_dim: int = 4096
    encoder_attention_heads: int = 16
    decoder_layers: int = 12
    decoder_ffn_dim: int = 4096
    decoder_attention_heads: int = 16
    activation_function: str = "gelu"
    d_model: int = 1024
    dropout: float = 0.1
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    init_std: float = 0.02
    scale_embedding: bool = False
    gradient_checkpointing: bool = True
    use_scan: bool | None = None
    is_encoder_decoder: bool = True
    tie_word_embeddings: bool = False
    use_bias: bool = False
    ln_type: str = "layernorm"
    ln_positions: str = "normformer"
    use_head_scale: bool = False
    use_cosine_attention: bool = False
    tau_init: float = 0.05
    use_absolute_position_embeddings: bool = True
    use_swin_position_embeddings: bool = False
    use_deepnet_scaling: bool = False
    use_subln_init: bool = False
    use_glu: bool = True
    use_alibi: bool = False
    sinkhorn_iters: int = 1
    use_final_ln_encoder: bool = True
    use_final_ln_decoder: bool = True
    force_ln_scale: bool = False
    encoder_layerdrop: float = 0.0
    decoder_layerdrop: float = 0.0
    forced_bos_token_id: int | None = None
    forced_eos_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    decoder_start_token_id: int | None = None
    min_length: int | None = None
    max_length: int | None = None
    model_type: str = "dallebart"

    def __post_init__(self):
        for key in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id"):
            if getattr(self, key) is None:
                object.__setattr__(self, key, self.image_vocab_size)
        for key in ("min_length", "max_length"):
            if getattr(self, key) is None:
                object.__setattr__(self, key, self.image_length + 1)
        if self.use_scan is None:
            object.__setattr__(self, "use_scan", self.ln_positions != "swinv2")
        _validate_dallebart(self)

    @property
    def decoder_vocab_size(self) -> int:
        """Rows of the decoder embedding and columns of lm_head: image_vocab_size + 1."""
        return self.image_vocab_size + 1

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "DalleBartConfig") -> "DalleBartConfig":
        """Builds a config from a ``config.json`` dict; ConfigError names key and value."""
        names = {f.name for f in dataclasses.fields(cls)}
        formats.check_config_keys(d, {n: (lambda v: True) for n in names}, where,
                                  ignored=_IGNORED_KEYS)
        try:
            return cls(**{k: v for k, v in d.items() if k in names})
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# key -> allowed values (architecture variants we do not implement are rejected)
_ONLY = {
    "ln_type": ("layernorm",),
    "ln_positions": ("normformer",),
    "use_glu": (True,),
    "use_bias": (False,),
    "use_final_ln_encoder": (True,),
    "use_final_ln_decoder": (True,),
    "use_absolute_position_embeddings": (True,),
    "tie_word_embeddings": (False,),
    "use_cosine_attention": (False,),
    "use_alibi": (False,),
    "sinkhorn_iters": (1,),
    "use_deepnet_scaling": (False,),
    "use_subln_init": (False,),
    "use_swin_position_embeddings": (False,),
    "use_head_scale": (False,),
    "is_encoder_decoder": (True,),
    "encoder_layerdrop": (0.0,),
    "decoder_layerdrop": (0.0,),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
    "model_type": ("dallebart",),
}


def _same(value, allowed) -> bool:
    """Equality that keeps true/false, numbers and null apart (True == 1 in Python)."""
    if allowed is None or isinstance(allowed, bool):
        return value is allowed
    if isinstance(allowed, (int, float)):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and value == allowed
    return value == allowed


def _validate_dallebart(c: DalleBartConfig) -> None:
    def bad(key, why):
        raise ConfigError(f"'{key}' = {getattr(c, key)!r}: {why}")

    for key, allowed in _ONLY.items():
        if not any(_same(getattr(c, key), a) for a in allowed):
            bad(key, f"is not implemented (supported: {list(dict.fromkeys(allowed))})")
    for key in ("encoder_vocab_size", "image_vocab_size", "image_length", "max_text_length",
                "encoder_layers", "encoder_ffn_dim", "encoder_attention_heads",
                "decoder_layers", "decoder_ffn_dim", "decoder_attention_heads", "d_model"):
        v = getattr(c, key)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            bad(key, "expected a positive integer")
    for key in ("encoder_attention_heads", "decoder_attention_heads"):
        if c.d_model % getattr(c, key):
            bad(key, f"must divide d_model = {c.d_model}")
    if c.activation_function not in _ACTIVATIONS:
        bad("activation_function", f"is not implemented (supported: {sorted(_ACTIVATIONS)})")
    for key in ("dropout", "attention_dropout", "activation_dropout"):
        v = getattr(c, key)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0.0 <= v < 1.0:
            bad(key, "expected a float in [0, 1)")
    for key in ("init_std", "tau_init"):
        if not isinstance(getattr(c, key), (int, float)) or getattr(c, key) < 0:
            bad(key, "expected a non-negative number")
    for key in ("normalize_text", "scale_embedding", "gradient_checkpointing", "use_scan",
                "force_ln_scale"):
        if not isinstance(getattr(c, key), bool):
            bad(key, "expected true or false")
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id"):
        v = getattr(c, key)
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= c.image_vocab_size:
            bad(key, f"expected an id in [0, image_vocab_size = {c.image_vocab_size}]")
    for key in ("min_length", "max_length"):
        if getattr(c, key) != c.image_length + 1:
            bad(key, f"is not implemented: generation always emits image_length tokens after "
                     f"the decoder start (supported: [{c.image_length + 1}])")


# ----------------------------------------------------------------------------- modules

def _normal(std):
    return jax.nn.initializers.normal(std)


def _layer_norm(use_scale: bool, owner: nn.Module, name: str | None = None):
    """A LayerNorm with ``owner``'s precision policy; flax computes the statistics in
    float32 whatever the output dtype is."""
    return nn.LayerNorm(epsilon=1e-5, use_scale=use_scale, use_bias=True, dtype=owner.dtype,
                        param_dtype=owner.param_dtype, name=name)


class Attention(nn.Module):
    """Multi-head attention without biases (``q_proj``, ``k_proj``, ``v_proj``, ``out_proj``).

    ``project_kv`` and ``attend`` are separate so the decoder can cache keys/values.
    """

    num_heads: int
    embed_dim: int
    dropout: float
    init_std: float
    deterministic: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        dense = functools.partial(nn.Dense, self.embed_dim, use_bias=False, dtype=self.dtype,
                                  param_dtype=self.param_dtype,
                                  kernel_init=_normal(self.init_std))
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = dense(), dense(), dense(), dense()
        # dalle-mini drops whole (query, key) entries shared across batch and heads
        self.attn_dropout = nn.Dropout(self.dropout, broadcast_dims=(0, 1))

    def _split(self, x):
        return x.reshape(x.shape[:2] + (self.num_heads, self.embed_dim // self.num_heads))

    def project_kv(self, source):
        """f[B,K,D] -> keys, values f[B,K,H,D/H]."""
        return self._split(self.k_proj(source)), self._split(self.v_proj(source))

    def attend(self, x, keys, values, mask):
        """x f[B,Q,D], keys/values f[B,K,H,Dh], mask bool broadcastable to [B,H,Q,K]."""
        q = self._split(self.q_proj(x))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, keys).astype(jnp.float32)
        scores = scores / jnp.sqrt(jnp.float32(q.shape[-1]))
        scores = jnp.where(mask, scores, _NEG)
        weights = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        weights = self.attn_dropout(weights, deterministic=self.deterministic)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, values)
        return self.out_proj(out.reshape(out.shape[:2] + (self.embed_dim,)))

    def __call__(self, x, mask, source=None):
        k, v = self.project_kv(x if source is None else source)
        return self.attend(x, k, v, mask)


class GLU(nn.Module):
    """NormFormer GLU: LN -> act(Dense_0) * Dense_1 -> LN -> Dense_2."""

    config: DalleBartConfig
    ffn_dim: int
    deterministic: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = self.config
        dense = functools.partial(nn.Dense, use_bias=False, dtype=self.dtype,
                                  param_dtype=self.param_dtype, kernel_init=_normal(c.init_std))
        x = _layer_norm(c.force_ln_scale, self)(x)
        w = _ACTIVATIONS[c.activation_function](dense(self.ffn_dim)(x))
        v = dense(self.ffn_dim)(x)
        x = _layer_norm(c.force_ln_scale, self)(w * v)
        x = nn.Dropout(c.activation_dropout)(x, deterministic=self.deterministic)
        x = dense(c.d_model)(x)
        return nn.Dropout(c.dropout)(x, deterministic=self.deterministic)


class EncoderLayer(nn.Module):
    config: DalleBartConfig
    deterministic: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask):
        c, det = self.config, self.deterministic
        h = _layer_norm(c.force_ln_scale, self, "LayerNorm_0")(x)
        h = Attention(c.encoder_attention_heads, c.d_model, c.attention_dropout, c.init_std,
                      det, name="FlaxBartAttention_0", **module_policy(self))(h, mask)
        h = _layer_norm(True, self, "LayerNorm_1")(h)
        x = x + nn.Dropout(c.dropout)(h, deterministic=det)
        return x + GLU(c, c.encoder_ffn_dim, det, name="GLU_0",
                       **module_policy(self))(x)


class DecoderLayer(nn.Module):
    """Self-attention (causal, optionally cached), cross-attention, GLU.

    Submodule names follow dalle-mini's auto-numbered layout (LayerNorm_0..3,
    FlaxBartAttention_0 = self, FlaxBartAttention_1 = cross, GLU_0).
    """

    config: DalleBartConfig
    deterministic: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        c, det = self.config, self.deterministic
        s = c.force_ln_scale
        self.LayerNorm = [_layer_norm(s, self), _layer_norm(True, self),
                          _layer_norm(s, self), _layer_norm(True, self)]
        attn = functools.partial(Attention, c.decoder_attention_heads, c.d_model,
                                 c.attention_dropout, c.init_std, det,
                                 **module_policy(self))
        self.FlaxBartAttention = [attn(), attn()]
        self.GLU = [GLU(c, c.decoder_ffn_dim, det, **module_policy(self))]
        self.drop = nn.Dropout(c.dropout)

    def cross_kv(self, encoder_hidden_states):
        """Cross-attention keys/values of the encoder output (computed once per prompt)."""
        return self.FlaxBartAttention[1].project_kv(encoder_hidden_states)

    def __call__(self, x, encoder_mask, encoder_hidden_states=None, cache=None, index=None):
        """x f[B,T,D]; encoder_mask bool[B,S].

        Without ``cache``: causal attention over the T tokens given, cross-attention to
        ``encoder_hidden_states``; returns (x, None). With ``cache`` (dict k, v f[B,L,H,Dh],
        cross_k, cross_v f[B,S,H,Dh]): the T tokens sit at positions index..index+T-1,
        their keys/values are written into the cache; returns (x, new cache).
        """
        self_attn, cross_attn = self.FlaxBartAttention
        det = self.deterministic
        h = self.LayerNorm[0](x)
        k, v = self_attn.project_kv(h)
        t = x.shape[1]
        if cache is None:
            mask = jnp.tril(jnp.ones((t, t), bool))[None, None]
            new_cache = None
        else:
            k = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype),
                                             (0, index, 0, 0))
            v = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype),
                                             (0, index, 0, 0))
            q_pos = index + jnp.arange(t)
            mask = (jnp.arange(k.shape[1])[None, :] <= q_pos[:, None])[None, None]
            new_cache = dict(cache, k=k, v=v)
        h = self_attn.attend(h, k, v, mask)
        x = x + self.drop(self.LayerNorm[1](h), deterministic=det)

        h = self.LayerNorm[2](x)
        if cache is None:
            ck, cv = cross_attn.project_kv(encoder_hidden_states)
        else:
            ck, cv = cache["cross_k"], cache["cross_v"]
        h = cross_attn.attend(h, ck, cv, encoder_mask[:, None, None, :])
        x = x + self.drop(self.LayerNorm[3](h), deterministic=det)
        return x + self.GLU[0](x), new_cache


class _EncoderLayers(nn.Module):
    config: DalleBartConfig
    deterministic: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask):
        layer = EncoderLayer
        if self.config.gradient_checkpointing and not self.deterministic:
            layer = nn.remat(EncoderLayer)
        for i in range(self.config.encoder_layers):
            x = layer(self.config, self.deterministic, name=f"FlaxBartEncoderLayer_{i}",
                      **module_policy(self))(x, mask)
        return x


class _DecoderLayers(nn.Module):
    config: DalleBartConfig
    deterministic: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        layer = DecoderLayer
        if self.config.gradient_checkpointing and not self.deterministic:
            layer = nn.remat(DecoderLayer)
        self.FlaxBartDecoderLayer = [layer(self.config, self.deterministic, **module_policy(self))
                                     for _ in range(self.config.decoder_layers)]


class Encoder(nn.Module):
    """int32[B,S] ids + mask -> f[B,S,D] (S <= max_text_length)."""

    config: DalleBartConfig
    deterministic: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids, attention_mask):
        c = self.config
        s = input_ids.shape[1]
        if s > c.max_text_length:
            raise DataError(f"input_ids: {s} text tokens, expected at most max_text_length = "
                            f"{c.max_text_length}")
        embed = functools.partial(nn.Embed, features=c.d_model, dtype=self.dtype,
                                  param_dtype=self.param_dtype,
                                  embedding_init=_normal(c.init_std))
        x = embed(c.encoder_vocab_size, name="embed_tokens")(input_ids)
        if c.scale_embedding:
            x = x * math.sqrt(c.d_model)
        x = x + embed(c.max_text_length, name="embed_positions")(jnp.arange(s))[None]
        x = _layer_norm(True, self, "layernorm_embedding")(x)
        x = nn.Dropout(c.dropout)(x, deterministic=self.deterministic)
        mask = (attention_mask > 0)[:, None, None, :]
        x = _EncoderLayers(c, self.deterministic, name="layers", **module_policy(self))(x, mask)
        return _layer_norm(c.force_ln_scale, self, "final_ln")(x)


class Decoder(nn.Module):
    """Image-token decoder: full (teacher-forced) or cached incremental."""

    config: DalleBartConfig
    deterministic: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        c = self.config
        embed = functools.partial(nn.Embed, features=c.d_model, dtype=self.dtype,
                                  param_dtype=self.param_dtype,
                                  embedding_init=_normal(c.init_std))
        self.embed_tokens = embed(c.decoder_vocab_size)
        self.embed_positions = embed(c.image_length)
        self.layernorm_embedding = _layer_norm(True, self)
        self.layers = _DecoderLayers(c, self.deterministic, **module_policy(self))
        self.final_ln = _layer_norm(c.force_ln_scale, self)
        self.drop = nn.Dropout(c.dropout)

    def _embed(self, ids, start):
        c = self.config
        x = self.embed_tokens(ids)
        if c.scale_embedding:
            x = x * math.sqrt(c.d_model)
        x = x + self.embed_positions(start + jnp.arange(ids.shape[1]))[None]
        x = self.layernorm_embedding(x)
        return self.drop(x, deterministic=self.deterministic)

    def __call__(self, decoder_input_ids, encoder_hidden_states, encoder_attention_mask):
        """int32[B,T] (T <= image_length) -> f[B,T,D]."""
        if decoder_input_ids.shape[1] > self.config.image_length:
            raise DataError(f"decoder_input_ids: {decoder_input_ids.shape[1]} tokens, expected "
                            f"at most image_length = {self.config.image_length}")
        x = self._embed(decoder_input_ids, 0)
        mask = encoder_attention_mask > 0
        for layer in self.layers.FlaxBartDecoderLayer:
            x, _ = layer(x, mask, encoder_hidden_states)
        return self.final_ln(x)

    def init_cache(self, encoder_hidden_states, encoder_attention_mask, length: int):
        c = self.config
        b = encoder_hidden_states.shape[0]
        heads = c.decoder_attention_heads
        zeros = jnp.zeros((b, length, heads, c.d_model // heads), self.dtype)
        layers = []
        for layer in self.layers.FlaxBartDecoderLayer:
            ck, cv = layer.cross_kv(encoder_hidden_states)
            layers.append({"k": zeros, "v": zeros, "cross_k": ck, "cross_v": cv})
        return {"index": jnp.zeros((), jnp.int32), "encoder_mask": encoder_attention_mask > 0,
                "layers": layers}

    def step(self, decoder_input_ids, cache):
        """int32[B,T] at positions cache['index']... -> (f[B,T,D], new cache)."""
        index = cache["index"]
        x = self._embed(decoder_input_ids, index)
        new_layers = []
        for layer, lc in zip(self.layers.FlaxBartDecoderLayer, cache["layers"]):
            x, lc = layer(x, cache["encoder_mask"], cache=lc, index=index)
            new_layers.append(lc)
        new_cache = dict(cache, index=index + decoder_input_ids.shape[1], layers=new_layers)
        return self.final_ln(x), new_cache


class _BartModule(nn.Module):
    config: DalleBartConfig
    deterministic: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        self.encoder = Encoder(self.config, self.deterministic, **module_policy(self))
        self.decoder = Decoder(self.config, self.deterministic, **module_policy(self))


class DalleBart(nn.Module):
    """dalle-mini's ``FlaxBartForConditionalGenerationModule`` with the same parameter tree.

    Build with ``deterministic=False`` (and a ``"dropout"`` rng) for training.

    KV cache (an ordinary pytree, passed in and returned): {"index": int32[] next position,
    "encoder_mask": bool[B,S], "layers": [ {"k","v": f[B,image_length,H,Dh],
    "cross_k","cross_v": f[B,S,H,Dh]} per decoder layer ]}.
    """

    config: DalleBartConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    deterministic: bool = True

    def setup(self):
        self.model = _BartModule(self.config, self.deterministic, **module_policy(self))
        self.lm_head = nn.Dense(self.config.decoder_vocab_size, use_bias=False,
                                dtype=self.dtype, param_dtype=self.param_dtype,
                                kernel_init=_normal(self.config.init_std))

    def encode(self, input_ids, attention_mask):
        """int32[B,S], int[B,S] (1 = token, 0 = padding) -> f[B,S,d_model]."""
        return self.model.encoder(input_ids, attention_mask)

    def init_cache(self, encoder_hidden_states, encoder_attention_mask):
        """An empty KV cache for image_length positions, with cross-attention K/V filled."""
        return self.model.decoder.init_cache(encoder_hidden_states, encoder_attention_mask,
                                             self.config.image_length)

    def decode(self, decoder_input_ids, encoder_hidden_states=None,
               encoder_attention_mask=None, cache=None):
        """Decoder logits f32[B,T,image_vocab_size+1].

        With ``cache=None``: teacher-forced over the T tokens (positions 0..T-1) against
        ``encoder_hidden_states``/``encoder_attention_mask``; returns (logits, None).
        With a cache: the T tokens continue at ``cache['index']`` (encoder arguments are
        unused; the cache holds them); returns (logits, new cache).
        """
        if cache is None:
            h = self.model.decoder(decoder_input_ids, encoder_hidden_states,
                                   encoder_attention_mask)
            new_cache = None
        else:
            h, new_cache = self.model.decoder.step(decoder_input_ids, cache)
        return self.lm_head(h).astype(jnp.float32), new_cache

    def __call__(self, input_ids, attention_mask, decoder_input_ids):
        """Teacher-forced logits f32[B,T,image_vocab_size+1]."""
        enc = self.encode(input_ids, attention_mask)
        return self.decode(decoder_input_ids, enc, attention_mask)[0]


# ----------------------------------------------------------------------------- functions

def init_dallebart(cfg: DalleBartConfig, key: jax.Array) -> PyTree:
    """Random parameters (normal(init_std) kernels and embeddings, as dalle-mini)."""
    ids = jnp.zeros((1, 2), jnp.int32)
    return jax.jit(lambda k: DalleBart(cfg).init({"params": k}, ids, jnp.ones_like(ids),
                                                 ids)["params"])(key)


@functools.partial(jax.jit, static_argnums=1)
def _logits_jit(params, cfg, input_ids, attention_mask, decoder_input_ids):
    return DalleBart(cfg).apply({"params": params}, input_ids, attention_mask,
                                decoder_input_ids)


def logits(params: PyTree, cfg: DalleBartConfig, input_ids, attention_mask,
           decoder_input_ids) -> jax.Array:
    """Jitted teacher-forced logits f32[B,T,image_vocab_size+1]."""
    _check_text(cfg, input_ids, attention_mask, "input_ids")
    return _logits_jit(params, cfg, jnp.asarray(input_ids, jnp.int32),
                       jnp.asarray(attention_mask, jnp.int32),
                       jnp.asarray(decoder_input_ids, jnp.int32))


def _top_k_filter(lg, k: int):
    """Keeps the k largest logits per row (ties: lower id first, as lax.top_k)."""
    k = min(k, lg.shape[-1])
    vals, idx = jax.lax.top_k(lg, k)
    rows = jnp.arange(lg.shape[0])[:, None]
    return jnp.full_like(lg, -jnp.inf).at[rows, idx].set(vals)


def _top_p_filter(lg, top_p):
    """Nucleus filter (transformers' Flax rule): keep the most likely ids whose preceding
    cumulative probability is below top_p, and always the most likely one."""
    order = jnp.argsort(-lg, axis=-1, stable=True)
    sorted_lg = jnp.take_along_axis(lg, order, axis=-1)
    cum = jnp.cumsum(jax.nn.softmax(sorted_lg, axis=-1), axis=-1)
    keep = jnp.concatenate([jnp.ones_like(cum[:, :1], bool), cum[:, :-1] < top_p], axis=-1)
    kept = jnp.where(keep, sorted_lg, -jnp.inf)
    rows = jnp.arange(lg.shape[0])[:, None]
    return jnp.full_like(lg, -jnp.inf).at[rows, order].set(kept)


def _next_tokens(lg, keys, position, temperature, top_p, *, top_k, use_top_p, do_sample):
    """Chooses one token per row from logits f32[B,V] (eos already masked)."""
    if not do_sample:
        return jnp.argmax(lg, axis=-1).astype(jnp.int32)
    lg = lg / temperature
    if top_k is not None:
        lg = _top_k_filter(lg, top_k)
    if use_top_p:
        lg = _top_p_filter(lg, top_p)
    draw = lambda k, l: jax.random.categorical(jax.random.fold_in(k, position), l)
    return jax.vmap(draw)(keys, lg).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "guided", "top_k", "use_top_p",
                                             "do_sample", "use_cache", "return_logits", "dtype"))
def _generate_jit(params, input_ids, attention_mask, keys, uncond_ids, uncond_mask,
                  condition_scale, temperature, top_p, *, cfg, guided, top_k, use_top_p,
                  do_sample, use_cache, return_logits, dtype):
    model = DalleBart(cfg, dtype=dtype)
    variables = {"params": params}
    b = input_ids.shape[0]
    n = cfg.image_length
    if guided:  # unconditional rows ride in the same batch
        input_ids = jnp.concatenate([input_ids, uncond_ids])
        attention_mask = jnp.concatenate([attention_mask, uncond_mask])
    enc = model.apply(variables, input_ids, attention_mask, method=DalleBart.encode)
    seq = jnp.full((b, n + 1), cfg.decoder_start_token_id, jnp.int32)
    lg_buf = jnp.zeros((b, n if return_logits else 0, cfg.decoder_vocab_size), jnp.float32)
    cache = (model.apply(variables, enc, attention_mask, method=DalleBart.init_cache)
             if use_cache else None)

    def body(t, carry):
        seq, cache, lg_buf = carry
        if use_cache:
            tok = seq[:, t][:, None]
            if guided:
                tok = jnp.concatenate([tok, tok])
            lg, cache = model.apply(variables, tok, cache=cache, method=DalleBart.decode)
            lg = lg[:, 0]
        else:  # whole prefix each step; tokens after t are placeholders hidden by the causal mask
            prefix = seq[:, :n]
            if guided:
                prefix = jnp.concatenate([prefix, prefix])
            lg_all, _ = model.apply(variables, prefix, enc, attention_mask,
                                    method=DalleBart.decode)
            lg = jax.lax.dynamic_index_in_dim(lg_all, t, axis=1, keepdims=False)
        if guided:
            cond, uncond = lg[:b], lg[b:]
            lg = uncond + condition_scale * (cond - uncond)
        lg = lg.at[:, cfg.eos_token_id].set(-jnp.inf)
        if return_logits:
            lg_buf = jax.lax.dynamic_update_index_in_dim(lg_buf, lg, t, axis=1)
        nxt = _next_tokens(lg, keys, t + 1, temperature, top_p, top_k=top_k,
                           use_top_p=use_top_p, do_sample=do_sample)
        seq = jax.lax.dynamic_update_index_in_dim(seq, nxt, t + 1, axis=1)
        return seq, cache, lg_buf

    seq, _, lg_buf = jax.lax.fori_loop(0, n, body, (seq, cache, lg_buf))
    return (seq, lg_buf) if return_logits else seq


def _check_text(cfg, ids, mask, what):
    ids_shape, mask_shape = np.shape(ids), np.shape(mask)
    if len(ids_shape) != 2 or ids_shape != mask_shape:
        raise DataError(f"{what}: shape {ids_shape} with attention mask {mask_shape}, expected "
                        "two equal shapes [B, S]")
    if ids_shape[1] > cfg.max_text_length:
        raise DataError(f"{what}: {ids_shape[1]} text tokens, expected at most "
                        f"max_text_length = {cfg.max_text_length}")
    if not isinstance(ids, jax.core.Tracer):
        arr = np.asarray(ids)
        if arr.size and (arr.min() < 0 or arr.max() >= cfg.encoder_vocab_size):
            raise DataError(f"{what}: ids in [{arr.min()}, {arr.max()}], expected ids in "
                            f"[0, encoder_vocab_size = {cfg.encoder_vocab_size})")


def _pad_to(x, s):
    return jnp.pad(x, ((0, 0), (0, s - x.shape[1])))


def _generate(params, cfg, input_ids, attention_mask, key_per_row, uncond_input_ids,
              uncond_attention_mask, condition_scale, top_k, top_p, temperature, do_sample,
              return_logits, dtype, use_cache):
    _check_text(cfg, input_ids, attention_mask, "input_ids")
    b = np.shape(input_ids)[0]
    keys = jnp.asarray(key_per_row)
    if jnp.issubdtype(keys.dtype, jax.dtypes.prng_key):
        keys = jax.random.key_data(keys)
    if keys.shape != (b, 2) or keys.dtype != jnp.uint32:
        raise DataError(f"key_per_row: {keys.dtype}{list(keys.shape)}, expected uint32[{b}, 2] "
                        "(one raw PRNG key per row)")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ConfigError(f"top_k = {top_k!r}: expected a positive integer or None")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ConfigError(f"top_p = {top_p!r}: expected a number in (0, 1] or None")
    if not temperature > 0:
        raise ConfigError(f"temperature = {temperature!r}: expected a positive number")
    ids = jnp.asarray(input_ids, jnp.int32)
    mask = jnp.asarray(attention_mask, jnp.int32)
    guided = uncond_input_ids is not None and condition_scale != 1.0
    if uncond_input_ids is None and condition_scale != 1.0:
        raise DataError(f"condition_scale = {condition_scale}: super-conditioning needs "
                        "uncond_input_ids and uncond_attention_mask")
    u_ids = u_mask = None
    if guided:
        if uncond_attention_mask is None:
            raise DataError("uncond_input_ids given without uncond_attention_mask")
        _check_text(cfg, uncond_input_ids, uncond_attention_mask, "uncond_input_ids")
        u_ids = jnp.asarray(uncond_input_ids, jnp.int32)
        u_mask = jnp.asarray(uncond_attention_mask, jnp.int32)
        if u_ids.shape[0] == 1 and b > 1:  # one empty prompt for every row
            u_ids, u_mask = (jnp.broadcast_to(a, (b, a.shape[1])) for a in (u_ids, u_mask))
        if u_ids.shape[0] != b:
            raise DataError(f"uncond_input_ids: batch {u_ids.shape[0]}, expected 1 or {b}")
        s = max(ids.shape[1], u_ids.shape[1])  # masked padding changes no attention output
        ids, mask, u_ids, u_mask = (_pad_to(a, s) for a in (ids, mask, u_ids, u_mask))
    return _generate_jit(
        params, ids, mask, keys, u_ids, u_mask, jnp.float32(condition_scale),
        jnp.float32(temperature), jnp.float32(1.0 if top_p is None else top_p), cfg=cfg,
        guided=guided, top_k=top_k, use_top_p=top_p is not None and top_p < 1.0,
        do_sample=do_sample, use_cache=use_cache, return_logits=return_logits,
        dtype=jnp.dtype(dtype))


def generate(params: PyTree, cfg: DalleBartConfig, input_ids, attention_mask, key_per_row, *,
             uncond_input_ids=None, uncond_attention_mask=None, condition_scale: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, temperature: float = 1.0,
             do_sample: bool = True, return_logits: bool = False, dtype: Any = jnp.float32):
    """Image tokens int32[B, image_length + 1] (column 0 = decoder start), KV-cached.

    One ``jax.jit`` holding one ``lax.fori_loop`` over image_length steps.

    Args:
      input_ids, attention_mask: int[B,S] text ids and mask (S <= max_text_length).
      key_per_row: uint32[B,2] raw PRNG keys (typed keys also accepted); the token at
        position t of row b is drawn with ``fold_in(key_per_row[b], t)``.
      uncond_input_ids, uncond_attention_mask: int[B or 1, S'] unconditional prompt
        (dalle-mini uses the empty caption); used when ``condition_scale != 1``:
        logits = uncond + condition_scale * (cond - uncond), computed in the same batch.
      top_k, top_p, temperature: sampling filters, applied as transformers does
        (temperature, then top-k, then top-p). None disables a filter. Note dalle-mini's
        own ``generate`` falls back to the config's generation default top_k = 50 when
        top_k is None; pass top_k=50 to reproduce that.
      do_sample: False -> greedy (argmax; filters and keys unused).
      return_logits: also return the guided, eos-masked logits before filtering,
        f32[B, image_length, image_vocab_size + 1] (row t chose token t + 1).
      dtype: computation dtype (e.g. jnp.bfloat16 on accelerators); parameters stay as
        given, softmax, layer-norm statistics and logits are float32.
    """
    return _generate(params, cfg, input_ids, attention_mask, key_per_row, uncond_input_ids,
                     uncond_attention_mask, condition_scale, top_k, top_p, temperature,
                     do_sample, return_logits, dtype, use_cache=True)


def generate_full_prefix(params: PyTree, cfg: DalleBartConfig, input_ids, attention_mask,
                         key_per_row, *, uncond_input_ids=None, uncond_attention_mask=None,
                         condition_scale: float = 1.0, top_k: int | None = None,
                         top_p: float | None = None, temperature: float = 1.0,
                         do_sample: bool = True, return_logits: bool = False,
                         dtype: Any = jnp.float32):
    """As :func:`generate` but recomputes the whole decoder prefix at every step (no KV
    cache): the reference that proves the cache right, and a benchmark baseline."""
    return _generate(params, cfg, input_ids, attention_mask, key_per_row, uncond_input_ids,
                     uncond_attention_mask, condition_scale, top_k, top_p, temperature,
                     do_sample, return_logits, dtype, use_cache=False)


# ----------------------------------------------------------------------------- checkpoints

_STACKED = {"encoder": ("FlaxBartEncoderLayers", "FlaxBartEncoderLayer", "encoder_layers"),
            "decoder": ("FlaxBartDecoderLayers", "FlaxBartDecoderLayer", "decoder_layers")}


def unstack_layers(params: PyTree, cfg: DalleBartConfig, where: str = "params") -> PyTree:
    """Splits ``use_scan`` stacks (``layers/FlaxBart{En,De}coderLayers/...`` with a leading
    layer axis) into ``layers/FlaxBart{En,De}coderLayer_<i>/...``; other trees unchanged."""
    flat = traverse_util.flatten_dict(params)
    out = {}
    for path, value in flat.items():
        part = path[0] == "model" and len(path) > 4 and path[1] in _STACKED and \
            path[2] == "layers" and path[3] == _STACKED[path[1]][0]
        if not part:
            out[path] = value
            continue
        _, single, count_key = _STACKED[path[1]]
        n = getattr(cfg, count_key)
        if np.ndim(value) < 1 or np.shape(value)[0] != n:
            raise CheckpointError(
                f"{where}: stacked tensor '{'/'.join(path)}' has shape {tuple(np.shape(value))}, "
                f"expected a leading axis of {count_key} = {n}")
        for i in range(n):
            out[path[:3] + (f"{single}_{i}",) + path[4:]] = value[i]
    return traverse_util.unflatten_dict(out)


def stack_layers(params: PyTree, cfg: DalleBartConfig) -> PyTree:
    """Inverse of :func:`unstack_layers` (the ``use_scan`` checkpoint layout)."""
    flat = traverse_util.flatten_dict(params)
    out, groups = {}, {}
    for path, value in flat.items():
        if path[0] == "model" and len(path) > 4 and path[1] in _STACKED and path[2] == "layers":
            stacked, single, _ = _STACKED[path[1]]
            i = int(path[3][len(single) + 1:])
            groups.setdefault(path[:3] + (stacked,) + path[4:], {})[i] = value
        else:
            out[path] = value
    for path, per_layer in groups.items():
        out[path] = np.stack([np.asarray(per_layer[i]) for i in range(len(per_layer))])
    return traverse_util.unflatten_dict(out)


def _expected_params(cfg: DalleBartConfig) -> PyTree:
    ids = jax.ShapeDtypeStruct((1, 2), jnp.int32)
    return jax.eval_shape(
        lambda k, i: DalleBart(cfg).init({"params": k}, i, i, i)["params"],
        jax.random.PRNGKey(0), ids)


def load_dallebart(folder: str | os.PathLike) -> tuple[DalleBartConfig, PyTree]:
    """Reads a dalle-mini folder (``config.json`` + ``flax_model.msgpack``).

    ``use_scan`` stacks are unstacked (whatever the config's use_scan says; the layout is
    unambiguous). Returns ``(config, params)``, params nested dicts of float32 numpy
    arrays. Raises ConfigError / CheckpointError naming the key or tensor at fault.
    """
    folder = os.fspath(folder)
    cfg_path = os.path.join(folder, CONFIG_NAME)
    cfg = DalleBartConfig.from_dict(formats.read_json(cfg_path), cfg_path)
    w_path = os.path.join(folder, WEIGHTS_NAME)
    tree = unstack_layers(formats.read_msgpack(w_path), cfg, w_path)
    return cfg, formats.match_tree(tree, _expected_params(cfg), w_path)


def save_dallebart(folder: str | os.PathLike, cfg: DalleBartConfig, params: PyTree) -> None:
    """Writes ``config.json`` + ``flax_model.msgpack`` as dalle-mini does (stacked layers
    when ``cfg.use_scan``), atomically."""
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    w_path = os.path.join(folder, WEIGHTS_NAME)
    params = formats.match_tree(jax.device_get(params), _expected_params(cfg), w_path)
    formats.write_msgpack(w_path, stack_layers(params, cfg) if cfg.use_scan else params)
    d = cfg.to_dict()
    d["architectures"] = ["DalleBart"]
    formats.write_json(os.path.join(folder, CONFIG_NAME), d)
