"""Roles of the online RL loop, each behind a narrow interface (DESIGN.md §2a).

The controller (`train/rl/controller.py`) only talks to these objects and only passes
them plain data (`RLBatch`, tensors, lists of strings), so each can live in another
process (a torch.distributed rank, a Ray actor) without the controller changing.
"""

from posttrain.roles.baseline import RunningMean
from posttrain.roles.batch import RLBatch
from posttrain.roles.policy import PolicyRole
from posttrain.roles.prompts import PromptItem, PromptSource
from posttrain.roles.rewarder import RewardRole
from posttrain.roles.scorer import CriticRole, ScoringRole

__all__ = [
    "CriticRole",
    "PolicyRole",
    "PromptItem",
    "PromptSource",
    "RLBatch",
    "RewardRole",
    "RunningMean",
    "ScoringRole",
]
