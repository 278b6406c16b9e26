set -x
export PYTHONPATH=.
nvidia-smi --query-gpu=name,clocks.max.sm --format=csv
mkdir -p $OUT/r
timeout 300 python benchmarks/bench_generate.py --sections sambay,decode --decode-batches 1,16 --no-hf --out $OUT/r/gen 2>&1 | tail -60
timeout 60 python benchmarks/profile_decode.py --preset phi4-mini-flash --batch 16 1 --prompt 4096 --out $OUT/r/prof 2>&1 | tail -30
timeout 60 python benchmarks/bench_linear.py --models phi4-mini-flash --rows 1,16 --out $OUT/r/lin 2>&1 | tail -30
timeout 200 python benchmarks/bench_train.py --models samba-421m --modes compiled --steps 3 --warmup 2 --profile --out $OUT/r/train.json 2>&1 | tail -30
cd $OUT && tar czf r.tgz r && rm -rf r
