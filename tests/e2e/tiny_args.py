"""Shared inputs of the e2e misuse tests: a small SFT dataset and a one-step tiny SFT run."""

SFT_ROWS = [
    {"prompt": f"What is {a}+{b}?", "completion": f"<answer>{a + b}</answer>"}
    for a in range(6)
    for b in range(3)
]
SFT_TINY = ["--data.task", "null", "--train.steps", "2", "--train.batch_size", "4", "--train.eval_every", "0",
            "--train.eval_at_start", "false", "--data.eval_fraction", "0"]  # fmt: skip
