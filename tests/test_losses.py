"""Each pure loss against values worked out by hand, plus gradient-level properties."""
import math

import pytest
import torch

import common
from conftest import records
import dpo
import kl_sft
import orpo
import sft
from common import IGNORE


def test_sft_loss_hand_value():
    loss, m = sft.sft_loss(torch.tensor([-1.0, -2.0, -3.0]), n_tokens=3)
    assert loss.item() == pytest.approx(2.0)
    loss, _ = sft.sft_loss(torch.tensor([-1.0, -2.0, -3.0]), n_tokens=6)  # a micro-batch's share of a step
    assert loss.item() == pytest.approx(1.0)


def _tiny_lm(tiny_model_dir, lora_r=0, need_reference=False):
    torch.manual_seed(0)
    return common.CausalLM(common.load_model(str(tiny_model_dir)), lora_r=lora_r,
                           need_reference=need_reference)


def test_grad_accumulation_k1_equals_k4(tok, tiny_model_dir):
    """Mean over all response tokens of the step, not a mean of micro-batch means."""
    recs = records("arithmetic")[:8]
    recs[0] = dict(recs[0], chosen=recs[0]["chosen"] * 3)  # unequal lengths make the two means differ
    pairs = [common.encode(tok, r["prompt"], r["chosen"]) for r in recs]

    def grads(k):
        lm = _tiny_lm(tiny_model_dir)
        batches = [common.collate(tok, pairs[i:i + 8 // k], 256, "cpu") for i in range(0, 8, 8 // k)]
        n = sum((b["targets"] != IGNORE).sum().item() for b in batches)
        for b in batches:
            logps, _, _ = sft.response_logps(lm(b["input_ids"], b["attention_mask"]), lm.output_weight(),
                                             b["targets"])
            sft.sft_loss(logps, n)[0].backward()
        return torch.cat([p.grad.flatten() for p in lm.trainable()])

    g1, g4 = grads(1), grads(4)
    assert torch.allclose(g1, g4, atol=1e-6, rtol=1e-4)
    assert g1.abs().sum() > 0


def test_dpo_is_ln2_when_policy_equals_reference():
    x = torch.tensor([-12.0, -3.5, -40.0])
    loss, m = dpo.dpo_loss(x, x - 1, x, x - 1, beta=0.1, n_pairs=3)
    assert loss.item() == pytest.approx(math.log(2))
    assert m["rewards/chosen"].item() == 0 and m["rewards/rejected"].item() == 0


def test_dpo_hand_worked_case_and_gradient_signs():
    pc = torch.tensor([-1.0, -2.0], requires_grad=True)
    pr = torch.tensor([-3.0, -1.0], requires_grad=True)
    loss, m = dpo.dpo_loss(pc, pr, torch.tensor([-2.0, -1.0]), torch.tensor([-2.0, -1.0]), beta=0.5,
                           n_pairs=2)
    # pair 1: margin 0.5*1 - 0.5*(-1) = 1 -> log(1+e^-1); pair 2: -0.5 - 0 -> log(1+e^0.5)
    expected = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(0.5))) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert m["rewards/accuracy"].item() == 0.5 and m["rewards/margin"].item() == pytest.approx(0.25)
    loss.backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()  # descent raises chosen, lowers rejected
    half, m_half = dpo.dpo_loss(pc[:1], pr[:1], torch.tensor([-2.0]), torch.tensor([-2.0]), beta=0.5,
                                n_pairs=2)
    assert half.item() == pytest.approx(math.log1p(math.exp(-1.0)) / 2)  # one micro-batch's share of the step
    assert m_half["rewards/accuracy"].item() == 0.5  # summed over the step's micro-batches: a step mean


def test_orpo_log_odds_ratio_zero_when_equal():
    a = torch.tensor([-0.7, -2.0])
    loss, m = orpo.orpo_loss(torch.tensor(1.5), a, a.clone(), lam=0.1, n_pairs=2)
    assert m["log_odds_ratio"].item() == pytest.approx(0.0, abs=1e-6)
    assert loss.item() == pytest.approx(1.5 + 0.1 * math.log(2), abs=1e-6)


def test_orpo_hand_worked_case():
    # P_w = 0.5 -> odds 1; P_l = 0.2 -> odds 0.25; log OR = ln 4; -logsigmoid(ln 4) = -ln(4/5)
    loss, m = orpo.orpo_loss(torch.tensor(1.0), torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.2)]),
                             lam=0.1, n_pairs=1)
    assert m["log_odds_ratio"].item() == pytest.approx(math.log(4), abs=1e-5)
    assert loss.item() == pytest.approx(1.0 + 0.1 * -math.log(0.8), abs=1e-6)


def test_orpo_finite_near_zero_and_log1mexp_accuracy():
    c = torch.tensor([-1e-9, -1e-4, 0.0], requires_grad=True)
    r = torch.tensor([-1e-12, -5.0, -1e-3], requires_grad=True)
    loss, _ = orpo.orpo_loss(torch.tensor(0.5), c, r, lam=1.0, n_pairs=3)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(c.grad).all() and torch.isfinite(r.grad).all()
    x = -torch.logspace(-6, 2, 200, dtype=torch.float64)
    exact = torch.log(1 - torch.exp(x))
    assert torch.allclose(orpo.log1mexp(x.float()).double(), exact, rtol=1e-5, atol=1e-6)


def test_kl_hand_values_both_directions():
    h = torch.tensor([[1.0, 0.0]])
    w = torch.tensor([[0.0, 0.0], [math.log(3), 0.0]])  # policy p = (1/4, 3/4)
    w_ref = torch.zeros(2, 2)  # reference q = (1/2, 1/2)
    y = torch.tensor([1])
    logp, kl = kl_sft.token_logps_and_kl(h, w, h, w_ref, y, "reverse")
    assert logp.item() == pytest.approx(math.log(0.75))
    assert kl.item() == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5), abs=1e-6)
    _, kl_f = kl_sft.token_logps_and_kl(h, w, h, w_ref, y, "forward")
    assert kl_f.item() == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(0.5 / 0.75), abs=1e-6)
    loss, m = kl_sft.kl_sft_loss(logp, kl, n_tokens=1, beta=2.0)
    assert loss.item() == pytest.approx(-math.log(0.75) + 2 * kl.item())


def test_kl_chunked_equals_unchunked():
    g = torch.Generator().manual_seed(1)
    h, hr = torch.randn(29, 8, generator=g), torch.randn(29, 8, generator=g)
    w, wr = torch.randn(40, 8, generator=g), torch.randn(40, 8, generator=g)
    y = torch.randint(0, 40, (29,), generator=g)
    for direction in ("reverse", "forward"):
        a = kl_sft.token_logps_and_kl(h, w, hr, wr, y, direction, chunk=4)
        b = kl_sft.token_logps_and_kl(h, w, hr, wr, y, direction, chunk=1024)
        assert torch.allclose(a[0], b[0]) and torch.allclose(a[1], b[1])
        assert (a[1] >= -1e-6).all()


@pytest.mark.parametrize("lora_r", [4, 0])
def test_kl_zero_at_start_positive_after_update_and_frozen_stays(tok, tiny_model_dir, lora_r):
    lm = _tiny_lm(tiny_model_dir, lora_r=lora_r, need_reference=True)
    recs = records("arithmetic")[:4]
    b = common.collate(tok, [common.encode(tok, r["prompt"], r["chosen"]) for r in recs], 256, "cpu")
    targets = b["targets"]
    scored = targets != IGNORE

    def kl_now():
        with torch.no_grad(), lm.reference():
            hr, wr = lm(b["input_ids"], b["attention_mask"])[scored], lm.output_weight().clone()
        h = lm(b["input_ids"], b["attention_mask"])[scored]
        return kl_sft.token_logps_and_kl(h, lm.output_weight(), hr, wr, targets[scored])

    frozen = {n: p.detach().clone() for n, p in lm.named_parameters() if not p.requires_grad}
    trainable = {n: p.detach().clone() for n, p in lm.named_parameters() if p.requires_grad}
    logps, kl = kl_now()
    assert kl.abs().max().item() < 1e-6  # policy == reference at step 0
    opt = torch.optim.AdamW(lm.trainable(), lr=1e-2)
    kl_sft.kl_sft_loss(logps, kl, scored.sum(), beta=0.1)[0].backward()
    opt.step()
    _, kl = kl_now()
    assert kl.mean().item() > 1e-6
    assert frozen and trainable
    for n, p in lm.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert any(not torch.equal(p, trainable[n]) for n, p in lm.named_parameters() if n in trainable)


def test_dpo_packed_gradient_equals_separate_sequences_gradient(tok, tiny_model_dir, monkeypatch):
    """The DPO gradient through one packed forward (prompt | chosen | rejected, collate_pairs) equals
    the gradient through chosen and rejected as separate padded sequences: the mask and positions
    make the packing exact, not an approximation.

    Checked in float64 to ~1e-15. transformers' LlamaRMSNorm computes in float32 whatever the input
    dtype; the packed prompt's gradient is summed before that float32 step, the separate copies'
    after it, which alone moves the gradient by ~1e-7 (relative). The test computes the norm in
    the input dtype so that only the packing is compared."""
    from transformers.models.llama import modeling_llama

    def rms_norm_in_input_dtype(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))
    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", rms_norm_in_input_dtype)
    recs = records("arithmetic")[:4]
    recs[0] = dict(recs[0], chosen=recs[0]["chosen"] * 2)  # unequal lengths: padding must not matter
    ctx = common.Ctx(torch.device("cpu"), torch.float32)

    def fresh():  # float64, so that a real difference is not hidden in float32 rounding
        lm = _tiny_lm(tiny_model_dir, lora_r=4).double()
        torch.manual_seed(1)
        for name, p in lm.named_parameters():  # LoRA B starts at 0 (policy == reference); move it
            if "lora_B" in name:
                p.data.normal_(0, 0.5)
        return lm

    lm = fresh()
    b = common.pair_batch(tok, recs, 256, "cpu")
    ref = dpo.reference_logps(lm, b, ctx)
    packed_loss, _ = dpo.dpo_loss(*dpo.pair_logps(lm, lm, b, ctx), *ref, 0.5, 4)
    packed_loss.backward()
    packed = torch.cat([p.grad.flatten() for p in lm.trainable()])

    lm = fresh()
    sep = common.collate(tok, [common.encode(tok, r["prompt"], r[k])
                               for k in ("chosen", "rejected") for r in recs], 256, "cpu")
    next_ids = sep["input_ids"][:, 1:]
    scored = sep["targets"][:, :-1] != IGNORE  # naive: every position predicts the next input token
    with torch.no_grad(), lm.reference():
        ref_h = lm(sep["input_ids"], sep["attention_mask"])[:, :-1]
        ref_t = (ref_h @ lm.output_weight().T).log_softmax(-1).gather(-1, next_ids[..., None]).squeeze(-1)
        ref_logps = (ref_t * scored).sum(1)
    hidden = lm(sep["input_ids"], sep["attention_mask"])
    logits = (hidden[:, :-1] @ lm.output_weight().T).log_softmax(-1)  # naive: all positions, full vocabulary
    token = logits.gather(-1, next_ids[..., None]).squeeze(-1)
    logps = (token * scored).sum(1)
    loss, _ = dpo.dpo_loss(logps[:4], logps[4:], ref_logps[:4], ref_logps[4:], 0.5, 4)
    loss.backward()
    whole = torch.cat([p.grad.flatten() for p in lm.trainable()])

    assert packed_loss.item() == pytest.approx(loss.item(), abs=1e-10)
    assert abs(loss.item() - math.log(2)) > 1e-3  # the policy really differs from the reference
    assert whole.abs().max() > 1e-3
    assert (packed - whole).norm() / whole.norm() < 1e-12
