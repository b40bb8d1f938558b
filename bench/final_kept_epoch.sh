#!/usr/bin/env bash
# The final training's kept epoch, side by side: this checkout (its last epoch, held to the confirmed mean at
# the seeds' last epochs) against an older commit (default 0205685: its best epoch by validation, held to its
# trial's best epoch). Digits, `--strategy random --time-budget 2 --no-report`, seeds 0..N-1, the two sides
# interleaved per seed, each in a fresh folder of its own store. Prints each run's final training line and its
# promoted test accuracy. Usage (from the repository root, its venv active):
#   bash bench/final_kept_epoch.sh [OLD_COMMIT] [SEEDS]
set -u
old=${1:-0205685}; seeds=${2:-3}
root=$(pwd); out=$(mktemp -d /tmp/cnnopt-final-XXXX); tree=$out/old
git worktree add -q "$tree" "$old"
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores; old = $old"
for seed in $(seq 0 $((seeds - 1))); do
  for side in new old; do
    run=$out/$side-$seed; mkdir -p "$run"; cd "$run"
    path=$root; [ $side = old ] && path=$tree
    PYTHONPATH=$path timeout 400 python -m cnnopt.search --strategy random --seed "$seed" --time-budget 2 \
      --no-report > out.txt 2> err.txt
    echo "$side seed $seed rc $? | $(grep -E '^  [0-9]+ epochs \(its trial|no final model' out.txt | head -1) |" \
         "$(grep -oE 'test_accuracy [0-9.]+' out.txt | head -1)"
    cd "$root"
  done
done
git worktree remove --force "$tree"; rm -rf "$out"
