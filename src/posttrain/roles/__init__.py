"""Roles of the online RL loop, each behind a narrow interface (DESIGN.md §2a).

The controller (`train/rl/controller.py`) only talks to these objects and only passes
them plain data (`RLBatch`, tensors, lists of strings), so each can live in another
process (a torch.distributed rank, a Ray actor) without the controller changing.
"""

from posttrain.roles.baseline import RunningMean
from posttrain.roles.batch import RLBatch
from posttrain.roles.critic import CriticLearner
from posttrain.roles.generator import Generator
from posttrain.roles.learner import PolicyLearner
from posttrain.roles.policy import PolicyRole
from posttrain.roles.prompts import PromptItem, PromptSource
from posttrain.roles.rewarder import RewardRole
from posttrain.roles.scorer import ScoringRole
from posttrain.roles.weights import SharedModule, StateDictWeights, WeightSource

__all__ = [
    "CriticLearner",
    "Generator",
    "PolicyLearner",
    "PolicyRole",
    "PromptItem",
    "PromptSource",
    "RLBatch",
    "RewardRole",
    "RunningMean",
    "ScoringRole",
    "SharedModule",
    "StateDictWeights",
    "WeightSource",
]
