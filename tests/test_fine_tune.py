"""``ldm.base_train``: a public base LDM trained on ``pretrain`` that every audit LDM
fine-tunes from. Shrunken ci sizes (a few steps): the parameters' provenance is the point."""

import json
import os

import jax
import numpy as np
import pytest

from t2i_mia.config import load_config
from t2i_mia.data.sources import open_dataset
from t2i_mia.data.splits import build_splits
from t2i_mia.errors import ConfigError
from t2i_mia.parallel.mesh import make_mesh
from t2i_mia.targets import factory

SHRINK = ["public.components=null",  # the base trained here, on pretrain
          "data.splits.pretrain=32", "data.splits.target_members=8",
          "data.splits.target_nonmembers=8", "data.splits.shadow_members=8",
          "data.splits.shadow_nonmembers=8", "data.splits.auxiliary=8",
          "ldm.vae_train.steps=2", "ldm.vae_train.batch_size=8",
          # base and fine-tuning alike, so the three LDMs share one compiled train step
          "ldm.base_train.steps=3", "ldm.base_train.batch_size=8",
          "ldm.base_train.warmup_steps=1", "ldm.base_train.learning_rate=0.003",
          "ldm.train.steps=3", "ldm.train.batch_size=8", "ldm.train.warmup_steps=1",
          # small models: compiling them is most of the test's time
          "ldm.vae.block_out_channels=[8,8,8]", "ldm.unet.block_out_channels=[32,32]",
          "ldm.text_encoder.num_hidden_layers=1"]


def _models(work, extra):
    cfg = load_config("ci", SHRINK + extra)
    mesh = make_mesh(devices=jax.devices()[:1])
    cache = factory.ModelCache(str(work))
    dataset = open_dataset(cfg, sum(vars(cfg.data.splits).values()))
    m = build_splits(cfg, dataset)
    base = factory.ldm_base(cfg, dataset, m, cache, mesh)
    pre = factory.ldm_pretrained(cfg, dataset, m, base, cache, mesh)
    target = factory.ldm_for(cfg, "target", dataset, m, base, cache, mesh)
    return pre, target


def _dirs(work, prefix):
    return sorted(d for d in os.listdir(work / "models") if d.startswith(prefix))


def _max_diff(a, b) -> float:
    return max(float(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)).max())
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.slow
def test_target_starts_from_the_base_and_the_base_is_trained_once(tmp_path):
    pre, ft = _models(tmp_path, [])
    assert pre is not None
    # 3 Adam steps of learning rate <= 0.003 move each parameter by about 0.009 at most: the
    # fine-tuned target lies that close to the base ...
    assert 0.0 < _max_diff(ft.unet_params, pre[1].unet_params) < 0.05
    assert _max_diff(ft.text_params, pre[1].text_params) < 0.05
    # ... while the same 3 steps from random initialisation land far from it
    none, scratch = _models(tmp_path, ["ldm.base_train.steps=0"])
    assert none is None and _max_diff(scratch.unet_params, pre[1].unet_params) > 0.2
    # another fine-tuning run reuses the base (its key ignores ldm.train)
    pre2, _ = _models(tmp_path, ["ldm.train.checkpoint_every=2"])
    assert pre2[0] == pre[0] and len(_dirs(tmp_path, "ldm-base-")) == 1
    infos = [json.loads((tmp_path / "models" / d / "cache.json").read_text())
             for d in _dirs(tmp_path, "ldm-target-")]
    assert len(infos) == 3
    # the two fine-tuned targets name their base; the one from scratch names none
    assert sorted(i.get("fine_tuned_from", "") for i in infos) == \
        ["", f"ldm-base-{pre[0]}", f"ldm-base-{pre[0]}"]


def test_base_train_is_validated():
    with pytest.raises(ConfigError, match="ldm.base_train.steps"):
        load_config("ci", ["ldm.base_train.steps=-1"])
