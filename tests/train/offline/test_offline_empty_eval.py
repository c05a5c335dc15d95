"""A dataset file with no held-out rows (`data.eval_fraction 0`, no eval_path) trains every
offline command; held-out ratios are NaN instead of a KeyError in the evaluation that the
loop runs before the first step (found by `posttrain annotate`'s output going to `prm`)."""

import json
import math

import pytest

from posttrain import cli

ROWS = {
    "sft": [{"prompt": f"What is {a}+1?", "completion": f"<answer>{a + 1}</answer>"} for a in range(6)],
    "rm": [{"prompt": f"What is {a}+1?", "chosen": f"{a + 1}", "rejected": f"{a + 2}"} for a in range(6)],
    "dpo": [{"prompt": f"What is {a}+1?", "chosen": f"{a + 1}", "rejected": f"{a + 2}"} for a in range(6)],
    "prm": [
        {
            "prompt": f"What is {a}+1+1?",
            "completions": [f"{a}+1={a + 1}", f"{a + 1}+1={a + 3}"],
            "labels": [True, False],
        }
        for a in range(6)
    ],  # fmt: skip
}


@pytest.mark.parametrize("command", ["rm", "prm", "dpo", "sft"])
def test_no_held_out_rows_trains_and_reports_nan(command, tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS[command]))
    out = tmp_path / "run"
    status = cli.main([command, "--data.path", str(data), "--data.task", "null", "--data.eval_fraction", "0",
                       "--train.steps", "1", "--train.batch_size", "2", "--train.eval_every", "0",
                       "--run.output_dir", str(out)])  # fmt: skip
    assert status == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    held_out = {k: v for r in rows for k, v in r.items() if k.startswith("eval/")}
    # NaN is written as JSON null (no rows to average).
    assert held_out and all(v is None or math.isnan(v) for v in held_out.values()), held_out
