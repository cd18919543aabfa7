"""Attack features: pixel distances and SSIM against numpy references, embeddings, assembly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from t2i_mia.adversary import features as F
from t2i_mia.errors import ConfigError, DataError


def ssim_reference(a: np.ndarray, b: np.ndarray) -> float:
    """Wang et al. (2004) mean SSIM of two [H, W, C] images in [0, 1], float64, written
    directly: a 2-D Gaussian window slid over every valid position (no padding)."""
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    size, sigma = F.ssim_window(a.shape[0], a.shape[1])
    r = np.arange(size) - (size - 1) / 2
    g = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * sigma ** 2))
    g /= g.sum()
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    vals = []
    for ch in range(a.shape[2]):
        pa = np.lib.stride_tricks.sliding_window_view(a[..., ch], (size, size))
        pb = np.lib.stride_tricks.sliding_window_view(b[..., ch], (size, size))
        mu_a = np.einsum("ijkl,kl->ij", pa, g)
        mu_b = np.einsum("ijkl,kl->ij", pb, g)
        va = np.einsum("ijkl,kl->ij", (pa - mu_a[..., None, None]) ** 2, g)
        vb = np.einsum("ijkl,kl->ij", (pb - mu_b[..., None, None]) ** 2, g)
        cov = np.einsum("ijkl,kl->ij",
                        (pa - mu_a[..., None, None]) * (pb - mu_b[..., None, None]), g)
        m = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (va + vb + c2))
        vals.append(m.mean())
    return float(np.mean(vals))


def _images(n, k, h, w, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.random((n, h, w, 3), dtype=np.float32)
    # generations: noisy, blurred-ish versions of the query so SSIM covers a useful range
    noise = rng.normal(scale=rng.uniform(0.02, 0.5, (n, k, 1, 1, 1)), size=(n, k, h, w, 3))
    g = np.clip(q[:, None] + noise, 0, 1).astype(np.float32)
    return q, g


def test_ssim_window_sizes():
    assert F.ssim_window(32, 64) == (11, 1.5)
    assert F.ssim_window(11, 11) == (11, 1.5)
    assert F.ssim_window(8, 9) == (7, 1.5)
    assert F.ssim_window(9, 8) == (7, 1.5)
    assert F.ssim_window(1, 5) == (1, 1.5)
    np.testing.assert_allclose(F.gaussian_kernel_1d(11, 1.5).sum(), 1.0, rtol=1e-6)


@pytest.mark.parametrize("hw", [(16, 20), (8, 9)])
def test_pixel_features_against_numpy(hw):
    h, w = hw
    q, g = _images(3, 4, h, w)
    g[1, 2] = q[1]  # an exact copy among the generations
    out = {k: np.asarray(v) for k, v in F.pixel_features(q, g, coarse_side=0).items()}
    assert sorted(out) == ["pixel.l1.mean", "pixel.l1.min", "pixel.mse.mean", "pixel.mse.min",
                           "pixel.ssim.max", "pixel.ssim.mean"]
    d = g.astype(np.float64) - q[:, None].astype(np.float64)
    mse = (d ** 2).mean(axis=(2, 3, 4))
    l1 = np.abs(d).mean(axis=(2, 3, 4))
    ssim = np.array([[ssim_reference(q[i], g[i, j]) for j in range(4)] for i in range(3)])
    for name, ref in (("pixel.mse.min", mse.min(1)), ("pixel.mse.mean", mse.mean(1)),
                      ("pixel.l1.min", l1.min(1)), ("pixel.l1.mean", l1.mean(1)),
                      ("pixel.ssim.max", ssim.max(1)), ("pixel.ssim.mean", ssim.mean(1))):
        assert out[name].shape == (3,) and out[name].dtype == np.float32
        np.testing.assert_allclose(out[name], ref, rtol=1e-5, atol=2e-6, err_msg=name)
    assert out["pixel.mse.min"][1] == 0.0 and out["pixel.l1.min"][1] == 0.0
    assert out["pixel.ssim.max"][1] == pytest.approx(1.0, abs=1e-6)
    assert np.all(out["pixel.ssim.mean"] < out["pixel.ssim.max"])


def test_coarse_mse_filters_fine_detail():
    """pixel.coarse_mse sees colour and layout, not pixel-level texture."""
    n, k, h, w = 4, 3, 32, 32
    q, _ = _images(n, k, h, w, seed=3)
    q = 0.25 + 0.5 * q  # room for the perturbations below inside [0, 1]
    checker = ((np.indices((h, w)).sum(0) % 2) * 2 - 1)[..., None].astype(np.float32)
    g = np.repeat(q[:, None], k, axis=1).copy()
    g[:, 0] += 0.2 * checker  # fine texture only: zero mean over every 2x2 block
    g[:, 1] += 0.1  # a colour shift: the same at every scale
    g[:, 2, : h // 2] += 0.2  # layout: the top half brighter
    out = {name: np.asarray(v) for name, v in F.pixel_features(q, g).items()}
    d = g.astype(np.float64) - q[:, None]
    mse = (d ** 2).mean(axis=(2, 3, 4))
    np.testing.assert_allclose(out["pixel.mse.mean"], mse.mean(1), rtol=1e-5)
    coarse = np.stack([np.asarray(F.pixel_features(q, g[:, j:j + 1])["pixel.coarse_mse.min"])
                       for j in range(k)], 1)
    assert np.all(coarse[:, 0] < 1e-3 * mse[:, 0])  # the checkerboard is gone at 8x8
    np.testing.assert_allclose(coarse[:, 1], 0.01, rtol=1e-4)  # the shift is not
    assert np.all(coarse[:, 2] > 0.5 * mse[:, 2])  # a half-image change mostly survives
    np.testing.assert_allclose(out["pixel.coarse_mse.min"], coarse.min(1), rtol=1e-5)
    np.testing.assert_allclose(out["pixel.coarse_mse.mean"], coarse.mean(1), rtol=1e-5)
    # no downsampling when the side is >= the image: the coarse MSE is the MSE
    full = F.pixel_features(q, g, coarse_side=h)
    np.testing.assert_allclose(np.asarray(full["pixel.coarse_mse.mean"]), mse.mean(1),
                               rtol=1e-5)
    with pytest.raises(ConfigError, match="coarse_side"):
        F.pixel_features(q, g, coarse_side=-1)


def test_ssim_identical_and_uint8_and_batching():
    q, g = _images(5, 3, 12, 12, seed=1)
    same = np.repeat(q[:, None], 3, axis=1)
    out = F.pixel_features(q, same)
    np.testing.assert_allclose(np.asarray(out["pixel.ssim.max"]), 1.0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(out["pixel.ssim.mean"]), 1.0, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(out["pixel.mse.mean"]), 0.0)
    # uint8 input equals the to_unit_float conversion; batching changes nothing
    q8 = (q * 255).round().astype(np.uint8)
    g8 = (g * 255).round().astype(np.uint8)
    a = F.pixel_features(q8, g8)
    b = F.pixel_features(F.to_unit_float(q8), F.to_unit_float(g8), batch_size=2)
    for k in a:
        np.testing.assert_allclose(np.asarray(a[k]), np.asarray(b[k]), rtol=1e-6, atol=1e-7)
    # (XLA may multiply by 1/255: within 1 ulp of the division)
    np.testing.assert_allclose(np.asarray(F.to_unit_float(q8)), q8.astype(np.float32) / 255,
                               rtol=2e-7, atol=0)
    with pytest.raises(DataError, match="uint8"):
        F.to_unit_float(q)


def test_pixel_features_shape_errors():
    q, g = _images(2, 2, 8, 8)
    with pytest.raises(DataError, match=r"gen must be \[N, k, H, W, 3\]"):
        F.pixel_features(q, g[:, :, :7])
    with pytest.raises(DataError, match=r"query must be \[N, H, W, 3\]"):
        F.pixel_features(q[..., :1], g)
    with pytest.raises(DataError, match="dtype int32"):
        F.pixel_features(q.astype(np.int32), g)


def test_features_are_traced_once_for_any_batch():
    """No Python loop over samples: the traced program does not grow with N."""
    def n_eqns(fn, *shapes):
        return len(jax.make_jaxpr(fn)(*[jnp.zeros(s, jnp.float32) for s in shapes]).eqns)

    pix = lambda q, g: F.pixel_features(q, g)  # noqa: E731
    assert n_eqns(pix, (2, 12, 12, 3), (2, 3, 12, 12, 3)) == \
        n_eqns(pix, (64, 12, 12, 3), (64, 3, 12, 12, 3))
    sem = lambda q, g: F.semantic_features(q, g)  # noqa: E731
    assert n_eqns(sem, (2, 8), (2, 3, 8)) == n_eqns(sem, (64, 8), (64, 3, 8))
    # the public functions are jit-compiled (lowerable), and return device arrays
    for fn in (F.pixel_features, F.semantic_features, F.faithfulness_features):
        assert hasattr(fn, "lower")
    q, g = _images(2, 2, 8, 8)
    assert all(isinstance(v, jax.Array) for v in F.pixel_features(q, g).values())


def _emb(n, k, d, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, d)).astype(np.float32),
            rng.normal(size=(n, k, d)).astype(np.float32) * 3)


def test_semantic_features_against_numpy():
    q, g = _emb(4, 3, 16)
    g[2, 1] = 5 * q[2]  # same direction: cosine 1, L2 (normalised) 0
    out = {k: np.asarray(v) for k, v in F.semantic_features(q, g).items()}
    qn = q / np.linalg.norm(q, axis=-1, keepdims=True)
    gn = g / np.linalg.norm(g, axis=-1, keepdims=True)
    cos = np.einsum("nd,nkd->nk", qn, gn)
    l2 = np.linalg.norm(gn - qn[:, None], axis=-1)
    np.testing.assert_allclose(out["semantic.cosine.max"], cos.max(1), atol=1e-6)
    np.testing.assert_allclose(out["semantic.cosine.mean"], cos.mean(1), atol=1e-6)
    assert "semantic.l2.min" not in out  # sqrt(2 - 2 cosine.max): no feature of its own
    np.testing.assert_allclose(out["semantic.l2.mean"], l2.mean(1), atol=1e-5)
    assert out["semantic.cosine.max"][2] == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(out["semantic.emb_query"], qn, atol=1e-6)
    np.testing.assert_allclose(out["semantic.emb_gen_mean"], gn.mean(1), atol=1e-6)
    with pytest.raises(DataError, match=r"g_emb must be \[N, k, D\] = \[4, k, 16\]"):
        F.semantic_features(q, g[..., :8])


def test_faithfulness_features_against_numpy():
    t, g = _emb(5, 4, 8, seed=2)
    out = {k: np.asarray(v) for k, v in F.faithfulness_features(t, g).items()}
    assert sorted(out) == ["faithfulness.clip.max", "faithfulness.clip.mean"]
    tn = t / np.linalg.norm(t, axis=-1, keepdims=True)
    gn = g / np.linalg.norm(g, axis=-1, keepdims=True)
    cos = np.einsum("nd,nkd->nk", tn, gn)
    np.testing.assert_allclose(out["faithfulness.clip.max"], cos.max(1), atol=1e-6)
    np.testing.assert_allclose(out["faithfulness.clip.mean"], cos.mean(1), atol=1e-6)


def test_feature_matrix_assembly():
    q, g = _images(4, 2, 8, 8)
    e_q, e_g = _emb(4, 2, 6)
    t, _ = _emb(4, 2, 6, seed=1)
    feats = {**F.pixel_features(q, g), **F.semantic_features(e_q, e_g),
             **F.faithfulness_features(t, e_g)}
    pixel_names = F.scalar_feature_names(feats, "pixel")
    assert pixel_names == sorted(pixel_names) and len(pixel_names) == 8
    # vector features are for the MLP only
    assert "semantic.emb_query" not in F.scalar_feature_names(feats)
    assert len(F.scalar_feature_names(feats)) == 13
    x = F.feature_matrix(feats, "pixel")
    assert x.shape == (4, 8) and x.dtype == np.float32
    np.testing.assert_array_equal(x[:, 0], np.asarray(feats[pixel_names[0]]))
    xs = F.feature_matrix(feats, "semantic")
    assert xs.shape == (4, 3 + 6 + 6)
    cols = F.feature_columns(feats, "semantic")
    assert cols[:3] == ["semantic.cosine.max", "semantic.cosine.mean", "semantic.l2.mean"]
    assert cols[3] == "semantic.emb_gen_mean[0]" and cols[-1] == "semantic.emb_query[5]"
    np.testing.assert_array_equal(xs[:, 9:], np.asarray(feats["semantic.emb_query"]))
    xc = F.feature_matrix(feats, "combined")
    assert xc.shape == (4, 2 + 8 + 15)
    # the order does not depend on dict insertion order
    shuffled = dict(reversed(list(feats.items())))
    np.testing.assert_array_equal(F.feature_matrix(shuffled, "combined"), xc)

    with pytest.raises(ConfigError, match="unknown attack 'texture'"):
        F.feature_matrix(feats, "texture")
    with pytest.raises(DataError, match="no features for attack 'faithfulness'"):
        F.feature_matrix({k: v for k, v in feats.items() if k.startswith("pixel")},
                         "faithfulness")
    bad = dict(feats)
    bad["pixel.mse.min"] = np.array([0.1, np.nan, 0.2, 0.3], np.float32)
    with pytest.raises(DataError, match="'pixel.mse.min' has 1 non-finite"):
        F.feature_matrix(bad, "combined")
    bad["pixel.mse.min"] = np.zeros(3, np.float32)
    with pytest.raises(DataError, match="has 3 rows"):
        F.feature_matrix(bad, "pixel")
