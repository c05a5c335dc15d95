"""Multi-turn rollout time with and without the native engine's KV-cache continuation.

    python benchmarks/multiturn_kv.py --model runs/tools/sft/final [--prompts 8] [--group 8] \
        [--rounds 5] [--turns 2] [--total 160] [--echo-turns 4,8]

The tool task (recipes/tools/2_grpo.yaml's shapes: difficulty-1 tool_arithmetic prompts
with the calculator declared, G samples each, env.max_turns / env.max_total_tokens) is
rolled out by `MultiTurnEngine` over the native engine, once re-encoding every turn
(continue_kv=False) and once continuing from the cache; the two alternate round by round
so drifting machine load affects them alike, and the medians are reported with the
largest |Δ sampling log-prob| and whether the sampled ids were identical.

--echo-turns adds conversations longer than the tool task's one call: an environment that
answers every model turn with a short tool-style observation until the turn limit, the
model's turns ended by the first of a few frequent characters (">", '"', ":", a digit), on the same prompts, so the saving
can be read against the number of turns.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from posttrain.data.envs import EnvStep, make_env
from posttrain.data.tasks import get_task
from posttrain.engines.encoding import encode_prompt
from posttrain.engines.models import build_preset, load_model, load_tokenizer
from posttrain.engines.rollout import SamplingParams, make_engine
from posttrain.engines.rollout.multiturn import MultiTurnEngine


class EchoTool:
    """Answers every turn with a tool-style observation (a running count) until the limit."""

    def reset(self, row):
        self.k = 0

    def step(self, turn):
        self.k += 1
        return EnvStep(f"result {self.k * 1111}", tool_call=True)

    def tool_schemas(self):
        return []


def measure(model, tok, prompts, params, env_factory, turns, total, rounds) -> dict:
    engines = {c: MultiTurnEngine(make_engine("native", model, tok), tok, env_factory, max_turns=turns,
                                  max_total_tokens=total, continue_kv=c) for c in (False, True)}  # fmt: skip
    times = {False: [], True: []}
    outs = {}
    for r in range(rounds + 1):  # round 0 warms up
        for c in (False, True) if r % 2 else (True, False):
            t0 = time.perf_counter()
            outs[c] = engines[c].generate(prompts, params)
            if r:
                times[c].append(time.perf_counter() - t0)
    a, b = outs[False], outs[True]
    return {
        "reencode_s": statistics.median(times[False]),
        "continue_s": statistics.median(times[True]),
        "same_ids": bool(torch.equal(a.response_ids, b.response_ids)),
        "max_dlogp": float((a.sampling_logprobs - b.sampling_logprobs).abs().max()),
        "turns_mean": sum(b.turn_stats["turns"]) / len(b),
        "tokens_mean": float(b.response_ids.ne(tok.pad_token_id).sum(1).float().mean()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--model", default=None, help="a tool-using model (recipes/tools/1_sft.yaml); none: random tiny"
    )
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--turns", type=int, default=2)
    ap.add_argument("--total", type=int, default=160)
    ap.add_argument("--new-tokens", type=int, default=100)
    ap.add_argument("--echo-turns", default="4,8", help="comma list; empty: skip")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.model:
        tok = load_tokenizer(args.model)
        model = load_model(args.model, tokenizer=tok).eval()
    else:
        from posttrain.engines.tokenizer import build_char_tokenizer

        tok = build_char_tokenizer()
        model = build_preset("tiny", len(tok)).eval()
    schemas = make_env("tools").tool_schemas()
    examples = get_task("tool_arithmetic").examples("test", args.prompts, seed=0, difficulty=1)
    prompts = [encode_prompt(tok, ex.prompt, tools=schemas) for ex in examples]
    params = SamplingParams(n=args.group, max_new_tokens=args.new_tokens, temperature=1.0, seed=0)
    print(f"torch {torch.__version__}, {platform.machine()}, {args.threads} thread(s), "
          f"{args.prompts} prompts x {args.group} samples, {args.rounds} rounds")  # fmt: skip
    print(
        "| case | turns (mean) | tokens/sample | re-encode s | continue s | speed-up | same ids | max abs dlogp |"
    )
    print("|---|---|---|---|---|---|---|---|")
    cases = [(f"tool task, calculator, max_turns {args.turns}", lambda: make_env("tools"), args.turns,
              args.total, params)]  # fmt: skip
    stops = tok.convert_tokens_to_ids(list('>":0123456789'))  # frequent characters end a turn
    for k in [int(x) for x in args.echo_turns.split(",") if x]:
        echo = SamplingParams(n=args.group, max_new_tokens=24, temperature=1.0, seed=0, stop_token_ids=stops)
        cases.append((f"echo env, {k} turns", EchoTool, k, 40 * k, echo))
    for name, factory, turns, total, p in cases:
        m = measure(model, tok, prompts, p, factory, turns, total, args.rounds)
        print(f"| {name} | {m['turns_mean']:.2f} | {m['tokens_mean']:.0f} | {m['reencode_s']:.3f} | "
              f"{m['continue_s']:.3f} | {m['reencode_s'] / m['continue_s']:.2f}x | {m['same_ids']} | "
              f"{m['max_dlogp']:.1e} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
