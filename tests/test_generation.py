"""The fast evaluation path against the plain one: greedy() against transformers' generate, prefill()
against one full forward, the teacher-forced scores against a naive log-softmax."""
import pytest
import torch

import common
from evaluation import model as evaluation_model
from evaluation.model import Target, greedy, length_batches, prefill, reference_greedy, shared_prefix

PROMPTS = ["How do vaccines work?", "Write a haiku about rain.", "What is 17 * 23? Show the steps, please.",
           "Name three rivers in Africa and say which is the longest one of them.", "Hi"]


def chat(tok, users):
    return [common.chat_prompt(tok, u) for u in users]


@pytest.fixture(scope="module")
def lively_dir(tok, tmp_path_factory):
    """A tiny random Llama whose greedy answers vary from prompt to prompt (initial weights of scale 0.2;
    at 0.02 every answer is the same invisible token)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      pad_token_id=tok.pad_token_id, initializer_range=0.2)
    path = tmp_path_factory.mktemp("lively")
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_shared_prefix_and_length_batches():
    assert shared_prefix([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]], most=5) == 2
    assert shared_prefix([[1, 2, 3], [1, 2, 3]], most=2) == 2  # capped: each row keeps a token of its own
    assert shared_prefix([[7, 1], [8, 1]], most=1) == 0
    assert length_batches([5, 1, 4, 2, 3, 9], rows=2, tokens=100) == [[1, 3], [4, 2], [0, 5]]  # by length
    assert length_batches([5, 1, 4, 2, 3, 9], rows=9, tokens=10) == [[1, 3, 4], [2, 0], [5]]  # rows x longest


@pytest.mark.parametrize("pieces", [1024, 12])
def test_prefill_equals_one_full_forward(tok, lively_dir, monkeypatch, pieces):
    """Prefix once, rests left-padded (in one piece, or in several of similar length): each row's hidden
    states are those of its own sequence run alone, and the cache continues it exactly."""
    monkeypatch.setattr(evaluation_model, "PREFILL_TOKENS", pieces)
    lm = common.load_model(str(lively_dir)).eval()
    decoder = lm.get_decoder()
    seqs = [tok(t, add_special_tokens=False).input_ids for t in chat(tok, PROMPTS)]
    hidden, mask, position, cache = prefill(decoder, seqs, tok.pad_token_id, "cpu",
                                            most=min(map(len, seqs)) - 1)
    n = shared_prefix(seqs, 100)
    assert n > 10  # the system turn is shared
    with torch.no_grad():
        for row, s in enumerate(seqs):
            alone = decoder(input_ids=torch.tensor([s])).last_hidden_state[0]
            assert torch.allclose(hidden[row, -(len(s) - n):], alone[n:], atol=1e-5)
            assert position[row] == len(s)
        nxt = torch.tensor([[5]] * len(seqs))                            # one more token through the cache
        step = decoder(input_ids=nxt, attention_mask=torch.cat([mask, mask.new_ones(len(seqs), 1)], 1),
                       position_ids=position[:, None], cache=cache, use_cache=True).last_hidden_state
        for row, s in enumerate(seqs):
            alone = decoder(input_ids=torch.tensor([s + [5]])).last_hidden_state[0, -1]
            assert torch.allclose(step[row, -1], alone, atol=1e-5)


def test_greedy_equals_generate_on_the_tiny_model(tok, lively_dir):
    lm = common.load_model(str(lively_dir)).eval()
    texts = chat(tok, PROMPTS)
    fast = greedy(lm, tok, texts, 12, "cpu")
    assert fast == reference_greedy(lm, tok, texts, 12, "cpu")
    assert all(fast) and len(set(fast)) > 1


def test_a_finished_row_leaves_the_batch_without_changing_the_others(tok, lively_dir, monkeypatch):
    """Force an end-of-turn token on one row at its third step: its answer stops there, and every other
    row's answer is what it was (the cache rows that stay are the right ones)."""
    lm = common.load_model(str(lively_dir)).eval()
    texts = chat(tok, PROMPTS)
    free = greedy(lm, tok, texts, 10, "cpu")
    stop = tok.convert_tokens_to_ids("<|im_end|>")
    head, calls = lm.get_output_embeddings().weight, {"n": 0}
    real_argmax = torch.Tensor.argmax

    def rigged(t, *a, **k):  # the argmax of the third step, for row 1 only
        out = real_argmax(t, *a, **k)
        calls["n"] += 1
        if calls["n"] == 3 and t.shape == (len(texts), head.shape[0]):
            out = out.clone()
            out[1] = stop
        return out
    monkeypatch.setattr(torch.Tensor, "argmax", rigged)
    forced = greedy(lm, tok, texts, 10, "cpu")
    monkeypatch.undo()
    assert calls["n"] >= 10 and free[1].startswith(forced[1]) and len(forced[1]) < len(free[1])  # it stopped
    assert [a for i, a in enumerate(forced) if i != 1] == [a for i, a in enumerate(free) if i != 1]


def test_response_logp_equals_a_naive_log_softmax(tok, lively_dir):
    target = Target(str(lively_dir), "cpu", batch_size=2)
    replies = ["Vaccines teach the immune system.", "Rain on the roof", "391", "The Nile.", "Hello!"]
    got = target.response_logp(PROMPTS, replies)
    lm = common.load_model(str(lively_dir)).eval()
    for user, reply, value in zip(PROMPTS, replies, got):
        p, c = common.encode(tok, user, reply)
        ids = torch.tensor([p + c[:-1]])
        with torch.no_grad():
            logp = torch.log_softmax(lm(input_ids=ids).logits[0].double(), -1)
        naive = sum(logp[len(p) - 1 + k, t].item() for k, t in enumerate(c[:-1])) / len(c[:-1])
        assert value == pytest.approx(naive, abs=1e-4)


@pytest.mark.slow
def test_greedy_equals_generate_on_the_shipped_start(tok):
    """The embedded model made refusing (assets/start): harmful and benign prompts, two wrappers."""
    from conftest import ROOT
    from tasks import safety
    lm = common.load_model(str(ROOT / "assets" / "start")).eval()
    harmful = safety.strongreject_prompts("small")[:3]
    users = [safety.apply_jailbreak(f, p) for f in ("plain", "happy_to_help") for p in harmful] + PROMPTS[:3]
    texts = chat(tok, users)
    assert greedy(lm, tok, texts, 40, "cpu") == reference_greedy(lm, tok, texts, 40, "cpu")
