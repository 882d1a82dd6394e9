"""The built wheel carries the recipes and expert prompts, and runs its packaged recipes from outside the source
tree."""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(ROOT)], check=True, capture_output=True, text=True)
    (whl,) = out.glob("megatron_meml-*.whl")
    return whl


def test_wheel_holds_every_recipe_and_prompt(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    source = ROOT / "megatron_meml" / "recipes"
    want = {f"megatron_meml/recipes/{p.relative_to(source).as_posix()}" for p in source.rglob("*")
            if p.is_file() and p.suffix in (".yaml", ".txt")}
    assert {"megatron_meml/recipes/smollm2-wordmath.yaml", "megatron_meml/recipes/base/meml.yaml",
            "megatron_meml/recipes/prompts/experts/expert1.txt"} <= want
    assert want <= names, sorted(want - names)


def test_installed_wheel_runs_a_packaged_recipe_by_name_from_elsewhere(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, text=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}

    def meml(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "megatron_meml.cli", *args], cwd=elsewhere, env=env,
                              capture_output=True, text=True, timeout=300)

    cfg = meml("config", "smollm2-wordmath", "rollout.temperature=0.7")
    assert cfg.returncode == 0, cfg.stderr
    assert "temperature: 0.7" in cfg.stdout and "the_answer_is" in cfg.stdout
    loc = subprocess.run([sys.executable, "-c", "import megatron_meml; print(megatron_meml.__file__)"],
                         cwd=elsewhere, env=env, capture_output=True, text=True)
    assert loc.stdout.strip().startswith(str(site))
    demo = meml("demo", "--help")
    assert demo.returncode == 0 and "--default" in demo.stdout
    bad = meml("config", "no-such-recipe")
    assert bad.returncode == 2 and "smollm2-wordmath" in bad.stderr  # the error lists the packaged recipes
