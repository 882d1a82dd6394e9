"""The synthetic arithmetic family: hand-worked styles, fixed widths, exact level mixture, determinism."""
from __future__ import annotations

import random
from collections import Counter

import pytest

from megatron_meml.data import DataConfig, load_problems
from megatron_meml.data.charset import SPECIALS, char_tokenizer, synthetic_tokenizer
from megatron_meml.data.synthetic import ALPHABET, STYLES, level_counts, make_problem


class FixedRng(random.Random):
    """Returns the queued operands in order (to build hand-worked problems)."""

    def __init__(self, values):
        super().__init__(0)
        self.values = list(values)

    def randrange(self, *args):  # noqa: ARG002
        return self.values.pop(0)


def test_addition_hand_worked():
    p = make_problem("add", 4, FixedRng([123, 456]), "x")
    assert (p.question, p.answer, p.kind) == ("0123+0456", "00579", "math")
    sol = p.meta["solutions"]
    assert sol["direct"] == ""
    assert sol["steps"] == "0+0=00\n01+04=005\n012+045=0057\n0123+0456=00579"
    assert sol["columns"] == "3 6 9 0\n2 5 7 0\n1 4 5 0\n0 0 0 0"
    carry = make_problem("add", 2, FixedRng([58, 67]), "y")  # 58 + 67 = 125: carries in both columns
    assert carry.answer == "125"
    assert carry.meta["solutions"]["columns"] == "8 7 5 1\n5 6 2 1"
    assert carry.meta["solutions"]["steps"] == "5+6=11\n58+67=125"


def test_expression_and_multiplication_hand_worked():
    e = make_problem("expr", 2, FixedRng([99, 99, 99]), "e")
    assert (e.question, e.answer) == ("99+99+99", "297")
    assert e.meta["solutions"]["steps"] == "99+99=198\n198+99=297"
    assert e.meta["solutions"]["columns"] == "9 9 9 7 2\n9 9 9 9 2"
    m = make_problem("mul", 2, FixedRng([12, 34]), "m")
    assert (m.question, m.answer) == ("12*34", "0408")
    assert m.meta["solutions"]["steps"] == "12*4=0048\n12*30=0360"
    assert m.meta["solutions"]["columns"] == "12*4=0048 0048\n12*30=0360 0408"


@pytest.mark.parametrize("op", ["add", "mul", "expr"])
def test_fixed_widths_and_correct_answers(op):
    rng = random.Random(1)
    for level in range(1, 7):
        for _ in range(50):
            p = make_problem(op, level, rng, "p")
            sign = "*" if op == "mul" else "+"
            operands = p.question.split(sign)
            assert all(len(o) == level for o in operands)
            value = 1 if op == "mul" else 0
            for o in operands:
                value = value * int(o) if op == "mul" else value + int(o)
            assert int(p.answer) == value
            assert len(p.answer) == (2 * level if op == "mul" else level + 1)
            assert set(p.meta["solutions"]) == set(STYLES)
            assert all(set(t) <= set(ALPHABET) for t in [p.question, p.answer, *p.meta["solutions"].values()])


def test_columns_style_recomputes_the_answer():
    rng = random.Random(7)
    for _ in range(200):
        p = make_problem("add", rng.randint(1, 6), rng, "p")
        lines = [ln.split() for ln in p.meta["solutions"]["columns"].split("\n")]
        digits = "".join(ln[-2] for ln in reversed(lines))
        assert lines[-1][-1] + digits == p.answer


def test_level_counts_are_exact():
    assert level_counts([1.0, 1.0, 1.0], 10) == [4, 3, 3]
    assert level_counts([0.9, 0.06, 0.04], 100) == [90, 6, 4]
    assert sum(level_counts([3.0, 0.2, 0.1], 4096)) == 4096
    with pytest.raises(ValueError):
        level_counts([0.0], 5)


def test_generation_is_deterministic_and_mixes_levels():
    cfg = DataConfig(synthetic_levels=[2, 5, 6], synthetic_weights=[0.9, 0.05, 0.05], synthetic_size=400,
                     synthetic_ops=["add", "expr"])
    a = load_problems("synthetic", seed=11, config=cfg)
    assert a == load_problems("synthetic", seed=11, config=cfg)
    assert [p.question for p in a] != [p.question for p in load_problems("synthetic", seed=12, config=cfg)]
    assert [p.question for p in a] != [p.question for p in load_problems("synthetic", "x", "validation", seed=11,
                                                                         config=cfg)]
    assert Counter(p.meta["level"] for p in a) == {2: 360, 5: 20, 6: 20}
    assert {p.meta["op"] for p in a} == {"add", "expr"}
    assert len({p.id for p in a}) == 400 and a[0].id == "synthetic/train/0"


def test_char_tokenizer_round_trip_and_exact_vocab():
    tok = synthetic_tokenizer(["Hi #### x"])
    chars = sorted(set(ALPHABET + "Hi #### x"))
    assert list(tok.get_vocab()) != [] and len(tok) == len(SPECIALS) + len(chars)
    assert [tok.convert_ids_to_tokens(i) for i in range(4)] == list(SPECIALS)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    text = "0123+0456\n3 6 9 0\n#### 00579"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and tok.unk_token_id not in ids
    assert tok.decode(ids) == text
    assert tok.decode(ids + [tok.eos_token_id], skip_special_tokens=True) == text
    assert char_tokenizer(["ba", "c"]).get_vocab() == char_tokenizer(["cab"]).get_vocab()  # order-free ids
    assert tok("?", add_special_tokens=False)["input_ids"] == [tok.unk_token_id]
