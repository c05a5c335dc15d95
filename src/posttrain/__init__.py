"""posttrain: post-training language models with RL and preference optimization.

Layers (imports point down only): cli -> train -> algos -> engines, data -> core.
"""

__version__ = "0.1.0"
