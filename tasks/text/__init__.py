"""The generic text task: prompts and references from your JSONL or datasets folder (tasks/text/task.py)."""
