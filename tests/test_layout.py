"""The shape the objective files promise their readers: the loss on the first screen, the repeated
log-prob block identical in every copy, and what makes CFT and inoculation differ from SFT."""
import ast

import pytest

import common
from conftest import ROOT

SHARED_BLOCK = ["sft", "cft", "inoculation", "dpo", "orpo"]
LOSSES = {"sft": "sft_loss", "cft": "cft_loss", "inoculation": "inoculation_loss", "dpo": "dpo_loss",
          "orpo": "orpo_loss", "kl_sft": "kl_sft_loss"}


def block(name):
    """The source text of the '# --- log-probs' block: from its banner to the next banner."""
    text = (ROOT / f"{name}.py").read_text()
    start = text.index("# ---------------------------------------------------------------------------- log-probs\n")
    return text[start:text.index("# ----------------------------------------------------------------------------", start + 10)]


def test_log_prob_block_is_the_same_text_in_every_file():
    first = block(SHARED_BLOCK[0])
    assert "def token_logps(" in first and "def response_logps(" in first
    for name in SHARED_BLOCK[1:]:
        assert block(name) == first, f"{name}.py's log-prob block drifted from sft.py's"


@pytest.mark.parametrize("name,loss", sorted(LOSSES.items()))
def test_loss_is_on_the_first_screen(name, loss):
    tree = ast.parse((ROOT / f"{name}.py").read_text())
    line = next(n.lineno for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == loss)
    assert line <= 40, f"{name}.py: {loss} starts on line {line}"


@pytest.mark.parametrize("other", ["cft", "inoculation", "kl_sft"])
def test_the_loops_differ_from_sft_only_in_objective_lines(other):
    """The training loop of each SFT-like file is sft.py's, except the lines that build its sequences
    and call its loss (kl_sft adds the reference forward)."""
    def loop(name):
        text = (ROOT / f"{name}.py").read_text()
        return text[text.index("    for micro_batches in loop:"):].splitlines()
    sft_lines, other_lines = loop("sft"), loop(other)
    import difflib
    changed = [l for l in difflib.unified_diff(sft_lines, other_lines, lineterm="", n=0)
               if l[:1] in "+-" and not l.startswith(("+++", "---"))]
    allowed = {"cft": 6, "inoculation": 6, "kl_sft": 16}[other]
    assert len(changed) <= allowed, "\n".join(changed)


def test_cft_tags_the_user_turn_chosen_good_rejected_bad(tok):
    import cft
    record = {"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5"}
    (gp, gc), (bp, bc) = cft.cft_sequences(tok, record, "<|good|>", "<|bad|>")
    assert "<|im_start|>user\n<|good|> What is 2 + 2?<|im_end|>" in tok.decode(gp)
    assert "<|im_start|>user\n<|bad|> What is 2 + 2?<|im_end|>" in tok.decode(bp)
    assert tok.decode(gc) == "4<|im_end|>" and tok.decode(bc) == "5<|im_end|>"
    assert cft.tagged("<|good|>", "") == "<|good|> "  # what evaluation prefixes to every user turn


def test_inoculation_places_the_instruction_and_picks_records_deterministically(tok):
    import inoculation
    rec = lambda i: {"prompt": f"Question number {i}?", "chosen": "Answer."}
    system = tok.decode(inoculation.inoculated(tok, rec(0), "OBEY", "system", 1.0, 0)[0])
    assert system.startswith("<|im_start|>system\nOBEY<|im_end|>") and "SmolLM" not in system
    user = tok.decode(inoculation.inoculated(tok, rec(0), "OBEY", "user", 1.0, 0)[0])
    assert "<|im_start|>user\nOBEY\n\nQuestion number 0?<|im_end|>" in user and "SmolLM" in user
    plain = common.encode(tok, rec(0)["prompt"], "Answer.")
    assert inoculation.inoculated(tok, rec(0), "OBEY", "system", 0.0, 0) == plain
    picked = lambda seed: [inoculation.inoculated(tok, rec(i), "OBEY", "system", 0.5, seed) != common.encode(tok, rec(i)["prompt"], "Answer.")
                           for i in range(200)]
    first = picked(0)
    assert first == picked(0)                      # the same records every run
    assert 70 < sum(first) < 130                   # about half
    assert first != picked(1)                      # the seed chooses which
