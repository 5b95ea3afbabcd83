"""Command-line option groups: each option is declared once and shared by the commands that take it.

A group is a frozen dataclass whose fields are typer options (``EmbedOptions``, ``BuildOptions``)
or a table of overrides (``TRAIN``). :func:`with_groups` adds a group's options to a command's
signature and hands the command one object per group, so ``embed``, ``index`` and
``build-index`` spell their 16 options in one place and each command stays a few lines long.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from dataclasses import dataclass
from typing import Any, Callable, Optional

import typer

# ---- single options shared by several commands -----------------------------------------------
MODEL_OPT = typer.Option(None, "--model", "-m", help="Model name (default: the built-in default model).")
PRETRAINED_OPT = typer.Option(None, "--pretrained", "-p", help="Tag, hf-hub:org/repo, or checkpoint file.")
DEVICE_OPT = typer.Option("auto", help="auto, cpu or cuda.")
PRECISION_OPT = typer.Option("auto", "--precision", help="Inference precision: auto (bf16 where this CPU/GPU runs "
                             "it fast, else fp32; `vlsearch info` says which), fp32, bf16, fp16 or int8 (CPU).")
SOURCE_ARG = typer.Argument(..., help="Image folder, .csv/.parquet manifest, .tar shard(s) (folder or glob).")
COLLECTION_OUT_ARG = typer.Argument(..., help="Output collection directory (created, resumed, or synced).")
COLLECTION_ARG = typer.Argument(..., help="Collection directory (from `vlsearch embed`).")


def _option(default: Any, *flags: str, **kwargs: Any) -> Any:
    return dataclasses.field(default=default, metadata={"option": typer.Option(default, *flags, **kwargs)})


@dataclass(frozen=True)
class EmbedOptions:
    """The options of ``embed`` and ``index``: how a source is read and encoded."""

    model: Optional[str] = dataclasses.field(default=None, metadata={"option": MODEL_OPT})
    pretrained: Optional[str] = dataclasses.field(default=None, metadata={"option": PRETRAINED_OPT})
    batch_size: int = _option(64, "--batch-size", "-b", min=1, help="Images per forward pass.")
    workers: Optional[int] = _option(None, "--workers", "-w", min=0,
                                     help="Decoding processes (0: decode in the main process; default: every core "
                                          "but one with a GPU, else the cores torch leaves free, at least 2).")
    device: str = dataclasses.field(default="auto", metadata={"option": DEVICE_OPT})
    precision: str = dataclasses.field(default="auto", metadata={"option": PRECISION_OPT})
    shard_size: int = _option(10_000, "--shard-size", min=1, help="Source records per Parquet shard.")
    threads: Optional[int] = _option(None, "--threads", min=1, help="torch threads of the encoding process.")
    decode_timeout: float = _option(30.0, "--decode-timeout", min=0.0,
                                    help="Seconds per image before it is refused (0: none).")
    source_type: str = _option("auto", "--source-type", help="auto, folder, manifest or webdataset.")
    image_column: Optional[str] = _option(None, "--image-column", help="Manifest column of image paths.")
    caption_column: Optional[str] = _option(None, "--caption-column", help="Manifest column of captions.")
    dry_run: bool = _option(False, "--dry-run", help="On a finished collection: list what a sync would change, "
                            "write nothing.")

    def config(self) -> Any:
        """The :class:`indexing.embed.EmbedConfig` these options describe."""
        from indexing.embed import EmbedConfig

        return EmbedConfig(model=self.model, pretrained=self.pretrained, batch_size=self.batch_size,
                           workers=self.workers, device=self.device, precision=self.precision,
                           shard_size=self.shard_size,
                           threads=self.threads, decode_timeout=self.decode_timeout or None)

    def open_source(self, source: str) -> Any:
        from vlsearch.data.sources import open_source

        return open_source(source, kind=self.source_type, image_column=self.image_column,
                           caption_column=self.caption_column)


@dataclass(frozen=True)
class BuildOptions:
    """The options of ``build-index`` and ``index``: which index and how it is tuned."""

    index_type: str = _option("auto", "--index-type", "-t",
                              help="'auto' or a FAISS factory string, e.g. 'IVF4096,PQ32x4fs,Refine(SQ8)' or 'Flat'; "
                                   "',Refine(disk)' after an IVF index re-scores exactly from an fp16 file on disk.")
    max_memory: str = _option("4GB", "--max-memory", help="Memory budget of the index and the build (e.g. 4GB).")
    max_bytes_per_vector: Optional[int] = _option(
        None, "--max-bytes-per-vector", min=12,
        help="auto: resident index bytes per vector (e.g. 80); below a full-dimension SQ8 code the shortlist "
             "is re-scored exactly from an fp16 file on disk.")
    nprobe_default: Optional[int] = _option(None, "--nprobe-default", min=1, help="Fix nprobe instead of tuning it.")
    k_factor_default: Optional[float] = _option(None, "--k-factor-default", min=1.0,
                                                help="Fix the refine k_factor instead of tuning it.")
    train_size: Optional[int] = _option(None, "--train-size", min=1, help="Training sample size (default: auto).")
    seed: int = _option(0, "--seed", help="Seed of the training sample and k-means (reproducible builds).")

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`indexing.build.build_index`."""
        return {**dataclasses.asdict(self), "metric": "ip"}


@dataclass(frozen=True)
class EngineOptions:
    """Where ``embed``, ``build-index`` and ``index`` run: here, or on a Ray cluster."""

    engine: str = _option("local", "--engine",
                          help="local (this process) or ray (a Ray cluster; pip install 'vlsearch[ray]').")
    address: Optional[str] = _option(None, "--address",
                                     help="Ray cluster: auto, ray://head:10001 (default: $RAY_ADDRESS or a new local Ray).")
    actors: int = _option(2, "--actors", min=1, help="Ray: parallel actors/tasks (one model per embedding actor).")
    gpus_per_actor: float = _option(0.0, "--gpus-per-actor", min=0.0, help="Ray: GPUs per actor (e.g. 1, or 0.5).")

    def ray_config(self) -> Any:
        """The :class:`indexing.ray_engine.RayConfig` of ``--engine ray``; None for the local engine."""
        if self.engine not in ("local", "ray"):
            raise typer.BadParameter(f"--engine must be local or ray, not {self.engine!r}")
        if self.engine == "local":
            return None
        from indexing.ray_engine import RayConfig

        return RayConfig(address=self.address, actors=self.actors, gpus_per_actor=self.gpus_per_actor)


@dataclass(frozen=True)
class PartsOptions:
    """How ``--engine ray`` splits and merges an index build."""

    parts: Optional[int] = _option(None, "--parts", min=1,
                                   help="Ray: index parts built in parallel, then merged (default 2 x actors).")
    on_disk: bool = _option(False, "--on-disk", help="Ray: merge the inverted lists into a file beside the index "
                                                     "(memory-mapped by searches; needs a plain IVF code).")


# ---- train: every flag is an override of the config file (or of TrainConfig's defaults) -----------
@dataclass(frozen=True)
class TrainFlag:
    """One ``vlsearch train`` flag: what it sets in the config (``to`` maps its value to overrides)."""

    name: str
    type: type
    flags: tuple[str, ...]
    key: str
    default: str  #: TrainConfig's default as shown in --help (tests check it against TrainConfig)
    help: str = ""
    limits: dict[str, float] = dataclasses.field(default_factory=dict)
    to: Optional[Callable[[Any], dict[str, Any]]] = None

    def overrides(self, value: Any) -> dict[str, Any]:
        return self.to(value) if self.to is not None else {self.key: value}


TRAIN_FLAGS: tuple[TrainFlag, ...] = (
    TrainFlag("model", str, ("--model", "-m"), "model", "vlsearch-tiny", "open_clip architecture to train."),
    TrainFlag("pretrained", str, ("--pretrained", "-p"), "pretrained", "none", "Start from these weights (tag or file)."),
    TrainFlag("epochs", int, ("--epochs",), "epochs", "10", limits={"min": 1}),
    TrainFlag("batch_size", int, ("--batch-size", "-b"), "batch_size", "128", limits={"min": 2}),
    TrainFlag("lr", float, ("--lr",), "lr", "0.0005"),
    TrainFlag("weight_decay", float, ("--weight-decay",), "weight_decay", "0.2", limits={"min": 0.0}),
    TrainFlag("warmup_steps", int, ("--warmup-steps",), "warmup_steps", "100", limits={"min": 0}),
    TrainFlag("grad_clip", float, ("--grad-clip",), "grad_clip", "1.0", "Max gradient norm (0: no clipping).",
              {"min": 0.0}, lambda v: {"grad_clip": v or None}),
    TrainFlag("lock_text", bool, ("--lock-text/--no-lock-text",), "lock_text", "no", "Freeze the text tower (LiT)."),
    TrainFlag("unlocked_layers", int, ("--unlocked-text-layers",), "lock_text_unlocked_layers", "0",
              "With --lock-text: train its last N blocks.", {"min": 0}),
    TrainFlag("lock_image", bool, ("--lock-image/--no-lock-image",), "lock_image", "no",
              "Freeze the image tower (a timm trunk: its head trains)."),
    TrainFlag("unlocked_groups", int, ("--unlocked-image-groups",), "lock_image_unlocked_groups", "0",
              "With --lock-image: train the last N stages of the timm trunk.", {"min": 0}),
    TrainFlag("pretrained_image", str, ("--pretrained-image",), "pretrained_image", "none",
              "Load the timm image trunk from this weights file first."),
    TrainFlag("precompute_image", bool, ("--precompute-image/--no-precompute-image",), "precompute_image", "auto",
              "Run the locked image layers once and cache their output (default: with --lock-image)."),
    TrainFlag("image_views", int, ("--image-views",), "image_views", "1",
              "Precomputed views per image: the plain one + N-1 augmented.", {"min": 1}),
    TrainFlag("image_size", int, ("--train-image-size",), "image_size", "none",
              "Training input size in px (none: the model's own).", {"min": 16}),
    TrainFlag("cache_dir", str, ("--cache-dir",), "cache_dir", "none", "Shared folder for precomputed feature caches."),
    TrainFlag("precompute_text", bool, ("--precompute-text/--no-precompute-text",), "precompute_text", "auto",
              "Cache the locked text layers' output once (default: with --lock-text)."),
    TrainFlag("augment", bool, ("--augment/--no-augment",), "augment", "on", "Random resized crop + colour jitter."),
    TrainFlag("crop_scale", float, ("--crop-scale",), "augment.scale", "0.8", "Smallest crop area fraction.",
              {"min": 0.05, "max": 1.0}, lambda v: {"augment.scale": [v, 1.0]}),
    TrainFlag("hflip", float, ("--hflip",), "augment.hflip", "0.0",
              "Horizontal flip probability (never for a caption that says left/right).", {"min": 0.0, "max": 1.0}),
    TrainFlag("color_jitter", float, ("--color-jitter",), "augment.brightness", "0.3",
              "Brightness/contrast jitter strength.", {"min": 0.0},
              lambda v: {"augment.brightness": v, "augment.contrast": v}),
    TrainFlag("val_fraction", float, ("--val-fraction",), "val_fraction", "0.05", "Images held out for validation.",
              {"min": 0.0, "max": 0.99}),
    TrainFlag("checkpoint_every", int, ("--checkpoint-every",), "checkpoint_every", "500",
              "Steps between last.pt saves.", {"min": 0}),
    TrainFlag("max_steps", int, ("--max-steps",), "max_steps", "none", limits={"min": 1}),
    TrainFlag("seed", int, ("--seed",), "seed", "0"),
    TrainFlag("device", str, ("--device",), "device", "auto", "auto, cpu or cuda."),
    TrainFlag("precision", str, ("--precision",), "precision", "auto", "auto, fp32, fp16 or bf16."),
    TrainFlag("workers", int, ("--workers", "-w"), "workers", "2", "Image decoding processes.", {"min": 0}),
    TrainFlag("threads", int, ("--threads",), "threads", "none", "torch CPU threads.", {"min": 1}),
    TrainFlag("captions_per_image", int, ("--captions-per-image",), "captions_per_image", "1",
              "Captions of each image per step (loss averaged over them).", {"min": 1}),
    TrainFlag("cache_images", bool, ("--cache-images/--no-cache-images",), "cache_images", "no",
              "Decode all images into memory once and augment batches as tensors (fast on CPU)."),
    TrainFlag("half", bool, ("--half/--no-half",), "half_final", "no", "Save model.pt in fp16."),
)


def train_overrides(values: dict[str, Any]) -> dict[str, Any]:
    """The config overrides of the train flags that were given (None: not given)."""
    out: dict[str, Any] = {}
    for flag in TRAIN_FLAGS:
        if values.get(flag.name) is not None:
            out.update(flag.overrides(values[flag.name]))
    return out


def _train_option(flag: TrainFlag) -> Any:
    text = f"{flag.help} [default: {flag.default}]".strip()
    return typer.Option(None, *flag.flags, help=text, show_default=False, **flag.limits)


# ---- groups -> command parameters --------------------------------------------------------------
@dataclass(frozen=True)
class OptionGroup:
    """Options added to a command's signature, gathered into one argument ``name`` by ``make``."""

    name: str
    parameters: tuple[inspect.Parameter, ...]
    make: Callable[[dict[str, Any]], Any]


def group_of(name: str, cls: type) -> OptionGroup:
    """The options of dataclass ``cls`` (from its fields' ``option`` metadata), made into a ``cls``."""
    hints = typing.get_type_hints(cls)
    params = tuple(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.metadata["option"],
                                     annotation=hints[f.name]) for f in dataclasses.fields(cls))
    return OptionGroup(name, params, lambda values: cls(**values))


EMBED = group_of("embed", EmbedOptions)
BUILD = group_of("build", BuildOptions)
ENGINE = group_of("engine", EngineOptions)
PARTS = group_of("parts", PartsOptions)
TRAIN = OptionGroup("overrides", tuple(
    inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=_train_option(f), annotation=Optional[f.type])
    for f in TRAIN_FLAGS), train_overrides)


def with_groups(*groups: OptionGroup) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Add the groups' options to the decorated command; it receives one object per group, by name."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        names = {g.name for g in groups}
        own = [p for p in inspect.signature(fn).parameters.values() if p.name not in names]
        hints = typing.get_type_hints(fn)
        own = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in own]

        @functools.wraps(fn)
        def command(**values: Any) -> Any:
            for g in groups:
                values[g.name] = g.make({p.name: values.pop(p.name) for p in g.parameters})
            return fn(**values)

        command.__signature__ = inspect.Signature(own + [p for g in groups for p in g.parameters])  # type: ignore[attr-defined]
        del command.__wrapped__  # typer must see the new signature, not fn's
        command.__annotations__ = {p.name: p.annotation for p in command.__signature__.parameters.values()}
        return command

    return decorate
