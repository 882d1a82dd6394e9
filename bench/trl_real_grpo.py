"""TRL's GRPOTrainer on a real HF model, the TRL side of ``bench/step_vs_trl.py --real``.

Runs in the TRL venv (TRL 1.16.0 and its own transformers), never in the project's. Reads the prompts our side
wrote (already chat-templated text, so both sides see the same tokens) with their gold answers, trains with
``GRPOConfig`` as below and HF generate, and writes per-step wall times, generation times and token counts.

    GRPOConfig(per_device_train_batch_size=G * prompts, num_generations=G, max_completion_length=N,
               learning_rate=1e-5, bf16=(--bf16 1), use_cpu=True, temperature=T, beta=0.0, num_iterations=1,
               loss_type default, save_strategy='no', report_to='none', seed=0, use_vllm=False)

The reward is 1.0 when the last "The answer is X" in the completion names the gold number, else 0.0: the rule of
the project's ``the_answer_is`` verifier, written out here because this venv does not have the project installed.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import time

P = argparse.ArgumentParser(description=__doc__.splitlines()[0])
P.add_argument("--model", required=True, help="HF model directory")
P.add_argument("--prompts", required=True, help="JSONL of {prompt, answer} from our side")
P.add_argument("--out-dir", required=True)
P.add_argument("--json-out", required=True)
P.add_argument("--prompts-per-step", type=int, default=8)
P.add_argument("--generations", type=int, default=8)
P.add_argument("--max-new-tokens", type=int, default=64)
P.add_argument("--temperature", type=float, default=0.7)
P.add_argument("--steps", type=int, default=3)
P.add_argument("--warmup", type=int, default=1)
P.add_argument("--threads", type=int, default=2)
P.add_argument("--bf16", type=int, default=1, help="1: bf16 autocast (TRL's bf16=True), 0: fp32")
ARGS = P.parse_args()

import torch  # noqa: E402

torch.set_num_threads(ARGS.threads)
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

ANSWER = re.compile(r"answer is[:\s]*\$?\s*(-?[\d,]*\.?\d+)", re.IGNORECASE)


def answer_reward(prompts, completions, answer, **kw):  # noqa: ARG001 - TRL's reward signature
    out = []
    for text, gold in zip(completions, answer):
        found = ANSWER.findall(text if isinstance(text, str) else text[-1]["content"])
        try:
            out.append(1.0 if found and float(found[-1].replace(",", "")) == float(gold) else 0.0)
        except ValueError:
            out.append(0.0)
    return out


rows = [json.loads(x) for x in open(ARGS.prompts) if x.strip()]
dataset = Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in rows])
tokenizer = AutoTokenizer.from_pretrained(ARGS.model)
tokenizer.padding_side = "left"
model = AutoModelForCausalLM.from_pretrained(ARGS.model, dtype=torch.float32)
total = ARGS.warmup + ARGS.steps
config = GRPOConfig(output_dir=ARGS.out_dir, per_device_train_batch_size=ARGS.prompts_per_step * ARGS.generations,
                    gradient_accumulation_steps=1, num_generations=ARGS.generations,
                    max_completion_length=ARGS.max_new_tokens, max_steps=total, learning_rate=1e-5,
                    bf16=bool(ARGS.bf16), use_cpu=True, temperature=ARGS.temperature, beta=0.0, num_iterations=1,
                    logging_steps=1, save_strategy="no", report_to="none", seed=0, dataloader_num_workers=0,
                    disable_tqdm=True, use_vllm=False)
step_t, gen_t, gen_tokens, rewards = [], [], [], []


class Timer(TrainerCallback):
    def on_step_begin(self, args, state, control, **kw):  # noqa: ARG002
        self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):  # noqa: ARG002
        step_t.append(time.perf_counter() - self.t0)
        print(f"[trl step {len(step_t)}] {step_t[-1]:.2f}s gen {gen_t[-1] if gen_t else 0:.2f}s", flush=True)


trainer = GRPOTrainer(model=model, reward_funcs=answer_reward, args=config, train_dataset=dataset,
                      processing_class=tokenizer, callbacks=[Timer()])
inner = trainer._generate


def timed_generate(*a, **kw):
    t0 = time.perf_counter()
    out = inner(*a, **kw)
    gen_t.append(time.perf_counter() - t0)
    completion_ids = out[1]
    gen_tokens.append(sum(len(c) for c in completion_ids))
    return out


trainer._generate = timed_generate
prompt_lens = [len(tokenizer(r["prompt"], add_special_tokens=False)["input_ids"]) for r in rows[:64]]
trainer.train()
meas = slice(ARGS.warmup, None)
rec = {"seconds_per_step_median": statistics.median(step_t[meas]), "step_times": step_t[meas],
       "gen_times": gen_t[meas], "gen_tokens": gen_tokens[meas], "prompt_len_mean": statistics.mean(prompt_lens),
       "threads": torch.get_num_threads(), "log": [h for h in trainer.state.log_history if "reward" in h]}
json.dump(rec, open(ARGS.json_out, "w"), indent=1)
print(f"trl_real seconds_per_step={rec['seconds_per_step_median']:.3f}", flush=True)
