"""Shared fixtures: the real embedded tokenizer and a tiny random Llama built locally (no download)."""
import contextlib
import importlib
import io
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import common  # noqa: E402
import tasks  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: the embedded model, torchrun or run_all.sh "
                                       "(left out by ./test.sh --quick)")


def records(dataset, split="train"):
    """The records an objective script reads for --dataset with every other flag at its default."""
    p = common.parser("")
    tasks.add_args(p)
    return tasks.load(dataset, split, p.parse_args([]))


@pytest.fixture(scope="session")
def tok():
    return common.load_tokenizer(common.EMBEDDED_MODEL)


@pytest.fixture(scope="session")
def tiny_model_dir(tok, tmp_path_factory):
    """A 2-layer Llama with the real tokenizer and chat template, random weights, saved locally."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def run_script(script, *args):
    """Run an objective script's or evaluate.py's main() with these arguments, in this process (torch and
    transformers are imported once per test session, not once per run), and return what a subprocess
    would: returncode, stdout, stderr. A UserError prints its one line, as the interpreter does at exit;
    any other exception prints its traceback and returns 1."""
    module = importlib.import_module(Path(script).stem)
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            module.main([str(a) for a in args])
        except SystemExit as e:
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except Exception:  # noqa: BLE001 - a traceback is what the tests look for
            traceback.print_exc()
            code = 1
    return subprocess.CompletedProcess([script, *args], code, out.getvalue(), err.getvalue())
