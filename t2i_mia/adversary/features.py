"""Attack features: how close a query's k generated images are to the query (jitted).

Every feature function is one ``jax.jit``-compiled call over the whole batch: the per-query
work is a traced function mapped with ``jax.lax.map`` (optionally in vmapped chunks of
``batch_size`` queries to bound device memory), so there is no Python loop over samples and
no host round trip until the caller reads the results.

Feature names follow ``<attack>.<metric>.<agg>`` (docs/design.md, "Report"):

* pixel (Attack I): ``pixel.mse.{min,mean}``, ``pixel.l1.{min,mean}``,
  ``pixel.ssim.{max,mean}``: per generated image, then aggregated over the k images; and
  ``pixel.coarse_mse.{min,mean}``, the MSE between antialiased downsamples (8x8 by default)
  of the query and each generated image. A partly memorised model reproduces a member's
  layout and colours before its fine texture; at full resolution the unmemorised texture
  adds the same noise to members and non-members, which the coarse distance filters out
  (tiny LDM: MSE(min) AUC 0.709 at 32x32, 0.748 at 8x8).
* semantic (Attack II): ``semantic.cosine.{max,mean}``, ``semantic.l2.mean`` (mean L2 between
  L2-normalised embeddings; the minimum L2 is sqrt(2 - 2 cosine.max), the same ranking, so
  it is not a feature of its own), and two vector features for the MLP only:
  ``semantic.emb_query`` f32[N, D] and ``semantic.emb_gen_mean`` f32[N, D].
* faithfulness (Attack III): ``faithfulness.clip.{max,mean}``: cosine between the caption's
  text embedding and each generated image's embedding.

Scalar features are f32[N]; vector features f32[N, D]. Threshold attacks use scalars only;
:func:`feature_matrix` builds the MLP input of an attack.
"""

from __future__ import annotations

import functools
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from t2i_mia.errors import ConfigError, DataError

# The attacks' names, defined here only. The three families (attacks I-III) name their
# features' prefix; attack IV (combined) uses every feature; the calibrated attack is
# the families' scalar features calibrated against reference models.
FAMILIES: tuple[str, ...] = ("pixel", "semantic", "faithfulness")
COMBINED = "combined"
CALIBRATED = "calibrated"
ATTACK_NAMES: tuple[str, ...] = FAMILIES + (COMBINED,)  # the attacks with an MLP
ALL_ATTACKS: tuple[str, ...] = ATTACK_NAMES + (CALIBRATED,)
# attack -> feature-name prefixes it uses
ATTACKS: dict[str, list[str]] = {**{f: [f + "."] for f in FAMILIES},
                                 COMBINED: [f + "." for f in FAMILIES]}

# The sign of each metric that makes "higher = member" (the paper's intuitions: a member's
# generations are closer to it, more similar to it, more faithful to its caption); used
# where nothing is fitted (adversary.aux_mode=none).
MEMBER_SIGN: dict[str, float] = {"mse": -1.0, "l1": -1.0, "coarse_mse": -1.0, "l2": -1.0,
                                 "ssim": 1.0, "cosine": 1.0, "clip": 1.0}

SSIM_C1 = 0.01 ** 2  # (K1 * L)^2 with data range L = 1
SSIM_C2 = 0.03 ** 2  # (K2 * L)^2
_EPS = 1e-12  # guards the L2 normalisation of an all-zero embedding


# ----------------------------------------------------------------------------- helpers

@jax.jit
def _to_unit_float(images: jax.Array) -> jax.Array:
    return images.astype(jnp.float32) / 255.0


def to_unit_float(images) -> jax.Array:
    """uint8[..., H, W, 3] in [0, 255] -> f32 in [0, 1], on device."""
    dtype = np.dtype(images.dtype if hasattr(images, "dtype") else np.asarray(images).dtype)
    if dtype != np.uint8:
        raise DataError(f"to_unit_float: expected uint8 images, got dtype {dtype}")
    return _to_unit_float(jnp.asarray(images))


def _as_float_images(x, name: str) -> jax.Array:
    """Accepts f32/f64 images in [0, 1] or uint8 images (converted); traced-safe."""
    dtype = np.dtype(x.dtype)
    if dtype == np.uint8:
        return x.astype(jnp.float32) / 255.0
    if not np.issubdtype(dtype, np.floating):
        raise DataError(f"{name}: expected float images in [0, 1] (or uint8), got dtype {dtype}")
    return x.astype(jnp.float32)


def ssim_window(height: int, width: int) -> tuple[int, float]:
    """The SSIM Gaussian window (size, sigma) for an image of this size.

    11x11 with sigma 1.5 (Wang et al. 2004) when both sides are >= 11; otherwise the largest
    odd size that fits, keeping sigma 1.5 (the Gaussian truncated to the window and
    renormalised), so small images still get a valid ("no padding") SSIM map.
    """
    side = min(height, width)
    if side < 1:
        raise DataError(f"ssim: image of size {height}x{width} has no pixels")
    size = min(11, side if side % 2 == 1 else side - 1)
    return size, 1.5


def gaussian_kernel_1d(size: int, sigma: float) -> np.ndarray:
    """f32[size], sums to 1."""
    r = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
    g = np.exp(-(r ** 2) / (2.0 * sigma ** 2))
    return (g / g.sum()).astype(np.float32)


def _filter_valid(x: jax.Array, w: np.ndarray) -> jax.Array:
    """Separable 'valid' filtering of x f32[..., H, W, C] over H and W with kernel w."""
    s = w.shape[0]
    h, wd = x.shape[-3], x.shape[-2]
    # Sums of shifted slices: exact separable correlation, no padding, any leading dims.
    y = sum(float(w[i]) * x[..., i:i + h - s + 1, :, :] for i in range(s))
    return sum(float(w[i]) * y[..., :, i:i + wd - s + 1, :] for i in range(s))


def _ssim(a: jax.Array, b: jax.Array, w: np.ndarray) -> jax.Array:
    """Mean SSIM of a, b f32[..., H, W, C] in [0, 1] -> f32[...] (mean over map and channels)."""
    mu_a = _filter_valid(a, w)
    mu_b = _filter_valid(b, w)
    var_a = _filter_valid(a * a, w) - mu_a * mu_a
    var_b = _filter_valid(b * b, w) - mu_b * mu_b
    cov = _filter_valid(a * b, w) - mu_a * mu_b
    num = (2.0 * mu_a * mu_b + SSIM_C1) * (2.0 * cov + SSIM_C2)
    den = (mu_a * mu_a + mu_b * mu_b + SSIM_C1) * (var_a + var_b + SSIM_C2)
    return jnp.mean(num / den, axis=(-3, -2, -1))


def _map_queries(fn, xs, batch_size: int | None):
    """Maps fn over the leading (query) axis inside the trace: vmapped chunks of batch_size."""
    if batch_size is None:
        return jax.vmap(fn)(xs)
    if batch_size < 1:
        raise ConfigError(f"features: batch_size must be >= 1 or None, got {batch_size}")
    return jax.lax.map(fn, xs, batch_size=batch_size)


# ----------------------------------------------------------------------------- Attack I

def _downsample(x: jax.Array, side: int) -> jax.Array:
    """f32[..., H, W, C] -> f32[..., min(side, H), min(side, W), C], antialiased (low-pass)."""
    h, w = x.shape[-3], x.shape[-2]
    shape = x.shape[:-3] + (min(side, h), min(side, w), x.shape[-1])
    return jax.image.resize(x, shape, method="linear", antialias=True)


@functools.partial(jax.jit, static_argnames=("batch_size", "coarse_side"))
def pixel_features(query, gen, batch_size: int | None = None,
                   coarse_side: int = 8) -> dict[str, jax.Array]:
    """Pixel-space distances between each query and its k generated images (Attack I).

    Args:
      query: f32[N, H, W, 3] in [0, 1] (uint8 is converted).
      gen: f32[N, k, H, W, 3] in [0, 1] (uint8 is converted), the k images generated from
        query i's caption.
      batch_size: queries per vmapped chunk (bounds memory); None = all at once.
      coarse_side: side of the downsamples compared by ``pixel.coarse_mse`` (capped at the
        image size); 0 leaves that feature out.
    Returns:
      ``pixel.mse.{min,mean}``, ``pixel.l1.{min,mean}``, ``pixel.ssim.{max,mean}`` and
      (unless ``coarse_side`` is 0) ``pixel.coarse_mse.{min,mean}``: f32[N].
      MSE and L1 are means over pixels and channels; SSIM uses a Gaussian window (see
      :func:`ssim_window`), C1 = 0.01^2, C2 = 0.03^2, averaged over the map and channels.
    """
    if query.ndim != 4 or query.shape[-1] != 3:
        raise DataError(f"pixel_features: query must be [N, H, W, 3], got shape {query.shape}")
    if gen.ndim != 5 or gen.shape[0] != query.shape[0] or gen.shape[2:] != query.shape[1:]:
        raise DataError(f"pixel_features: gen must be [N, k, H, W, 3] = [{query.shape[0]}, k, "
                        f"{', '.join(map(str, query.shape[1:]))}], got shape {gen.shape}")
    if gen.shape[1] < 1:
        raise DataError("pixel_features: k = 0 generated images per query")
    if coarse_side < 0:
        raise ConfigError(f"pixel_features: coarse_side must be >= 0, got {coarse_side}")
    q = _as_float_images(query, "pixel_features: query")
    g = _as_float_images(gen, "pixel_features: gen")
    size, sigma = ssim_window(q.shape[1], q.shape[2])
    w = gaussian_kernel_1d(size, sigma)

    def one(qg):
        qi, gi = qg  # [H, W, 3], [k, H, W, 3]
        d = gi - qi[None]
        mse = jnp.mean(d * d, axis=(1, 2, 3))
        l1 = jnp.mean(jnp.abs(d), axis=(1, 2, 3))
        ssim = _ssim(jnp.broadcast_to(qi[None], gi.shape), gi, w)
        out = {
            "pixel.mse.min": mse.min(), "pixel.mse.mean": mse.mean(),
            "pixel.l1.min": l1.min(), "pixel.l1.mean": l1.mean(),
            "pixel.ssim.max": ssim.max(), "pixel.ssim.mean": ssim.mean(),
        }
        if coarse_side:
            dc = _downsample(gi, coarse_side) - _downsample(qi, coarse_side)[None]
            cmse = jnp.mean(dc * dc, axis=(1, 2, 3))
            out["pixel.coarse_mse.min"] = cmse.min()
            out["pixel.coarse_mse.mean"] = cmse.mean()
        return out

    return _map_queries(one, (q, g), batch_size)


# ----------------------------------------------------------------------------- Attack II, III

def _normalise(x: jax.Array) -> jax.Array:
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), _EPS)


def _check_embeddings(fn: str, a, a_name: str, g) -> None:
    if a.ndim != 2:
        raise DataError(f"{fn}: {a_name} must be [N, D], got shape {a.shape}")
    if g.ndim != 3 or g.shape[0] != a.shape[0] or g.shape[2] != a.shape[1]:
        raise DataError(f"{fn}: g_emb must be [N, k, D] = [{a.shape[0]}, k, {a.shape[1]}], "
                        f"got shape {g.shape}")
    if g.shape[1] < 1:
        raise DataError(f"{fn}: k = 0 generated images per query")
    for name, x in ((a_name, a), ("g_emb", g)):
        if not np.issubdtype(np.dtype(x.dtype), np.floating):
            raise DataError(f"{fn}: {name} must be a float array, got dtype {x.dtype}")


@jax.jit
def semantic_features(q_emb, g_emb) -> dict[str, jax.Array]:
    """Image-encoder embedding similarity of query and generated images (Attack II).

    Args:
      q_emb: f32[N, D], the query image's embedding.
      g_emb: f32[N, k, D], the k generated images' embeddings (same encoder).
    Returns:
      ``semantic.cosine.{max,mean}``, ``semantic.l2.mean`` f32[N] (L2 between the
      L2-normalised embeddings; its minimum would duplicate ``cosine.max``); ``semantic.emb_query`` f32[N, D] (normalised query
      embedding) and ``semantic.emb_gen_mean`` f32[N, D] (mean of the normalised generated
      embeddings), vector features for the MLP only.
    """
    _check_embeddings("semantic_features", q_emb, "q_emb", g_emb)
    q = _normalise(q_emb.astype(jnp.float32))
    g = _normalise(g_emb.astype(jnp.float32))
    cos = jnp.einsum("nd,nkd->nk", q, g)
    l2 = jnp.linalg.norm(g - q[:, None, :], axis=-1)
    return {
        "semantic.cosine.max": cos.max(axis=1), "semantic.cosine.mean": cos.mean(axis=1),
        "semantic.l2.mean": l2.mean(axis=1),
        "semantic.emb_query": q, "semantic.emb_gen_mean": g.mean(axis=1),
    }


@jax.jit
def faithfulness_features(t_emb, g_emb) -> dict[str, jax.Array]:
    """Text-image alignment of the generated images with the query caption (Attack III).

    Args:
      t_emb: f32[N, D], the caption's text embedding (CLIP-style text tower).
      g_emb: f32[N, k, D], the generated images' embeddings (the matching image tower).
    Returns:
      ``faithfulness.clip.{max,mean}`` f32[N]: cosine similarity over the k images. The query
      image's own caption similarity is deliberately not a feature: it does not involve the
      target model, so it carries no membership signal about it.
    """
    _check_embeddings("faithfulness_features", t_emb, "t_emb", g_emb)
    t = _normalise(t_emb.astype(jnp.float32))
    g = _normalise(g_emb.astype(jnp.float32))
    cos = jnp.einsum("nd,nkd->nk", t, g)
    return {"faithfulness.clip.max": cos.max(axis=1), "faithfulness.clip.mean": cos.mean(axis=1)}


# ----------------------------------------------------------------------------- assembly

def member_sign(name: str) -> float:
    """+1 or -1: the sign that makes scalar feature ``name`` (``<attack>.<metric>.<agg>``,
    optionally ``calibrated.``-prefixed) higher for members, from ``MEMBER_SIGN``."""
    parts = name.split(".")
    if parts[0] == "calibrated":
        parts = parts[1:]
    if len(parts) != 3 or parts[1] not in MEMBER_SIGN:
        raise ConfigError(f"feature {name!r}: no member sign for metric "
                          f"{parts[1] if len(parts) == 3 else name!r} (known: "
                          f"{sorted(MEMBER_SIGN)})")
    return MEMBER_SIGN[parts[1]]


def _check_attack(attack: str) -> list[str]:
    if attack not in ATTACKS:
        raise ConfigError(f"unknown attack {attack!r} (expected one of {sorted(ATTACKS)})")
    return ATTACKS[attack]


def _select(features: Mapping[str, object], attack: str | None) -> list[str]:
    prefixes = _check_attack(attack) if attack is not None else None
    names = sorted(features)
    if prefixes is not None:
        names = [n for n in names if any(n.startswith(p) for p in prefixes)]
    return names


def scalar_feature_names(features: Mapping[str, object], attack: str | None = None) -> list[str]:
    """Sorted names of the scalar (f32[N]) features, optionally only those of an attack.

    These are the features a threshold attack is fitted on.
    """
    return [n for n in _select(features, attack) if np.ndim(features[n]) == 1]


def _columns(features: Mapping[str, object], attack: str,
             vectors: bool = True) -> list[tuple[str, np.ndarray]]:
    names = _select(features, attack)
    if not vectors:
        names = [n for n in names if np.ndim(features[n]) == 1]
    if not names:
        raise DataError(f"feature_matrix: no features for attack {attack!r} "
                        f"(prefixes {ATTACKS[attack]}; have {sorted(features)})")
    arrays = {n: np.asarray(features[n], np.float32) for n in names}
    n_rows = {n: a.shape[0] if a.ndim else None for n, a in arrays.items()}
    first = names[0]
    for n, a in arrays.items():
        if a.ndim not in (1, 2):
            raise DataError(f"feature_matrix: feature {n!r} must be [N] or [N, D], got shape "
                            f"{a.shape}")
        if n_rows[n] != n_rows[first]:
            raise DataError(f"feature_matrix: feature {n!r} has {n_rows[n]} rows but {first!r} "
                            f"has {n_rows[first]}")
        bad = int(np.size(a) - np.count_nonzero(np.isfinite(a)))
        if bad:
            raise DataError(f"feature_matrix: feature {n!r} has {bad} non-finite values")
    scalars = [n for n in names if arrays[n].ndim == 1]
    vectors = [n for n in names if arrays[n].ndim == 2]
    return [(n, arrays[n]) for n in scalars + vectors]


def feature_columns(features: Mapping[str, object], attack: str,
                    vectors: bool = True) -> list[str]:
    """The column names of :func:`feature_matrix` (vector features as ``name[i]``)."""
    out = []
    for n, a in _columns(features, attack, vectors):
        out += [n] if a.ndim == 1 else [f"{n}[{i}]" for i in range(a.shape[1])]
    return out


def has_vector_features(features: Mapping[str, object], attack: str) -> bool:
    """Whether the attack has vector (f32[N, D]) features, e.g. semantic's embeddings."""
    return any(np.ndim(features[n]) == 2 for n in _select(features, attack))


def feature_matrix(features: Mapping[str, object], attack: str,
                   vectors: bool = True) -> np.ndarray:
    """The MLP input of an attack: f32[N, F] on the host.

    Columns: the attack's scalar features in sorted name order, then (if ``vectors``) its
    vector features (sorted by name) flattened; the same order for every call, so a matrix
    built on attack-training data lines up with one built on evaluation data.
    Raises DataError for an unknown/empty attack, mismatched N, or non-finite values.
    """
    cols = _columns(features, attack, vectors)
    return np.concatenate([a[:, None] if a.ndim == 1 else a for _, a in cols],
                          axis=1).astype(np.float32)


def attack_features(encoder, query_images, gen: jax.Array, captions: list[str],
                    coarse_side: int = 8) -> dict[str, np.ndarray]:
    """All features of one query set: query_images uint8[N,H,W,3], ``gen`` uint8[N,k,H,W,3]
    (on device), the N captions the generations were asked for; ``encoder`` has
    ``embed_images`` / ``embed_texts`` (:class:`t2i_mia.adversary.encoder.Encoder`).
    Returns feature name -> np.ndarray[N] (or [N,P] for the embeddings)."""
    n, k = gen.shape[:2]
    q = jnp.asarray(query_images)
    feats = dict(pixel_features(to_unit_float(q), to_unit_float(gen), coarse_side=coarse_side))
    q_emb = encoder.embed_images(q)
    g_emb = encoder.embed_images(gen.reshape((n * k,) + gen.shape[2:])).reshape(n, k, -1)
    t_emb = encoder.embed_texts(captions)
    feats.update(semantic_features(q_emb, g_emb))
    feats.update(faithfulness_features(t_emb, g_emb))
    return {name: np.asarray(v) for name, v in feats.items()}
