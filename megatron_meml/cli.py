"""The ``meml`` command."""
from __future__ import annotations

import argparse
import logging
import sys

from megatron_meml.config import load_config, to_yaml
from megatron_meml.errors import UserError
from megatron_meml.experiments.defaults import DEFAULTS

# The commands' modules are imported when a command runs, not here: the stages and experiments pull in
# megatron-core, transformers and vLLM (seconds of start-up), which `meml config`, `meml report` and `--help` never
# need.

STAGES = {
    "sft": "stage 1 (MEF): SFT of every expert prompt on its gold / teacher answers",
    "train": "stage 2 (RIEL): RL with inter-expert mutual learning and hard-example replay",
    "eval": "greedy accuracy and pass@k per expert prompt on the held-out problems",
    "traces": "teacher traces for MEF: sample expert prompts from a teacher, keep the verified-correct answers",
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meml", description="MEML-GRPO on Megatron-Core")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("config", help="print the resolved config of a recipe with overrides")
    c.add_argument("recipe", nargs="?", default=None)
    c.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. algo.num_experts=3")
    pl = sub.add_parser("plan", help="check a recipe's parallel layout and estimate memory per GPU (no GPU needed)")
    pl.add_argument("recipe")
    pl.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. parallel.tp=4")
    pl.add_argument("--nodes", type=int, required=True, help="SLURM nodes")
    pl.add_argument("--gpus-per-node", type=int, required=True, help="GPUs per node")
    pl.add_argument("--gpu-mem-gb", type=float, default=80.0, help="usable memory per GPU in GiB (default 80)")
    for name, what in STAGES.items():
        st = sub.add_parser(name, help=what)
        st.add_argument("recipe")
        st.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.steps=10")
        if name == "eval":
            st.add_argument("--checkpoint", default=None, help="Megatron model directory (default: model.megatron_path)")
    dm = sub.add_parser("demo", help="an embedded CPU default end to end: (traces,) MEF SFT, RIEL, evaluation, report")
    main_default = next(iter(DEFAULTS))
    dm.add_argument("--default", default=main_default, choices=list(DEFAULTS),
                    help="; ".join(f"{k}: {v.what}" for k, v in DEFAULTS.items()) + f" (default: {main_default})")
    dm.add_argument("--recipe-dir", default=None, help="directory holding the default's recipe pair "
                                                        "(default: the packaged recipes)")
    dm.add_argument("overrides", nargs="*", help="overrides applied to both stages, e.g. output_dir=/tmp/runs")
    cp = sub.add_parser(
        "compare", help="the paper's main/ablation table on an embedded default (several seeds)",
        description="Runs MoE-SFT per seed and the RL rows from it, then tabulates each row's held-out test accuracy "
                    "under three read-outs (expert0, expert1, and best-on-dev: the expert best on the run's dev "
                    "problems, reported on the test problems; set data.dev_size=N to have dev problems, else the "
                    "expert of highest training reward stands in and the table marks it), with 95% intervals, and "
                    "each row's paired difference to MoE-SFT-GRPO per seed (bootstrap over problems) and pooled over "
                    "seeds (two-level bootstrap). Writes compare.md, compare.png (the pooled differences), "
                    "compare_rows.json (logged metrics) and compare_problems.json (per-problem correctness, from "
                    "which the intervals can be recomputed) to --out; finished runs there are reused and earlier "
                    "seeds gathered.")
    cp.add_argument("--default", default="toy", choices=sorted(DEFAULTS), help="which embedded default (toy)")
    cp.add_argument("--recipe-dir", default=None, help="directory holding the default's recipe pair")
    cp.add_argument("--seeds", default="1,2,3", help="comma-separated seeds (default 1,2,3)")
    cp.add_argument("--out", default=None, help="output directory (default <output_dir>/compare)")
    cp.add_argument("--variant", action="append", default=[], metavar="'NAME: key=value ...'",
                    help="an extra RL variant from MoE-SFT (repeatable)")
    cp.add_argument("--only", default=None, help="comma-separated built-in variants to run (MoE-SFT and the "
                                                 "--variant rows always run)")
    cp.add_argument("--keep-checkpoints", action="store_true", help="keep each finished run's resumable "
                                                                     "checkpoints (default: only its final model)")
    cp.add_argument("--resume", default=None, metavar="RECORD",
                    help="a compare_problems.json written by an earlier compare (its record: rows, per-problem data, "
                         "recipe stamp, overrides), e.g. one kept with the results: its rows join the tables and are "
                         "not run again, so a compare continues on another machine (same recipe files and overrides "
                         "only)")
    cp.add_argument("overrides", nargs="*", help="overrides applied to every run, e.g. train.steps=20")
    rp = sub.add_parser("report", help="plots and summary.md of a run directory (written to RUN_DIR/report/)")
    rp.add_argument("run_dir", metavar="RUN_DIR")
    ex = sub.add_parser("export", help="a run's model as a Hugging Face directory for serving (--fp8: modelopt FP8)")
    ex.add_argument("run_dir", metavar="RUN_DIR")
    ex.add_argument("--out", required=True, help="output directory (must be empty unless --overwrite)")
    ex.add_argument("--checkpoint", default=None, help="export RUN_DIR/checkpoints/<step_*|latest> or a "
                                                       "checkpoint path instead of RUN_DIR/final_model")
    ex.add_argument("--fp8", action="store_true", help="nvidia-modelopt post-training FP8 quantisation")
    ex.add_argument("--calib-samples", type=int, default=32, help="FP8 calibration sequences (default 32)")
    ex.add_argument("--overwrite", action="store_true", help="replace the contents of a non-empty --out")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse ``meml CMD ...`` with the command's options, positionals and ``key=value`` overrides in any order
    (``meml eval RECIPE --checkpoint DIR eval.max_problems=5`` as well as the other way round)."""
    parser = _parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if not argv or argv[0] not in sub.choices:
        return parser.parse_args(argv)  # prints the usage / the error for an unknown command
    args = sub.choices[argv[0]].parse_intermixed_args(argv[1:])
    args.cmd = argv[0]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return _run(args)
    except UserError as e:
        print(f"meml {args.cmd}: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.cmd == "plan":
        from megatron_meml.experiments.plan import run_plan

        return run_plan(args.recipe, args.overrides, args.nodes, args.gpus_per_node, args.gpu_mem_gb)
    if args.cmd == "report":
        return _report(args.run_dir)
    if args.cmd in STAGES:
        return _stage(args)
    if args.cmd == "compare":
        from megatron_meml.experiments.compare import run_compare

        return run_compare(args.recipe_dir, args.overrides, [int(x) for x in args.seeds.split(",")], args.out,
                           variants=args.variant, only=args.only.split(",") if args.only else None,
                           default=args.default, keep_checkpoints=args.keep_checkpoints, resume=args.resume)
    if args.cmd == "demo":
        from megatron_meml.experiments.demo import run_demo

        return run_demo(args.recipe_dir, args.overrides, default=args.default)
    if args.cmd == "export":
        from megatron_meml.stages.export import ExportConfig, run_export

        return run_export(ExportConfig(run_dir=args.run_dir, out=args.out, checkpoint=args.checkpoint, fp8=args.fp8,
                                       overwrite=args.overwrite, calib_samples=args.calib_samples))
    print(to_yaml(load_config(args.recipe, args.overrides)), end="")
    return 0


def _stage(args: argparse.Namespace) -> int:
    from megatron_meml.model.dtype import for_this_machine

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = for_this_machine(load_config(args.recipe, args.overrides))
    if args.cmd == "sft":
        from megatron_meml.stages.sft import run_sft

        print(f"meml sft: model written to {run_sft(cfg)}")
    elif args.cmd == "train":
        from megatron_meml.stages.riel import run_train

        print(f"meml train: model written to {run_train(cfg)}")
    elif args.cmd == "traces":
        from megatron_meml.stages.traces import run_traces

        run_traces(cfg, recipe=args.recipe)
    else:
        from megatron_meml.stages.evaluate import run_eval

        run_eval(cfg, args.checkpoint)
    return 0


def _report(run_dir: str) -> int:
    from megatron_meml.reporting.report import write_report

    paths = write_report(run_dir)
    print(f"meml report: wrote {len(paths)} files to {paths[-1].parent}")
    for p in paths:
        print(f"  {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
