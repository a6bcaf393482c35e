"""The demo task: short questions a program can check (arithmetic, opposites, letter
counts, ...), answered correctly, warmly and concisely.

`demo.tasks` holds the task families, `demo.sft_data` and `demo.prompts` generate the
shipped configs/data/demo_*.jsonl files from them, `demo.judge` is the gold judge and
`demo.rankings` makes the reward model's rankings. A new family is one `Family`
subclass in `demo.tasks` and one entry at the end of its `FAMILIES` table; the shipped
files then need rebuilding (the rankings too, as the prompt sets change).
"""
