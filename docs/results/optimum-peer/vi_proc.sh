#!/bin/bash
# issue 11 acceptance 5 (session 5): optimum's export vs lp-deploy's default (no value_info) vs
# the same graph with value_info, 8 fresh processes, session creation order rotated; other jobs
# of this session paused meanwhile (and resumed on any exit). Run from the repository root.
PIDS="$(pgrep -f all_blocks.py) $(pgrep -f 'lp-deploy -q bench')"
trap 'kill -CONT $PIDS' EXIT
kill -STOP $PIDS; echo "paused $PIDS"; sleep 3; uptime
export OMP_NUM_THREADS=1
for o in opt,novi,vi vi,novi,opt novi,vi,opt opt,vi,novi vi,opt,novi novi,opt,vi opt,novi,vi vi,novi,opt; do
  .venv/bin/python docs/results/optimum-peer/vi_proc.py $o
done
kill -CONT $PIDS; echo "resumed"; date
