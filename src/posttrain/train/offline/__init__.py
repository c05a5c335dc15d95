"""`posttrain sft | rm | prm | dpo`: the offline trainers and their one shared loop.

commands.py (configs' entry points: run_sft, run_rm, run_prm, run_dpo, plan), loop.py (the
loop), methods.py (batch -> loss per method), data.py (rows -> token ids), ref.py (the
reference log-prob cache), scored.py (pointwise scores), dp.py (data-parallel ranks),
prm_annotate.py (Monte-Carlo step labels).
"""

from typing import Any

__all__ = [
    "DPOConfig", "PRMConfig", "RMConfig", "SFTConfig", "plan", "run_dpo", "run_prm", "run_rm", "run_sft",
]  # fmt: skip


def __getattr__(name: str) -> Any:
    # Lazy: importing one piece (the data encoding, the loop) does not build the commands.
    if name in __all__:
        from posttrain.train.offline import commands

        return getattr(commands, name)
    raise AttributeError(f"module 'posttrain.train.offline' has no attribute {name!r}")
