"""Config system and command line: presets, overrides, validation errors, --dry-run."""

import json
import subprocess
import sys

import pytest

from t2i_mia import cli
from t2i_mia.config import PRESETS, apply_overrides, get_config, load_config, validate
from t2i_mia.errors import ConfigError


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_validate(preset):
    cfg = validate(get_config(preset))
    assert cfg.preset == preset


def test_tiny_is_the_embedded_default_at_required_size():
    cfg = load_config(None)
    s = cfg.data.splits
    assert cfg.preset == "tiny" and cfg.data.source == "synthetic"
    # >= 250 non-members resolve TPR at 1% FPR; the shadow is the target's size
    assert s.target_members >= 250 and s.target_nonmembers >= 250
    assert (s.shadow_members, s.shadow_nonmembers) == (s.target_members, s.target_nonmembers)
    # built on the shipped components: only target and shadow are trained, the base is the
    # calibration reference
    assert cfg.public.components == "package" and cfg.public.fine_tune
    assert cfg.adversary.n_reference == 0 and cfg.adversary.base_reference


def test_the_previous_default_is_a_named_preset():
    """tiny-scratch is the default before the public components, unchanged: every part
    trained on the audit's own splits, 500 vs 500, k = 4, 6000 steps per LDM."""
    cfg = load_config("tiny-scratch")
    s = cfg.data.splits
    assert cfg.public.components is None and cfg.adversary.n_reference == 1
    assert (s.pretrain, s.target_members, s.target_nonmembers, s.auxiliary) == (2000, 500, 500,
                                                                                1000)
    assert cfg.adversary.k == 4 and cfg.ldm.train.steps == 6000
    assert cfg.ldm.vae_train.steps == 600 and cfg.adversary.encoder.train.steps == 800
    # the default shares its model shapes but the latent channels: 8 for the shipped
    # components' autoencoder, 4 for the one tiny-scratch trains
    tiny = load_config("tiny")
    assert tiny.ldm.vae["latent_channels"] == tiny.ldm.unet["in_channels"] == 8
    assert cfg.ldm.vae["latent_channels"] == cfg.ldm.unet["out_channels"] == 4
    latent = ("latent_channels", "in_channels", "out_channels", "scaling_factor")
    for a, b in ((tiny.ldm.unet, cfg.ldm.unet), (tiny.ldm.vae, cfg.ldm.vae)):
        assert {k: v for k, v in a.items() if k not in latent} == \
            {k: v for k, v in b.items() if k not in latent}
    assert tiny.ldm.text_encoder == cfg.ldm.text_encoder


def test_set_overrides_are_typed():
    cfg = load_config("ci", ["adversary.k=7", "ldm.train.learning_rate=3e-4",
                             'adversary.caption_source="captioner"',
                             "adversary.mlp.hidden=[16,8]", "ldm.unet.block_out_channels=[32,32]"])
    assert cfg.adversary.k == 7
    assert cfg.ldm.train.learning_rate == pytest.approx(3e-4)
    assert cfg.adversary.caption_source == "captioner"
    assert cfg.adversary.mlp.hidden == (16, 8)
    assert cfg.ldm.unet["block_out_channels"] == [32, 32]
    # Unquoted strings are accepted as strings.
    assert load_config("ci", ["adversary.aux_mode=partial", "data.splits.target_known_members=8",
                              "data.splits.target_known_nonmembers=8"]
                       ).adversary.aux_mode == "partial"
    # partial knowledge without known sets is an error naming the key
    with pytest.raises(ConfigError, match="target_known_members"):
        load_config("ci", ["adversary.aux_mode=partial"])


@pytest.mark.parametrize("override, key", [
    ("adversary.kk=3", "adversary.kk"),
    ("nope=1", "nope"),
    ("ldm.train.stepz=3", "ldm.train.stepz"),
])
def test_unknown_key_names_the_key(override, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config("ci", [override])


@pytest.mark.parametrize("override, key", [
    ("adversary.k=two", "adversary.k"),
    ("adversary.k=2.5", "adversary.k"),
    ("adversary.white_box=1", "adversary.white_box"),
    ("adversary.mlp.hidden=3", "adversary.mlp.hidden"),
    ("data.image_size=30", "data.image_size"),
    ("adversary.caption_source=oracle", "adversary.caption_source"),
    ("ldm.sample.eta=-1", "ldm.sample.eta"),
    ("adversary.pixel_coarse_side=-2", "adversary.pixel_coarse_side"),
    ("adversary.n_shuffles=1", "adversary.n_shuffles"),
    ("adversary.base_reference=1", "adversary.base_reference"),
    ("adversary.encoder.ssl_views=decoded", "adversary.encoder.ssl_views"),
])
def test_wrong_type_or_value_names_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("ci", [override])


def test_reconstruction_views_need_the_image_term():
    with pytest.raises(ConfigError, match="image_ssl_weight > 0"):
        load_config("ci", ["adversary.encoder.ssl_views=autoencoder",
                           "adversary.encoder.image_ssl_weight=0"])


def test_model_subconfig_validated_by_model_class():
    from t2i_mia.models.configs import check_model_configs
    with pytest.raises(ConfigError, match="down_block_types"):
        check_model_configs(load_config(
            "ci", ['ldm.unet.down_block_types=["FooBlock","DownBlock2D"]']))
    with pytest.raises(ConfigError, match="hidden_act"):
        check_model_configs(load_config("ci", ['ldm.text_encoder.hidden_act="relu6"']))
    # the entry points check them before anything runs
    with pytest.raises(ConfigError, match="hidden_act"):
        cli.resolve(cli.make_parser("t", "d").parse_args(
            ["--config", "ci", "--set", 'ldm.text_encoder.hidden_act="relu6"']))


def test_config_file(tmp_path):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"preset": "ci", "seed": 3, "adversary": {"k": 3}}))
    cfg = load_config(str(f), ["adversary.k=5"])
    assert cfg.preset == "ci" and cfg.seed == 3 and cfg.adversary.k == 5
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"adversary": {"kay": 3}}))
    with pytest.raises(ConfigError, match=r"bad\.json.*adversary\.kay"):
        load_config(str(bad))
    garbage = tmp_path / "garbage.json"
    garbage.write_bytes(b"\xff\xfe{")
    with pytest.raises(ConfigError, match="garbage.json"):
        load_config(str(garbage))
    with pytest.raises(ConfigError, match="neither a preset"):
        load_config(str(tmp_path / "missing.json"))


def test_section_hash_changes_with_value():
    a, b = get_config("ci"), get_config("ci")
    assert a.section_hash("ldm") == b.section_hash("ldm")
    apply_overrides(b, ["ldm.train.steps=1"])
    assert a.section_hash("ldm") != b.section_hash("ldm")


def test_resolve_flags_and_errors(tmp_path):
    p = cli.make_parser("x", "d")
    cfg, paths = cli.resolve(p.parse_args(["--config", "ci", "--seed", "4", "--set",
                                           "adversary.k=3", "--out", str(tmp_path / "o")]))
    assert cfg.seed == 4 and cfg.adversary.k == 3 and paths.out.endswith("o")
    with pytest.raises(ConfigError, match="--target-dir"):
        cli.resolve(p.parse_args(["--config", "ci", "--target-dir", str(tmp_path / "nope")]))
    with pytest.raises(ConfigError, match="--data-dir"):
        cli.resolve(p.parse_args(["--config", "ci", "--data", "folder"]))
    with pytest.raises(ConfigError, match="--target-dir"):
        cli.resolve(p.parse_args(["--config", "ci", "--target", "generations"]))


@pytest.mark.parametrize("module", ["t2i_mia.attack", "t2i_mia.train", "t2i_mia.generate"])
def test_dry_run_prints_plan_and_touches_nothing(module, tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    r = subprocess.run([sys.executable, "-m", module, "--config", "ci", "--dry-run",
                        "--out", str(out), "--work-dir", str(work)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "plan" in r.stdout and "splits" in r.stdout and "mesh" in r.stdout
    assert not out.exists() and not work.exists()


def test_help_teaches():
    r = subprocess.run([sys.executable, "-m", "t2i_mia.attack", "--help"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0
    for word in ("--target", "--config", "--set", "--dry-run", "pixel", "shadow", "examples"):
        assert word in r.stdout


def test_cli_error_is_one_clear_line():
    r = subprocess.run([sys.executable, "-m", "t2i_mia.attack", "--config", "ci", "--set",
                        "adversary.bogus=1"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "error:" in r.stderr and "adversary.bogus" in r.stderr
    assert "Traceback" not in r.stderr


def test_real_data_defaults_to_paper_presets(tmp_path):
    p = cli.make_parser("x", "d")
    cfg, _ = cli.resolve(p.parse_args(["--data", "coco", "--dry-run"]))
    assert cfg.preset == "paper-ldm" and cfg.data.source == "coco"
    assert cfg.data.image_size == 256 and cfg.data.tfds_name == "coco_captions"
    cfg, paths = cli.resolve(p.parse_args(["--data", "cc3m", "--target", "dalle-mini",
                                           "--data-dir", "s/{00000..00003}.tar", "--dry-run"]))
    assert cfg.preset == "paper-dalle" and cfg.data.source == "cc3m"
    assert paths.data_dir == "s/{00000..00003}.tar"
    cfg, _ = cli.resolve(p.parse_args(["--config", "ci", "--data", "coco"]))
    assert cfg.preset == "ci"  # an explicit --config wins
    assert cli.resolve(p.parse_args([]))[0].preset == "tiny"
    # cc3m needs its shards for a real run (not for a dry run).
    with pytest.raises(ConfigError, match="--data cc3m needs --data-dir"):
        cli.resolve(p.parse_args(["--data", "cc3m"]))
    with pytest.raises(ConfigError, match="data.tfds_split"):
        cli.resolve(p.parse_args(["--data", "coco", "--set", "data.tfds_split=  "]))


@pytest.mark.parametrize("data, words", [
    ("coco", ["paper-ldm", "coco_captions", "train+restval+val+test", "array_record"]),
    ("cc3m", ["paper-ldm", "webdataset shards", "{00000..00331}"]),
])
def test_real_data_dry_run_plans_paper_scale_and_reads_nothing(data, words, tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    arg = str(data_dir / "{00000..00331}.tar") if data == "cc3m" else str(data_dir)
    code = ("import sys; from t2i_mia import attack; rc = attack.main(sys.argv[1:]); "
            "print('imported', sorted(m for m in ('tensorflow', 'tensorflow_datasets') "
            "if m in sys.modules)); sys.exit(rc)")
    r = subprocess.run([sys.executable, "-c", code, "--data", data, "--data-dir", arg,
                        "--dry-run", "--out", str(tmp_path / "o"), "--work-dir",
                        str(tmp_path / "w")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for w in words + ["256x256", "target_members=10000", "mesh", "200000 steps",
                      "report.json"]:
        assert w in out, (w, out)
    assert "imported []" in out  # no TFDS, no TensorFlow: nothing read or downloaded
    assert list(tmp_path.iterdir()) == [data_dir] and list(data_dir.iterdir()) == []
