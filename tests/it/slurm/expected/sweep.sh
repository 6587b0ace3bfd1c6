#!/bin/bash
# recycle slurm: submits the stages in order, each after the previous one.
set -euo pipefail
mkdir -p /sweeps/mini/logs
stage0=$(sbatch --parsable /sweeps/mini/sweep.stage0.sbatch)
stage0=${stage0%%;*}
echo "stage0 $stage0"
stage1=$(sbatch --parsable --dependency=afterok:$stage0 /sweeps/mini/sweep.stage1.sbatch)
stage1=${stage1%%;*}
echo "stage1 $stage1"
rank=$(sbatch --parsable --dependency=afterany:$stage1 /sweeps/mini/sweep.rank.sbatch)
rank=${rank%%;*}
echo "rank $rank"
