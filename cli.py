"""scout command line: one typer app, one command per role.

Heavy libraries (torch, vLLM, faiss, transformers) are imported inside the commands, so
`python cli.py --help` stays instant.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="scout: asynchronous actor-learner RL that teaches LLMs to search.")
index_app = typer.Typer(no_args_is_help=True, help="Build retrieval indexes.")
keys_app = typer.Typer(no_args_is_help=True, help="CurveZMQ key management.")
app.add_typer(index_app, name="index")
app.add_typer(keys_app, name="keys")

ConfigOpt = typer.Option(None, "--config", "-c", help="TOML config file read by every role.")
SetOpt = typer.Option(None, "--set", help="Override a config key: section.key=value (repeatable).")


def _config(config: Optional[Path], sets: Optional[list[str]], role: str, log: bool = True, **cli_overrides):
    """Load the config, apply CLI overrides, set up logging and log the resolved config (unless
    the role resolves more itself and logs the result: the demo)."""
    from common.config import ConfigError, load_config, log_config
    from common.log import setup_logging

    extra = [f"{k}={v!r}" if isinstance(v, str) else f"{k}={str(v).lower() if isinstance(v, bool) else v}"
             for k, v in cli_overrides.items() if v is not None]
    try:
        cfg = load_config(config, [*(sets or []), *extra])
    except ConfigError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    setup_logging(role, cfg.log_level)
    if log:
        log_config(cfg, role)
    return cfg


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


@app.command()
def retriever(
    index: Optional[Path] = typer.Option(None, "--index", help="Index folder made by `index build`."),
    gpus: Optional[str] = typer.Option(None, "--gpus", help="Shard GPUs, e.g. 0-1 or all (faiss-gpu; CUDA numbering: "
                                        "indices into CUDA_VISIBLE_DEVICES when it is set)."),
    endpoint: Optional[str] = typer.Option(None, "--endpoint", help="ZeroMQ endpoint to bind."),
    http_port: Optional[int] = typer.Option(None, "--http-port", help="Search-R1 HTTP port (0 = off)."),
    http_token_file: Optional[Path] = typer.Option(None, "--http-token-file", help="File holding a Bearer token that "
                                                   "POST /retrieve then requires (retriever.http_token_file)."),
    config: Optional[Path] = ConfigOpt, set_: Optional[list[str]] = SetOpt,
):
    """Serve a sharded FAISS or BM25 index over ZeroMQ and Search-R1's HTTP /retrieve."""
    cfg = _config(config, set_, "retriever", **{"retriever.index_dir": str(index) if index else None,
                                                "retriever.gpus": gpus, "retriever.endpoint": endpoint,
                                                "retriever.http_port": http_port,
                                                "retriever.http_token_file": str(http_token_file) if http_token_file
                                                else None})
    from retriever.service import main

    raise typer.Exit(main(cfg))


PresetOpt = typer.Option(None, "--encoder-preset", help="Encoder conventions: e5 (\"query: \" / \"passage: \", mean), "
                         "bge (CLS, its query instruction), minilm (mean, no prefixes); all normalised. "
                         "--pooling / --query-prefix / --passage-prefix override it.")
PoolingOpt = typer.Option(None, "--pooling", help="mean or cls (default: the preset, else retriever.pooling).")
QueryPrefixOpt = typer.Option(None, "--query-prefix",
                              help='Prepended to queries at search time, e.g. "query: " (e5).')


@index_app.command("build")
def index_build(
    corpus: Path = typer.Option(..., "--corpus", help="Corpus in Search-R1 format (jsonl or parquet)."),
    out: Path = typer.Option(..., "--out", help="Output index folder."),
    encoder: Optional[str] = typer.Option(None, "--encoder", help="Local HF encoder folder (default: packaged MiniLM)."),
    shards: int = typer.Option(1, "--shards", min=1),
    kind: Optional[str] = typer.Option(None, "--kind", help="dense (encoder + FAISS) or bm25 (bm25s, global IDF; "
                                       "retriever.bm25_* settings). Default: retriever.kind, auto = dense."),
    factory: str = typer.Option("Flat", "--factory", help="faiss index_factory string."),
    batch_size: int = typer.Option(256, "--batch-size", min=1),
    preset: Optional[str] = PresetOpt, pooling: Optional[str] = PoolingOpt,
    query_prefix: Optional[str] = QueryPrefixOpt,
    passage_prefix: Optional[str] = typer.Option(None, "--passage-prefix", help='Prepended to passages when they '
                                                 'are encoded, e.g. "passage: " (e5).'),
    config: Optional[Path] = ConfigOpt, set_: Optional[list[str]] = SetOpt,
):
    """Embed a corpus and write a sharded FAISS index with a manifest (resumable); --kind bm25:
    a sharded BM25 index instead."""
    cfg = _config(config, set_, "index", **{"retriever.encoder": encoder})
    from retriever.bm25 import build_bm25, build_kind
    from retriever.docstore import CorpusError
    from retriever.index import IndexFolderError, build_index
    from retriever.presets import warn_conventions, with_preset

    try:
        if build_kind(cfg.retriever, kind) == "bm25":
            build_bm25(cfg.retriever, corpus=corpus, out=out, shards=shards)
            return
        rc = with_preset(cfg.retriever, preset, None, pooling, query_prefix, passage_prefix)
        m = build_index(rc, corpus=corpus, out=out, shards=shards, factory=factory, batch_size=batch_size)
    except (CorpusError, IndexFolderError, ValueError, FileNotFoundError) as e:
        _fail(str(e))
    except KeyboardInterrupt:
        typer.echo(f"interrupted: run the same command again to resume the build in {out}", err=True)
        raise typer.Exit(130)
    warn_conventions(m["encoder"])


@index_app.command("import")
def index_import(
    faiss_file: Path = typer.Option(..., "--faiss", help="Prebuilt FAISS index: Flat (e5_Flat.index), IVF-Flat/PQ/SQ "
                                    "(also in an IDMap or behind a pre-transform) or HNSW-Flat; inner product or L2."),
    corpus: Path = typer.Option(..., "--corpus", help="The corpus it was encoded from, in index row order (jsonl)."),
    out: Path = typer.Option(..., "--out", help="Output index folder (missing or empty)."),
    shards: int = typer.Option(1, "--shards", min=1, help="Contiguous row ranges; IVF is split by id without "
                               "decoding, HNSW with N>1 rebuilds one graph per shard from the index's vectors."),
    encoder: Optional[str] = typer.Option(None, "--encoder", help="Local HF encoder folder the index was built "
                                          "with (default: packaged MiniLM)."),
    preset: Optional[str] = PresetOpt, pooling: Optional[str] = PoolingOpt,
    query_prefix: Optional[str] = QueryPrefixOpt,
    passage_prefix: Optional[str] = typer.Option(None, "--passage-prefix", help='Recorded only: "passage: " for e5.'),
    metric: Optional[str] = typer.Option(None, "--metric", help="ip or l2: read from the index; given, it must agree "
                                         "with the file (a check)."),
    nprobe: Optional[int] = typer.Option(None, "--nprobe", min=1, help="IVF lists searched per query, stored in the "
                                         "shards (default: the file's; retriever.search_params overrides at serving)."),
    config: Optional[Path] = ConfigOpt, set_: Optional[list[str]] = SetOpt,
):
    """Import a prebuilt FAISS index without re-encoding (docstore, shards of the same type, manifest)."""
    cfg = _config(config, set_, "index")
    from retriever.docstore import CorpusError
    from retriever.importer import import_faiss
    from retriever.index import IndexFolderError

    try:
        m = import_faiss(cfg.retriever, faiss_file, corpus, out, shards=shards, encoder=encoder, pooling=pooling,
                         query_prefix=query_prefix, passage_prefix=passage_prefix, metric=metric, preset=preset,
                         nprobe=nprobe)
    except (CorpusError, IndexFolderError, ValueError, FileNotFoundError) as e:
        _fail(str(e))
    except KeyboardInterrupt:
        typer.echo(f"interrupted: nothing was written to {out}; run the command again", err=True)
        raise typer.Exit(130)
    typer.echo(f"imported {faiss_file} into {out}: {m['count']} passages, {len(m['shards'])} shards, dim {m['dim']}, "
               f"{m['factory']}, metric {m['metric']}, encoder {m['encoder']['path']}")


@app.command()
def actor(
    gpus: Optional[str] = typer.Option(None, "--gpus", help="One worker per GPU: 0-3, 0,2,5 or all. With "
                                        "CUDA_VISIBLE_DEVICES set: all = its entries, a list = indices into them."),
    workers: Optional[int] = typer.Option(None, "--workers", help="CPU workers when no --gpus."),
    model: Optional[Path] = typer.Option(None, "--model", help="Local HF causal-LM folder."),
    stay: bool = typer.Option(False, "--stay", help="When the learner's run ends, wait for a new learner run "
                              "instead of exiting 0 (actor.stay)."),
    config: Optional[Path] = ConfigOpt, set_: Optional[list[str]] = SetOpt,
):
    """Run rollout workers (one engine per GPU) that stream groups to the learner; exit 0 when the
    learner's run ends (unless --stay)."""
    cfg = _config(config, set_, "actor", **{"actor.gpus": gpus, "actor.workers": workers,
                                            "actor.model": str(model) if model else None,
                                            "actor.stay": True if stay else None})
    from actors.main import main

    raise typer.Exit(main(cfg))


@app.command()
def learner(
    resume: bool = typer.Option(False, "--resume", help="Continue from the latest complete checkpoint."),
    model: Optional[Path] = typer.Option(None, "--model", help="Local HF causal-LM folder."),
    config: Optional[Path] = ConfigOpt, set_: Optional[list[str]] = SetOpt,
):
    """Train with importance-corrected GRPO (FSDP2; launch under torchrun for several ranks)."""
    cfg = _config(config, set_, "learner", **{"learner.model": str(model) if model else None})
    from common.config import ConfigError
    from learner.main import main

    try:
        code = main(cfg, resume=resume)
    except ConfigError as e:
        _fail(str(e))
    raise typer.Exit(code)


@app.command()
def demo(
    no_search: bool = typer.Option(False, "--no-search", help="Disable retrieval (control run)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Learner steps."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of everything: the world, the base model's "
                                       "initialisation and data, RL sampling and prompt order (demo.seed)."),
    world: Optional[str] = typer.Option(None, "--world", help="single (one search per answer) or multihop "
                                        "(two chained searches: demo.world)."),
    prepare_only: bool = typer.Option(False, "--prepare-only", help="Build (or find cached) the world, its "
                                      "indexes and the base model under demo.dir, then exit."),
    config: Optional[Path] = ConfigOpt, set_: Optional[list[str]] = SetOpt,
):
    """Embedded default: build the toy world and run the whole system on this machine."""
    cfg = _config(config, set_, "demo", log=False, **{"demo.no_search": no_search or None, "demo.steps": steps,
                                                      "demo.seed": seed, "demo.world": world})
    from demo.run import main

    raise typer.Exit(main(cfg, prepare_only=prepare_only))


@app.command("eval")
def evaluate(
    model: Path = typer.Option(..., "--model", help="Local HF causal-LM folder."),
    data: Path = typer.Option(..., "--data", help="QA file (jsonl/parquet: question, golden_answers)."),
    config: Optional[Path] = ConfigOpt, set_: Optional[list[str]] = SetOpt,
):
    """Greedy EM / F1 / search rate of a model through the real rollout loop."""
    cfg = _config(config, set_, "eval", **{"actor.model": str(model)})
    from actors.evaluate import main

    raise typer.Exit(main(cfg, data))


@keys_app.command("generate")
def keys_generate(
    directory: Path = typer.Argument(..., help="Folder for the key pairs."),
    client: list[str] = typer.Option(["client"], "--client", help="Client key names to authorise."),
):
    """Make CurveZMQ key pairs: server + authorised clients. Point transport.curve_dir at DIR."""
    from common.transport import generate_keys

    made = generate_keys(directory, tuple(client))
    for name, path in made.items():
        typer.echo(f"{name}: {path}")
    typer.echo(f"set transport.curve_dir = {str(directory)!r} on every role")


@app.command()
def export(ckpt: Path = typer.Argument(...), out: Path = typer.Argument(...)):
    """Write a learner checkpoint as an HF folder (safetensors + config + tokenizer)."""
    try:
        from learner.checkpoint import export_hf
    except ImportError:
        _fail("`export` is not available yet: the learner issue (#5) has not landed")
    try:
        export_hf(ckpt, out)
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e))
    typer.echo(f"exported to {out}")


@app.command()
def report(run_dir: Path = typer.Argument(...)):
    """PNG plots and a text summary from what a run logged."""
    try:
        from learner.report import main
    except ImportError:
        _fail("`report` is not available yet: the observability issue (#7) has not landed")
    raise typer.Exit(main(run_dir))


if __name__ == "__main__":
    try:
        app()
    finally:
        from common.procs import skip_final_collections

        skip_final_collections()
