"""The log-prob gather of every objective file against a naive log_softmax + gather, and each other."""
import importlib

import pytest
import torch

import common
from common import IGNORE

OBJECTIVES = ["sft", "dpo", "orpo", "kl_sft", "cft", "inoculation"]


def naive_token_logps(logits, labels):
    """(B, T, V) logits, (B, T) labels -> (B, T-1) log p(next token), 0 where not scored. float64."""
    logp = torch.log_softmax(logits.double(), -1)[:, :-1]
    y = labels[:, 1:]
    out = logp.gather(-1, y.clamp(min=0)[..., None]).squeeze(-1)
    return torch.where(y != IGNORE, out, torch.zeros_like(out))


@pytest.mark.parametrize("name", OBJECTIVES)
def test_token_logps_equals_naive(name):
    mod = importlib.import_module(name)
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(37, 16, generator=g), torch.randn(50, 16, generator=g)
    labels = torch.randint(0, 50, (37,), generator=g)
    naive = torch.log_softmax((hidden @ weight.T).double(), -1).gather(-1, labels[:, None]).squeeze(-1)
    for chunk in (5, 2048):  # chunking does not change the result
        assert torch.allclose(mod.token_logps(hidden, weight, labels, chunk=chunk).double(), naive, atol=1e-5)


@pytest.fixture(scope="module")
def batch_and_model(tok, tiny_model_dir):
    lm = common.CausalLM(common.load_model(str(tiny_model_dir)))
    recs = common.load_records("arithmetic")[:3]
    pairs = [common.encode(tok, r["prompt"], r["chosen"]) for r in recs] + [common.encode(tok, r["prompt"], r["rejected"]) for r in recs]
    b = common.collate(tok, pairs, 256, "cpu")
    return lm, b


def test_all_copies_agree_with_naive_on_one_batch(batch_and_model):
    lm, b = batch_and_model
    with torch.no_grad():
        hidden = lm(b["input_ids"], b["attention_mask"])
        naive = naive_token_logps(lm.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"])
        w = lm.output_weight()
        scored = b["labels"][:, 1:] != IGNORE
        expected_tokens = naive[scored]
        expected_sums = naive.sum(1)
        import sft, dpo, orpo, kl_sft, cft, inoculation
        assert torch.allclose(sft.response_logps(hidden, w, b["labels"])[0].double(), expected_tokens, atol=1e-4)
        assert torch.allclose(cft.response_logps(hidden, w, b["labels"]).double(), expected_tokens, atol=1e-4)
        assert torch.allclose(inoculation.response_logps(hidden, w, b["labels"]).double(), expected_tokens, atol=1e-4)
        h = hidden[:, :-1][scored]
        logps, kl = kl_sft.token_logps_and_kl(h, w, h, w, b["labels"][:, 1:][scored])
        assert torch.allclose(logps.double(), expected_tokens, atol=1e-4)
        assert torch.allclose(kl, torch.zeros_like(kl), atol=1e-6)


@pytest.mark.parametrize("max_length", [256, 40])
def test_packed_pairs_equal_separate_sequences(tok, tiny_model_dir, max_length):
    """dpo.py/orpo.py run prompt | chosen | rejected in one row; each response's log-probs must
    equal a naive log_softmax + gather over its own sequence prompt + response (cut to max_length)."""
    lm = common.CausalLM(common.load_model(str(tiny_model_dir)))
    recs = common.load_records("arithmetic")[:4]
    recs[0] = dict(recs[0], chosen=recs[0]["chosen"] * 2)  # unequal lengths: padding must not matter
    import dpo, orpo
    chosen = [common.encode(tok, r["prompt"], r["chosen"]) for r in recs]
    rejected = [common.encode(tok, r["prompt"], r["rejected"]) for r in recs]
    separate = common.collate(tok, chosen + rejected, max_length, "cpu")
    packed = common.pair_batch(tok, recs, max_length, "cpu")
    assert packed["n_scored"] == separate["n_scored"]
    assert packed["n_real"] < separate["n_real"]  # each prompt ran once
    with torch.no_grad():
        naive = naive_token_logps(lm.model(input_ids=separate["input_ids"], attention_mask=separate["attention_mask"]).logits,
                                  separate["labels"])
        expected_sums, expected_counts = naive.sum(1), (separate["labels"][:, 1:] != IGNORE).sum(1)
        hidden = lm(packed["input_ids"], packed["attention_mask"], packed["position_ids"])
        w = lm.output_weight()
        got = torch.cat([dpo.sequence_logps(hidden, w, packed[k]) for k in ("chosen_targets", "rejected_targets")])
        assert torch.allclose(got.double(), expected_sums, atol=1e-3)
        sums, counts = zip(*(orpo.sequence_logps(hidden, w, packed[k]) for k in ("chosen_targets", "rejected_targets")))
        assert torch.allclose(torch.cat(sums).double(), expected_sums, atol=1e-3)
        assert torch.equal(torch.cat(counts), expected_counts)
