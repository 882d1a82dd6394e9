"""Expert set: prompt files, rendering (plain and chat template), SFT masks, gold responses, MEF joins."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_meml.data import DataConfig, DataError, load_problems
from megatron_meml.data.charset import char_tokenizer
from megatron_meml.experts.config import ExpertsConfig
from megatron_meml.experts.expert_set import (PACKAGE_PROMPT_DIR, ExpertSet, format_instruction, load_experts,
                                              load_teacher_traces, synthetic_expert_set, vocab_texts)
from megatron_meml.rewards.score import score_strict
from megatron_meml.types import ANSWER_FORMATS
from megatron_meml.types import Problem

REPO = Path(__file__).resolve().parents[2]
PAPER = ExpertsConfig(ids=["expert0", "expert1", "expert2"], answer_format="the_answer_is")
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def synth(level=2, op="add", size=3, seed=0):
    cfg = DataConfig(synthetic_levels=[level], synthetic_weights=[1.0], synthetic_ops=[op], synthetic_size=size)
    return load_problems("synthetic", seed=seed, config=cfg)


def test_packaged_prompts_exist_and_recipes_link_to_them():
    for eid in ["expert0", "expert1", "expert2", "synth_direct", "synth_steps", "synth_columns"]:
        assert (PACKAGE_PROMPT_DIR / f"{eid}.txt").read_text().strip()
        assert (REPO / "recipes/prompts/experts" / f"{eid}.txt").resolve() == (PACKAGE_PROMPT_DIR / f"{eid}.txt")
    assert all(len((PACKAGE_PROMPT_DIR / f"synth_{s}.txt").read_text()) <= 32 for s in ("direct", "steps", "columns"))
    experts = load_experts(PAPER, 3)
    assert [e.id for e in experts] == ["expert0", "expert1", "expert2"] and experts[1].prompt.startswith("You are Expert 1")
    assert [e.style for e in load_experts(ExpertsConfig(), 3)] == ["direct", "steps", "columns"]


def test_prompt_errors(tmp_path):
    with pytest.raises(ValueError, match="algo.num_experts=4"):
        load_experts(PAPER, 4)
    with pytest.raises(ValueError, match="no prompt file for expert 'expert0'"):
        load_experts(ExpertsConfig(ids=["expert0"], prompt_dir=str(tmp_path)), 1)
    (tmp_path / "e.txt").write_text("  \n")
    with pytest.raises(ValueError, match="is empty"):
        load_experts(ExpertsConfig(ids=["e"], prompt_dir=str(tmp_path)), 1)


@pytest.mark.parametrize("kwargs,field", [
    ({"ids": []}, "experts.ids"), ({"ids": ["a", "a"]}, "experts.ids"), ({"answer_format": "xml"}, "answer_format"),
    ({"chat_template": "jinja"}, "chat_template"), ({"teacher_traces": {"zz": "f.jsonl"}}, "teacher_traces"),
    ({"plain_template": "{system}"}, "plain_template"), ({"plain_template": "{system}{q"}, "plain_template"),
    ({"ids": ["e0", "e1"], "styles": {"e9": "r1"}}, "experts.styles names experts not in"),
    ({"ids": ["e0", "e1"], "styles": {"e1": "r1"}, "teacher_traces": {"e1": "t.jsonl"}}, "both experts.styles"),
])
def test_config_checks_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ExpertsConfig(**kwargs)


def test_plain_rendering_and_sft_mask_hand_worked():
    es = synthetic_expert_set(ExpertsConfig(), 3)
    tok = es.tokenizer
    p = Problem(id="x", question="12+34", answer="046", solution="1+3=04",
                meta={"solutions": {"direct": "", "steps": "1+3=04", "columns": "2 4 6 0\n1 3 4 0"}})
    assert es.prompt_text(0, p) == "Answer only. End with #### and the final answer.\n12+34\n"
    ids = es.prompt_ids(0, p)
    assert ids[0] == tok.bos_token_id and tok.decode(ids[1:]) == es.prompt_text(0, p)
    assert es.gold_response(0, p) == "#### 046"
    assert es.gold_response(1, p) == "1+3=04\n#### 046"
    assert es.gold_response(2, p) == "2 4 6 0\n1 3 4 0\n#### 046"
    # hard_examples.target=solution: the problem's own solution whatever the expert's style
    assert es.gold_response(0, p, own_style=False) == es.gold_response(2, p, own_style=False) == "1+3=04\n#### 046"
    ex = es.sft_example(0, p, "#### 046")
    P = len(ids)
    assert ex.prompt_len == P and ex.tokens[:P] == ids
    assert ex.tokens[P:] == tok("#### 046", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert len(ex.loss_mask) == len(ex.tokens) == P + 9
    # position t predicts token t+1: the last prompt position predicts the first response token
    assert ex.loss_mask == [0.0] * (P - 1) + [1.0] * 9 + [0.0]


def test_synthetic_vocab_covers_every_rendered_text_and_gold_scores_correct():
    for fmt in ANSWER_FORMATS:
        cfg = ExpertsConfig(answer_format=fmt)
        es = synthetic_expert_set(cfg, 3)
        unk = es.tokenizer.unk_token_id
        for op in ("add", "mul", "expr"):
            for p in synth(level=3, op=op, size=5):
                for e in range(3):
                    ex = es.sft_example(e, p, es.gold_response(e, p))
                    assert unk not in ex.tokens, (fmt, op, e)
                    assert score_strict(p, es.gold_response(e, p), fmt).status == "correct"
        assert set("".join(vocab_texts(es.experts, cfg))) <= set(es.tokenizer.get_vocab())


def test_chat_template_rendering():
    texts = ["<|im_start|><|im_end|>systemuserassistant\n", *vocab_texts(load_experts(ExpertsConfig(), 3),
                                                                          ExpertsConfig()), "0123456789+"]
    tok = char_tokenizer(texts)
    tok.chat_template = CHAT_TEMPLATE
    p = synth()[0]
    es = ExpertSet.from_config(ExpertsConfig(), 3, tok)
    assert es.use_chat_template
    system = "Steps, left to right. End with #### and the final answer."
    expected = (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{p.question}<|im_end|>\n"
                "<|im_start|>assistant\n")
    assert es.prompt_text(1, p) == expected
    assert es.prompt_ids(1, p) == tok(expected, add_special_tokens=False)["input_ids"]  # no BOS added
    forced_plain = ExpertSet.from_config(ExpertsConfig(chat_template="plain"), 3, tok)
    assert forced_plain.prompt_text(1, p) == f"{system}\n{p.question}\n"


def test_expand_is_problem_major():
    es = synthetic_expert_set(ExpertsConfig(), 2)
    problems = synth(size=2)
    rows = es.expand(problems)
    assert [(r[0].id, r[1]) for r in rows] == [(problems[0].id, 0), (problems[0].id, 1),
                                                (problems[1].id, 0), (problems[1].id, 1)]
    assert rows[3][2] == es.prompt_ids(1, problems[1])


def test_format_instructions_by_kind():
    assert format_instruction("hash", "math") == "End with #### and the final answer."
    assert format_instruction("boxed", "choice") == "Put the option letter in \\boxed{}."
    assert format_instruction("the_answer_is", "bool") == 'End with "The answer is X.", X being yes or no.'
    es = synthetic_expert_set(ExpertsConfig(format_instruction=""), 1)
    assert es.system_text(0, synth()[0]) == "Answer only."


def test_mef_joins_teacher_traces_by_id_with_a_report(tmp_path):
    problems = [Problem(id=f"q{i}", question=f"{i}+{i}", answer=str(2 * i), solution=f"{i}+{i}={2 * i}")
                for i in range(4)]
    traces = tmp_path / "expert1.jsonl"
    traces.write_text("".join(json.dumps(r) + "\n" for r in [
        {"id": "q0", "response": "t0"}, {"id": "q2", "response": "t2"}, {"id": "zz", "response": "tz"}]))
    cfg = ExpertsConfig(ids=["expert0", "expert1", "expert2"], answer_format="hash",
                        teacher_traces={"expert1": str(traces)})
    tok = char_tokenizer(["".join(vocab_texts(load_experts(cfg, 3), cfg)), "0123456789+=tz"])
    es = ExpertSet.from_config(cfg, 3, tok)
    rows, reports = es.mef_examples(problems)
    assert [(r.expert, r.problem_id) for r in rows] == [(0, "q0"), (0, "q1"), (0, "q2"), (0, "q3"),
                                                         (1, "q0"), (1, "q2")]
    assert tok.decode(rows[1].tokens[rows[1].prompt_len:], skip_special_tokens=True) == "1+1=2\n#### 2"
    assert tok.decode(rows[5].tokens[rows[5].prompt_len:], skip_special_tokens=True) == "t2"
    r1, r2 = reports
    assert (r1.expert_id, r1.matched, r1.missing_ids, r1.extra_ids) == ("expert1", 2, ["q1", "q3"], ["zz"])
    assert "2 problems without a trace" in r1.summary() and "1 traces for unknown ids" in r1.summary()
    assert (r2.expert_id, r2.file, r2.matched) == ("expert2", None, 0)


def test_teacher_trace_rows_are_validated(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"id": "a", "response": "x"}\n{"id": "b"}\n')
    with pytest.raises(DataError, match=r"line 2: missing field 'response'"):
        load_teacher_traces(path)
    assert load_teacher_traces(path, skip_bad_rows=True) == {"a": "x"}
    path.write_text('{"id": "a", "response": "x"}\n{"id": "a", "response": "y"}\n')
    with pytest.raises(DataError, match="line 2: field 'id': duplicate id 'a'"):
        load_teacher_traces(path)


def test_synthetic_vocabulary_does_not_depend_on_how_many_experts_are_active():
    """A 1-expert RL run from a K-expert MEF model (meml compare's DAPO-1exp) must tokenize expert0's prompt and the
    questions into the ids the model was trained on; before, the character vocabulary was built from the active
    experts only, so every id shifted and the run started from garbage (toy reward 0.002 instead of 0.11)."""
    cfg = ExpertsConfig()
    one, three = synthetic_expert_set(cfg, 1), synthetic_expert_set(cfg, 3)
    assert len(one.tokenizer) == len(three.tokenizer)
    text = one.experts[0].prompt + "12+34=46"
    assert one.tokenizer.encode(text) == three.tokenizer.encode(text)
    problem = Problem(id="p", question="12+34", answer="46")
    assert one.expand([problem])[0][2] == three.expand([problem])[0][2]


def test_styled_experts_learn_every_problem_in_their_own_style():
    """experts.styles: each expert's MEF rows are every training problem's gold work in its style (balanced), the
    answer line after it; a style the data does not have is a DataError naming the expert and the styles there."""
    from megatron_meml.data.wordmath import generate_problems
    from megatron_meml.errors import DataError

    problems = generate_problems([1, 5], [1.0, 1.0], 6, seed=0)
    cfg = ExpertsConfig(ids=["expert0", "expert1", "expert2"], answer_format="the_answer_is",
                        styles={"expert0": "plain", "expert1": "r1", "expert2": "plan"})
    tok = char_tokenizer(["".join(vocab_texts(load_experts(cfg, 3), cfg)),
                          "".join(t for p in problems for t in (p.question, *p.meta["solutions"].values()))])
    es = ExpertSet.from_config(cfg, 3, tok)
    assert [e.style for e in es.experts] == ["plain", "r1", "plan"]
    rows, reports = es.mef_examples(problems)
    assert reports == [] and [r.expert for r in rows] == [0] * 6 + [1] * 6 + [2] * 6
    for r in rows:
        p = next(q for q in problems if q.id == r.problem_id)
        text = tok.decode(r.tokens[r.prompt_len:], skip_special_tokens=True)
        style = es.experts[r.expert].style
        assert text == f"{p.meta['solutions'][style]}\nThe answer is {p.answer}."
    bad = ExpertsConfig(ids=["expert0", "expert1"], answer_format="the_answer_is", styles={"expert1": "haiku"})
    with pytest.raises(DataError, match="expert 'expert1' writes style 'haiku'.*'plain', 'plan', 'r1'"):
        ExpertSet.from_config(bad, 2, tok).mef_examples(problems)


def test_prompt_sets():
    """experts.prompt_set picks a packaged folder of prompt files; an unknown set names the ones there."""
    short = load_experts(ExpertsConfig(ids=["expert0", "expert1", "expert2"], prompt_set="short"), 3)
    long = load_experts(PAPER, 3)
    assert [e.prompt.split(".")[0] for e in short] == [e.prompt.split(",")[0].split(".")[0] for e in long]
    assert all(len(s.prompt) < len(x.prompt) for s, x in zip(short, long))
    with pytest.raises(ValueError, match=r"prompt_set: one of \['experts', 'short'\]"):
        load_experts(ExpertsConfig(ids=["expert0"], prompt_set="nope"), 1)
    with pytest.raises(ValueError, match="must name a packaged prompt folder"):
        ExpertsConfig(prompt_set="../x")
