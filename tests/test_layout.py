"""The shape the objective files promise their readers: the loss on the first screen, the repeated
log-prob block identical in every copy, and what makes CFT and inoculation differ from SFT."""
import ast
import re

import pytest

import common
from conftest import ROOT

BANNER = "# ---------------------------------------------------------------------------- log-probs\n"
OBJECTIVES = common.objectives()
# the files that carry the shared block: every objective that gathers log-probs, and evaluation's scoring
SHARED = [ROOT / f"{o}.py" for o in OBJECTIVES if BANNER in (ROOT / f"{o}.py").read_text()]
SHARED.append(ROOT / "evaluation" / "model.py")


def block(path):
    """The source text of the '# --- log-probs' block: from its banner to the next banner."""
    text = path.read_text()
    start = text.index(BANNER)
    return text[start:text.index(
        "# ----------------------------------------------------------------------------", start + 10)]


def loss_function(name):
    """The first `*_loss` function an objective file defines (what objectives() looks for)."""
    tree = ast.parse((ROOT / f"{name}.py").read_text())
    return next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.endswith("_loss"))


def test_log_prob_block_is_the_same_text_in_every_file():
    assert len(SHARED) >= 6 and SHARED[0].stem == "cft"
    first = block(SHARED[0])
    assert "def token_logps(" in first and "def response_logps(" in first
    for path in SHARED[1:]:
        assert block(path) == first, f"{path.name}'s log-prob block drifted from {SHARED[0].name}'s"


@pytest.mark.parametrize("name", OBJECTIVES)
def test_loss_is_on_the_first_screen(name):
    loss = loss_function(name)
    assert loss.lineno <= 40, f"{name}.py: {loss.name} starts on line {loss.lineno}"


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
    picked = lambda seed: [inoculation.inoculated(tok, rec(i), "OBEY", "system", 0.5, seed)
                           != common.encode(tok, rec(i)["prompt"], "Answer.") for i in range(200)]
    first = picked(0)
    assert first == picked(0)                      # the same records every run
    assert 70 < sum(first) < 130                   # about half
    assert first != picked(1)                      # the seed chooses which


# ---------------------------------------------------------------------- the house: layers, lines, discovery

def project_modules():
    """{module name: path} of the project's own code (not tests)."""
    paths = ([p for p in ROOT.glob("*.py")] + list((ROOT / "tasks").glob("*.py"))
             + list((ROOT / "evaluation").glob("*.py")))
    name = lambda p: (p.parent.name + "." if p.parent != ROOT else "") + p.stem
    return {name(p).removesuffix(".__init__"): p for p in paths}


def imports(path, modules):
    """-> (project modules imported at the top of the file, project modules imported inside a
    function)."""
    tree = ast.parse(path.read_text())
    top, nested = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found = {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found = {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                     for a in node.names}
        else:
            continue
        (top if node in tree.body else nested).update(found & set(modules))
    return top, nested


def test_imports_point_down_and_never_hide_in_functions():
    """Objective scripts and evaluate.py on top; tasks/ and evaluation/ in the middle (evaluation never
    imports tasks); common.py at the bottom. No cycle, and no project import inside a function."""
    modules = project_modules()
    layer = lambda m: (0 if m == "common" else 1 if m.startswith("evaluation") else 2 if m.startswith("tasks")
                       else 3)
    graph = {}
    for m, path in modules.items():
        top, nested = imports(path, modules)
        assert not nested, \
            f"{path.name} imports {sorted(nested)} inside a function (an import circle hidden?)"
        graph[m] = top - {m}
        for dep in graph[m]:
            assert (layer(dep) < layer(m)
                    or (layer(dep) == layer(m) < 3 and dep.split(".")[0] == m.split(".")[0])), \
                f"{m} imports {dep}: arrows point down (objectives/evaluate -> tasks -> evaluation -> common)"
    seen, stack = set(), []

    def visit(m):
        assert m not in stack, f"import circle: {' -> '.join(stack[stack.index(m):] + [m])}"
        if m not in seen:
            stack.append(m)
            for dep in graph[m]:
                visit(dep)
            stack.pop()
            seen.add(m)
    for m in graph:
        visit(m)


def test_no_line_is_longer_than_110_characters():
    files = [p for p in ROOT.rglob("*.py")
             if not {".venv", ".cache", "runs"} & set(p.relative_to(ROOT).parts)]
    long = [f"{p.relative_to(ROOT)}:{i}" for p in files
            for i, line in enumerate(p.read_text().splitlines(), 1) if len(line) > 110]
    assert not long, long


def test_objectives_are_discovered_not_listed(tmp_path):
    """A forker's new objective file is found by its loss and main; other files are not."""
    (tmp_path / "simpo.py").write_text(
        (ROOT / "orpo.py").read_text().replace("def orpo_loss(", "def simpo_loss("))
    (tmp_path / "helper.py").write_text("def main():\n    pass\n")            # no loss: not an objective
    (tmp_path / "losses.py").write_text("def dpo_loss(x):\n    return x\n")   # no main: not an objective
    assert common.objectives(tmp_path) == ["simpo"]


def test_the_readme_table_lists_every_objective():
    """The one place a new objective is written down by hand: its row in the README's table."""
    rows = re.findall(r"^\| `(\w+)\.py` \|", (ROOT / "README.md").read_text(), re.M)
    assert sorted(rows) == OBJECTIVES
