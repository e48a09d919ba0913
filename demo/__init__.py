"""The embedded default (`python cli.py demo`): a toy world small enough to learn on a laptop CPU,
run through the real roles. It sits above every role and may import any of them; no role imports it.

    toyworld.py   invented entities and facts → corpus, QA sets, held-out and swapped twins
    tinymodel.py  a tiny Qwen2 and its byte-level BPE tokenizer, built locally
    pretrain.py   the base model's generic copy prior (never the task, never held-out facts)
    teach.py      scripted search rollouts a tiny model is fitted to (tests and benches)
    recipe.py     world + index + base model (cached), DEMO_RECIPE, the run's one TOML
    children.py   the roles as child processes: start, wait for /health, stop by PID
    run.py        the demo end to end: eval before → train → eval after (and swapped) → plot
"""
