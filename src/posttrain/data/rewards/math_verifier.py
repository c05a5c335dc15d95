"""Answer extraction + math-verify comparison, and the worker-process loop that runs it.

This file is both a module (the pure functions, importable for tests) and the script a
`posttrain.data.rewards.accuracy.MathVerifyPool` worker runs (``python math_verifier.py``).
It therefore imports nothing from posttrain: a worker starts with math-verify/sympy only.

Why a worker process: math-verify's own timeout uses SIGALRM, which works only in the main
thread and overwrites the caller's alarm. A separate process can be killed at a hard
budget from any thread or event loop without touching the caller's signals.

Extraction (`extract_prediction`):
1. Reasoning is not an answer: text up to the last ``</think>`` is dropped; a ``<think>``
   that never closes means no answer at all.
2. If ``<answer>…</answer>`` is present, the last one's payload is the answer. A payload
   without ``$`` delimiters is parsed as LaTeX first (so ``4\\sqrt{2}`` stays ``4√2`` —
   math-verify's plain-expression extractor reads it as ``4``), then as an expression.
3. Otherwise math-verify's default extraction on the remaining text: ``\\boxed{}`` first,
   then the last LaTeX span, then a bare final number/expression.

Exact double check (`check`, ``exact_check=True``): math-verify compares numbers after
rounding to ``float_rounding`` decimals, which accepts 1/2^99 == 1/2^98 (both round to 0).
After math-verify says "equal", two plain numbers are compared again: exact ones
(rationals, radicals — no Float atom) must agree to ``exact_rtol`` relative error at 50
significant digits; when a side was written as a decimal, to ``float_rtol``.
"""

from __future__ import annotations

import json
import re
import struct
import sys

_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def extract_prediction(completion: str, *, think_open: bool = False) -> tuple[str, str] | None:
    """Return (mode, text) for the part of `completion` that holds the final answer.

    mode is "payload" for an ``<answer>`` payload and "text" for free text; None when the
    completion has no answer (reasoning never closed, or the answer tag is empty).
    think_open: the prompt already opened ``<think>`` (the completion starts inside it).
    """
    text = completion
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    elif think_open or "<think>" in text:
        return None
    payloads = _ANSWER_RE.findall(text)
    if payloads:
        payload = payloads[-1].strip()
        return ("payload", payload) if payload else None
    if "<answer>" in text:  # opened but never closed (e.g. truncated): take the rest
        payload = text.rsplit("<answer>", 1)[1].strip()
        return ("payload", payload) if payload else None
    return ("text", text) if text.strip() else None


def _parse(text: str, mode: str):
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    if mode == "payload" and "$" not in text and "\\boxed" not in text:
        found = parse(f"${text}$", extraction_config=[LatexExtractionConfig()], parsing_timeout=None)
        if found:
            return found
        return parse(text, extraction_config=[ExprExtractionConfig()], parsing_timeout=None)
    return parse(text, parsing_timeout=None)


def _numeric_agrees(gold, pred, exact_rtol: float, float_rtol: float) -> bool | None:
    """None when the double check does not apply (not two plain numbers)."""
    import sympy

    if not (isinstance(gold, sympy.Expr) and isinstance(pred, sympy.Expr)):
        return None
    if not (gold.is_number and pred.is_number):
        return None
    inexact = bool(gold.atoms(sympy.Float) or pred.atoms(sympy.Float))
    if not inexact and isinstance(gold, sympy.Rational) and isinstance(pred, sympy.Rational):
        return bool(gold == pred)
    g = complex(sympy.N(gold, 50))
    p = complex(sympy.N(pred, 50))
    scale = max(abs(g), abs(p))
    if scale == 0:
        return True
    return abs(g - p) <= (float_rtol if inexact else exact_rtol) * scale


def check(
    gold: str,
    completion: str,
    *,
    think_open: bool = False,
    exact_check: bool = True,
    exact_rtol: float = 1e-12,
    float_rtol: float = 1e-6,
) -> float | None:
    """1.0 if the completion's final answer equals `gold` (math-verify + exact double
    check), else 0.0; None when `gold` itself cannot be parsed. Runs unbounded: call it
    through a worker with a budget.

    exact_rtol: relative tolerance between two exact numbers (evaluated at 50 digits).
    float_rtol: relative tolerance when either side was written as a decimal.
    """
    from math_verify import verify

    gold_parsed = _parse(gold.strip(), "payload")
    if not gold_parsed:
        return None  # a ground truth nobody can parse is a data problem, not a wrong answer
    found = extract_prediction(completion, think_open=think_open)
    if found is None:
        return 0.0
    pred = _parse(found[1], found[0])
    if not pred:
        return 0.0
    if not verify(gold_parsed, pred, timeout_seconds=None):
        return 0.0
    if exact_check:
        agrees = _numeric_agrees(gold_parsed[0], pred[0], exact_rtol, float_rtol)
        if agrees is False:
            return 0.0
    return 1.0


# ------------------------------------------------------------------ worker protocol
# Frames: 4-byte big-endian length + UTF-8 JSON. Requests {"gold", "completion", "options"};
# replies {"score": float} or {"error": str}. The first frame a worker writes is {"ready": true}.


def write_frame(stream, obj) -> None:
    data = json.dumps(obj).encode("utf-8")
    stream.write(struct.pack(">I", len(data)) + data)
    stream.flush()


def _read_exact(stream, n: int) -> bytes | None:
    buf = b""
    while len(buf) < n:
        chunk = stream.read(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


def serve(memory_mb: int) -> None:
    """Worker main loop: answer requests until stdin closes (the parent went away)."""
    import logging
    import os
    import resource

    if memory_mb > 0:  # a pathological answer may try to build a huge integer
        resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
    logging.disable(logging.CRITICAL)  # math-verify warns per call; stderr is discarded anyway
    sys.setrecursionlimit(10_000)
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # stray prints from libraries must not corrupt the protocol stream
    inp = sys.stdin.buffer
    import math_verify  # noqa: F401  (pay the import before announcing readiness)

    write_frame(out, {"ready": True})
    while True:
        head = _read_exact(inp, 4)
        if head is None:
            return
        body = _read_exact(inp, struct.unpack(">I", head)[0])
        if body is None:
            return
        try:
            req = json.loads(body)
            score = check(req["gold"], req["completion"], **req.get("options", {}))
            write_frame(out, {"score": score})
        except (Exception, RecursionError, MemoryError) as e:
            write_frame(out, {"error": f"{type(e).__name__}: {str(e)[:200]}"})


if __name__ == "__main__":
    serve(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
