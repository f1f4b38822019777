"""The log-prob gather of every objective file against a naive log_softmax + gather, and each other;
the prompt-once pair layout against separate sequences under every attention implementation offered."""
import importlib

import pytest
import torch

import common
from conftest import records
from common import IGNORE

# every module with the shared gather (kl_sft fuses it into its KL: checked below), evaluation's scoring too
SHARED = [m for m in common.objectives() + ["evaluation.model"]
          if hasattr(importlib.import_module(m), "token_logps")]


def naive_token_logps(logits, input_ids, targets):
    """(B, T, V) logits -> (B, T-1) log p(next input token) in float64, 0 where targets say 'not scored'.
    It reads the next token from input_ids, not from targets, so a wrong target would show."""
    logp = torch.log_softmax(logits.double(), -1)[:, :-1]
    out = logp.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return torch.where(targets[:, :-1] != IGNORE, out, torch.zeros_like(out))


@pytest.mark.parametrize("name", SHARED)
def test_token_logps_equals_naive(name):
    mod = importlib.import_module(name)
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(37, 16, generator=g), torch.randn(50, 16, generator=g)
    labels = torch.randint(0, 50, (37,), generator=g)
    naive = torch.log_softmax((hidden @ weight.T).double(), -1).gather(-1, labels[:, None]).squeeze(-1)
    for chunk in (5, 2048):  # chunking does not change the result
        assert torch.allclose(mod.token_logps(hidden, weight, labels, chunk=chunk).double(), naive, atol=1e-5)


def test_kl_sft_fused_gather_equals_the_shared_one():
    import kl_sft
    import sft
    g = torch.Generator().manual_seed(3)
    hidden, weight = torch.randn(23, 16, generator=g), torch.randn(50, 16, generator=g)
    labels = torch.randint(0, 50, (23,), generator=g)
    fused, _ = kl_sft.token_logps_and_kl(hidden, weight, hidden, weight, labels, chunk=7)
    assert torch.allclose(fused, sft.token_logps(hidden, weight, labels), atol=1e-5)


@pytest.fixture(scope="module")
def batch_and_model(tok, tiny_model_dir):
    lm = common.CausalLM(common.load_model(str(tiny_model_dir)))
    recs = records("arithmetic")[:3]
    pairs = ([common.encode(tok, r["prompt"], r["chosen"]) for r in recs]
             + [common.encode(tok, r["prompt"], r["rejected"]) for r in recs])
    return lm, common.collate(tok, pairs, 256, "cpu")


@pytest.mark.parametrize("name", SHARED)
def test_every_copy_agrees_with_naive_on_one_batch(batch_and_model, name):
    lm, b = batch_and_model
    mod = importlib.import_module(name)
    with torch.no_grad():
        hidden = lm(b["input_ids"], b["attention_mask"])
        logits = lm.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        naive = naive_token_logps(logits, b["input_ids"], b["targets"])
        scored = b["targets"][:, :-1] != IGNORE
        tokens, sums, counts = mod.response_logps(hidden, lm.output_weight(), b["targets"])
        assert torch.allclose(tokens.double(), naive[scored], atol=1e-4)
        assert torch.allclose(sums.double(), naive.sum(1), atol=1e-3)
        assert torch.equal(counts, scored.sum(1))


def test_kl_sft_on_one_batch(batch_and_model):
    import kl_sft
    lm, b = batch_and_model
    with torch.no_grad():
        hidden = lm(b["input_ids"], b["attention_mask"])
        naive = naive_token_logps(
            lm.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
            b["input_ids"], b["targets"])
        scored = b["targets"] != IGNORE
        h, w = hidden[scored], lm.output_weight()
        logps, kl = kl_sft.token_logps_and_kl(h, w, h, w, b["targets"][scored])
        assert torch.allclose(logps.double(), naive[b["targets"][:, :-1] != IGNORE], atol=1e-4)
        assert torch.allclose(kl, torch.zeros_like(kl), atol=1e-6)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("max_length", [256, 40])
def test_packed_pairs_equal_separate_sequences(tok, tiny_model_dir, max_length, attn):
    """dpo.py/orpo.py run prompt | chosen | rejected in one row; each response's log-probs must
    equal a naive log_softmax + gather over its own sequence prompt + response (cut to max_length),
    under every attention implementation the scripts accept (eager adds the mask to the scores, so a
    boolean mask there would mask nothing: the reason CausalLM makes it additive)."""
    import dpo
    import orpo
    lm = common.CausalLM(common.load_model(str(tiny_model_dir), attn_implementation=attn))
    assert lm.model.config._attn_implementation == attn
    recs = records("arithmetic")[:4]
    recs[0] = dict(recs[0], chosen=recs[0]["chosen"] * 2)  # unequal lengths: padding must not matter
    chosen = [common.encode(tok, r["prompt"], r["chosen"]) for r in recs]
    rejected = [common.encode(tok, r["prompt"], r["rejected"]) for r in recs]
    separate = common.collate(tok, chosen + rejected, max_length, "cpu")
    packed = common.pair_batch(tok, recs, max_length, "cpu")
    assert packed["n_scored"] == separate["n_scored"]
    assert packed["n_real"] < separate["n_real"]  # each prompt ran once
    with torch.no_grad():
        naive = naive_token_logps(
            lm.model(input_ids=separate["input_ids"], attention_mask=separate["attention_mask"]).logits,
            separate["input_ids"], separate["targets"])
        expected_sums, expected_counts = naive.sum(1), (separate["targets"] != IGNORE).sum(1)
        hidden = lm(packed["input_ids"], packed["attention_mask"], packed["position_ids"])
        w = lm.output_weight()
        for mod in (dpo, orpo):
            _, sums, counts = zip(*(mod.response_logps(hidden, w, packed[k])
                                    for k in ("chosen_targets", "rejected_targets")))
            assert torch.allclose(torch.cat(sums).double(), expected_sums, atol=1e-3)
            assert torch.equal(torch.cat(counts), expected_counts)


def test_a_boolean_mask_under_eager_would_be_wrong(tok, tiny_model_dir):
    """The mutation the additive mask guards against: hand eager attention the boolean mask itself and
    the packed log-probs move away from the separate sequences' (so the parity test above can fail)."""
    lm = common.CausalLM(common.load_model(str(tiny_model_dir), attn_implementation="eager"))
    recs = records("arithmetic")[:2]
    packed = common.pair_batch(tok, recs, 256, "cpu")
    decoder = lm.model.get_decoder()
    with torch.no_grad():
        right = lm(packed["input_ids"], packed["attention_mask"], packed["position_ids"])
        wrong = decoder(input_ids=packed["input_ids"], attention_mask=packed["attention_mask"],
                        position_ids=packed["position_ids"], use_cache=False).last_hidden_state
    assert (right - wrong).abs().max() > 1e-3
