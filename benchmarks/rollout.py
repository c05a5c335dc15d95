"""Rollout-engine benchmark: generation tokens/s, sampler/trainer log-prob agreement, and
peak memory of the log-prob forward.

    python benchmarks/rollout.py --engines native,hf --presets tiny,small \
        --batch 32,64,128 --new-tokens 32,64,256 [--modes ignore_eos,eos] [--n 1,8] [--floor] \
        [--threads 2] [--repeats 3] [--write-doc]

RL shape (4 prompts x 8 samples, where pre-filling each distinct prompt once matters):
    python benchmarks/rollout.py --presets small --batch 32 --n 8 --new-tokens 32

Mode ignore_eos makes every row produce exactly `new-tokens` tokens (pure per-token
speed); mode eos lets rows stop at EOS as RL rollouts do, so lengths vary (random-init
models draw EOS with probability ~1/V per step) and both engines get the same seeds.
Each point is the median of `--repeats` timed runs after one warm-up; the engines
alternate run by run so drifting machine load affects them alike.
Memory of the log-prob forward is measured in fresh subprocesses as the growth of peak
RSS during one forward (Linux: malloc_trim, then VmHWM reset through /proc/self/clear_refs), for several micro-batch sizes and for the naive
full-logits forward, on a large vocabulary so that the [B, T, V] term dominates.
With --write-doc the results replace the "Rollout engines" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time

import torch

DOC = os.path.join(os.path.dirname(__file__), "..", "docs", "benchmarks.md")
BEGIN, END = "<!-- section:rollout-engines -->", "<!-- /section:rollout-engines -->"


def machine_info() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import transformers

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "load_avg_1m_at_start": round(os.getloadavg()[0], 2),
    }


def _model(preset: str, tok):
    from posttrain.engines.models import build_preset

    torch.manual_seed(0)
    return build_preset(
        preset,
        len(tok),
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    ).eval()


def gemm_floor_seconds(
    model, prompts_ids: list[list[int]], batch: int, new_tokens: int, repeats: int = 5
) -> float:
    """Time of the matmuls alone for one ignore_eos generate call: a lower bound for any engine.

    Every nn.Linear of the model (attention and MLP projections, LM head) is timed as
    F.linear on the shapes the call runs: one prefill over the distinct prompts (padded to
    the longest) and `new_tokens` decode steps over `batch` rows; attention, norms and
    sampling are left out. Returns medians of `repeats` (wall seconds, process CPU
    seconds), on the threads the benchmark uses.
    """
    import torch.nn.functional as F
    from torch import nn

    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    distinct = {tuple(p) for p in prompts_ids}
    prefill_rows = len(distinct) * max(len(p) for p in distinct)
    xs = {}
    for m in linears:
        for rows in (prefill_rows, batch):
            xs.setdefault((rows, m.in_features), torch.randn(rows, m.in_features))

    def one_call():
        with torch.no_grad():
            for rows, steps in ((prefill_rows, 1), (batch, new_tokens)):
                for _ in range(steps):
                    for m in linears:
                        F.linear(xs[(rows, m.in_features)], m.weight, m.bias)

    one_call()  # warm-up
    times, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        one_call()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(times), statistics.median(cpu)


def bench_generation(
    engines, presets, batches, new_tokens, repeats, modes=("ignore_eos",), ns=(1,), floor=False
):
    from posttrain.engines.rollout import SamplingParams, make_engine
    from posttrain.engines.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    prompts_pool = [f"Compute {a}+{b}*{a - b}=" for a in range(10, 99) for b in range(3, 9)]
    rows = []
    for preset in presets:
        model = _model(preset, tok)
        built = {name: make_engine(name, model, tok) for name in engines}
        for B, n in [(B, n) for B in batches for n in ns if B % n == 0]:
            prompts = prompts_pool[: B // n]  # B rows: B / n prompts, n samples each
            for T in new_tokens:
                for mode in modes:
                    params = SamplingParams(
                        temperature=1.0, max_new_tokens=T, seed=0, ignore_eos=mode == "ignore_eos", n=n
                    )
                    times = {name: [] for name in built}
                    cpu = {name: [] for name in built}  # process CPU time: robust to other jobs at 1 thread
                    tokens = {}
                    for engine in built.values():
                        engine.generate(prompts, params)  # warm-up
                    # Engines alternate run by run so a change in machine load hits both alike.
                    for _ in range(repeats):
                        for name, engine in built.items():
                            t0, c0 = time.perf_counter(), time.process_time()
                            r = engine.generate(prompts, params)
                            times[name].append(time.perf_counter() - t0)
                            cpu[name].append(time.process_time() - c0)
                            tokens[name] = int(r.mask.sum())
                    shape = dict(preset=preset, mode=mode, batch=B, n=n, new_tokens=T)
                    results = [
                        (name, statistics.median(times[name]), statistics.median(cpu[name]), tokens[name])
                        for name in built
                    ]
                    if floor and mode == "ignore_eos":
                        ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
                        results.append(("gemm-floor", *gemm_floor_seconds(model, ids, B, T, repeats), B * T))
                    for engine, sec, cpu_sec, n_tok in results:
                        row = dict(engine=engine, **shape, seconds=sec, cpu_seconds=cpu_sec, tokens=n_tok,
                                   tokens_per_s=n_tok / sec)  # fmt: skip
                        print(json.dumps(row), flush=True)
                        rows.append(row)
    return rows


def bench_logprob_agreement(engines, preset="tiny"):
    from posttrain.engines.batching import build_sequences
    from posttrain.engines.logprobs import sequence_logprobs
    from posttrain.engines.rollout import SamplingParams, make_engine
    from posttrain.engines.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    model = _model(preset, tok)
    out = []
    for name in engines:
        for temperature, top_k in ((1.0, 0), (0.7, 0)):
            params = SamplingParams(temperature=temperature, top_k=top_k, max_new_tokens=64, n=4, seed=1)
            r = make_engine(name, model, tok).generate([f"{i}+{i}=" for i in range(16)], params)
            batch = build_sequences(r.prompt_ids, r.response_ids, r.mask, tok.pad_token_id)
            lp, _ = sequence_logprobs(model, batch, temperature=temperature)
            diff = float(((lp - r.sampling_logprobs) * r.mask).abs().max())
            row = dict(engine=name, temperature=temperature, tokens=int(r.mask.sum()), max_abs_diff=diff)
            print(json.dumps(row), flush=True)
            out.append(row)
    return out


MEMORY_CHILD = r"""
import ctypes, json, sys, torch
from posttrain.engines.batching import build_sequences
from posttrain.engines.logprobs import sequence_logprobs
from posttrain.engines.models import build_preset

def status(key):  # kB from /proc/self/status
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])

torch.set_num_threads(1)
mode, mbs, B, T, V = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
torch.manual_seed(0)
model = build_preset("tiny", V).eval()
g = torch.Generator().manual_seed(0)
resp = torch.randint(1, V, (B, T), generator=g)
batch = build_sequences([[1, 2, 3, 4]] * B, resp, torch.ones(B, T), 0)
# Return freed heap pages to the OS, then reset the RSS high-water mark (VmHWM) so the
# peak below is the forward's own, not the model build's.
ctypes.CDLL("libc.so.6").malloc_trim(0)
open("/proc/self/clear_refs", "w").write("5")
before = status("VmRSS")
with torch.no_grad():
    if mode == "naive":  # full logits [B, L, V] then log_softmax over all of it
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        lp = logits.float().log_softmax(-1)[:, 3:-1].gather(-1, resp[..., None])
    else:
        lp, _ = sequence_logprobs(model, batch, micro_batch_size=mbs or None)  # 0 = automatic
peak = status("VmHWM")
print(json.dumps({"mode": mode, "micro_batch": mbs, "peak_extra_mib": (peak - before) / 1024}))
"""


def bench_memory(B=32, T=256, V=32000, micro_batches=(1, 4, 16, 0)):
    out = []
    configs = [("chunked", m) for m in micro_batches] + [("naive", B)]  # micro-batch 0 = automatic
    for mode, mbs in configs:
        res = subprocess.run(
            [sys.executable, "-c", MEMORY_CHILD, mode, str(mbs), str(B), str(T), str(V)],
            capture_output=True,
            text=True,
            check=True,
        )
        row = json.loads(res.stdout.strip().splitlines()[-1])
        row.update(batch=B, response_tokens=T, vocab=V, full_fp32_logits_mib=B * T * V * 4 / 2**20)
        print(json.dumps(row), flush=True)
        out.append(row)
    return out


def render(info, command, gen, agree, mem) -> str:
    engines = sorted({r["engine"] for r in gen} - {"gemm-floor"})
    floor = any(r["engine"] == "gemm-floor" for r in gen)
    lines = [BEGIN, "## Rollout engines", ""]
    lines += [
        f"Command: `{command}`",
        "",
        f"Machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']} ({info['torch_threads']} threads), "
        f"transformers {info['transformers']}, Python {info['python']}. "
        f"1-minute load average when the run started: {info['load_avg_1m_at_start']} "
        "(other jobs share this CPU; numbers taken on a busy machine understate both engines).",
        "",
        "Generation throughput (temperature 1, median of repeats; tokens/s counts generated tokens). "
        "Mode `ignore_eos`: every row generates exactly `new tokens` (pure per-token speed). Mode `eos`: "
        "rows stop at EOS as in RL rollouts (random-init models draw EOS with p ~ 1/V per step), so lengths "
        "vary and finished rows leaving the batch matters. CPU-time ratios use the process's CPU "
        "seconds (at 1 thread they are robust to other jobs on the machine; at 2 threads they count "
        "OpenMP spinning). Batch = prompts x n samples per prompt "
        "(RL asks for n = G samples of each prompt)."
        + (
            " GEMM floor: the call's matmuls alone (`gemm_floor_seconds`); hf / floor is the "
            "largest speed-up over hf any engine could reach on this machine."
            if floor
            else ""
        ),
        "",
        "| preset | mode | batch (prompts x n) | new tokens | "
        + " | ".join(f"{e} tok/s" for e in engines)
        + " | native / hf | native / hf (CPU time) |"
        + (" hf / GEMM floor (CPU time) |" if floor else ""),
        "|---|---|---|---|" + "---|" * (len(engines) + 2 + floor),
    ]
    field = lambda r: (r["preset"], r.get("mode", "ignore_eos"), r["batch"], r.get("n", 1), r["new_tokens"])
    cpu_tok_s = lambda r: r["tokens"] / r["cpu_seconds"]
    keys = sorted({field(r) for r in gen}, key=lambda k: (k[0] != "tiny", k))
    for key in keys:
        by = {r["engine"]: r for r in gen if field(r) == key}
        cells = [f"{by[e]['tokens_per_s']:.0f}" if e in by else "-" for e in engines]
        ratio = (
            by["native"]["tokens_per_s"] / by["hf"]["tokens_per_s"] if "native" in by and "hf" in by else None
        )
        ratio_cell = f"{ratio:.1f}x" if ratio else "-"
        cpu_ratio = cpu_tok_s(by["native"]) / cpu_tok_s(by["hf"]) if "native" in by and "hf" in by else None
        ratio_cell += f" | {cpu_ratio:.1f}x" if cpu_ratio else " | -"
        rows_cell = f"{key[2]} ({key[2] // key[3]} x {key[3]})"
        line = f"| {key[0]} | {key[1]} | {rows_cell} | {key[4]} | " + " | ".join(cells) + f" | {ratio_cell} |"
        if floor:  # the most any engine could gain over hf if everything but the matmuls were free
            f_row = by.get("gemm-floor")
            bound = by["hf"]["cpu_seconds"] / f_row["cpu_seconds"] if f_row and "hf" in by else None
            line += f" {bound:.1f}x |" if bound else " - |"
        lines.append(line)
    if agree:
        lines += [
            "",
            "Sampler vs training forward log-probs (float32, `sequence_logprobs` at the sampler's temperature):",
            "",
        ]
        lines += ["| engine | temperature | tokens | max abs diff |", "|---|---|---|---|"]
        lines += [
            f"| {r['engine']} | {r['temperature']} | {r['tokens']} | {r['max_abs_diff']:.2e} |" for r in agree
        ]
    if mem:
        m0 = mem[0]
        lines += [
            "",
            f"Log-prob forward peak memory (tiny preset with vocab {m0['vocab']}, batch {m0['batch']}, "
            f"{m0['response_tokens']} response tokens; growth of peak RSS during one no-grad forward; "
            f"a full float32 [B, T, V] logits tensor would be {m0['full_fp32_logits_mib']:.0f} MiB):",
            "",
            "| forward | micro-batch | peak extra MiB |",
            "|---|---|---|",
        ]
        lines += [
            f"| {'sequence_logprobs' if r['mode'] == 'chunked' else 'naive model(...).logits.log_softmax'} | "
            f"{r['micro_batch'] or 'auto (64 MiB logits budget)'} | {r['peak_extra_mib']:.0f} |"
            for r in mem
        ]
    lines += [END, ""]
    return "\n".join(lines)


def write_doc(section: str) -> None:
    text = open(DOC).read() if os.path.exists(DOC) else "# Benchmarks\n\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1].lstrip("\n")
        text = head + section + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section
    os.makedirs(os.path.dirname(DOC), exist_ok=True)
    with open(DOC, "w") as f:
        f.write(text)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engines", default="native,hf")
    ap.add_argument("--presets", default="tiny")
    ap.add_argument("--batch", default="64")
    ap.add_argument("--new-tokens", default="64")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--modes", default="ignore_eos", help="comma list of ignore_eos,eos")
    ap.add_argument(
        "--n",
        default="1",
        help="comma list of samples per prompt (batch / n distinct prompts); e.g. 8 for RL",
    )
    ap.add_argument("--floor", action="store_true", help="also time the matmuls alone (GEMM floor)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-agreement", action="store_true")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument(
        "--write-doc", action="store_true", help="replace the Rollout engines section of docs/benchmarks.md"
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    ints = lambda s: [int(x) for x in s.split(",") if x]
    engines = [e for e in args.engines.split(",") if e]
    info = machine_info()
    print(json.dumps(info), flush=True)
    gen = bench_generation(
        engines,
        args.presets.split(","),
        ints(args.batch),
        ints(args.new_tokens),
        args.repeats,
        args.modes.split(","),
        ints(args.n),
        args.floor,
    )
    agree = [] if args.skip_agreement else bench_logprob_agreement([e for e in engines if e != "vllm"])
    mem = [] if args.skip_memory else bench_memory()
    command = "python benchmarks/rollout.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    section = render(info, command, gen, agree, mem)
    print(section)
    if args.write_doc:
        write_doc(section)
    print(
        f"peak RSS of the benchmark process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB"
    )


if __name__ == "__main__":
    main()
