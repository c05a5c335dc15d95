"""Run settings: YAML + dotted CLI overrides -> one documented dataclass per command.

loader.py   load_config, the shared sections (model, optim, run) and the YAML walk
checks.py   value checks and `setting(default, help)`, a documented field
sections.py sections shared by several commands
rl.py       RLConfig (`posttrain rl`); rl_checks.py validates it and resolves the method
offline.py  SFTConfig, RMConfig, PRMConfig, DPOConfig (`posttrain sft | rm | prm | dpo`)
"""
