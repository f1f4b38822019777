"""A model under evaluation: loaded from a run directory (with the prompt decoration its run asks for),
a model directory, the embedded default or a hub id; greedy answers, next-token probabilities, and
teacher-forced log-likelihoods computed with the objective files' chunked gather."""
import collections
import contextlib
import copy
import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers.cache_utils import Cache, DynamicLayer

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


# ---------------------------------------------------------------------------- batched forward, generation

def end_of_turn_ids(tok):
    ids = {tok.eos_token_id}
    for t in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>"):
        i = tok.convert_tokens_to_ids(t)
        if isinstance(i, int) and i != tok.unk_token_id and i is not None:
            ids.add(i)
    return sorted(i for i in ids if i is not None)


class GrowingLayer(DynamicLayer):
    """One layer's KV cache that writes each step's keys and values into spare room at the end of a
    buffer, instead of concatenating (which copies the whole cache, every layer, every step: a tenth of
    a decode step on the CPU). The room grows by half when it runs out."""

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            self.room = None
        n, k = self.get_seq_length(), key_states.shape[-2]
        if self.room is None or n + k > self.room[0].shape[-2]:
            size = max(n + k + 64, (n + k) * 3 // 2)
            self.room = [s.new_empty(*s.shape[:-2], size, s.shape[-1]) for s in (key_states, value_states)]
            if n:
                self.room[0][..., :n, :], self.room[1][..., :n, :] = self.keys, self.values
        self.room[0][..., n:n + k, :], self.room[1][..., n:n + k, :] = key_states, value_states
        self.keys, self.values = self.room[0][..., :n + k, :], self.room[1][..., :n + k, :]
        return self.keys, self.values

    def batch_repeat_interleave(self, repeats):
        super().batch_repeat_interleave(repeats)
        self.room = None  # the next update moves the repeated states into a new buffer

    def batch_select_indices(self, indices):
        super().batch_select_indices(indices)
        self.room = None


PREFILL_TOKENS = 1024  # padded tokens per piece of a prefill: large enough for efficient matrix products


def length_batches(lengths, rows, tokens):
    """Indices in order of length, cut into batches of at most `rows` sequences and `tokens` padded tokens."""
    order, batches = sorted(range(len(lengths)), key=lengths.__getitem__), []
    for i in order:
        if batches and len(batches[-1]) < rows and lengths[i] * (len(batches[-1]) + 1) <= tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def shared_prefix(seqs, most):
    """Length of the longest token prefix every sequence shares, at most `most`."""
    first, n = seqs[0], most
    for s in seqs[1:]:
        n = next((k for k in range(n) if s[k] != first[k]), n)
    return n


@torch.no_grad()
def prefill(decoder, seqs, pad, device, most):
    """Token sequences through the decoder, the prefix they all share run once (it is most of every
    prompt: the chat template's system turn, a jailbreak's wording, a probe's question), each row's rest
    left-padded after it. `most` caps the shared prefix. -> (final hidden states of the rests (B, W, H),
    the attention mask over prefix + rests (B, L + W), the position each row's next token takes (B,),
    the filled KV cache). Positions count only real tokens, so every row sees exactly its own sequence.

    The rests run in pieces of similar length (PREFILL_TOKENS padded tokens at most), so that a short
    row is not padded to the longest one's width; their states are then laid side by side."""
    n = shared_prefix(seqs, most)
    prefix = Cache(layer_class_to_replicate=GrowingLayer)
    if n:
        decoder(input_ids=torch.tensor([seqs[0][:n]], device=device), cache=prefix, use_cache=True)
    rests = [s[n:] for s in seqs]
    width = max(map(len, rests))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rests], device=device)
    mask = torch.tensor([[1] * n + [0] * (width - len(r)) + [1] * len(r) for r in rests], device=device)
    positions = torch.tensor([[n] * (width - len(r)) + list(range(n, n + len(r))) for r in rests],
                             device=device)
    hidden, states = None, None
    for idx in length_batches([len(r) for r in rests], len(rests), PREFILL_TOKENS):
        w = max(len(rests[i]) for i in idx)  # this piece's rows need only the last w columns
        piece = copy.deepcopy(prefix)
        if n:
            piece.batch_repeat_interleave(len(idx))
        out = decoder(input_ids=ids[idx, -w:], attention_mask=torch.cat([mask[idx, :n], mask[idx, -w:]], 1),
                      position_ids=positions[idx, -w:], cache=piece, use_cache=True).last_hidden_state
        if hidden is None:  # zeros where a row is padding: masked out, never read
            hidden = out.new_zeros(len(seqs), width, out.shape[-1])
            states = [[t.new_zeros(len(seqs), *t.shape[1:-2], n + width, t.shape[-1])
                       for t in (layer.keys, layer.values)] for layer in piece.layers]
        hidden[idx, -w:] = out
        for layer_states, layer in zip(states, piece.layers):
            for full, part in zip(layer_states, (layer.keys, layer.values)):
                full[idx, ..., :n, :], full[idx, ..., -w:, :] = part[..., :n, :], part[..., n:, :]
    cache = Cache(layers=[GrowingLayer() for _ in states])
    for layer, (keys, values) in zip(cache.layers, states):
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values, layer.room = keys, values, None
    return hidden, mask, positions[:, -1] + 1, cache


@torch.no_grad()
def greedy(model, tok, prompt_texts, max_new_tokens, device, autocast=contextlib.nullcontext()):
    """Greedy answers to chat-formatted prompts, batched, with a KV cache: one prefill (the shared prefix
    once), then one token per step for the rows still running; a row that writes an end-of-turn token
    leaves the batch and the cache, so finished answers cost nothing more."""
    enc = [tok(t, add_special_tokens=False).input_ids for t in prompt_texts]
    decoder, head = model.get_decoder(), model.get_output_embeddings().weight
    stop = torch.tensor(end_of_turn_ids(tok), device=device)
    out = [[] for _ in enc]
    with autocast:
        hidden, mask, position, cache = prefill(decoder, enc, tok.pad_token_id, device,
                                                most=min(map(len, enc)) - 1)
        rows = torch.arange(len(enc), device=device)  # which prompt each row of the batch answers
        for step in range(max_new_tokens):
            token = (hidden[:, -1] @ head.T).float().argmax(-1)
            for r, t in zip(rows.tolist(), token.tolist()):
                out[r].append(t)
            running = ~torch.isin(token, stop)
            if step == max_new_tokens - 1 or not running.any():
                break
            if not running.all():
                keep = running.nonzero()[:, 0]
                cache.batch_select_indices(keep)
                rows, token, mask, position = rows[keep], token[keep], mask[keep], position[keep]
            mask = torch.cat([mask, mask.new_ones(len(rows), 1)], 1)
            hidden = decoder(input_ids=token[:, None], attention_mask=mask, position_ids=position[:, None],
                             cache=cache, use_cache=True).last_hidden_state
            position = position + 1
    return [tok.decode(o, skip_special_tokens=True).strip() for o in out]


@torch.no_grad()
def reference_greedy(model, tok, prompt_texts, max_new_tokens, device, autocast=contextlib.nullcontext()):
    """The same answers from transformers' generate (left-padded, one batch): greedy() is tested on it."""
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

SCORING_TOKENS = 4096  # padded tokens per teacher-forced batch: short sequences go together, long ones apart

class Target:
    """A model plus the prompt decoration its run asks for (config.json's eval_prompt)."""

    def __init__(self, name, device="auto", batch_size=64):
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
        out = [None] * len(texts)
        t0 = time.time()
        batches = length_batches([len(t) for t in texts], self.batch_size, 1 << 30)
        for idx in tqdm(batches, desc=desc, leave=False, file=sys.stderr):
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
        texts = [self.prompt(u) for u in users]
        enc = [self.tok(t, add_special_tokens=False).input_ids for t in texts]
        decoder, results = self.lm.model.get_decoder(), [None] * len(texts)
        for idx in length_batches([len(e) for e in enc], self.batch_size, SCORING_TOKENS):
            seqs = [enc[i] for i in idx]
            with self.autocast:
                hidden = prefill(decoder, seqs, self.tok.pad_token_id, self.device,
                                 most=min(map(len, seqs)) - 1)[0]
                probs = torch.softmax((hidden[:, -1] @ self.lm.output_weight().T).float(), -1)
            for row, i in enumerate(idx):
                results[i] = [probs[row, self.answer_token(texts[i], a)].item() for a in answer_sets[i]]
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
        pairs = [common.encode(self.tok, self.user(u), r, self.eval_prompt.get("system"))
                 for u, r in zip(users, responses)]
        decoder, out = self.lm.model.get_decoder(), [None] * len(pairs)
        for idx in length_batches([len(p) + len(c) for p, c in pairs], self.batch_size, SCORING_TOKENS):
            prompts = [pairs[i][0] for i in idx]
            seqs = [pairs[i][0] + pairs[i][1][:-1] for i in idx]  # the reply's tokens, not its end-of-turn
            with self.autocast:
                hidden = prefill(decoder, seqs, self.tok.pad_token_id, self.device,
                                 most=min(map(len, prompts)) - 1)[0]
                # token k of a sequence sits in column k + shift: rows are left-padded after the shared prefix
                targets = torch.full(hidden.shape[:2], IGNORE, device=self.device)
                for row, (p, q) in enumerate(zip(prompts, seqs)):
                    shift = hidden.shape[1] - len(q)
                    cols = torch.arange(len(p) - 1, len(q) - 1) + shift  # positions that predict the reply
                    targets[row, cols] = torch.tensor(q[len(p):], device=self.device)
                logps = response_logps(hidden, self.lm.output_weight(), targets)
            for i, mean in zip(idx, (logps.sums / logps.counts).tolist()):
                out[i] = mean
        return out
