"""A model under evaluation: loaded from a run directory (with the prompt decoration its run asks for),
a model directory, the embedded default or a hub id; greedy answers, next-token probabilities, and
teacher-forced log-likelihoods computed with the objective files' chunked gather."""
import collections
import contextlib
import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

import common
from common import IGNORE, UserError


# ---------------------------------------------------------------------------- log-probs
# The same block in every objective file that gathers log-probs (tests/test_layout.py compares the text).

Logps = collections.namedtuple("Logps", "tokens sums counts")


def token_logps(hidden, weight, labels, chunk=2048):
    """log p(label) for scored positions only: hidden (N, H), weight (V, H), labels (N,) -> (N,), fp32
    or wider. Gather minus logsumexp, `chunk` rows at a time: no (B, T, V) log-softmax is ever built."""
    out = []
    for h, y in zip(hidden.split(chunk), labels.split(chunk)):
        logits = (h @ weight.T).to(torch.promote_types(h.dtype, torch.float32))  # fp32 at least
        out.append(logits.gather(-1, y[:, None]).squeeze(-1) - logits.logsumexp(-1))
    return torch.cat(out)


def response_logps(hidden, weight, targets):
    """hidden (B, T, H); targets (B, T): the token each position predicts, IGNORE where none -> Logps:
    tokens (N,) the log-probs of the scored tokens, sums (B,) their sum per row, counts (B,) per row."""
    scored = targets != IGNORE
    tokens = token_logps(hidden[scored], weight, targets[scored])
    sums = tokens.new_zeros(len(targets)).index_add(0, scored.nonzero()[:, 0], tokens)
    return Logps(tokens, sums, scored.sum(1))


# ---------------------------------------------------------------------------- generation

def end_of_turn_ids(tok):
    ids = {tok.eos_token_id}
    for t in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>"):
        i = tok.convert_tokens_to_ids(t)
        if isinstance(i, int) and i != tok.unk_token_id and i is not None:
            ids.add(i)
    return sorted(i for i in ids if i is not None)


@torch.no_grad()
def greedy(model, tok, prompt_texts, max_new_tokens, device, autocast=contextlib.nullcontext()):
    """Greedy, batched, left-padded, KV cache. Prompt texts are already chat-formatted."""
    enc = [tok(t, add_special_tokens=False).input_ids for t in prompt_texts]
    width = max(map(len, enc))
    pad = tok.pad_token_id
    ids = torch.tensor([[pad] * (width - len(e)) + e for e in enc], device=device)
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in enc], device=device)
    with autocast:
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad, eos_token_id=end_of_turn_ids(tok))
    return [tok.decode(o[width:], skip_special_tokens=True).strip() for o in out]


# ---------------------------------------------------------------------------- the model under evaluation

class Target:
    """A model plus the prompt decoration its run asks for (config.json's eval_prompt)."""

    def __init__(self, name, device="auto", batch_size=16):
        self.name = name
        path = Path(name)
        is_run = (path / "run.json").exists()
        if not is_run and (path / "config.json").exists() and not any(path.glob("*.safetensors")):
            raise UserError(f"{name} has config.json but no run.json and no weights: "
                            "not a run directory or model")
        if not is_run and path.exists() and not path.is_dir():
            raise UserError(f"{name} is a file; pass a run directory, a model directory or a model id")
        config = json.loads((path / "config.json").read_text()) if is_run else {}
        self.eval_prompt = config.get("eval_prompt") or {"system": None, "prefix": ""}
        self.device = common.pick_device(device)
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda"
                         else contextlib.nullcontext())
        self.tok = common.load_tokenizer(name)
        self.lm = common.CausalLM(common.load_model(name)).to(self.device).eval()
        self.batch_size = batch_size
        self.gen_seconds, self.gen_count = 0.0, 0

    def user(self, text):
        return self.eval_prompt.get("prefix", "") + text

    def prompt(self, user):
        return common.chat_prompt(self.tok, self.user(user), self.eval_prompt.get("system"))

    def generate(self, users, max_new_tokens, desc):
        """Greedy answers, batched by sorted prompt length (less padding), in the input order."""
        texts = [self.prompt(u) for u in users]
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = [None] * len(texts)
        t0 = time.time()
        for s in tqdm(range(0, len(order), self.batch_size), desc=desc, leave=False, file=sys.stderr):
            idx = order[s:s + self.batch_size]
            answers = greedy(self.lm.model, self.tok, [texts[i] for i in idx], max_new_tokens, self.device,
                             self.autocast)
            for i, answer in zip(idx, answers):
                out[i] = answer
        self.gen_seconds += time.time() - t0
        self.gen_count += len(texts)
        return out

    @torch.no_grad()
    def next_token_probs(self, users, answer_sets):
        """For each prompt, the next-token probability of the first token of each answer string,
        tokenized in context: prompt_text + answer (leading whitespace dropped after the header)."""
        results = []
        for s in range(0, len(users), self.batch_size):
            texts = [self.prompt(u) for u in users[s:s + self.batch_size]]
            enc = [self.tok(t, add_special_tokens=False).input_ids for t in texts]
            width = max(map(len, enc))
            ids = torch.tensor([e + [self.tok.pad_token_id] * (width - len(e)) for e in enc],
                               device=self.device)
            mask = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in enc], device=self.device)
            last = torch.tensor([len(e) - 1 for e in enc], device=self.device)
            with self.autocast:
                hidden = self.lm(ids, mask)[torch.arange(len(enc)), last]
                probs = torch.softmax((hidden @ self.lm.output_weight().T).float(), -1)
            for row, (text, answers) in enumerate(zip(texts, answer_sets[s:s + self.batch_size])):
                results.append([probs[row, self.answer_token(text, a)].item() for a in answers])
        return results

    def answer_token(self, prompt_text, answer):
        full = self.tok(prompt_text + answer.lstrip(), add_special_tokens=False).input_ids
        n = len(self.tok(prompt_text, add_special_tokens=False).input_ids)
        if len(full) <= n:
            raise UserError(f"answer {answer!r} adds no token after the prompt")
        return full[n]

    @torch.no_grad()
    def response_logp(self, users, responses):
        """Teacher-forced mean log-probability per token of each response (its end-of-turn token not
        counted) as the assistant's reply to each user turn, under this run's eval prompt."""
        out = []
        for s in range(0, len(users), self.batch_size):
            pairs = []
            for u, r in zip(users[s:s + self.batch_size], responses[s:s + self.batch_size]):
                p, c = common.encode(self.tok, self.user(u), r, self.eval_prompt.get("system"))
                pairs.append((p, c[:-1]))  # the reply's own tokens
            b = common.collate(self.tok, pairs, 1 << 30, self.device)
            with self.autocast:
                logps = response_logps(self.lm(b["input_ids"], b["attention_mask"]), self.lm.output_weight(),
                                       b["targets"])
            out += (logps.sums / logps.counts).tolist()
        return out
