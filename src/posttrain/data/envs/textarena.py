"""An adapter to TextArena (`pip install 'posttrain[envs]'`): train on games someone else wrote.

TextArena (Guertler et al. 2025) is a gym-style library of text games — Guess The Number,
Wordle, Sudoku, 2048, chess, ... — each ``ta.make(env_id)`` with ``reset(num_players,
seed)``, ``get_observation() -> (player, text)``, ``step(action) -> (done, info)`` and
``close() -> (rewards, info)``. `TextArenaEnv` plays its single-player games:

- prompts: `dataset_rows` resets one game per seed and takes its opening observation as
  the prompt (train seeds from 0, test seeds from 1,000,000), so `posttrain rl` needs no
  dataset: ``--env.name textarena --env.options "{env_id: GuessTheNumber-v0}"``;
- each model turn is the game action (TextArena parses it, e.g. the ``[5]`` in the text);
- the observation after a turn is only what the game added since the last one (TextArena
  re-sends the whole history; the model already has it in context), shown as a ``user``
  message of the chat template;
- the game's reward at its end (``close()``) is the last turn's environment reward: use
  the ``env_return`` reward to make it the trajectory score.

Games that download data at run time (some word games fetch NLTK corpora) need network
this project does not assume; Guess The Number and other self-contained games do not.
"""

from __future__ import annotations

from typing import Any

from posttrain.data.envs.base import EnvStep
from posttrain.errors import ConfigError

TEST_SEED_OFFSET = 1_000_000


def _textarena():
    try:
        import textarena
    except ImportError:
        raise ConfigError(
            "env.name textarena needs the textarena package: pip install 'posttrain[envs]'"
        ) from None
    return textarena


class TextArenaEnv:
    """One single-player TextArena game per trajectory (see module docstring)."""

    observation_role = "user"
    gives_rewards = True

    def __init__(self, env_id: str = "GuessTheNumber-v0"):
        ta = _textarena()
        try:
            ta.make(env_id)
        except Exception as e:  # TextArena raises its own errors for unknown ids
            raise ConfigError(f"env.options.env_id: TextArena has no game {env_id!r} ({e})") from None
        self.env_id = env_id
        self._game: Any = None
        self._shown = ""

    def _start(self, seed: int) -> str:
        self._game = _textarena().make(self.env_id)
        self._game.reset(num_players=1, seed=seed)
        _, self._shown = self._game.get_observation()
        return self._shown

    def dataset_rows(self, split: str, n: int, seed: int = 0) -> list[dict[str, Any]]:
        """n games' opening observations as prompt rows (``game_seed`` replays each game)."""
        base = seed * 100_003 + (TEST_SEED_OFFSET if split == "test" else 0)
        return [{"prompt": self._start(base + i), "answer": "", "game_seed": base + i, "id": f"{self.env_id}-{base + i}"}
                for i in range(n)]  # fmt: skip

    def reset(self, row: dict[str, Any]) -> None:
        if "game_seed" not in row:
            raise ConfigError("textarena rows need a game_seed column (prompts come from the environment)")
        self._start(int(row["game_seed"]))

    def step(self, turn: str) -> EnvStep:
        done, _ = self._game.step(turn)
        if done:
            rewards, _ = self._game.close()
            return EnvStep(None, reward=float((rewards or {}).get(0, 0.0)))
        _, text = self._game.get_observation()
        new = text[len(self._shown) :] if text.startswith(self._shown) else text
        self._shown = text
        # TextArena echoes the player's move; the model already has its own turn in context.
        lines = [line for line in new.strip().splitlines() if not line.startswith("[Player]")]
        return EnvStep("\n".join(lines) or new.strip())

    def tool_schemas(self) -> list[dict]:
        return []
