# megatron-meml on the NGC PyTorch container: CUDA PyTorch, Transformer Engine (FP8) and apex (Megatron-Core's
# fused kernels) come from the base image; the pins below are checked against pyproject.toml by
# tests/unit/test_dockerfile.py.
#
#   docker build -t megatron-meml:0.1.0 .
#   enroot import -o meml.sqsh dockerd://megatron-meml:0.1.0    # for SLURM + pyxis: MEML_IMAGE=$PWD/meml.sqsh
#
# 25.06: Ubuntu 24.04, Python 3.12, CUDA 12.9, PyTorch 2.8.0a0, Transformer Engine 2.4 (pyproject's gpu extra
# asks for transformer-engine>=2.4). vLLM 0.11.0 is built for torch 2.8, the base image's torch line.
FROM nvcr.io/nvidia/pytorch:25.06-py3

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    CUDA_DEVICE_MAX_CONNECTIONS=1

# The base image pins its own packages in /etc/pip/constraint.txt (torch among them). vLLM pins a PyPI torch
# build, so it goes in without dependencies and its other requirements follow, leaving the image's torch,
# Transformer Engine and apex in place.
RUN pip install --no-deps vllm==0.11.0 && \
    python -c "import importlib.metadata as m, re; \
reqs = [r for r in m.requires('vllm') if 'extra ==' not in r]; \
keep = [r for r in reqs if re.split(r'[ <>=!~;\[]', r, maxsplit=1)[0].lower() not in {'torch', 'torchvision', 'torchaudio', 'xformers'}]; \
open('/tmp/vllm-reqs.txt', 'w').write('\n'.join(keep) + '\n')" && \
    pip install -r /tmp/vllm-reqs.txt && rm /tmp/vllm-reqs.txt

RUN pip install \
        megatron-core==0.16.1 \
        nvidia-modelopt==0.47.0 \
        math-verify==0.9.0 \
        datasets==5.2.0

WORKDIR /opt/megatron-meml
COPY pyproject.toml README.md ./
COPY megatron_meml ./megatron_meml
COPY checkpoints_convert ./checkpoints_convert
COPY recipes ./recipes
COPY launch ./launch
RUN pip install --no-build-isolation . && \
    python -c "import megatron.core, transformer_engine, vllm, modelopt, math_verify, megatron_meml; print('meml image ok')"

WORKDIR /workspace
ENTRYPOINT ["meml"]
