"""Thinking-budget constants, importable without torch (configs read the default phrase)."""

THINK_END = "</think>"
# Qwen3's termination phrase for a thinking budget (Qwen3 technical report, thinking budget).
DEFAULT_PHRASE = "\n\nConsidering the limited time by the user, I have to give the solution based on the thinking directly now.\n"
