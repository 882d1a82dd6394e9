"""Weight sync Megatron (TP=2, gloo, fp32, CPU) -> vLLM (its own process), against the engine's own reload.

A Qwen2-shaped model of a few hundred MB is trained for one optimizer step (a tiny SFT batch through
training.trainer.Trainer) in 2 gloo ranks (one thread each); rank 0 holds a vLLM engine in multiprocess mode (an
in-process engine hangs under several gloo ranks). Printed, one run, side by side:

  sync    ``rollout.weight_sync.sync_weights`` wall time (median of --repeats after one warm-up): TP gathers,
          transfer to the engine process, validation, the engine's in-place reload and the prefix-cache reset;
          split into gather (Megatron -> HF tensors on rank 0) and engine (everything after) seconds.
  floor   the engine's own ``reload_weights`` of the same HF tensors already in its process (the worker reads
          them from a safetensors file first, untimed; ``WeightSyncExtension.meml_time_reload``), median.
  disk    ``safetensors.torch.save_file`` of the same tensors to --disk-dir, fsynced, median (reference only).
  sync/floor ratio N   (goal: <= 1.5)

The engine's log-probs on a fixed sequence are checked against Megatron's after the last sync (|delta| < 1e-3),
so a sync that silently skips the load cannot look fast.

    OMP_NUM_THREADS=1 python bench/weight_sync.py [--layers 8 --hidden 1024 --ffn 2048 --vocab 32000]
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.tiny_hf (the char tokenizer), also in the spawned ranks
SEQ = [2, 10, 11, 12, 13, 14, 15, 16, 17, 20, 21, 22, 23, 24, 25, 26]


def _args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--ffn", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--heads", type=int, default=16, help="query heads (head_dim = hidden / heads)")
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--untied", action="store_true", help="separate lm_head (default: tied, as small Qwen2s)")
    p.add_argument("--repeats", type=int, default=5, help="timed syncs and floor reloads (medians are reported)")
    p.add_argument("--bucket-mb", type=int, default=256)
    p.add_argument("--disk-dir", default=None, help="where the reference safetensors write goes (default: a "
                   "temporary directory under the repository, i.e. on disk, not tmpfs)")
    return p.parse_args(argv)


def _install_shim() -> None:
    if torch.cuda.is_available():
        return
    try:
        from megatron_meml.model.cpu_compat import install_cpu_shim
    except ImportError:  # trees from before the shim moved into the package
        from tests.megatron_cpu import install_cpu_shim
    install_cpu_shim()


def _sft_batch(seqs: list[list[int]]):
    from megatron_meml.training.forward_step import SFT
    from megatron_meml.types import TrainBatch

    tokens = torch.tensor(seqs)
    mask = torch.ones(tokens.shape)
    mask[:, -1] = 0
    return TrainBatch(tokens=tokens, loss_mask=mask, row_kind=torch.full((len(seqs),), SFT),
                      advantages=torch.zeros(len(seqs)))


def _build(args):
    """Megatron model at TP=2, one optimizer step on a tiny SFT batch. Returns (state, trainer, arch)."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_meml.algo.config import AlgoConfig
    from megatron_meml.model.arch import arch_from_model_config
    from megatron_meml.model.config import ModelConfig
    from megatron_meml.parallel import ParallelConfig
    from megatron_meml.distributed import init_distributed
    from megatron_meml.training.config import TrainConfig
    from megatron_meml.training.setup import setup_training
    from megatron_meml.training.trainer import Trainer

    par = ParallelConfig(tp=2)
    init_distributed(par)
    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)
    mcfg = ModelConfig(family="qwen2", vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers,
                       num_attention_heads=args.heads, num_kv_heads=args.kv_heads, head_dim=args.hidden // args.heads,
                       ffn_hidden_size=args.ffn, max_position_embeddings=256, tie_embeddings=not args.untied)
    arch = arch_from_model_config(mcfg)
    state = setup_training(arch, mcfg, par, TrainConfig(), lr=1e-3)
    trainer = Trainer(state, AlgoConfig(), micro_batch_size=2, pad_id=1)
    trainer.train_step(_sft_batch([SEQ, SEQ[:8] + SEQ[:8]]))
    return state, trainer, arch


def _sync_and_floor(engine, state, arch, hf_file: str, args) -> tuple[list[dict], list[float]]:
    """The sync metrics (after one warm-up; sorted by time) and the floor runs, interleaved (floor, then sync, in each
    repeat) so that both see the same machine load; the last action is a sync."""
    import torch.distributed as dist

    from megatron_meml.rollout.weight_sync import sync_weights

    runs, floors = [], []
    sync_weights(engine, state.model, arch, bucket_mb=args.bucket_mb)
    for _ in range(args.repeats):
        dist.barrier()
        if engine is not None:
            floors.append(engine.llm.collective_rpc("meml_time_reload", args=(hf_file, engine.tied))[0])
        dist.barrier()
        runs.append(sync_weights(engine, state.model, arch, bucket_mb=args.bucket_mb))
    return sorted(runs, key=lambda m: m["weight_sync/seconds"]), floors


def _fmt(xs) -> str:
    return ", ".join(f"{x:.3f}" for x in xs)


def _disk_write(named, out_dir: Path, repeats: int) -> float:
    from safetensors.torch import save_file

    times = []
    for i in range(repeats):
        path = out_dir / f"w{i}.safetensors"
        t0 = time.perf_counter()
        save_file({n: t.contiguous() for n, t in named}, str(path))
        with open(path, "rb+") as f:
            os.fsync(f.fileno())
        times.append(time.perf_counter() - t0)
        path.unlink()
    return statistics.median(times)


def _rank_main(rank: int, args, tmp: Path) -> None:
    from megatron_meml.rollout.config import RolloutConfig
    from megatron_meml.rollout.vllm_backend import VLLMBackend
    from megatron_meml.rollout.weight_sync import collect_hf_weights, write_hf_dir
    from tests.tiny_hf import char_tokenizer

    t0 = time.perf_counter()
    state, trainer, arch = _build(args)
    named = collect_hf_weights(state.model, arch)
    engine = None
    if rank == 0:
        nparams = sum(t.numel() for _, t in named)
        print(f"model: {args.layers} layers, hidden {args.hidden}, ffn {args.ffn}, vocab {args.vocab}, "
              f"{'untied' if args.untied else 'tied'}: {nparams / 1e6:.1f} M params, "
              f"{nparams * 4 / 1e6:.0f} MB fp32; built + 1 step in {time.perf_counter() - t0:.1f} s", flush=True)
        hf_dir = write_hf_dir(tmp / "hf", arch, named, char_tokenizer())
        engine = VLLMBackend(hf_dir, RolloutConfig(kv_cache_gb=0.125), max_model_len=64, mode="multiprocess")
        print(f"engine started in {engine.startup_seconds:.1f} s", flush=True)
    try:
        _measure(rank, args, tmp, state, trainer, arch, named, engine)
    finally:
        if engine is not None:
            engine.shutdown()


def _measure(rank: int, args, tmp: Path, state, trainer, arch, named, engine) -> None:
    hf_file = str(tmp / "hf" / "model.safetensors")
    runs, floors = _sync_and_floor(engine, state, arch, hf_file, args)
    want = trainer.compute_logprobs(_sft_batch([SEQ]))[0, :-1]
    if rank != 0:
        return
    got = torch.tensor(engine.prompt_logprobs([SEQ])[0])
    err = float((got - want).abs().max())
    if err > 1e-3:
        raise SystemExit(f"engine log-probs differ from Megatron's by {err:.2e} after the sync: the sync is broken")
    m = runs[len(runs) // 2]
    sync_s, gather_s, engine_s = (m[f"weight_sync/{k}seconds"] for k in ("", "gather_", "engine_"))
    nbytes, floor = m["weight_sync/bytes"], statistics.median(floors)
    disk_dir = Path(args.disk_dir) if args.disk_dir else Path(tempfile.mkdtemp(dir=ROOT, prefix=".bench_ws_"))
    try:
        disk = _disk_write(named, disk_dir, args.repeats)
    finally:
        if not args.disk_dir:
            disk_dir.rmdir()
    print(f"bytes pushed per sync       {int(nbytes)} ({nbytes / 1e6:.0f} MB)")
    print(f"sync (median of {args.repeats})          {sync_s:.3f} s  (gather {gather_s:.3f} s, engine {engine_s:.3f} s)"
          f"  {nbytes / 1e6 / sync_s:.0f} MB/s  (runs: {_fmt(r['weight_sync/seconds'] for r in runs)})")
    print(f"floor: engine reload_weights {floor:.3f} s  (runs: {_fmt(floors)})")
    print(f"disk: safetensors write+fsync {disk:.3f} s")
    print(f"engine log-probs vs Megatron after sync: max |delta| {err:.1e}")
    best = runs[0]["weight_sync/seconds"] / min(floors)
    print(f"sync/floor ratio {sync_s / floor:.2f}  (goal <= 1.5; medians; fastest sync / fastest floor: {best:.2f})")


def _worker(rank: int, world: int, port: int, args, tmp: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    _install_shim()
    from megatron_meml.distributed import destroy_distributed

    _rank_main(rank, args, Path(tmp))
    destroy_distributed()


def main(argv=None) -> None:
    import torch.multiprocessing as mp

    args = _args(argv)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="bench_ws_") as tmp:
        mp.start_processes(_worker, args=(2, port, args, tmp), nprocs=2, start_method="spawn")


if __name__ == "__main__":
    main()
