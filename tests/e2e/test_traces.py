"""`meml traces` end to end on real vLLM (CPU): a teacher that is right some of the time, a run interrupted after
its first chunk (and torn mid-append) that resumes to the files of an uninterrupted run, and yield counts that
match an independent recount of every drawn sample.

The teacher is a tiny Llama whose next-token distribution is a hand-set bigram table (layers output zero, one-hot
embeddings, lm_head = log-probabilities), so what it writes after a prompt is known exactly: optional leading
spaces, then ``\\boxed{7}`` (p 0.5), ``\\boxed{3}`` (0.3) or ``\\boxed{q}`` (0.2), or nothing (0.1). Problems
whose answer is 7 or 3 get traces some of the time, problems whose answer is 5 never do."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_meml.config import load_config

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
EXPERTS = ["expert0", "expert1", "expert2"]
BIGRAM = {"\n": {" ": 0.2, "\\": 0.7, "<eos>": 0.1}, " ": {" ": 0.5, "\\": 0.5}, "\\": {"b": 1.0},
          "b": {"o": 1.0}, "o": {"x": 1.0}, "x": {"e": 1.0}, "e": {"d": 1.0}, "d": {"{": 1.0},
          "{": {"7": 0.5, "3": 0.3, "q": 0.2}, "7": {"}": 1.0}, "3": {"}": 1.0}, "q": {"}": 1.0}, "}": {"<eos>": 1.0}}
"""next character -> probability, after each character the teacher writes (the prompt ends with a newline)."""
N, M, CHUNK, PROBLEMS = 6, 2, 5, 12


def bigram_teacher(path: Path, texts: list[str], hidden: int = 128) -> None:
    """Save a Llama HF model + char tokenizer whose next-token distribution after character x is BIGRAM[x]."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_meml.data.charset import char_tokenizer

    tok = char_tokenizer(texts + ["".join(BIGRAM) + "".join("".join(v) for v in BIGRAM.values())])
    assert len(tok) <= hidden, len(tok)
    # Llama, not Qwen2: for model_type qwen2, transformers 5's AutoTokenizer swaps a saved char tokenizer for
    # Qwen2Tokenizer, which drops spaces and newlines.
    cfg = LlamaConfig(vocab_size=hidden, hidden_size=hidden, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=hidden // 32, num_key_value_heads=2, head_dim=32,
                      max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, torch_dtype="float32")
    model = LlamaForCausalLM(cfg)
    logp = torch.full((hidden, hidden), -50.0)  # [next token, current token]
    for cur, nxt in BIGRAM.items():
        for tok_text, p in nxt.items():
            row = tok.eos_token_id if tok_text == "<eos>" else tok.convert_tokens_to_ids(tok_text)
            logp[row, tok.convert_tokens_to_ids(cur)] = math.log(p)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.zero_()  # every layer adds nothing: the last hidden state is the current token's embedding
        model.model.embed_tokens.weight.copy_(torch.eye(hidden))
        model.model.norm.weight.fill_(1.0)  # RMSNorm(one-hot) = sqrt(hidden) * one-hot
        model.lm_head.weight.copy_(logp / math.sqrt(hidden))
    model.save_pretrained(str(path), safe_serialization=True)
    tok.save_pretrained(str(path))


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    from megatron_meml.experts.expert_set import load_experts, vocab_texts
    from megatron_meml.experts.config import ExpertsConfig

    root = tmp_path_factory.mktemp("traces")
    prompts = root / "prompts"
    prompts.mkdir()
    for i, eid in enumerate(EXPERTS):
        (prompts / f"{eid}.txt").write_text(f"You are Expert {i}.")
    pairs = [(3, 4), (1, 2), (2, 3)]  # answers 7, 3, 5
    rows = [{"id": f"p{i}", "question": f"What is {pairs[i % 3][0]}+{pairs[i % 3][1]} ({i})?",
             "answer": str(sum(pairs[i % 3]))} for i in range(PROBLEMS)]
    data = root / "problems.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ecfg = ExpertsConfig(ids=EXPERTS, prompt_dir=str(prompts), answer_format="boxed")
    bigram_teacher(root / "teacher", [r["question"] for r in rows] + vocab_texts(load_experts(ecfg, 3), ecfg))
    recipe = root / "recipe.yaml"
    recipe.write_text(f"""run_name: traces-test
output_dir: {root / 'runs'}
seed: 7
model: {{hf_path: {root / 'teacher'}, dtype: fp32}}
data: {{source: jsonl, path: {data}, val_fraction: 0.0}}
experts: {{ids: {EXPERTS}, prompt_dir: {prompts}, answer_format: boxed}}
algo: {{num_experts: 3}}
rollout: {{max_new_tokens: 12, max_prompt_tokens: 96, kv_cache_gb: 0.0625}}
traces: {{samples_per_expert: {N}, keep_per_problem: {M}, chunk_size: {CHUNK}, save_samples: true}}
logging: {{tensorboard: false}}
""")
    full = root / "full"
    proc = _meml(recipe, f"traces.out_dir={full}")
    return {"root": root, "recipe": recipe, "rows": rows, "full": full, "stdout": proc.stdout}


def _meml(recipe: Path, *overrides: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "megatron_meml.cli", "traces", str(recipe), *overrides], cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _files(out: Path) -> dict[str, bytes]:
    names = [f"{e}.jsonl" for e in EXPERTS[1:]] + [f"samples/{e}.jsonl" for e in EXPERTS[1:]]
    return {n: (out / n).read_bytes() for n in names}


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def _summary(out: Path) -> dict:
    s = json.loads((out / "summary.json").read_text())
    s.pop("files")  # absolute paths of this directory
    return s


def test_interrupted_run_resumes_to_the_uninterrupted_files(setup):
    from megatron_meml.stages.traces import TracesError, run_traces

    part = setup["root"] / "part"
    proc = _meml(setup["recipe"], f"traces.out_dir={part}", "traces.max_chunks=1")
    assert "stopped after chunk 1/3" in proc.stdout
    progress = json.loads((part / "progress.json").read_text())
    assert progress["chunks_done"] == 1 and not json.loads((part / "summary.json").read_text())["complete"]
    first = {f"p{i}" for i in range(CHUNK)}
    for e in EXPERTS[1:]:
        assert {r["id"] for r in _jsonl(part / "samples" / f"{e}.jsonl")} == first
        assert {r["id"] for r in _jsonl(part / f"{e}.jsonl")} <= first
    # a crash in the middle of chunk 2's append: rows after the committed size must not survive the resume
    with (part / "expert1.jsonl").open("a") as f:
        f.write('{"id": "p5", "response": "\\\\boxed{7}", "sample": 0}\n{"id": "p6", "resp')
    proc = _meml(setup["recipe"], f"traces.out_dir={part}")
    assert "continuing" in proc.stdout and "at chunk 1/3" in proc.stdout
    assert _files(part) == _files(setup["full"])
    assert _summary(part) == _summary(setup["full"])
    # a finished directory: the same summary again, no engine; other settings: refused, naming the setting
    cfg = load_config(setup["recipe"], [f"traces.out_dir={part}"])
    assert {k: v for k, v in run_traces(cfg).items() if k != "files"} == _summary(setup["full"])
    with pytest.raises(TracesError, match=r"other settings \(samples_per_expert: 6 -> 5\)"):
        run_traces(load_config(setup["recipe"], [f"traces.out_dir={part}", "traces.samples_per_expert=5"]))


def test_yield_counts_match_an_independent_recount(setup):
    answers = {r["id"]: r["answer"] for r in setup["rows"]}
    summary = json.loads((setup["full"] / "summary.json").read_text())
    assert summary["complete"] and summary["problems"] == PROBLEMS
    for e in EXPERTS[1:]:
        samples = _jsonl(setup["full"] / "samples" / f"{e}.jsonl")
        traces = _jsonl(setup["full"] / f"{e}.jsonl")
        assert len(samples) == PROBLEMS * N
        right = [s for s in samples if s["response"].strip() == f"\\boxed{{{answers[s['id']]}}}"]
        want_kept = []
        for pid in answers:  # the first M distinct correct responses the teacher finished, in draw order
            seen: list[str] = []
            for s in (s for s in right if s["id"] == pid and s["finish_reason"] == "stop"):
                if s["response"].rstrip() not in seen and len(seen) < M:
                    seen.append(s["response"].rstrip())
                    want_kept.append({"id": pid, "response": s["response"], "sample": s["sample"]})
        assert traces == want_kept
        got = summary["experts"][e]
        assert got["samples_drawn"] == len(samples) and got["problems"] == PROBLEMS
        assert got["correct"] == len(right) == got["statuses"]["correct"]
        assert got["traces_kept"] == len(traces) and got["problems_with_trace"] == len({t["id"] for t in traces})
        assert got["yield"] == pytest.approx(len(right) / len(samples))
        assert got["statuses"]["no_answer"] == sum(1 for s in samples if not re.search(r"\\boxed\{.\}", s["response"]))
        assert 0 < got["yield"] < 1 and got["dropped_duplicate"] > 0  # right some of the time; duplicates exist
        assert all(answers[t["id"]] in ("7", "3") for t in traces)  # the teacher never writes 5
        assert max(sum(1 for t in traces if t["id"] == pid) for pid in answers) == M  # the cap was reached
    assert "yield" in setup["stdout"] and "problems with a trace" in setup["stdout"]


def test_printed_overrides_feed_meml_sft(setup):
    from transformers import AutoTokenizer

    from megatron_meml.data.loaders import load_splits
    from megatron_meml.experts.expert_set import ExpertSet

    line = next(x for x in setup["stdout"].splitlines() if x.strip().startswith("meml sft "))
    overrides = line.split()[3:]
    assert line.split()[2] == str(setup["recipe"]) and len(overrides) == 2
    cfg = load_config(setup["recipe"], overrides)
    summary = json.loads((setup["full"] / "summary.json").read_text())
    experts = ExpertSet.from_config(cfg.experts, 3, AutoTokenizer.from_pretrained(cfg.model.hf_path))
    problems = load_splits(cfg.data, cfg.seed).train
    rows, reports = experts.mef_examples(problems)
    for r in reports:
        assert r.traces == summary["experts"][r.expert_id]["traces_kept"]
        assert r.matched == summary["experts"][r.expert_id]["problems_with_trace"]
    assert len(rows) == PROBLEMS + sum(r.traces for r in reports)  # expert0's gold rows + one per trace
