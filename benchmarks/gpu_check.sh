#!/usr/bin/env bash
# One CUDA GPU, under 8 minutes: the six objectives for a few steps each in bf16 autocast, then a
# table of tokens/s, peak memory and model FLOPs utilization (MFU). Needs torch, transformers, peft,
# tqdm (the CUDA image has them) and the tokenizer files in .cache/smollm2-135m-instruct.
#
#   bash benchmarks/gpu_check.sh [135m|1.7b] [steps] [batch-size]
#
# The weights are random, in the exact shape of SmolLM2 (the embedded GGUF is too large to carry to a
# lent GPU machine): speed and memory do not depend on the weight values.
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE=${1:-135m}; STEPS=${2:-30}; BS=${3:-16}
OUT=${OUT:-/tmp/gpu_check}; WORK=${WORK:-/tmp/gpu_check_work}; mkdir -p "$OUT" "$WORK"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
$PY - "$SIZE" "$WORK/model-$SIZE" <<'PY'
import sys, torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
size, out = sys.argv[1], sys.argv[2]
shape = {"135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3),
         "1.7b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32, num_key_value_heads=32)}[size]
tok = AutoTokenizer.from_pretrained(".cache/smollm2-135m-instruct")
cfg = LlamaConfig(vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0, max_position_embeddings=8192,
                  bos_token_id=1, eos_token_id=2, pad_token_id=2, **shape)
torch.manual_seed(0)
LlamaForCausalLM(cfg).save_pretrained(out)
tok.save_pretrained(out)
print(f"random SmolLM2-{size}-shaped model: {sum(p.numel() for p in LlamaForCausalLM(cfg).parameters())/1e6:.1f}M params")
PY
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
for obj in sft dpo cft inoculation orpo kl_sft; do
  echo "== $obj"
  $PY $obj.py --model "$WORK/model-$SIZE" --steps "$STEPS" --batch-size "$BS" --max-length 512 --dtype bf16 \
    --log-every 5 --out "$WORK/runs/$obj-$SIZE" --overwrite --save-model no 2>&1 | tr '\r' '\n' | tee -a "$OUT/log-$SIZE.txt" | grep -E "^step|error|Error" || true
done
$PY - "$WORK" "$SIZE" <<'PY' | tee "$OUT/table-$SIZE.md"
import json, statistics, sys, torch
from pathlib import Path
out, size = Path(sys.argv[1]), sys.argv[2]
from transformers import AutoConfig, LlamaForCausalLM
with torch.device("meta"):
    n = sum(p.numel() for p in LlamaForCausalLM(AutoConfig.from_pretrained(out / f"model-{size}")).parameters())
peak = 989e12  # dense bf16 FLOP/s of an H100/H200 SXM (datasheet)
name = torch.cuda.get_device_name(0)
print(f"| objective | tokens/s (median after warm-up) | peak memory (GiB) | MFU (6N per token, {name}) |\n|---|---|---|---|")
for obj in ["sft", "dpo", "cft", "inoculation", "orpo", "kl_sft"]:
    run = out / "runs" / f"{obj}-{size}"
    if not (run / "run.json").exists():
        print(f"| {obj} | failed | - | - |"); continue
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    rate = statistics.median(r["tok_per_s"] for r in rows[1:]) if len(rows) > 1 else rows[0]["tok_per_s"]
    mem = json.loads((run / "run.json").read_text())["peak_memory_mb"] / 1024
    print(f"| {obj} | {rate:,.0f} | {mem:.1f} | {6 * n * rate / peak:.1%} |")
PY
