"""tpu_configs/*.json: each loads with load_config, its mesh uses exactly the slice's devices
(from the table in tpu_configs/README.md), sharded batches divide over the data axis, and
the target model sees as many training examples as its preset intends."""

import pathlib
import re

import jax
import pytest

from t2i_mia.config import get_config, load_config
from t2i_mia.parallel.mesh import make_mesh

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "tpu_configs"
README = (CONFIGS / "README.md").read_text(encoding="utf-8")
TARGETS = {"ldm": ("paper-ldm", "ldm"), "dalle": ("paper-dalle", "dalle-mini")}


def table(heading: str) -> dict[str, list[str]]:
    """Rows of the markdown table under ``## heading``: first cell (backticks removed) ->
    the other cells."""
    section = README.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        if not line.startswith("|") or set(line) <= set("|- "):
            continue
        cells = [c.strip().replace("`", "") for c in line.strip("|").split("|")]
        if cells[0] != "file":
            rows[cells[0]] = cells[1:]
    return rows


SLICES = table("Slices")
BATCHES = table("Batch sizes")
FILES = sorted(p.name for p in CONFIGS.glob("*.json"))


def sections(cfg):
    """(autoencoder/VQGAN train, target train, sample) configs of the file's target."""
    if cfg.target == "ldm":
        return cfg.ldm.vae_train, cfg.ldm.train, cfg.ldm.sample
    return cfg.dalle.vqgan_train, cfg.dalle.train, cfg.dalle.sample


def test_every_file_is_in_the_tables():
    assert len(FILES) >= 6
    assert sorted(SLICES) == FILES
    assert sorted(f for f in BATCHES if f.endswith(".json")) == FILES
    # one multi-host slice at least, and the single-host v4-8 and v5e-8
    types = {cells[0] for cells in SLICES.values()}
    assert {"v4-8", "v5litepod-8"} <= types
    assert any(int(cells[1]) > 1 for cells in SLICES.values())


def batch_row(cfg, cells):
    """Checks a row of the README's batch table against a config."""
    ae, train, sample = sections(cfg)
    ae_col, train_col, sample_col, enc_col = cells
    b, s, unit = re.fullmatch(r"(\d+) \(([\d.]+)([kM])\)", train_col).groups()
    assert int(b) == train.batch_size
    assert float(s) * {"k": 1e3, "M": 1e6}[unit] == train.steps
    assert int(ae_col) == ae.batch_size and int(sample_col) == sample.batch_size
    assert int(enc_col) == cfg.adversary.encoder.train.batch_size


def test_preset_rows():
    presets = [r for r in BATCHES if r.startswith("preset ")]
    assert sorted(presets) == ["preset paper-dalle", "preset paper-ldm"]
    for row in presets:
        batch_row(get_config(row.split()[1]), BATCHES[row])


@pytest.mark.parametrize("name", FILES)
def test_config(name):
    kind, accel = re.fullmatch(r"(ldm|dalle)_(v\w+-\d+)\.json", name).groups()
    accel_col, hosts, devices, _hbm, mesh_col = SLICES[name]
    assert accel_col == accel
    cfg = load_config(str(CONFIGS / name))
    preset_name, target = TARGETS[kind]
    assert cfg.preset == preset_name and cfg.target == target
    devices = int(devices)
    assert int(hosts) >= 1 and devices % int(hosts) == 0
    data, model = cfg.mesh.data, cfg.mesh.model
    assert data >= 1 and model >= 1, "explicit mesh sizes (no -1) so the check has teeth"
    assert data * model == devices, f"{name}: mesh {data}x{model} on {devices} devices"
    assert mesh_col == f"{data} x {model}"
    if devices <= len(jax.devices()):  # the real mesh builds on as many fake CPU devices
        mesh = make_mesh(data, model, devices=jax.devices()[:devices])
        assert dict(mesh.shape) == {"data": data, "model": model}

    ae, train, sample = sections(cfg)
    for what, batch in (("autoencoder/VQGAN train", ae.batch_size),
                        ("target train", train.batch_size), ("sample", sample.batch_size)):
        assert batch % data == 0, f"{name}: {what} batch {batch} does not divide by {data}"

    # target and shadow see the preset's number of training examples (and warm-up)
    preset = get_config(preset_name)
    _, p_train, _ = sections(preset)
    assert train.batch_size * train.steps == p_train.batch_size * p_train.steps
    assert train.batch_size * train.warmup_steps == p_train.batch_size * p_train.warmup_steps
    assert train.learning_rate == p_train.learning_rate

    # the README's batch table says what the file says
    batch_row(cfg, BATCHES[name])
