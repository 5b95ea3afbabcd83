"""The ``vlsearch`` command line: thin typer commands over the Python API.

This module is the only place that prints or exits. Library errors (``VlsearchError``) become a
one-line message on stderr and exit code 1; progress callbacks become tqdm bars. Heavy imports
(torch, open_clip, faiss) happen inside commands so ``--help`` stays fast.
"""

from __future__ import annotations

import functools
import json
import logging
import platform
from typing import Any, Callable, Optional

import typer

app = typer.Typer(
    name="vlsearch",
    help="Image-text retrieval: embed image galleries, build FAISS indexes, search by text or image, benchmark.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn vlsearch's typed exceptions into a clear message and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from .errors import VlsearchError

        try:
            return fn(*args, **kwargs)
        except VlsearchError as exc:
            typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            typer.secho("interrupted", err=True)
            raise typer.Exit(130) from None

    return wrapper


class TqdmProgress:
    """A progress callback for library functions, shown as a tqdm bar.

    Library functions call ``progress(done, total, **postfix)``; ``total`` may be None.
    """

    def __init__(self, desc: str, unit: str = "it"):
        from tqdm import tqdm

        self.bar = tqdm(desc=desc, unit=unit, dynamic_ncols=True)

    def __call__(self, done: int, total: Optional[int] = None, **postfix: Any) -> None:
        if total is not None and self.bar.total != total:
            self.bar.total = total
        self.bar.n = done
        if postfix:
            self.bar.set_postfix(postfix, refresh=False)
        self.bar.refresh()

    def __enter__(self) -> "TqdmProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.close()


@app.callback()
def main(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug details to stderr."),
) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )


@app.command("models")
@handle_errors
def models_cmd(
    name: Optional[str] = typer.Argument(None, help="Show the pretrained tags of this model only."),
    tags: bool = typer.Option(False, "--tags", help="List every model with its pretrained tags."),
) -> None:
    """List model architectures (open_clip's and vlsearch's built-in ones) and pretrained tags."""
    from . import models

    if name:
        models._check_name(name)
        typer.echo("\n".join(models.pretrained_tags(name)) or f"{name}: no published tags (random init or a local file)")
        return
    for model_name in models.available_models():
        line = model_name
        if tags:
            line += "\t" + ",".join(models.pretrained_tags(model_name))
        typer.echo(line)


@app.command("info")
def info_cmd(as_json: bool = typer.Option(False, "--json", help="Print one JSON object.")) -> None:
    """Print versions, the compute device and how many GPUs FAISS sees."""
    import faiss
    import open_clip
    import torch

    from . import __version__

    info = {
        "vlsearch": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "faiss": faiss.__version__,
        "cuda_available": torch.cuda.is_available(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "torch_threads": torch.get_num_threads(),
        "faiss_gpus": faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0,
    }
    if as_json:
        typer.echo(json.dumps(info))
    else:
        for key, value in info.items():
            typer.echo(f"{key:15} {value}")


@app.command("encode")
@handle_errors
def encode_cmd(
    texts: list[str] = typer.Argument(None, help="Texts to encode."),
    image: list[str] = typer.Option([], "--image", "-i", help="Image file to encode (repeatable)."),
    model: str = typer.Option(None, "--model", "-m", help="Model name (default: the built-in default model)."),
    pretrained: Optional[str] = typer.Option(None, "--pretrained", "-p", help="Tag, hf-hub:org/repo, or checkpoint file."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
) -> None:
    """Encode texts and/or images and print one JSON line per input (its embedding)."""
    from .models import DEFAULT_MODEL, load_model

    enc = load_model(model or DEFAULT_MODEL, pretrained, device=device)
    rows = []
    if texts:
        rows += [("text", t, v) for t, v in zip(texts, enc.encode_texts(texts))]
    if image:
        rows += [("image", p, v) for p, v in zip(image, enc.encode_images(image))]
    if not rows:
        raise typer.BadParameter("give at least one text or --image")
    for kind, value, vec in rows:
        typer.echo(json.dumps({kind: value, "model": enc.name, "dim": enc.dim, "embedding": [round(float(x), 6) for x in vec]}))


def _int_list(value: str, option: str) -> tuple[int, ...]:
    try:
        items = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        items = ()
    if not items or any(v < 1 for v in items):
        raise typer.BadParameter(f"expected comma-separated positive integers, got {value!r}", param_hint=option)
    return items


@app.command("bench")
@handle_errors
def bench_cmd(
    collection_dir: str = typer.Argument(..., help="Collection with caption shards (e.g. built from captions.csv)."),
    k: str = typer.Option("1,5,10", "--k", help="Recall@K cut-offs, comma-separated; the largest is the ANN depth."),
    nprobe: str = typer.Option("1,4,16,64,256", "--nprobe", help="IVF lists probed, comma-separated."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Write all results to this JSON file."),
    plot: Optional[str] = typer.Option(None, "--plot", help="Write a recall-vs-QPS plot (needs matplotlib)."),
    latency_queries: int = typer.Option(1000, "--latency-queries", min=0, help="Single queries timed for p50/p99."),
    max_queries: Optional[int] = typer.Option(None, "--max-queries", min=1, help="Evaluate a seeded sample of queries."),
) -> None:
    """Recall@K / MRR / median rank both ways (exact), and ANN recall, QPS and latency per nprobe."""
    from .bench import BenchConfig, format_table, plot_results, run_benchmark
    from .fsutil import write_json

    config = BenchConfig(ks=_int_list(k, "--k"), nprobes=_int_list(nprobe, "--nprobe"),
                         latency_queries=latency_queries, max_queries=max_queries)
    with TqdmProgress("bench", unit="setting") as progress:
        result = run_benchmark(collection_dir, config, progress=progress)
    typer.echo(format_table(result))
    if out:
        write_json(out, result)
        typer.echo(f"results: {out}")
    if plot:
        typer.echo(f"plot: {plot_results(result, plot)}")


if __name__ == "__main__":  # pragma: no cover
    app()
