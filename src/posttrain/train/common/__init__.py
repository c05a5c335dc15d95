"""Run machinery shared by the offline loop and the online RL controller.

checkpoint.py (atomic checkpoints, resume), metrics.py (metrics.jsonl, progress),
loading.py (tokenizer, policy and value model from a `model:` section), optim.py (optimizer,
schedule, the one bad-step guard), rundir.py (run directory lock and
states), alerts.py (reward-hacking monitor), plots.py + report.py (`posttrain report`),
input_checks.py (data checks before any model is built), launch.py (torchrun for `--nproc`).
"""
