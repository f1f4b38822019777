"""Shared fixtures: the real embedded tokenizer and a tiny random Llama built locally (no download)."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import common  # noqa: E402


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


def run_script(script, *args, timeout=600):
    """Run an objective/evaluation script as a subprocess from the repo root."""
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)
