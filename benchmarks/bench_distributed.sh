#!/usr/bin/env bash
# Data-parallel scaling of `samba-lm train` under torchrun: for each model, parallel mode (DDP, FSDP2)
# and number of processes, a short run at seq 4096 with MICRO sequences per process (the global batch
# grows with the processes: weak scaling), through the same entry point users run. From each run's
# metrics.jsonl: tokens/s (the median step after WARMUP steps), per process, the scaling efficiency
# against one process of the same model and mode, and the peak memory of rank 0. NVLink multicast
# stays off (NCCL_NVLS_ENABLE=0), as the machines set it.
#
#   bash benchmarks/bench_distributed.sh                        # samba-421m and samba-1.7b, DDP and FSDP2, 1/2/4/8 GPUs
#   MODELS=samba-421m NPROCS="1 2" MODES=fsdp bash benchmarks/bench_distributed.sh
#   DEVICE=cpu MODELS=tiny MODEL_ARGS='{}' NPROCS="1 2" SEQ=64 MICRO=2 STEPS=4 WARMUP=1 COMPILE=0 \
#     bash benchmarks/bench_distributed.sh                      # a smoke run on CPU processes (gloo)
#
# DATA: shards from `samba-lm data` (default: data/shakespeare, built here if missing; speed does not
# depend on the text). Writes bench_distributed.json and bench_distributed.md under OUT (default results/).
set -euo pipefail
cd "$(dirname "$0")/.."
MODELS=${MODELS:-"samba-421m samba-1.7b"}
MODES=${MODES:-"ddp fsdp"}
NPROCS=${NPROCS:-"1 2 4 8"}
SEQ=${SEQ:-4096}
MICRO=${MICRO:-8}
STEPS=${STEPS:-12}
WARMUP=${WARMUP:-4}
DEVICE=${DEVICE:-auto}
COMPILE=${COMPILE:-1}
DATA=${DATA:-data/shakespeare}
OUT=${OUT:-results}
PY=${PY:-python}
MODEL_ARGS=${MODEL_ARGS:-'{"vocab_size": 32000}'}  # the papers' vocabulary, whatever the data's tokenizer
export NCCL_NVLS_ENABLE=0 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
[ -f "$DATA/index.json" ] || $PY -m samba_lm.cli data --source shakespeare --out "$DATA"
mkdir -p "$OUT/runs"
compile=$([ "$COMPILE" = 1 ] && echo --compile || echo --no-compile)
for model in $MODELS; do for mode in $MODES; do for n in $NPROCS; do
  run="$OUT/runs/${model}_${mode}_$n"
  rm -rf "$run"
  echo "== $model $mode x$n" >&2
  if ! $PY -m torch.distributed.run --standalone --nproc_per_node "$n" -m samba_lm.cli train --model "$model" \
      --model-args "$MODEL_ARGS" --data "$DATA" --seq-len "$SEQ" --batch-size $((MICRO * n)) --micro-batch-size "$MICRO" --steps "$STEPS" \
      --eval-every 1000000 --save-every 1000000 --log-every 1 --parallel "$mode" $compile --device "$DEVICE" \
      --out-dir "$run" --no-tensorboard --no-progress > "$run.log" 2>&1; then
    echo "   failed: see $run.log" >&2
  fi
done; done; done
$PY - "$OUT" "$WARMUP" "$MODELS" "$MODES" "$NPROCS" <<'PY'
import json, statistics, sys
from pathlib import Path
out, warmup = Path(sys.argv[1]), int(sys.argv[2])
rows = []
for model in sys.argv[3].split():
    for mode in sys.argv[4].split():
        base = None
        for n in map(int, sys.argv[5].split()):
            metrics = out / "runs" / f"{model}_{mode}_{n}" / "metrics.jsonl"
            steps = [r for r in map(json.loads, metrics.read_text().splitlines()) if "tok_per_s" in r] \
                if metrics.is_file() else []
            timed = steps[warmup:]
            if not timed:
                rows.append(dict(model=model, mode=mode, processes=n, error="no timed steps (see its log)"))
                continue
            tok_s = statistics.median(r["tok_per_s"] for r in timed)
            per = tok_s / n
            base = per if n == 1 else base
            rows.append(dict(model=model, mode=mode, processes=n, tok_s=tok_s, tok_s_per_process=per,
                             efficiency=per / base if base else None, peak_gib=timed[-1].get("peak_gib")))
(out / "bench_distributed.json").write_text(json.dumps(rows, indent=1))
lines = ["| model | mode | processes | tok/s | tok/s per process | scaling efficiency | peak GiB (rank 0) |",
         "|---|---|---|---|---|---|---|"]
for r in rows:
    if "error" in r:
        lines.append(f"| {r['model']} | {r['mode']} | {r['processes']} | {r['error']} | | | |")
        continue
    eff = f"{r['efficiency']:.1%}" if r["efficiency"] is not None else "-"
    peak = f"{r['peak_gib']:.1f}" if r["peak_gib"] is not None else "-"
    lines.append(f"| {r['model']} | {r['mode']} | {r['processes']} | {r['tok_s']:,.0f} | {r['tok_s_per_process']:,.0f} "
                 f"| {eff} | {peak} |")
(out / "bench_distributed.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY
