"""Metrics on hand-made cases: a scripted LM whose next-token logits we choose, so every expected number is
known exactly — summed vs length-normalised choice scores, greedy recall under teacher forcing, left padding,
log-loss, the choice-restricted loss, and the "only the generated continuation counts" rule."""
import math

import torch
from torch import nn

from c2i_fast.evaluate import Scorer, answer_in_continuation, better
from c2i_fast.search import spearman
from c2i_fast.tasks import Example


class CharTok:
    """One token per character ('a' = 1 … ), no special tokens; pad 0."""
    pad_token_id, eos_token_id = 0, None

    def __call__(self, text, add_special_tokens=True):
        return type("E", (), {"input_ids": [ord(c) - 96 if c != " " else 27 for c in text]})()

    def decode(self, ids, skip_special_tokens=True):
        return "".join(" " if i == 27 else chr(i + 96) for i in ids if i)


class ScriptedLM(nn.Module):
    """Next-token log-probs depend only on the current token: table[cur] → distribution over 28 tokens."""

    def __init__(self, table: dict[int, dict[int, float]]):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        logits = torch.full((28, 28), -30.0)
        for cur, dist in table.items():
            for nxt, p in dist.items():
                logits[cur, nxt] = math.log(p)
        self.table = logits

    def forward(self, input_ids, attention_mask=None, position_ids=None, logits_to_keep=0, use_cache=False):
        out = self.table[input_ids] + 0 * self.w
        if isinstance(logits_to_keep, torch.Tensor):      # the columns to keep (transformers' protocol)
            out = out[:, logits_to_keep]
        elif logits_to_keep:
            out = out[:, -logits_to_keep:]
        return type("O", (), {"logits": out})()


def tok(c):
    return 27 if c == " " else ord(c) - 96


def test_summed_vs_length_normalised_classification():
    # After "q", " a" has p=.4 and " b" p=.3 at the space; choice " ab" continues with b p=.9, choice " c" is 1
    # token. Sum favours the short choice, mean favours the long one.
    table = {tok("q"): {tok(" "): 1.0},
             tok(" "): {tok("a"): 0.45, tok("c"): 0.5, tok("b"): 0.05},
             tok("a"): {tok("b"): 0.9, tok("q"): 0.1}}
    ex = Example("e", "q", " ab", choices=[" ab", " c"], label=0)
    sc = Scorer(ScriptedLM(table), CharTok(), [ex], "classification", scoring="mean")
    r = sc.evaluate()
    lp_ab = math.log(1.0) + math.log(0.45) + math.log(0.9)     # " ", "a", "b"
    lp_c = math.log(1.0) + math.log(0.5)
    assert lp_c > lp_ab and lp_ab / 3 > lp_c / 2               # the case is built to split the two rules
    assert r["predictions_sum"] == [1] and r["accuracy_sum"] == 0.0    # summed: the shorter choice wins
    assert r["predictions_mean"] == [0] and r["accuracy_mean"] == 1.0  # normalised: the gold one
    assert r["accuracy"] == 1.0                                         # primary scoring = mean
    assert abs(r["log_loss"] - (-lp_ab / 3)) < 1e-5
    ce = -torch.log_softmax(torch.tensor([lp_ab / 3, lp_c / 2]), 0)[0]
    assert abs(r["choice_loss"] - float(ce)) < 1e-5


def test_recall_is_greedy_exact_match_and_left_padding_is_harmless():
    table = {tok("x"): {tok(" "): 1.0}, tok(" "): {tok("p"): 0.6, tok("r"): 0.4},
             tok("p"): {tok("a"): 0.7, tok("o"): 0.3}, tok("y"): {tok("x"): 1.0}}
    good = Example("g", "yx", " pa")          # greedy: " ", "p", "a" → correct
    bad = Example("b", "x", " po")            # "o" is not the argmax after "p" → wrong
    sc = Scorer(ScriptedLM(table), CharTok(), [good, bad], "recall")
    assert len(sc.batches) == 1                # the two rows share one left-padded batch
    r = sc.evaluate()
    assert r["correct"] == [True, False] and r["accuracy"] == 0.5
    want = (-(math.log(0.6) + math.log(0.7)) / 3 - (math.log(0.6) + math.log(0.3)) / 3) / 2
    assert abs(r["log_loss"] - want) < 1e-5


def test_generation_counts_the_continuation_only():
    assert answer_in_continuation(["Paris"], " paris, of course")
    assert not answer_in_continuation(["Paris"], " Berlin")       # even if the prompt mentioned Paris
    # A scripted model that would "generate" from a prompt containing the answer: the prompt is not scored.
    assert answer_in_continuation(["New York"], "new york city")
    assert not answer_in_continuation([""], "anything")


def test_better_breaks_ties_by_log_loss():
    assert better({"accuracy": 0.6, "log_loss": 9}, {"accuracy": 0.5, "log_loss": 1})
    assert better({"accuracy": 0.5, "log_loss": 1.0}, {"accuracy": 0.5, "log_loss": 1.1})
    assert not better({"accuracy": 0.5, "log_loss": 1.0}, {"accuracy": 0.5, "log_loss": 1.0})


def test_spearman():
    assert abs(spearman([1, 2, 3, 4], [10, 20, 30, 40]) - 1.0) < 1e-12
    assert abs(spearman([1, 2, 3, 4], [4, 3, 2, 1]) + 1.0) < 1e-12
    assert spearman([1, 2], [1, 2]) is None
