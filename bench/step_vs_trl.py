"""One RL step of megatron_meml vs Hugging Face TRL's GRPOTrainer, side by side in one run, at 1 thread.

Sides (run one after another, never concurrently, each in its own subprocess, OMP_NUM_THREADS=1):
  trl    ../shared/anchors/trl_grpo_cpu.py --mode hf (TRL 1.16.0 GRPOTrainer, HF generate): a tiny random Qwen2
         (hidden 128, 4 layers, 4 heads x 32, 2 KV heads, ffn 256, vocab 64, untied), 8 prompts x 8 samples x 16
         new tokens, loss_type dapo, AdamW. Runs from its own venv (TRL pins another transformers than ours),
         created on first use under --cache (default ~/.cache/megatron-meml/trl-anchor).
  grpo   this project in plain GRPO mode (algo.num_experts=1, algo.mutual_learning=false,
         hard_examples.enabled=false, algo.advantage=grpo, algo.policy_loss=clipped) on the same shape and
         workload: 8 problems x 8 samples x 16 new tokens, micro-batch 64 (TRL's per-device batch), lr 1e-5.
  meml   the full MEML step (3 experts, mutual learning, hard examples with capacity 16 as in the embedded
         default), same objective, at 3 problems x 3 experts x 7 samples = 63 completions (64 is not a multiple
         of 3 experts); micro-batch 40, so 63 GRPO rows + 16 hard-example SFT rows fill two micro-batches
         (each run at its own length).
Our sides go through the real code path: ``stages.context.setup_run`` (Megatron DDP + distributed optimizer,
threads), ``RunContext.with_rollout`` (vLLM in-process engine started from the trainer's weights), then
``stages.riel.riel_step`` (sample, rollout, reward, advantages, mutual pairs, hard examples, train, weight sync),
timed like ``stages.riel.run_train`` times ``timing/step``.

Data: synthetic 2-digit additions (data.synthetic_levels=[2]) whose prompt is BOS + "12+34" + the expert prompt
"=" (experts.plain_template="{question}{system}", no format instruction), about the anchor's "12+34=" length.
The model is random on both sides, so rewards are almost always 0: advantages are 0 (the backward still runs),
and the MEML side forms no mutual-learning pairs (they need a correct answer) while its hard-example store fills
and replays every step.

Each side: median over --steps measured steps after --warmup warm-up steps; all of it is repeated --repeats
times, the sides in turn. The machine may be shared: the table shows every repeat's median, and the ratios are
printed both from the median over repeats and from each side's best (least contended) repeat. Ends with
``step ratio N`` (ours plain GRPO / TRL) and ``meml step ratio N`` (full MEML / TRL), from the best repeats.

Usage:  .venv/bin/python bench/step_vs_trl.py [--repeats 3] [--steps 20] [--warmup 2] [--json-out FILE]

Real-model mode (``--real .models/SmolLM2-135M-Instruct``), at 2 threads on both sides:
  trl     bench/trl_real_grpo.py in the TRL venv: TRL 1.16.0 GRPOTrainer, HF generate, in the precision of our side
          (bf16=True where the recipe's model.dtype: auto picks bf16, i.e. on a GPU; fp32 on every CPU),
          8 prompts x 8 generations x 64 new tokens, T=0.7, lr 1e-5, reward "The answer is X" = gold.
  grpo    recipes/smollm2-wordmath.yaml in plain GRPO mode (one expert, no mutual learning, no hard examples,
          std-normalised advantages, clipped ratio), 8 problems x 8 samples x 64 new tokens, T=0.7: vLLM rollout,
          trainer in the recipe's dtype (auto) and layout (packed micro-batches of 2,048 tokens whose rows share
          their prompts: train.share_prompts), weight sync.
          Rows at advantage 0 (groups whose 8 rewards are equal) stay out of the train batch, keeping their share
          of the normaliser (algo.skip_zero_advantage: the same step; TRL trains them).
  allrows as grpo with every row trained (algo.skip_zero_advantage=false).
  padded  as grpo with rows padded per micro-batch instead (train.max_tokens_per_micro_batch=0, no sharing).
  packed  as grpo without sharing prompts (one THD sequence per row).
  allpos  as padded with train.logits_at_scored_only=false (the output layer on every position, prompts included).
The prompts are the same text on both sides: wordmath level 3 ("one addition of two-digit numbers") with the
expert0 system prompt, chat-templated by our side and written to a JSONL the TRL side reads. Ends with
``real step ratio N`` (grpo / trl, best repeats) and, with the other sides, ``real padded step ratio N`` (padded /
trl), ``real shared/padded step ratio N`` (grpo / padded), ``real packed step ratio N`` (packed / trl) and ``real
scored-only/all-positions step ratio N`` (padded / allpos; below 1: the scored-only output layer is faster) and
``real skip-zero/all-rows step ratio N`` (grpo / allrows).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ANCHOR = ROOT.parent / "shared" / "anchors" / "trl_grpo_cpu.py"
DEFAULT_CACHE = Path.home() / ".cache" / "megatron-meml" / "trl-anchor"
TRL_PINS = ("torch==2.13.0+cpu", "trl==1.16.0")
PROMPTS = {"synth_direct": "=", "synth_steps": "==", "synth_columns": "==="}
"""Expert prompt files for the bench: short, so prompts are about as long as the anchor's."""


REAL_RECIPE = ROOT / "recipes" / "smollm2-wordmath.yaml"
REAL_THREADS = 2


def real_overrides(side: str, steps: int, out_dir: str, model: str) -> list[str]:
    """Overrides of our real-model sides on recipes/smollm2-wordmath.yaml."""
    common = [f"output_dir={out_dir}", f"run_name={side}", "seed=0", f"model.hf_path={model}",
              "data.synthetic_levels=[3]", "data.synthetic_weights=[1.0]", "algo.num_experts=1",
              "algo.mutual_learning=false", "hard_examples.enabled=false", "algo.advantage=grpo",
              "algo.policy_loss=clipped", "rollout.samples_per_expert=8", "train.problems_per_step=8",
              "rollout.max_new_tokens=64", "rollout.temperature=0.7", f"train.threads={REAL_THREADS}",
              f"train.steps={steps}", "logging.tensorboard=false", "logging.progress='off'", "eval.max_problems=0",
              "checkpoint.save_every=0"]
    padded = ["train.max_tokens_per_micro_batch=0", "train.share_prompts=false"]
    sides = {"grpo": [], "allrows": ["algo.skip_zero_advantage=false"], "padded": padded,
             "packed": ["train.share_prompts=false"],
             "allpos": padded + ["train.logits_at_scored_only=false"]}
    if side not in sides:
        raise ValueError(f"unknown real-model side '{side}'")
    return common + sides[side]


def write_real_prompts(model: str, path: Path, n: int = 512) -> None:
    """The real-model sides' prompts, chat-templated by our expert set, with their gold answers (JSONL)."""
    from megatron_meml.config import load_config
    from megatron_meml.stages.inputs import build_experts, load_data

    cfg = load_config(REAL_RECIPE, real_overrides("grpo", 1, "/tmp", model))
    experts = build_experts(cfg)
    train = load_data(cfg).train
    with path.open("w") as f:
        for problem in train[:n]:
            f.write(json.dumps({"prompt": experts.prompt_text(0, problem), "answer": problem.answer}) + "\n")


def side_overrides(side: str, steps: int, out_dir: str, prompt_dir: str) -> list[str]:
    """Config overrides of one of our sides (no recipe: the dataclass defaults plus these)."""
    common = [f"output_dir={out_dir}", f"run_name={side}", "seed=0",
              "model.vocab_size=64", "model.hidden_size=128", "model.num_layers=4", "model.num_attention_heads=4",
              "model.num_kv_heads=2", "model.head_dim=32", "model.ffn_hidden_size=256",
              "model.max_position_embeddings=128", "model.tie_embeddings=false",
              "data.source=synthetic", "data.synthetic_levels=[2]", "data.synthetic_weights=[1.0]",
              "data.synthetic_size=4096", f"experts.prompt_dir={prompt_dir}", "experts.format_instruction=''",
              "experts.plain_template='{question}{system}'", "rollout.max_new_tokens=16", "rollout.temperature=1.0",
              "rollout.kv_cache_gb=0.25", "algo.advantage=grpo", "algo.policy_loss=clipped", "train.lr=1e-5",
              # the random model's rewards are all 0, so leaving zero-advantage rows out would leave no train
              # phase to time: the toy sides train every row, as TRL does
              "algo.skip_zero_advantage=false",
              "train.threads=1", f"train.steps={steps}", "logging.tensorboard=false", "logging.progress='off'",
              "eval.max_problems=0", "checkpoint.save_every=0"]
    if side == "grpo":
        return common + ["algo.num_experts=1", "algo.mutual_learning=false", "hard_examples.enabled=false",
                         "rollout.samples_per_expert=8", "train.problems_per_step=8", "train.micro_batch_size=64"]
    if side == "meml":
        return common + ["algo.num_experts=3", "algo.mutual_learning=true", "hard_examples.enabled=true",
                         "hard_examples.capacity=16", "rollout.samples_per_expert=7", "train.problems_per_step=3",
                         "train.micro_batch_size=40"]
    raise ValueError(f"unknown side '{side}'")


# ------------------------------------------------------------------------------------------------- our side (child)
def run_ours(side: str, steps: int, warmup: int, json_out: str, real: str = "") -> None:
    """Child process: set up a run through the project's code path and time ``riel_step``."""
    import torch

    from megatron_meml.config import load_config
    from megatron_meml.data.sampler import ProblemSampler
    from megatron_meml.hard_examples.store import HardExampleStore
    from megatron_meml.model.dtype import for_this_machine
    from megatron_meml.stages.context import setup_run
    from megatron_meml.stages.riel import RielState, riel_step

    work = Path(tempfile.mkdtemp(prefix=f"step_vs_trl_{side}_"))
    for eid, text in PROMPTS.items():
        (work / f"{eid}.txt").write_text(text + "\n")
    if real:  # the recipe's model.dtype: auto, made concrete as `meml train` does
        cfg = for_this_machine(load_config(REAL_RECIPE, real_overrides(side, warmup + steps, str(work / "runs"),
                                                                       real)))
    else:
        cfg = load_config(None, side_overrides(side, warmup + steps, str(work / "runs"), str(work)))
    ctx = setup_run(cfg, "train")
    store = (HardExampleStore(cfg.hard_examples, ctx.paths.hard_examples, seed=cfg.seed)
             if cfg.hard_examples.enabled else None)
    rs = RielState(sampler=ProblemSampler(ctx.train_problems, seed=cfg.seed), store=store)
    ctx = ctx.with_rollout()
    prompt_lens = [len(ids) for _, _, ids in ctx.experts.expand(ctx.train_problems[:64])]
    records = []
    for step in range(1, warmup + steps + 1):
        t0 = time.perf_counter()
        m = riel_step(ctx, rs, step)
        m.update(ctx.timers.pop())
        m["timing/step"] = time.perf_counter() - t0
        records.append(m)
        print(f"[{side} step {step:3d}] {m['timing/step']:.3f}s  rollout {m['timing/rollout']:.3f}s  "
              f"train {m['timing/train']:.3f}s  sync {m['timing/weight_sync']:.3f}s  "
              f"rows {m['rollout/train_rows']:.0f}", flush=True)
    ctx.rollout.shutdown()
    meas = records[warmup:]
    keys = sorted({k for r in meas for k in r if k.startswith("timing/") or k.startswith("weight_sync/")})
    rec = {"side": side, "seconds_per_step": statistics.median(r["timing/step"] for r in meas),
           "seconds_per_step_mean": statistics.mean(r["timing/step"] for r in meas),
           "phase_median": {k: statistics.median(r.get(k, 0.0) for r in meas) for k in keys},
           "completions_per_step": statistics.mean(r["rollout/num_samples"] for r in meas),
           "completion_len_mean": statistics.mean(r["rollout/mean_length"] for r in meas),
           "prompt_len_mean": statistics.mean(prompt_lens),
           "train_rows_mean": statistics.mean(r["rollout/train_rows"] for r in meas),
           "mutual_pairs_mean": statistics.mean(r["rollout/mutual_pairs"] for r in meas),
           "reward_mean": statistics.mean(r["reward/mean"] for r in meas),
           "torch_threads": torch.get_num_threads(), "step_times": [r["timing/step"] for r in meas]}
    Path(json_out).write_text(json.dumps(rec, indent=1))


# ------------------------------------------------------------------------------------------------- TRL side
def trl_python(cache: Path) -> Path:
    """The anchor's venv (TRL 1.16.0 and its transformers), created on first use."""
    py = cache / "venv" / "bin" / "python"
    ok = py.is_file() and subprocess.run([str(py), "-c", "import trl; assert trl.__version__ == '1.16.0'"],
                                         capture_output=True).returncode == 0
    if ok:
        return py
    print(f"[setup] creating the TRL anchor venv in {cache / 'venv'} (a minute or two, once)", flush=True)
    cache.mkdir(parents=True, exist_ok=True)
    base = os.environ.get("TRL_BASE_PYTHON", "python3.11")
    subprocess.run([base, "-m", "venv", str(cache / "venv")], check=True)
    for pin in TRL_PINS:  # torch first, so pip keeps the CPU wheel when it resolves trl
        subprocess.run([str(py), "-m", "pip", "install", "-q", pin], check=True)
    return py


def run_child(cmd: list[str], log: Path, threads: int = 1) -> None:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    with log.open("w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log.read_text().splitlines()[-30:]
        raise SystemExit(f"{' '.join(cmd[:3])} ... failed (exit {proc.returncode}); log {log}:\n" + "\n".join(tail))


def run_trl(py: Path, cache: Path, steps: int, warmup: int, out: Path, anchor: Path) -> dict:
    js = out / "trl.json"
    run_child([str(py), str(anchor), "--mode", "hf", "--threads", "1", "--steps", str(steps), "--warmup",
               str(warmup), "--model-dir", str(cache / "tiny"), "--out-dir", str(out / "trl_out"),
               "--json-out", str(js)], out / "trl.log")
    rec = json.loads(js.read_text())
    rest = statistics.median(s - g for s, g in zip(rec["step_times"], rec["gen_times"]))
    return {"side": "trl", "seconds_per_step": rec["seconds_per_step_median"],
            "seconds_per_step_mean": rec["seconds_per_step_mean"],
            "phase_median": {"timing/rollout": rec["gen_seconds_per_step_median"], "timing/train": rest},
            "completions_per_step": 64, "completion_len_mean": rec["gen_tokens_per_step_mean"] / 64,
            "prompt_len_mean": anchor_prompt_len(), "train_rows_mean": 64, "mutual_pairs_mean": 0.0,
            "reward_mean": float("nan"), "torch_threads": rec["versions"].get("torch_threads"),
            "step_times": rec["step_times"]}


def run_trl_real(py: Path, model: str, steps: int, warmup: int, out: Path, prompts: Path, rep: int) -> dict:
    js = out / f"trl_real.{rep}.json"
    run_child([str(py), str(ROOT / "bench" / "trl_real_grpo.py"), "--model", model, "--prompts", str(prompts),
               "--out-dir", str(out / "trl_real_out"), "--json-out", str(js), "--steps", str(steps), "--warmup",
               str(warmup), "--threads", str(REAL_THREADS), "--bf16", str(int(real_bf16()))],
              out / f"trl_real.{rep}.log", threads=REAL_THREADS)
    rec = json.loads(js.read_text())
    rest = statistics.median(s - g for s, g in zip(rec["step_times"], rec["gen_times"]))
    return {"side": "trl", "seconds_per_step": rec["seconds_per_step_median"],
            "seconds_per_step_mean": statistics.mean(rec["step_times"]),
            "phase_median": {"timing/rollout": statistics.median(rec["gen_times"]), "timing/train": rest},
            "completions_per_step": 64, "completion_len_mean": statistics.mean(rec["gen_tokens"]) / 64,
            "prompt_len_mean": rec["prompt_len_mean"], "train_rows_mean": 64, "mutual_pairs_mean": 0.0,
            "reward_mean": statistics.mean(h["reward"] for h in rec["log"]) if rec["log"] else float("nan"),
            "torch_threads": rec["threads"], "step_times": rec["step_times"]}


def real_bf16() -> bool:
    """Whether the real-model sides run in bf16: what the recipe's ``model.dtype: auto`` picks on this machine
    (bf16 on a GPU, fp32 on a CPU), so TRL gets the same precision as ours."""
    from megatron_meml.model.dtype import auto_dtype

    return auto_dtype()[0] == "bf16"


def anchor_prompt_len() -> float:
    """Mean token count of the anchor's prompts "{a}+{b}=" (a char-level tokenizer, no BOS), same RNG draw."""
    import random

    rng = random.Random(0)
    lens = [len(f"{rng.randint(0, 99)}+{rng.randint(0, 99)}=") for _ in range(4096)]
    return sum(lens) / len(lens)


# ------------------------------------------------------------------------------------------------- report
def table(results: dict[str, list[dict]]) -> str:
    head = (f"{'side':<7} {'s/step (median per repeat)':<30} {'gen s':>7} {'train s':>8} {'sync s':>7} "
            f"{'compl':>6} {'prompt len':>10} {'compl len':>9} {'rows':>6}")
    lines = [head, "-" * len(head)]
    for side, recs in results.items():
        r0 = min(recs, key=lambda r: r["seconds_per_step"])  # phases of the best repeat
        ph = r0["phase_median"]
        times = ", ".join(f"{r['seconds_per_step']:.3f}" for r in recs)
        lines.append(f"{side:<7} {times:<30} {ph.get('timing/rollout', float('nan')):>7.3f} "
                     f"{ph.get('timing/train', float('nan')):>8.3f} {ph.get('timing/weight_sync', float('nan')):>7.3f} "
                     f"{r0['completions_per_step']:>6.0f} {r0['prompt_len_mean']:>10.2f} "
                     f"{r0['completion_len_mean']:>9.2f} {r0['train_rows_mean']:>6.1f}")
    return "\n".join(lines)


def phases(rec: dict) -> str:
    """Median seconds per phase (``timing/*`` of the loop; TRL: generation and the rest), largest first."""
    ph = {k: v for k, v in rec["phase_median"].items() if k.startswith("timing/") and k != "timing/step"}
    return "  ".join(f"{k.split('/', 1)[1]} {v:.4f}" for k, v in sorted(ph.items(), key=lambda kv: -kv[1]))


def run_ours_child(side: str, rep: int, a, out: Path, extra: list[str], threads: int = 1) -> dict:
    """One of our sides in its own subprocess; its record."""
    js = out / f"{side}.json"
    run_child([sys.executable, str(Path(__file__).resolve()), "--worker", side, *extra, "--steps", str(a.steps),
               "--warmup", str(a.warmup), "--worker-json", str(js)], out / f"{side}.{rep}.log", threads=threads)
    return json.loads(js.read_text())


def run_rounds(sides: list[str], repeats: int, one, headline) -> dict[str, list[dict]]:
    """``repeats`` rounds of the sides in turn (never concurrently): {side: [record per round]}, each with the load
    average after it; one progress line per run."""
    results: dict[str, list[dict]] = {s: [] for s in sides}
    for rep in range(repeats):
        for side in sides:
            t0 = time.perf_counter()
            rec = one(side, rep)
            rec["load_after"] = os.getloadavg()[0]
            results[side].append(rec)
            print(f"[repeat {rep + 1}/{repeats}] {side}: {headline(rec)}, {time.perf_counter() - t0:.0f} s wall; "
                  f"phases: {phases(rec)}", flush=True)
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20, help="measured steps per side")
    p.add_argument("--warmup", type=int, default=2, help="warm-up steps per side (not measured)")
    p.add_argument("--repeats", type=int, default=3, help="times the three sides run, in turn")
    p.add_argument("--sides", default="trl,grpo,meml", help="comma-separated subset of trl,grpo,meml")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="TRL venv and tiny HF model directory")
    p.add_argument("--anchor", type=Path, default=ANCHOR, help="the TRL anchor script")
    p.add_argument("--json-out", default="", help="write every record here")
    p.add_argument("--real", default="", metavar="HF_DIR", help="real-model mode on this HF model directory "
                   "(sides trl, grpo, allrows, padded, packed, allpos; 2 threads)")
    p.add_argument("--worker", choices=["grpo", "meml", "allrows", "padded", "packed", "allpos"],
                   help=argparse.SUPPRESS)
    p.add_argument("--worker-json", default="", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        import torch

        torch.set_num_threads(REAL_THREADS if a.real else 1)
        run_ours(a.worker, a.steps, a.warmup, a.worker_json, real=a.real)
        return
    if a.real:
        return main_real(a)
    sides = [s for s in a.sides.split(",") if s]
    if not a.anchor.is_file() and "trl" in sides:
        raise SystemExit(f"the TRL anchor script {a.anchor} does not exist; pass --anchor PATH")
    py = trl_python(a.cache) if "trl" in sides else None
    out = Path(tempfile.mkdtemp(prefix="step_vs_trl_"))
    load = os.getloadavg()
    print(f"[conditions] {os.cpu_count()} cores, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, "
          f"OMP_NUM_THREADS=1, train.threads=1, sides run one after another; logs in {out}", flush=True)

    def one(side: str, rep: int) -> dict:
        if side == "trl":
            return run_trl(py, a.cache, a.steps, a.warmup, out, a.anchor)
        return run_ours_child(side, rep, a, out, [])

    results = run_rounds(sides, a.repeats, one, lambda rec: f"{rec['seconds_per_step']:.4f} s/step (median)")
    print()
    print(table(results))
    med = {s: statistics.median(r["seconds_per_step"] for r in recs) for s, recs in results.items()}
    best = {s: min(r["seconds_per_step"] for r in recs) for s, recs in results.items()}
    if a.json_out:
        Path(a.json_out).write_text(json.dumps({"results": results, "median": med, "best": best}, indent=1))
    print("phase columns: medians of each side's best repeat; gen s: TRL's _generate (HF generate) / our rollout phase (vLLM); train s: TRL's step minus generation "
          "(reward, log-probs, backward, AdamW) / our train phase; sync s: our weight push into vLLM")
    loads = ", ".join(f"{r['side']} {r['load_after']:.1f}" for recs in results.values() for r in recs)
    print(f"[conditions] 1-min load average after each run: {loads}")
    for name, pick in (("median over repeats", med), ("best repeat (least contended)", best)):
        if "trl" in pick:
            parts = [f"{s} / trl {pick[s] / pick['trl']:.3f}" for s in ("grpo", "meml") if s in pick]
            print(f"[ratios, {name}] " + ", ".join(parts))
    # The final lines use each side's best repeat: on a shared machine the slower repeats measure the neighbours.
    if "trl" in best and "grpo" in best:
        print(f"step ratio {best['grpo'] / best['trl']:.3f}")
    if "trl" in best and "meml" in best:
        print(f"meml step ratio {best['meml'] / best['trl']:.3f}")


def main_real(a) -> None:
    """Real-model mode: trl, grpo and padded in turn, --repeats times; ratios from each side's best repeat."""
    sides = [s for s in a.sides.split(",") if s] if a.sides != "trl,grpo,meml" else ["trl", "grpo", "padded"]
    out = Path(tempfile.mkdtemp(prefix="step_vs_trl_real_"))
    prompts = out / "prompts.jsonl"
    write_real_prompts(a.real, prompts)
    py = trl_python(a.cache) if "trl" in sides else None
    load = os.getloadavg()
    print(f"[conditions] real model {a.real}, {os.cpu_count()} cores, load average {load[0]:.2f} {load[1]:.2f} "
          f"{load[2]:.2f}, {REAL_THREADS} threads per side, sides one after another; logs in {out}", flush=True)

    def one(side: str, rep: int) -> dict:
        if side == "trl":
            return run_trl_real(py, a.real, a.steps, a.warmup, out, prompts, rep)
        return run_ours_child(side, rep, a, out, ["--real", a.real], threads=REAL_THREADS)

    results = run_rounds(sides, a.repeats, one,
                         lambda rec: f"{rec['seconds_per_step']:.2f} s/step (median), reward {rec['reward_mean']:.3f}")
    print()
    print(table(results))
    best = {s: min(r["seconds_per_step"] for r in recs) for s, recs in results.items()}
    if a.json_out:
        Path(a.json_out).write_text(json.dumps({"results": results, "best": best}, indent=1))
    loads = ", ".join(f"{r['side']} {r['load_after']:.1f}" for recs in results.values() for r in recs)
    print(f"[conditions] 1-min load average after each run: {loads}")
    if "trl" in best and "grpo" in best:
        print(f"real step ratio {best['grpo'] / best['trl']:.3f}")
    if "trl" in best and "padded" in best:
        print(f"real padded step ratio {best['padded'] / best['trl']:.3f}")
    if "grpo" in best and "padded" in best:
        print(f"real shared/padded step ratio {best['grpo'] / best['padded']:.3f}")
    if "trl" in best and "packed" in best:
        print(f"real packed step ratio {best['packed'] / best['trl']:.3f}")
    if "grpo" in best and "allrows" in best:
        print(f"real skip-zero/all-rows step ratio {best['grpo'] / best['allrows']:.3f}")
    if "padded" in best and "allpos" in best:
        print(f"real scored-only/all-positions step ratio {best['padded'] / best['allpos']:.3f}")


if __name__ == "__main__":
    main()
