"""Chat formatting and completion masks, token by token, on the real SmolLM2 tokenizer."""
import types

import torch

import common
from common import IGNORE


def test_encode_boundary_bos_and_end_of_turn(tok):
    prompt, completion = common.encode(tok, "What is 2 + 3?", "2 + 3 = 5\n#### 5")
    gen_prompt = tok(common.chat_prompt(tok, "What is 2 + 3?"), add_special_tokens=False).input_ids
    assert prompt == gen_prompt  # training prompt == what generation sees: stable boundary
    # one BOS, not two
    assert prompt[0] == tok.convert_tokens_to_ids("<|im_start|>") and prompt[1] != prompt[0]
    assert sum(t == prompt[0] for t in prompt) == 3  # system, user, assistant headers
    assert tok.decode(prompt).endswith("<|im_start|>assistant\n")
    # EOS scored although pad == EOS
    assert completion[-1] == tok.convert_tokens_to_ids("<|im_end|>") == tok.pad_token_id
    assert tok.decode(completion) == "2 + 3 = 5\n#### 5<|im_end|>"
    assert "You are a helpful AI assistant" in tok.decode(prompt)  # template's default system prompt kept


def test_encode_with_system_replaces_default(tok):
    prompt, _ = common.encode(tok, "hi", "hello", system="Be brief.")
    text = tok.decode(prompt)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n") and "SmolLM" not in text


def test_collate_masks_token_by_token(tok):
    a = common.encode(tok, "Short?", "Yes.")
    b = common.encode(tok, "A much longer question about apples and pears?", "No, it is not.")
    batch = common.collate(tok, [a, b], max_length=256, device="cpu")
    ids, att, tgt = batch["input_ids"], batch["attention_mask"], batch["targets"]
    for row, (p, c) in enumerate([a, b]):
        n = len(p) + len(c)
        assert ids[row, :n].tolist() == p + c
        assert att[row].tolist() == [1] * n + [0] * (ids.shape[1] - n)  # right padding
        # position t predicts token t + 1: the last prompt position predicts the first completion token,
        # the completion's own positions the rest; the last real position and padding predict nothing
        expected = [IGNORE] * (len(p) - 1) + c + [IGNORE] * (ids.shape[1] - n + 1)
        assert tgt[row].tolist() == expected
        scored = (tgt[row] != IGNORE).nonzero()[:, 0]
        assert torch.equal(tgt[row, scored], ids[row, scored + 1])
        assert ids[row, n:].eq(tok.pad_token_id).all()
    # the padded row's trailing pads are pad==EOS ids but are not scored; its real EOS is
    assert tgt[0, len(a[0]) + len(a[1]) - 2] == tok.pad_token_id
    assert batch["n_scored"] == len(a[1]) + len(b[1])


def test_collate_truncates_completion_but_keeps_a_scored_token(tok):
    p, c = common.encode(tok, "Question?", "word " * 100)
    batch = common.collate(tok, [(p, c)], max_length=len(p) + 5, device="cpu")
    assert batch["input_ids"].shape[1] == len(p) + 5 and (batch["targets"] != IGNORE).sum() == 5
    batch = common.collate(tok, [(p, c)], max_length=len(p) - 3, device="cpu")
    assert (batch["targets"] != IGNORE).sum() == 1


def test_collate_pairs_layout_mask_and_targets_token_by_token(tok):
    """prompt | chosen | rejected: positions restart for rejected, rejected never sees chosen,
    the last prompt position predicts the first token of both responses."""
    P = 99  # a padding id that is not a token of the rows
    tok = types.SimpleNamespace(pad_token_id=P)
    b = common.collate_pairs(tok, [([1, 2, 3], [4, 5], [6, 7, 8]), ([1, 2], [9], [10])], max_length=256,
                             device="cpu")
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 9, 10, P, P, P, P]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3, 4, 5], [0, 1, 2, 2, 0, 0, 0, 0]]
    assert b["segment"].tolist() == [[0, 0, 0, 1, 1, 2, 2, 2], [0, 0, 1, 2, 3, 3, 3, 3]]
    I = IGNORE
    assert b["chosen_targets"].tolist() == [[I, I, 4, 5, I, I, I, I], [I, 9, I, I, I, I, I, I]]
    assert b["rejected_targets"].tolist() == [[I, I, 6, I, I, 7, 8, I], [I, 10, I, I, I, I, I, I]]
    assert (b["n_scored"], b["n_real"]) == (2 + 3 + 1 + 1, 8 + 4)
    mask = b["attention_mask"]
    assert mask.shape == (2, 1, 8, 8) and mask.dtype == torch.bool
    expected_row0 = [
        [1, 0, 0, 0, 0, 0, 0, 0],  # prompt: causal
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0],  # chosen: prompt + chosen so far
        [1, 1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0, 1, 0, 0],  # rejected: prompt + rejected so far, never chosen
        [1, 1, 1, 0, 0, 1, 1, 0],
        [1, 1, 1, 0, 0, 1, 1, 1],
    ]
    assert mask[0, 0].int().tolist() == expected_row0
    expected_row1 = [
        [1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0],
        [1, 1, 0, 1, 0, 0, 0, 0],
        [1, 1, 0, 0, 1, 0, 0, 0],  # padding queries: prompt and padding only (no empty row, no NaN)
        [1, 1, 0, 0, 1, 1, 0, 0],
        [1, 1, 0, 0, 1, 1, 1, 0],
        [1, 1, 0, 0, 1, 1, 1, 1],
    ]
    assert mask[1, 0].int().tolist() == expected_row1
    for row in range(2):  # no real query ever attends to a padding key
        real = b["segment"][row] != 3
        assert not mask[row, 0][real][:, ~real].any()


def test_collate_pairs_truncates_each_response_like_collate():
    tok = types.SimpleNamespace(pad_token_id=0)
    b = common.collate_pairs(tok, [([1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11, 12])], max_length=5, device="cpu")
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 5, 8, 9]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 4, 3, 4]]
    b = common.collate_pairs(tok, [([1, 2, 3], [4, 5], [6, 7])], max_length=2, device="cpu")
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 6]]  # a prompt too long still keeps one scored token each


def test_orpo_nll_targets_cover_prompt_only_when_asked():
    import orpo
    tok = types.SimpleNamespace(pad_token_id=0)
    b = common.collate_pairs(tok, [([1, 2, 3], [4, 5], [6])], max_length=256, device="cpu")
    I = IGNORE
    assert orpo.nll_targets(b, False).tolist() == [[I, I, 4, 5, I, I]]
    # as if scoring the whole chosen sequence
    assert orpo.nll_targets(b, True).tolist() == [[2, 3, 4, 5, I, I]]
    assert b["chosen_targets"].tolist() == [[I, I, 4, 5, I, I]]  # not modified in place
