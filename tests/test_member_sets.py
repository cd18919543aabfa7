"""Explicit member / non-member sets: reading and validation, the known/evaluated split, and
audits of a `generations` folder from explicit sets in partial and none modes (positive
control, shuffled assignment, blind baseline). No model of the target's kind is trained."""

import json
import os
import shutil

import numpy as np
import pytest

from conftest import REFERENCE, assert_no_alarm, assert_reads_chance
from t2i_mia import attack, cli
from t2i_mia.data.images import save_png
from t2i_mia.data.member_sets import explicit_manifest, known_part, read_member_sets
from t2i_mia.data.records import content_hash
from t2i_mia.errors import DataError

SIZE = 32


def _images(n, seed, shift=0):
    from t2i_mia.data.synthetic import SyntheticCaptions
    ds = SyntheticCaptions(seed=seed, size=SIZE, n=n)
    images, captions = ds.get_many(ds.ids()[:n])
    if shift:
        images = np.clip(images.astype(np.int16) + shift, 0, 255).astype(np.uint8)
    return images, captions


def write_manifest(folder, images, captions, ids):
    """A JSONL manifest with explicit ids and its PNGs; returns the manifest path."""
    os.makedirs(folder, exist_ok=True)
    lines = []
    for i, img, cap in zip(ids, images, captions):
        save_png(os.path.join(folder, f"{i}.png"), img)
        lines.append(json.dumps({"image": f"{i}.png", "caption": cap, "id": int(i)}))
    path = os.path.join(folder, "manifest.jsonl")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def write_folder(folder, images, captions):
    os.makedirs(folder, exist_ok=True)
    for n, (img, cap) in enumerate(zip(images, captions)):
        save_png(os.path.join(folder, f"img{n:03d}.png"), img)
        with open(os.path.join(folder, f"img{n:03d}.txt"), "w") as f:
            f.write(cap)
    return folder


# ----------------------------------------------------------------------------- reading

def test_sets_read_with_ids_hashes_and_folder_numbering(tmp_path):
    im, cap = _images(12, seed=3)
    members = write_manifest(tmp_path / "m", im[:4], cap[:4], [100, 101, 102, 103])
    nonmembers = write_folder(tmp_path / "n", im[4:8], cap[4:8])
    aux = write_folder(tmp_path / "a", im[8:], cap[8:])
    ms = read_member_sets({"members": str(members), "nonmembers": str(nonmembers),
                           "aux": str(aux)}, SIZE)
    assert ms.sets["members"].ids == (100, 101, 102, 103)
    # a plain folder is numbered after the largest id read before it: never a collision
    assert ms.sets["nonmembers"].ids == (104, 105, 106, 107)
    assert ms.sets["aux"].ids == (108, 109, 110, 111)
    assert ms.sets["members"].sha256[0] == content_hash(im[0])
    got, caps = ms.dataset.get_many([105, 100])
    np.testing.assert_array_equal(got[0], im[5])
    assert caps == [cap[5], cap[0]]


def test_overlap_names_both_files(tmp_path):
    im, cap = _images(6, seed=4)
    members = write_manifest(tmp_path / "m", im[:3], cap[:3], [0, 1, 2])
    # non-members hold member 1's image under another name and id
    nonmembers = write_manifest(tmp_path / "n", [im[3], im[1]], [cap[3], "another caption"],
                                [10, 11])
    with pytest.raises(DataError, match=r"--nonmembers .* overlaps --members: "
                                        r".*manifest.jsonl:2 \(id 11\) and .*manifest.jsonl:2"):
        read_member_sets({"members": members, "nonmembers": nonmembers}, SIZE)


def test_duplicate_id_across_sets(tmp_path):
    im, cap = _images(4, seed=5)
    members = write_manifest(tmp_path / "m", im[:2], cap[:2], [7, 8])
    nonmembers = write_manifest(tmp_path / "n", im[2:], cap[2:], [8, 9])
    with pytest.raises(DataError, match=r"both have id 8; ids must be unique across the sets"):
        read_member_sets({"members": members, "nonmembers": nonmembers}, SIZE)


def test_same_image_twice_in_one_set(tmp_path):
    im, cap = _images(3, seed=6)
    members = write_manifest(tmp_path / "m", [im[0], im[0]], cap[:2], [0, 1])
    nonmembers = write_manifest(tmp_path / "n", im[2:], cap[2:], [5])
    with pytest.raises(DataError, match="holds the same image twice"):
        read_member_sets({"members": members, "nonmembers": nonmembers}, SIZE)


def test_missing_member_image(tmp_path):
    im, cap = _images(4, seed=7)
    members = write_manifest(tmp_path / "m", im[:2], cap[:2], [0, 1])
    nonmembers = write_manifest(tmp_path / "n", im[2:], cap[2:], [2, 3])
    os.remove(tmp_path / "m" / "1.png")
    with pytest.raises(DataError, match=r"manifest.jsonl:2: image file '1.png' not found"):
        read_member_sets({"members": members, "nonmembers": nonmembers}, SIZE)


def test_known_part_is_stratified_seeded_and_disjoint(tmp_path):
    im, cap = _images(50, seed=8)
    members = write_manifest(tmp_path / "m", im[:20], cap[:20], range(20))
    nonmembers = write_manifest(tmp_path / "n", im[20:], cap[20:], range(100, 130))
    ms = read_member_sets({"members": members, "nonmembers": nonmembers}, SIZE)
    m = explicit_manifest(ms, "partial", 0.2, seed=0)
    assert len(m.ids("target_known_members")) == 4 and len(m.ids("target_members")) == 16
    assert len(m.ids("target_known_nonmembers")) == 6
    assert len(m.ids("target_nonmembers")) == 24
    assert not set(m.ids("target_known_members")) & set(m.ids("target_members"))
    again = explicit_manifest(ms, "partial", 0.2, seed=0)
    assert again.sha256() == m.sha256()
    assert explicit_manifest(ms, "partial", 0.2, seed=1).ids("target_members") != \
        m.ids("target_members")
    assert known_part(20, 0.2, 0, "members").sum() == 4
    none = explicit_manifest(ms, "none", 0.2, seed=0)
    assert len(none.ids("target_members")) == 20 and not none.ids("target_known_members")
    with pytest.raises(DataError, match="leave 1 for the known part"):
        explicit_manifest(ms, "partial", 0.05, seed=0)


# ----------------------------------------------------------------------------- the CLI

def _encoder_dir(tmp_path, captions) -> str:
    """The reference CLIP fixture with a tokenizer trained on ``captions``: a local HF CLIP
    folder for adversary.encoder.dir."""
    from t2i_mia.models.tokenizer import TextTokenizer
    d = tmp_path / "encoder"
    d.mkdir()
    for f in ("config.json", "flax_model.msgpack"):
        shutil.copy(REFERENCE / "clip" / f, d / f)
    TextTokenizer.train(captions, vocab_size=600, max_length=16).save(str(d))
    return str(d)


def _audit(argv, capsys=None):
    code = cli.run_main(attack.main, argv)
    err = capsys.readouterr().err if capsys is not None else ""
    return code, err


def _gens(folder, ids, images, member_ids, rng, k=2):
    """Member generations: noisy copies of the member image; others: random images."""
    members = set(member_ids)
    for i, img in zip(ids, images):
        os.makedirs(os.path.join(folder, str(i)), exist_ok=True)
        for j in range(k):
            if i in members:
                g = np.clip(img.astype(np.int16) + rng.integers(-8, 9, img.shape), 0, 255)
            else:
                g = rng.integers(0, 255, img.shape)
            save_png(os.path.join(folder, str(i), f"{j}.png"), g.astype(np.uint8))
    return folder


@pytest.fixture(scope="module")
def gen_sets(tmp_path_factory):
    """40 members + 40 non-members (one distribution), their generations folder, and an
    encoder folder."""
    root = tmp_path_factory.mktemp("explicit")
    im, cap = _images(80, seed=11)
    m_ids, n_ids = list(range(0, 40)), list(range(1000, 1040))
    members = write_manifest(root / "members", im[:40], cap[:40], m_ids)
    nonmembers = write_manifest(root / "nonmembers", im[40:], cap[40:], n_ids)
    gens = _gens(str(root / "gens"), m_ids + n_ids, im, m_ids, np.random.default_rng(0))
    enc = _encoder_dir(root, cap)
    return {"root": root, "members": members, "nonmembers": nonmembers, "gens": gens,
            "encoder": enc, "images": im, "captions": cap, "m_ids": m_ids, "n_ids": n_ids}


def _argv(g, out, members, nonmembers, extra=()):
    return ["--target", "generations", "--target-dir", g["gens"], "--members", members,
            "--nonmembers", nonmembers, "--config", "ci", "--work-dir",
            str(g["root"] / "work"), "--out", str(out),
            "--set", f"adversary.encoder.dir={g['encoder']}", "--set", "adversary.n_shuffles=2",
            "--set", "adversary.n_bootstrap=300", *extra]


def _report(out):
    with open(os.path.join(out, "report.json")) as f:
        return json.load(f)


def test_generations_partial_mode_positive_control(gen_sets, tmp_path):
    g = gen_sets
    out = tmp_path / "partial"
    code, _ = _audit(_argv(g, out, g["members"], g["nonmembers"]))
    assert code == 0
    rep = _report(out)
    assert rep["aux_mode"] == "partial"  # the default with explicit sets and no shadow
    assert rep["data"] == "member-sets" and rep["target"] == f"generations:{g['gens']}"
    qs = rep["query_sets"]
    assert qs["members"]["n"] == 40 and qs["members"]["n_known"] == 8
    assert qs["members"]["n_evaluated"] == 32 and qs["nonmembers"]["n_evaluated"] == 32
    assert not set(qs["members"]["known_ids"]) & set(qs["members"]["evaluated_ids"])
    assert rep["n_eval"] == {"members": 32, "nonmembers": 32}
    assert rep["n_attack_train"] == {"members": 8, "nonmembers": 8}
    assert rep["attacks"]["pixel"]["threshold"]["pixel.mse.min"]["auc"] >= 0.99
    # no null target given: the control is absent with its reason, never dropped
    assert "--null-target-dir" in rep["controls"]["null_target"]["absent"]
    assert "absent" in rep["attacks"]["pixel"]["mlp"]["null_target"]
    assert "calibrated" not in rep["attacks"]
    # one distribution: the blind baseline reads chance
    blind = rep["controls"]["blind"]
    assert_reads_chance(blind, "blind")
    assert rep["models"]["encoder"]["source"] == g["encoder"]
    assert os.path.isfile(out / "scores.csv") and not os.path.exists(out / "null_scores.csv")


def test_generations_none_mode_and_null_target(gen_sets, tmp_path):
    """aux_mode none: unfitted features with the intuitions' signs; a null target whose
    generations are all random reads chance."""
    g = gen_sets
    null = _gens(str(tmp_path / "null_gens"), g["m_ids"] + g["n_ids"], g["images"], [],
                 np.random.default_rng(1))
    out = tmp_path / "none"
    code, _ = _audit(_argv(g, out, g["members"], g["nonmembers"],
                           ["--set", "adversary.aux_mode=none", "--null-target-dir", null]))
    assert code == 0
    rep = _report(out)
    assert rep["n_eval"] == {"members": 40, "nonmembers": 40}
    assert rep["n_attack_train"] == {"members": 0, "nonmembers": 0}
    for a in ("pixel", "semantic", "faithfulness", "combined"):
        assert rep["attacks"][a]["mlp"] is None and "aux_mode=none" in \
            rep["attacks"][a]["mlp_absent"]
    e = rep["attacks"]["pixel"]["threshold"]["pixel.mse.min"]
    assert e["auc"] >= 0.99 and e["accuracy"] is None
    assert e["tpr_at_heldout_threshold_1e-2"] is None
    assert rep["attacks"]["pixel"]["threshold"]["pixel.ssim.max"]["auc"] >= 0.95
    n = e["null_target"]
    assert_reads_chance(n, "null_target of pixel.mse.min")
    ctl = rep["controls"]
    assert "feature" in ctl["null_target"]
    assert_no_alarm(ctl["null_target"])
    assert "nothing is fitted" in ctl["shuffled_labels"]["absent"]
    assert_reads_chance(ctl["blind"], "blind")
    # the scores files alone give the same report numbers
    from t2i_mia.report.__main__ import main as report_main
    rout = tmp_path / "from_scores"
    assert report_main(["--scores", str(out / "scores.csv"), "--null-scores",
                        str(out / "null_scores.csv"), "--out", str(rout)]) == 0
    again = _report(rout)
    assert again["attacks"] == rep["attacks"] and again["controls"] == rep["controls"]


def test_shuffled_assignment_reads_chance(gen_sets, tmp_path):
    """The same generations with member/non-member assignment shuffled: no signal."""
    g = gen_sets
    rng = np.random.default_rng(5)
    ids = np.array(g["m_ids"] + g["n_ids"])
    perm = rng.permutation(len(ids))
    a, b = perm[:40], perm[40:]
    im, cap = g["images"], g["captions"]
    members = write_manifest(tmp_path / "sm", im[a], [cap[i] for i in a], ids[a])
    nonmembers = write_manifest(tmp_path / "sn", im[b], [cap[i] for i in b], ids[b])
    out = tmp_path / "shuffled"
    code, _ = _audit(_argv(g, out, members, nonmembers, ["--set", "adversary.aux_mode=none"]))
    assert code == 0
    assert_reads_chance(_report(out)["attacks"]["pixel"]["threshold"]["pixel.mse.min"],
                        "pixel.mse.min, shuffled assignment")


def test_blind_baseline_fires_on_two_distributions(gen_sets, tmp_path):
    """Non-members from another distribution (brighter images, longer captions): the blind
    baseline separates the sets without querying the model, and the report says so."""
    g = gen_sets
    im, cap = _images(40, seed=12, shift=60)
    cap = [c + " shown in a long and rather wordy description of the scene" for c in cap]
    nonmembers = write_manifest(tmp_path / "other", im, cap, g["n_ids"])
    out = tmp_path / "shift"
    code, _ = _audit(_argv(g, out, g["members"], nonmembers, ["--set", "adversary.aux_mode=none"]))
    assert code == 0
    blind = _report(out)["controls"]["blind"]
    assert blind["alarm"] is True and blind["auc_ci"][0] > 0.5
    assert "differ in distribution" in blind["verdict"]
    assert "differ in distribution" in (out / "report.md").read_text()


def test_generations_shadow_mode_with_the_users_shadow(gen_sets, tmp_path):
    """aux_mode shadow with explicit sets: the attacks are fitted on the user's shadow model
    (its own generations folder and member / non-member sets) and applied once to the
    target's sets, all of which are evaluated."""
    g = gen_sets
    im, cap = _images(40, seed=13)
    s_m, s_n = list(range(2000, 2020)), list(range(3000, 3020))
    sm = write_manifest(tmp_path / "sm", im[:20], cap[:20], s_m)
    sn = write_manifest(tmp_path / "sn", im[20:], cap[20:], s_n)
    shadow = _gens(str(tmp_path / "shadow_gens"), s_m + s_n, im, s_m,
                   np.random.default_rng(2))
    out = tmp_path / "shadow"
    code, _ = _audit(_argv(g, out, g["members"], g["nonmembers"],
                           ["--shadow-dir", shadow, "--shadow-members", sm,
                            "--shadow-nonmembers", sn]))
    assert code == 0
    rep = _report(out)
    assert rep["aux_mode"] == "shadow"  # the default when a shadow is given
    assert rep["n_attack_train"] == {"members": 20, "nonmembers": 20}
    assert rep["n_eval"] == {"members": 40, "nonmembers": 40}
    assert rep["models"]["shadow"] == shadow
    assert rep["query_sets"]["shadow_members"]["n"] == 20
    assert rep["attacks"]["pixel"]["threshold"]["pixel.mse.min"]["auc"] >= 0.99
    assert rep["attacks"]["pixel"]["mlp"]["auc"] >= 0.95


@pytest.mark.parametrize("case", ["no_nonmembers", "overlap", "no_encoder", "no_target_dir",
                                  "shadow_without_dir", "missing_image"])
def test_bad_explicit_input_exits_2_and_writes_nothing(gen_sets, tmp_path, capsys, case):
    g = gen_sets
    out = tmp_path / "out"
    argv = _argv(g, out, g["members"], g["nonmembers"])
    expect = {"no_nonmembers": "--members and --nonmembers go together",
              "overlap": "overlaps --members",
              "no_encoder": "adversary.encoder.dir .* or give --aux",
              "no_target_dir": "give its checkpoint with --target-dir",
              "shadow_without_dir": "needs --shadow-dir",
              "missing_image": "image file '3.png' not found"}[case]
    if case == "no_nonmembers":
        i = argv.index("--nonmembers")
        del argv[i:i + 2]
    elif case == "overlap":
        im, cap = g["images"], g["captions"]
        bad = write_manifest(tmp_path / "bad", [im[40], im[3]], cap[40:42], [1000, 1001])
        argv[argv.index(g["nonmembers"])] = bad
    elif case == "no_encoder":
        i = argv.index(f"adversary.encoder.dir={g['encoder']}")
        del argv[i - 1:i + 1]
    elif case == "no_target_dir":
        i = argv.index("--target-dir")
        del argv[i:i + 2]
    elif case == "shadow_without_dir":
        argv += ["--set", "adversary.aux_mode=shadow"]
    elif case == "missing_image":
        bad = tmp_path / "m"
        shutil.copytree(os.path.dirname(g["members"]), bad)
        os.remove(bad / "3.png")
        argv[argv.index(g["members"])] = str(bad / "manifest.jsonl")
    code, err = _audit(argv, capsys)
    assert code == 2
    import re
    assert re.search(expect, err), err
    assert not os.path.exists(out / "report.json") and not os.path.exists(out / "scores.csv")


def test_pytorch_layout_sd_folder_audited_on_explicit_sets(gen_sets, tmp_path):
    """A diffusers PyTorch-layout pipeline (the sd_pt fixture, 16 px) audited with explicit
    sets: the sets are decoded at the checkpoint's size, the model is sampled with DDIM and
    the report says so. (The fixture's weights are random: no AUC is asserted.)"""
    from t2i_mia.report.writer import validate_report
    g = gen_sets
    folder = REFERENCE / "sd_pt_a"
    im, cap = g["images"], g["captions"]
    members = write_manifest(tmp_path / "m", im[:8], cap[:8], range(8))
    nonmembers = write_manifest(tmp_path / "n", im[40:48], cap[40:48], range(100, 108))
    out = tmp_path / "out"
    code, _ = _audit(["--target", "ldm", "--target-dir", str(folder), "--members", members,
                      "--nonmembers", nonmembers, "--config", "ci", "--work-dir",
                      str(tmp_path / "work"), "--out", str(out), "--set",
                      f"adversary.encoder.dir={g['encoder']}", "--set", "adversary.k=1",
                      "--set", "adversary.aux_mode=none", "--set", "adversary.white_box=false",
                      "--set", "adversary.n_bootstrap=50"])
    assert code == 0
    rep = _report(out)
    validate_report(rep)
    assert rep["target"] == f"ldm:{folder}" and rep["n_eval"] == {"members": 8, "nonmembers": 8}
    assert rep["config"]["data"]["image_size"] == 16
    assert "DDIM" in rep["models"]["sampler"] and "DDIMScheduler" in rep["models"]["sampler"]
    with open(out / "scores.csv") as f:
        assert len(f.read().splitlines()) == 2 + 16


# ----------------------------------------------------------------------------- train --members

def test_train_members_needs_exactly_one_source_of_public_parts(gen_sets, tmp_path, capsys):
    from t2i_mia import train
    g = gen_sets
    base = ["--config", "ci", "--work-dir", str(tmp_path / "w"), "--out", str(tmp_path / "o"),
            "--members", g["members"]]
    assert cli.run_main(train.main, base) == 2
    assert "exactly one of --base-dir DIR" in capsys.readouterr().err
    assert cli.run_main(train.main, base + ["--base-dir", g["gens"], "--pretrain",
                                            g["nonmembers"]]) == 2
    assert "exactly one of" in capsys.readouterr().err
    assert cli.run_main(train.main, ["--config", "ci", "--pretrain", g["nonmembers"]]) == 2
    assert "go with --members" in capsys.readouterr().err
    # a pretrain set that shares an image with the members is refused before training
    im, cap = g["images"], g["captions"]
    bad = write_manifest(tmp_path / "p", [im[0], im[60]], cap[:2], [500, 501])
    assert cli.run_main(train.main, base + ["--pretrain", bad]) == 2
    assert "--pretrain" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o")


def test_train_members_on_pretrain_end_to_end(gen_sets, tmp_path):
    """--members with --pretrain: the autoencoder and tokenizer trained on the pretrain set,
    the LDM on the members (2 steps each: the path, not the quality), saved as a Stable
    Diffusion folder that --target-dir loads, with members.json."""
    from t2i_mia import train
    from t2i_mia.models.ldm import load_stable_diffusion
    g = gen_sets
    out = tmp_path / "model"
    steps = ["ldm.vae_train.steps=2", "ldm.train.steps=2", "ldm.vae_train.batch_size=8",
             "ldm.train.batch_size=8", "ldm.vae_train.warmup_steps=1",
             "ldm.train.warmup_steps=1"]
    argv = ["--config", "ci", "--work-dir", str(tmp_path / "w"), "--out", str(out),
            "--members", g["members"], "--pretrain", g["nonmembers"]]
    assert cli.run_main(train.main, argv + sum((["--set", s] for s in steps), [])) == 0
    comps = load_stable_diffusion(out)
    assert comps.vae_cfg.sample_size == SIZE
    with open(out / "members.json") as f:
        listed = json.load(f)
    assert listed["ids"] == g["m_ids"] and len(listed["sha256"]) == 40


def test_generate_from_a_pytorch_layout_folder_is_what_the_target_draws(tmp_path):
    """python -m t2i_mia.generate --target ldm --target-dir (PyTorch-layout SD): the
    generations folder holds exactly the images the target protocol gives."""
    from PIL import Image

    from t2i_mia import generate
    from t2i_mia.config import load_config
    from t2i_mia.models.ldm import load_stable_diffusion
    from t2i_mia.parallel.mesh import make_mesh
    from t2i_mia.targets.ldm import LDMTarget
    folder = REFERENCE / "sd_pt_a"
    caps = tmp_path / "caps.jsonl"
    caps.write_text(json.dumps({"id": 4, "caption": "a red square"}) + "\n"
                    + json.dumps({"id": 11, "caption": "two blue circles"}) + "\n")
    out = tmp_path / "gens"
    assert cli.run_main(generate.main, ["--config", "ci", "--target", "ldm", "--target-dir",
                                        str(folder), "--captions", str(caps), "-k", "1",
                                        "--out", str(out)]) == 0
    cfg = load_config("ci")
    t = LDMTarget(load_stable_diffusion(folder), cfg.ldm.sample, seed=0,
                  mesh=make_mesh(cfg.mesh.data, cfg.mesh.model))
    want = np.asarray(t.generate(["two blue circles"], [11], 1))[0, 0]
    np.testing.assert_array_equal(np.asarray(Image.open(out / "11" / "0.png")), want)
    assert (out / "4" / "0.png").is_file()
