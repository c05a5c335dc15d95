"""Named online-RL methods as settings of the one RL loop (DESIGN.md §2).

A method is not code: it is a choice of pieces — which advantage estimator, which policy
loss, where the KL goes, which aggregation, whether a critic or a teacher exists, which
filters run. `RLConfig.algo.method = "grpo"` fills every piece the user left unset
(`None`) from `METHODS["grpo"]`; any explicit `algo.<piece>` override wins. Pieces no
preset sets come from `PIECE_DEFAULTS`.

Sources for each preset (the seeds in /work/shared/seeds cite the equations):
  reinforce            Williams 1992; baseline = running mean of past scores.
  rloo                 Ahmadian et al. 2024 (leave-one-out baseline, KL in the reward).
  reinforce_pp         Hu 2025, REINFORCE++ (batch-normalised returns, PPO clip, k1 KL in reward).
  reinforce_pp_baseline REINFORCE++-baseline (group mean, batch std, k3 KL as a loss).
  a2c                  Mnih et al. 2016 synchronous actor-critic: GAE advantages, one update.
  trpo                 Schulman et al. 2015 (study guide §4.1): critic + GAE, one natural-gradient
                       step per batch (conjugate gradient on Fisher-vector products, KL ≤ δ line search).
  ppo                  Schulman et al. 2017 / Ouyang et al. 2022: critic + GAE, clipped ratio,
                       value clipping, entropy bonus, epochs × minibatches, k1 KL in the reward.
  grpo                 Shao et al. 2024 (DeepSeekMath): group z-score, PPO clip, k3 KL as a
                       loss, per-sequence token mean.
  dr_grpo              Liu et al. 2025 (Dr. GRPO): no std scaling, constant length normaliser.
  dapo                 Yu et al. 2025: clip-higher (0.2/0.28), dynamic sampling, token-level
                       mean, overlong masking, no KL.
  gspo                 Zheng et al. 2025: sequence-level, length-normalised ratio clip.
  cispo                MiniMax-M1 2025: clipped, stop-gradient IS weight times log-prob.
  kimi                 Kimi k1.5 2025: squared loss to the reward-implied log-ratio, group mean
                       baseline, length reward enabled late (via `rewards[].start_step`).
  on_policy_distill    Agarwal et al. 2024 / Thinking Machines 2025: the student samples, the
                       teacher scores every token; −(log π − log π_teacher) is the dense reward.
  kdrl                 Xu et al. 2025 (KDRL): GRPO − β·k2(π ‖ π_teacher), β annealed, KD only on
                       low-reward samples.
"""

from __future__ import annotations

from typing import Any

from posttrain.algos.spec import RLSpec, spec_defaults
from posttrain.core.registry import Registry, UnknownNameError

# Every piece of the loop with the value used when neither the preset nor the user sets it.
PIECE_DEFAULTS: dict[str, Any] = spec_defaults()


METHODS: Registry = Registry("RL method")

# Dict-valued pieces holding a registry entry's options (merged over the preset's, then
# typed by the registry) -> the piece naming that entry.
_OPTION_PIECES = {"advantage_options": "advantage", "policy_loss_options": "policy_loss"}

# A choice-valued config field cannot use null for "not set" when one of its choices is the
# word "none" (YAML/CLI read `none` as null), so those fields default to this marker.
UNSET = "preset"


def _preset(name: str, settings: dict[str, Any]) -> None:
    unknown = set(settings) - set(PIECE_DEFAULTS)
    if unknown:  # a typo here would silently fall back to a default
        raise ValueError(f"preset {name!r} sets unknown pieces {sorted(unknown)}")
    METHODS.register(name)(lambda: dict(settings))


_preset("reinforce", {"advantage": "reinforce", "policy_loss": "pg", "aggregation": "token-mean"})
_preset(
    "rloo",
    {
        "advantage": "rloo",
        "policy_loss": "pg",
        "kl_placement": "reward",
        "kl_estimator": "k1",
        "kl_coef": 0.01,
    },
)
_preset(
    "reinforce_pp",
    {
        "advantage": "reinforce_pp",
        "policy_loss": "ppo",
        "kl_placement": "reward",
        "kl_estimator": "k1",
        "kl_coef": 0.01,
    },
)
_preset(
    "reinforce_pp_baseline",
    {
        "advantage": "reinforce_pp_baseline",
        "policy_loss": "ppo",
        "kl_placement": "loss",
        "kl_estimator": "k3",
        "kl_coef": 0.01,
    },
)
_preset("a2c", {"advantage": "gae", "policy_loss": "pg", "critic": True, "gamma": 1.0, "lam": 1.0})
_preset(
    "trpo",
    {
        "advantage": "gae",
        "policy_loss": "pg",  # unused: TRPO steps on its own importance-sampled surrogate
        "critic": True,
        "trust_region": 0.01,
        "kl_placement": "reward",
        "kl_estimator": "k1",
        "kl_coef": 0.02,
        "lam": 0.95,
    },
)
_preset(
    "ppo",
    {
        "advantage": "gae",
        "policy_loss": "ppo",
        "critic": True,
        "value_clip": 0.2,
        "entropy_coef": 0.01,
        "update_epochs": 2,
        "num_minibatches": 2,
        "kl_placement": "reward",
        "kl_estimator": "k1",
        "kl_coef": 0.02,
        "lam": 0.95,
    },
)
_preset(
    "grpo",
    {
        "advantage": "grpo",
        "advantage_options": {"scale": "group"},
        "policy_loss": "ppo",
        "aggregation": "seq-mean-token-mean",
        "kl_placement": "loss",
        "kl_estimator": "k3",
        "kl_coef": 0.01,
    },
)
_preset("dr_grpo", {"advantage": "dr_grpo", "policy_loss": "ppo", "aggregation": "seq-mean-token-sum-norm"})
_preset(
    "dapo",
    {
        "advantage": "grpo",
        "advantage_options": {"scale": "group"},
        "policy_loss": "ppo",
        "clip_eps_low": 0.2,
        "clip_eps_high": 0.28,
        "aggregation": "token-mean",
        "dynamic_sampling": True,
        "overlong": "mask",
    },
)
_preset(
    "gspo",
    {
        "advantage": "grpo",
        "advantage_options": {"scale": "group"},
        "policy_loss": "gspo",
        "clip_eps_low": 3e-4,
        "clip_eps_high": 4e-4,
        "aggregation": "seq-mean-token-mean",
    },
)
_preset(
    "cispo",
    {
        "advantage": "grpo",
        "advantage_options": {"scale": "group"},
        "policy_loss": "cispo",
        "clip_eps_low": 1.0,  # MiniMax-M1 leaves the lower bound open in practice
        "clip_eps_high": 4.0,
        "aggregation": "token-mean",
    },
)
_preset(
    "kimi",
    {
        "advantage": "kimi",
        "policy_loss": "kimi",
        "policy_loss_options": {"beta": 1.0},
        "aggregation": "seq-mean-token-sum",
        # Several gradient steps on one batch, regularised toward the iteration's starting
        # policy (old_logprobs): with a single step π_θ = π_old at the only update and the
        # squared loss's gradient is −A·∇ℓ for every β (plain group-mean REINFORCE).
        "num_minibatches": 4,
    },
)
_preset(
    "on_policy_distill",
    {
        # γ = 0: each token's advantage is its own reverse-KL reward, not a sum of future
        # ones (the per-token credit assignment of on-policy distillation).
        "advantage": "reinforce",
        "gamma": 0.0,
        "policy_loss": "pg",
        "aggregation": "token-mean",
        "teacher_mode": "reward",
    },
)
_preset(
    "kdrl",
    {
        "advantage": "grpo",
        "advantage_options": {"scale": "group"},
        "policy_loss": "ppo",
        "aggregation": "token-mean",
        "teacher_mode": "loss",
        "kd_coef_start": 0.1,
        "kd_coef_end": 0.01,
        "kd_anneal_steps": 100,
        "kd_anneal": "cosine",
        "kd_reward_threshold": 0.5,
    },
)


def resolve_pieces(method: str, overrides: dict[str, Any]) -> RLSpec:
    """Merge piece settings: explicit override (not None) > method preset > PIECE_DEFAULTS.

    Args:
        method: a name in METHODS (unknown names raise ConfigError with suggestions).
        overrides: piece -> value from `RLConfig.algo`; None or UNSET ("preset") means "not
            set by the user".
            The option pieces (`advantage_options`, `policy_loss_options`) are dicts merged
            key by key over the preset's, so setting one option keeps the others; a preset's
            options apply only while its own entry is used (overriding algo.advantage drops
            them), then the registry builds the entry's typed options dataclass.

    Returns:
        the frozen RLSpec (every field of PIECE_DEFAULTS set).

    Raises:
        ConfigError (one line naming the key) for an unknown method, advantage or policy
        loss name, or an unknown or ill-typed option.
    """
    from posttrain.core.advantages import ADVANTAGES
    from posttrain.core.policy_losses import POLICY_LOSSES

    registries = {"advantage": ADVANTAGES, "policy_loss": POLICY_LOSSES}
    preset = METHODS[method]()
    out: dict[str, Any] = {}
    for piece, default in PIECE_DEFAULTS.items():
        value = preset.get(piece, default)
        given = overrides.get(piece)
        if piece not in _OPTION_PIECES and given is not None and given != UNSET:
            value = given
        out[piece] = value
    for options_piece, entry_piece in _OPTION_PIECES.items():
        registry, name = registries[entry_piece], out[entry_piece]
        if name not in registry:
            raise UnknownNameError(f"algo.{entry_piece}: {registry.unknown_message(name)}")
        from_preset = preset.get(options_piece) or {}
        if preset.get(entry_piece, PIECE_DEFAULTS[entry_piece]) != name:
            from_preset = {}  # the preset's options belong to the entry it chose
        merged = {**from_preset, **(overrides.get(options_piece) or {})}
        out[options_piece] = registry.options(name, merged, f"algo.{options_piece}")
    return RLSpec(**out)
