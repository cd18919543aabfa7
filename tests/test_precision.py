"""The precision policy: ``precision.dtype`` computes every matmul and convolution,
``precision.param_dtype`` stores the parameters; norms, softmax and losses stay float32."""

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jcore

from t2i_mia.config import get_config, load_config
from t2i_mia.errors import ConfigError
from t2i_mia.models import autoencoder_kl, dallebart as db, schedulers, unet as unet_lib
from t2i_mia.models import vqgan as vq
from t2i_mia.models.clip import CLIPConfig, CLIPModel, init_clip
from t2i_mia.models.precision import FLOAT32, cast_params, policy_of, policy_tag
from t2i_mia.training.ldm_train import init_text_encoder, ldm_loss
from test_sharding import TEXT, UNET  # a U-Net and text encoder that compile in seconds

BF16 = {"dtype": jnp.bfloat16, "param_dtype": jnp.float32}


def heavy_ops(fn, *args) -> collections.Counter:
    """(primitive, operand dtypes) of every dot_general and convolution in ``fn``'s jaxpr,
    sub-jaxprs (loops, custom derivatives, remat) included."""
    found = collections.Counter()

    def walk(jaxpr):
        for e in jaxpr.eqns:
            if e.primitive.name in ("dot_general", "conv_general_dilated"):
                found[(e.primitive.name, tuple(str(v.aval.dtype) for v in e.invars))] += 1
            for v in e.params.values():
                for sub in v if isinstance(v, (list, tuple)) else [v]:
                    if isinstance(sub, jcore.ClosedJaxpr):
                        walk(sub.jaxpr)
                    elif isinstance(sub, jcore.Jaxpr):
                        walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


def _only_bf16(ops, float32_dots: int = 0):
    """Every matmul and convolution in bf16, but ``float32_dots`` float32 dot_generals."""
    assert ops, "no matmul or convolution found"
    odd = {k: n for k, n in ops.items() if set(k[1]) != {"bfloat16"}}
    assert odd in ({}, {("dot_general", ("float32", "float32")): float32_dots}), \
        f"not in bfloat16: {odd}"


@pytest.fixture(scope="module")
def ldm_step():
    k = jax.random.PRNGKey(0)
    params = {"unet": unet_lib.init_params(UNET, k, 8), "text": init_text_encoder(TEXT, 1, 8)}
    rng = np.random.default_rng(0)
    batch = {"latents": jnp.asarray(rng.standard_normal((4, 4, 4, 4)), jnp.float32),
             "ids": jnp.asarray(rng.integers(1, 60, (4, 8)), jnp.int32),
             "mask": jnp.ones((4, 8), jnp.int32)}
    loss = functools.partial(ldm_loss, UNET, TEXT, schedulers.SchedulerConfig(),
                             uncond_ids=jnp.zeros(8, jnp.int32),
                             uncond_mask=jnp.zeros(8, jnp.int32).at[:2].set(1),
                             caption_dropout=0.25)
    return params, batch, loss


def test_unet_train_step_runs_every_matmul_and_conv_in_bf16(ldm_step):
    """Forward and backward of the LDM loss (U-Net + text encoder) under the bf16 policy:
    every dot_general and convolution has bf16 operands, the parameters' gradients are
    float32 (master weights), and the loss is float32 and matches the float32 loss within
    3% (bf16 keeps 8 mantissa bits, ~0.4% per rounding; the loss sums thousands of rounded
    products through ~20 layers, and its float32 value here is ~1)."""
    params, batch, loss = ldm_step
    key = jax.random.PRNGKey(3)

    def step(policy):
        return jax.value_and_grad(lambda p: loss(p, batch, key, policy=policy)[0])

    _only_bf16(heavy_ops(step(BF16), params))
    assert all(set(k[1]) == {"float32"} for k in heavy_ops(step(FLOAT32), params))
    (l16, g16), (l32, _) = step(BF16)(params), step(FLOAT32)(params)
    assert l16.dtype == jnp.float32
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(g16))
    assert abs(float(l16) - float(l32)) <= 0.03 * abs(float(l32)), (float(l16), float(l32))
    assert float(l16) != float(l32)  # bf16 did compute something else


def test_every_model_takes_the_policy():
    """CLIP, the KL autoencoder, the VQGAN and DalleBart: bf16 matmuls/convolutions, float32
    outputs close to float32's, and parameters created in ``param_dtype``."""
    cfg = get_config("ci")
    key = jax.random.key(0)
    clip_cfg = CLIPConfig.from_dict(cfg.adversary.encoder.clip)
    clip_p = init_clip(clip_cfg, key)
    px = jax.random.normal(key, (2, clip_cfg.vision_config.image_size,
                                 clip_cfg.vision_config.image_size, 3))
    feats = lambda pol: lambda p: CLIPModel(clip_cfg, **pol).apply(  # noqa: E731
        p, px, method=CLIPModel.get_image_features)
    vae_cfg = autoencoder_kl.AutoencoderKLConfig.from_dict(cfg.ldm.vae)
    vae_p = autoencoder_kl.init_params(vae_cfg, key)
    img = jax.random.uniform(key, (2, 32, 32, 3), minval=-1, maxval=1)
    recon = lambda pol: lambda p: autoencoder_kl.AutoencoderKL(vae_cfg, **pol).apply(  # noqa: E731
        {"params": p}, img)[0]
    vq_cfg = vq.VQGANConfig.from_dict(cfg.dalle.vqgan)
    vq_p = vq.init_vqgan(vq_cfg, key, 32)
    vq_rec = lambda pol: lambda p: vq.VQModel(vq_cfg, **pol).apply(  # noqa: E731
        {"params": p}, img)[0].astype(jnp.float32)
    bart = db.DalleBartConfig.from_dict(cfg.dalle.bart)
    bart_p = db.init_dallebart(bart, key)
    ids = jnp.ones((2, bart.max_text_length), jnp.int32)
    dec = jnp.zeros((2, 4), jnp.int32)
    logits = lambda pol: lambda p: db.DalleBart(bart, **pol).apply(  # noqa: E731
        {"params": p}, ids, jnp.ones_like(ids), dec).astype(jnp.float32)
    # the VQGAN's one float32 dot is the codebook distance: nearest codes must not flip on
    # bf16 rounding
    for name, fn, p, f32_dots in (("clip", feats, clip_p, 0), ("vae", recon, vae_p, 0),
                                  ("vqgan", vq_rec, vq_p, 1), ("dallebart", logits, bart_p, 0)):
        _only_bf16(heavy_ops(fn(BF16), p), f32_dots)
        a, b = fn(BF16)(p), fn(FLOAT32)(p)
        assert a.dtype == jnp.float32 and np.all(np.isfinite(a)), name
        rel = float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
        assert 0 < rel < 0.05, (name, rel)  # a few bf16 roundings (0.4% each) deep
    # param_dtype: parameters born (or cast) in it; integer leaves untouched
    p16 = jax.eval_shape(lambda k: db.DalleBart(bart, param_dtype=jnp.bfloat16).init(
        {"params": k}, ids, jnp.ones_like(ids), dec)["params"], key)
    assert {x.dtype for x in jax.tree.leaves(p16)} == {jnp.dtype(jnp.bfloat16)}
    cast = cast_params({"w": np.ones(3, np.float32), "i": np.arange(3)}, jnp.bfloat16)
    assert cast["w"].dtype == jnp.bfloat16 and cast["i"].dtype == np.arange(3).dtype
    same = {"w": np.ones(3, np.float32)}
    assert cast_params(same, jnp.float32)["w"] is same["w"]  # float32: no copy


def test_precision_is_config_data():
    assert policy_of(get_config("ci")) == FLOAT32 and policy_tag(FLOAT32) == ()
    cfg = load_config("ci", ["precision.dtype=bfloat16"])
    assert policy_of(cfg) == BF16
    assert policy_tag(policy_of(cfg)) == ("precision", "bfloat16", "float32")
    with pytest.raises(ConfigError, match="precision.dtype"):
        load_config("ci", ["precision.dtype=float64"])
    with pytest.raises(ConfigError, match="precision.param_dtype"):
        load_config("ci", ["precision.param_dtype=int8"])
