"""Multi-turn rollouts (engines/rollout/multiturn.py) and tools (data/envs): token in, token
out — the trained ids are the sampled ids, observation tokens carry no gradient, tools
never crash a rollout, and the python tool is the sandbox."""

import json

import pytest
import torch

from posttrain.core.masking import aggregate
from posttrain.data.envs import EnvStep, ToolEnv, build_tools, calculate, make_env, parse_tool_call
from posttrain.data.envs.tools import ToolError
from posttrain.engines.batching import build_sequences
from posttrain.engines.logprobs import sequence_logprobs
from posttrain.engines.models import build_preset
from posttrain.engines.rollout import SamplingParams, make_engine
from posttrain.engines.rollout.base import Rollout
from posttrain.engines.rollout.multiturn import MultiTurnEngine, observation_text
from posttrain.engines.tokenizer import build_char_tokenizer
from tiny_models import scripted_rollout


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def _call(expr: str) -> str:
    return (
        "<tool_call>" + json.dumps({"name": "calculator", "arguments": {"expression": expr}}) + "</tool_call>"
    )


# --------------------------------------------------------------------------- tools


def test_calculator_by_hand_and_its_refusals():
    assert calculate("48213+90577") == "138790"
    assert calculate("7/2") == "3.5" and calculate("6/3") == "2" and calculate("-(2**10)") == "-1024"
    for bad, why in [("__import__('os')", "only numbers"), ("1/0", "division by zero"),
                     ("9**99999", "exponent"), ("1+", "cannot parse"), ("x" * 300, "at most 256")]:  # fmt: skip
        with pytest.raises(ToolError, match=why):
            calculate(bad)


def test_tool_errors_come_back_as_observations_never_exceptions():
    env = ToolEnv(build_tools(["calculator"]))
    assert env.step("<answer>3</answer>") == EnvStep(None)  # no call: the final answer
    assert env.step(_call("1+2")) == EnvStep("3", tool_call=True)
    for turn, why in [("<tool_call>{not json</tool_call>", "not valid JSON"),
                      ('<tool_call>{"name": "search", "arguments": {}}</tool_call>', "unknown tool"),
                      ('<tool_call>{"name": "calculator", "arguments": {"expr": "1"}}</tool_call>', "bad arguments"),
                      (_call("1/0"), "division by zero")]:  # fmt: skip
        step = env.step(turn)
        assert (
            step.tool_call
            and step.tool_error
            and step.observation.startswith("error:")
            and why in step.observation
        )
    assert parse_tool_call('<tool_call>{"name": "calculator", "arguments": "{\\"expression\\": \\"2\\"}"}</tool_call>').arguments == {"expression": "2"}  # fmt: skip
    assert env.tool_schemas()[0]["function"]["name"] == "calculator"


def test_python_tool_runs_in_the_sandbox_and_cannot_reach_the_host(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("host data")
    env = make_env("tools", tools=["python"], tool_options={"python": {"wall_time_s": 2.0}})

    def run(code: str) -> EnvStep:
        return env.step(
            "<tool_call>" + json.dumps({"name": "python", "arguments": {"code": code}}) + "</tool_call>"
        )

    assert run("print(6*7)").observation.strip() == "42"
    escapes = [
        f"print(open({str(secret)!r}).read())",
        "import socket; s=socket.socket(); s.settimeout(1); s.connect(('127.0.0.1', 22)); print('connected')",
        "while True: pass",
    ]
    for code in escapes:
        step = run(code)
        assert step.tool_error and "host data" not in step.observation and "connected" not in step.observation
    assert secret.read_text() == "host data"


# --------------------------------------------------------------------------- token in, token out


class _Scripted:
    """An inner engine that 'samples' given id lists, recording the prompts it was asked for."""

    def __init__(self, turns: list[list[int]], tok):
        self.turns, self.tok, self.prompts = list(turns), tok, []

    def sync_weights(self, model):
        pass

    def generate(self, prompts, params):
        self.prompts.append([list(p) for p in prompts])
        rows = [self.turns.pop(0) for _ in range(len(prompts) * params.n)]
        T = max(map(len, rows))
        ids = torch.zeros((len(rows), T), dtype=torch.long)
        mask = torch.zeros((len(rows), T))
        for i, r in enumerate(rows):
            ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1.0
        lp = -0.5 * mask
        return Rollout([p for p in prompts for _ in range(params.n)], ids, mask, lp, ["stop"] * len(rows),
                       torch.arange(len(prompts)).repeat_interleave(params.n),
                       [self.tok.decode(r, skip_special_tokens=False) for r in rows])  # fmt: skip


def test_trained_ids_are_the_sampled_ids_even_where_decode_then_encode_differs(tok):
    # "<think>" sampled one character at a time: its text re-encodes to ONE special token,
    # so a trainer that decoded and re-encoded would train on ids the sampler never drew.
    chars = tok.convert_tokens_to_ids(list("<think>"))
    special = tok("<think>", add_special_tokens=False)["input_ids"]
    assert tok.decode(chars) == "<think>" and special != chars and len(special) == 1
    call = tok(_call("1+2"), add_special_tokens=False)["input_ids"]
    answer = tok("<answer>3</answer>", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    first = chars + call
    inner = _Scripted([first, answer], tok)
    eng = MultiTurnEngine(inner, tok, lambda: make_env("tools"), max_turns=3, max_total_tokens=400)
    prompt = tok("P", add_special_tokens=False)["input_ids"]
    ro = eng.generate([prompt], SamplingParams(n=1, max_new_tokens=200, seed=0))
    obs = tok(observation_text(tok, [{"role": "user", "content": "P"},
                                     {"role": "assistant", "content": tok.decode(first, skip_special_tokens=False)}],
                               "3"), add_special_tokens=False)["input_ids"]  # fmt: skip
    expected = first + obs + answer
    assert ro.response_ids[0].tolist() == expected
    assert ro.mask[0].tolist() == [1.0] * len(first) + [0.0] * len(obs) + [1.0] * len(answer)
    assert ro.sampling_logprobs[0].tolist() == [-0.5] * len(first) + [0.0] * len(obs) + [-0.5] * len(answer)
    # Turn 2 was sampled from exactly prompt + turn-1 ids + observation ids.
    assert inner.prompts[1] == [prompt + first + obs]
    assert ro.finish_reason == ["stop"] and ro.turn_stats == {
        "turns": [1 + 1],
        "tool_calls": [1],
        "tool_errors": [0],
        "return": [0.0],
    }
    assert "<answer>3</answer>" in ro.texts[0] and not ro.texts[0].endswith(tok.eos_token)


def test_observation_tokens_carry_exactly_zero_gradient(tok):
    """A hand-built two-turn trajectory: the masked loss's gradient w.r.t. the logits at
    observation positions is 0, and the model tokens' is not."""
    torch.manual_seed(0)
    model = build_preset("tiny", len(tok))
    t1 = tok(_call("2+2"), add_special_tokens=False)["input_ids"]
    obs = tok(observation_text(tok, [{"role": "user", "content": "Q"}, {"role": "assistant", "content": _call("2+2")}],
                               "4"), add_special_tokens=False)["input_ids"]  # fmt: skip
    t2 = tok("<answer>4</answer>", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([t1 + obs + t2])
    mask = torch.tensor([[1.0] * len(t1) + [0.0] * len(obs) + [1.0] * len(t2)])
    seq = build_sequences([tok("Q", add_special_tokens=False)["input_ids"]], ids, mask, tok.pad_token_id)
    captured = {}

    def keep(module, args, out):
        out.retain_grad()
        captured["h"] = out

    handle = model.get_decoder().norm.register_forward_hook(keep)
    try:
        lp, _ = sequence_logprobs(model, seq, with_grad=True, share_prompts=False)
    finally:
        handle.remove()
    aggregate(-lp, mask, mode="token-mean").backward()
    grad = captured["h"].grad[0, seq.response_start - 1 :]  # hidden state predicting each response token
    per_token = grad.abs().sum(-1)[: ids.shape[1]]
    obs_cols = slice(len(t1), len(t1) + len(obs))
    assert torch.equal(per_token[obs_cols], torch.zeros(len(obs)))
    assert bool((per_token[: len(t1)] > 0).all()) and bool((per_token[-len(t2) :] > 0).all())


def test_real_sampler_multi_turn_logprobs_match_the_training_forward(tok):
    """Native engine, several turns: every model token's sampling log-prob equals the
    trainer's log-prob of the assembled trajectory (so turn k+1 was sampled from exactly
    the ids that are trained)."""
    torch.manual_seed(0)
    model = build_preset("tiny", len(tok)).eval()

    class Echo:
        def reset(self, row):
            self.n = 0

        def step(self, turn):
            self.n += 1
            return EnvStep(f"obs {self.n}" if self.n < 3 else None, tool_call=True)

        def tool_schemas(self):
            return []

    digits = tok.convert_tokens_to_ids(list("0123456789"))
    eng = MultiTurnEngine(make_engine("native", model, tok), tok, Echo, max_turns=3, max_total_tokens=120)
    prompts = [
        tok("What is 1+2?", add_special_tokens=False)["input_ids"],
        tok("Hi", add_special_tokens=False)["input_ids"],
    ]
    ro = eng.generate(prompts, SamplingParams(n=4, max_new_tokens=12, stop_token_ids=digits, seed=3))
    assert max(ro.turn_stats["turns"]) >= 2 and (ro.mask == 0).any()
    seq = build_sequences(ro.prompt_ids, ro.response_ids, ro.mask, tok.pad_token_id)
    lp, _ = sequence_logprobs(model, seq)
    on = ro.mask > 0
    torch.testing.assert_close(lp[on], ro.sampling_logprobs[on], atol=1e-4, rtol=0)


def test_tool_task_demonstrations_use_the_layout_the_rollout_produces(tok):
    """SFT rows of tool_arithmetic are what a multi-turn rollout lays out for the char
    tokenizer: the call, then observation_text's tool message, then the answer."""
    from posttrain.data.tasks import get_task
    from posttrain.data.tasks.tool_arithmetic import tool_call_text, tool_transcript

    ex = get_task("tool_arithmetic").examples("train", 1, seed=0, difficulty=3)[0]
    expr = ex.prompt[len("What is ") : -1]
    history = [{"role": "user", "content": ex.prompt}, {"role": "assistant", "content": tool_call_text(expr)}]
    assert (
        ex.solution
        == tool_call_text(expr) + observation_text(tok, history, ex.answer) + f"<answer>{ex.answer}</answer>"
    )
    assert tool_transcript(expr, ex.answer, ex.answer, tokenizer=tok) == ex.solution
    env = make_env("tools")
    assert env.step(tool_call_text(expr)).observation == ex.answer  # the calculator agrees with the task
    no_tools = get_task("tool_arithmetic", tools=False).examples("train", 1, seed=0, difficulty=3)[0]
    assert no_tools.solution == f"<answer>{no_tools.answer}</answer>"


# --------------------------------------------------------------------------- TextArena


def test_textarena_guess_the_number_is_played_to_a_win_through_the_adapter(tok):
    """A scripted player does binary search on TextArena's hints; the game's reward comes
    back as the trajectory's environment return, and observations are the game's new
    messages only, as user messages."""
    pytest.importorskip("textarena")
    env = make_env("textarena", env_id="GuessTheNumber-v0")
    rows = env.dataset_rows("train", 2, seed=0)
    assert rows[0]["prompt"].strip().startswith("[GAME]") and rows[0]["game_seed"] != rows[1]["game_seed"]
    assert env.dataset_rows("test", 1, seed=0)[0]["game_seed"] >= 1_000_000

    class Bisect:
        def __init__(self):
            self.lo, self.hi, self.guess = {}, {}, {}

        def sync_weights(self, model):
            pass

        def generate(self, prompts, params):
            texts = []
            for p in [p for p in prompts for _ in range(params.n)]:
                seen = tok.decode(p, skip_special_tokens=False)
                key = seen.split("<|im_start|>assistant", 1)[0]
                lo, hi = self.lo.get(key, 1), self.hi.get(key, 20)
                last = seen.rsplit("<|im_start|>user\n", 1)[-1]
                if key in self.guess and "is higher" in last:
                    lo = self.guess[key] + 1
                elif key in self.guess and "is lower" in last:
                    hi = self.guess[key] - 1
                self.lo[key], self.hi[key] = lo, hi
                self.guess[key] = (lo + hi) // 2
                texts.append(f"[{self.guess[key]}]")
            rows = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
            return scripted_rollout(prompts, params.n, rows, texts)

    eng = MultiTurnEngine(Bisect(), tok, lambda: make_env("textarena", env_id="GuessTheNumber-v0"),
                          max_turns=8, max_total_tokens=2000)  # fmt: skip
    prompt_ids = [tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True,
                                          tokenize=False) for r in rows]  # fmt: skip
    ro = eng.generate([tok(p, add_special_tokens=False)["input_ids"] for p in prompt_ids], SamplingParams(n=1),
                      rows=rows)  # fmt: skip
    # TextArena pays a win less the more guesses it took (0.89 for a 3-guess win here).
    assert all(0.5 < r <= 1.0 for r in ro.turn_stats["return"]) and ro.finish_reason == ["stop", "stop"]
    assert all(2 <= t <= 5 for t in ro.turn_stats["turns"])  # binary search over 1..20
    assert "<|im_start|>user\n[GAME] The target number is" in ro.texts[0]
    assert "[Player]" not in ro.texts[0]  # the game's echo of the move is not repeated
