"""The "code" reward: run the completion's program in the sandbox against stdin/stdout tests."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from posttrain.data.rewards.runner import cancel_event
from posttrain.data.rewards.text import with_open_think
from posttrain.data.sandbox import SandboxLimits, detect_backend, run_tests
from posttrain.errors import ConfigError, RewardError

_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


def extract_code(completion: str) -> str | None:
    """The program in a completion: the last fenced code block after the reasoning (or the
    ``<answer>`` payload when there is no fence). None when there is no code."""
    text = completion.rsplit("</think>", 1)[1] if "</think>" in completion else completion
    if "<think>" in text:  # reasoning never closed
        return None
    blocks = _FENCE.findall(text)
    if blocks:
        return blocks[-1]
    m = re.findall(r"<answer>(.*?)</answer>", text, re.DOTALL)
    if m and m[-1].strip():
        return m[-1].strip("\n")
    return None


def code_reward(
    *,
    tests_column: str = "tests",
    partial_credit: bool = False,
    max_parallel: int = 2,
    cpu_time_s: int = 2,
    wall_time_s: float = 4.0,
    memory_mb: int = 512,
    backend: str = "auto",
    python: str | None = None,
) -> Callable:
    """Score programs by stdin/stdout tests run in `posttrain.data.sandbox`.

    Column `tests_column`: per row a list of {"input": str, "output": str} (or its JSON
    string). Score 1.0 iff all tests pass (partial_credit=True: the passed fraction, and all
    tests are run); 0.0 for no code or a failing program; None for rows without tests.
    A sandbox (infrastructure) failure raises RewardError, so the runner counts it as an
    error and excludes the sample instead of scoring a correct program 0.
    max_parallel: programs judged at once (each is its own sandboxed process).
    cpu_time_s, wall_time_s, memory_mb, backend, python: see `posttrain.data.sandbox`. With
        backend "auto" on a machine where only the rlimits fallback works (no isolation), the
        reward refuses to be built (ConfigError) unless backend="rlimits" is asked for.
    """
    limits = SandboxLimits(cpu_time_s=cpu_time_s, wall_time_s=wall_time_s, memory_mb=memory_mb)
    if backend == "auto" and detect_backend() == "rlimits":
        raise ConfigError(
            "code reward: neither bubblewrap nor unshare can isolate programs on this machine, so "
            "model-written code would reach its files and network; install bubblewrap, or set the "
            "reward's option backend: rlimits to accept that"
        )

    def judge(completion: str, tests) -> float | None:
        if tests is None:
            return None
        if isinstance(tests, str):
            tests = json.loads(tests)
        code = extract_code(completion)
        if code is None:
            return 0.0
        report = run_tests(
            code,
            list(tests),
            limits=limits,
            backend=backend,
            stop_on_failure=not partial_credit,
            python=python,
        )
        if report.status == "sandbox_error":
            detail = report.results[-1].get("stderr", "") if report.results else ""
            raise RewardError(f"code sandbox failed: {detail[:200]}")
        return report.score if partial_credit else float(report.status == "passed")

    def fn(prompts, completions, **columns):
        if tests_column not in columns:
            raise RewardError(f"code reward needs a column {tests_column!r}; got {sorted(columns)}")
        texts = [with_open_think(p, c) for p, c in zip(prompts, completions)]
        cancel = cancel_event()  # set when the reward runner gave up on this call

        def judge_unless_cancelled(text, tests):
            return None if cancel is not None and cancel.is_set() else judge(text, tests)

        with ThreadPoolExecutor(max_workers=max_parallel) as pool:
            return list(pool.map(judge_unless_cancelled, texts, columns[tests_column]))

    return fn
