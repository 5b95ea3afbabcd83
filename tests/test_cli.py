from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import typer
import typer.main
from typer.testing import CliRunner

import vlsearch.app.cli as cli
from vlsearch.app.cli import app
from vlsearch.app.options import MODEL, ModelOptions, with_groups

runner = CliRunner()


def _commands() -> list[str]:
    group = typer.main.get_command(app)
    return sorted(group.commands)


def _leaf_commands(group=None) -> list[str]:
    """Every command that runs a function: top-level ones and those of groups (``import clip-retrieval``)."""
    group = group or typer.main.get_command(app)
    leaves = []
    for name, cmd in group.commands.items():
        leaves += [f"{name} {sub}" for sub in _leaf_commands(cmd)] if hasattr(cmd, "commands") else [name]
    return sorted(leaves)


def test_top_level_help_lists_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in _commands():
        assert name in result.output


@pytest.mark.parametrize("command", _commands())
def test_every_command_has_help(command):
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_models_lists_tiny_and_open_clip_models():
    result = runner.invoke(app, ["models"])
    assert result.exit_code == 0
    names = result.output.split()
    assert "vlsearch-tiny" in names and "ViT-B-32" in names


def test_models_tags_of_one_model():
    result = runner.invoke(app, ["models", "ViT-B-32"])
    assert result.exit_code == 0 and "laion2b_s34b_b79k" in result.output


def test_unknown_model_is_a_clean_error():
    result = runner.invoke(app, ["models", "ViT-B-3"])
    assert result.exit_code == 1
    assert "unknown model" in result.output and "Traceback" not in result.output


def test_info_json():
    result = runner.invoke(app, ["info", "--json"])
    assert result.exit_code == 0
    info = json.loads(result.output)
    assert info["faiss_gpus"] == 0 or info["cuda_available"]
    assert {"torch", "open_clip", "faiss", "device"} <= set(info)
    from indexing.decode import default_workers

    assert info["decode_workers"] == default_workers("cuda" if info["cuda_available"] else "cpu") >= 1
    from vlsearch.core import allocator

    assert info["encoding_malloc"] == ("reuse freed memory (glibc)" if allocator._glibc() else "system")
    opted_out = json.loads(runner.invoke(app, ["info", "--json"], env={"VLSEARCH_MALLOC": "system"}).output)
    assert opted_out["encoding_malloc"] == "system"


def test_encode_text_and_image(tmp_path, tiny_checkpoint):
    from PIL import Image

    Image.new("RGB", (30, 30), (9, 9, 9)).save(tmp_path / "a.png")
    result = runner.invoke(
        app, ["encode", "a dog", "--image", str(tmp_path / "a.png"), "--model", "vlsearch-tiny",
              "--pretrained", str(tiny_checkpoint)]
    )
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.output.strip().splitlines() if line.startswith("{")]
    assert [("text" in r, "image" in r) for r in rows] == [(True, False), (False, True)]
    assert all(len(r["embedding"]) == r["dim"] for r in rows)


def test_every_command_is_a_thin_function_over_the_library():
    """Each command stays <= 20 lines (def to last line): option groups live in options.py, logic in the library."""
    tree = ast.parse(Path(cli.__file__).read_text(encoding="utf-8"))
    sizes = {f.name: f.end_lineno - f.lineno + 1 for f in tree.body if isinstance(f, ast.FunctionDef)
             and any(isinstance(d, ast.Call) and getattr(d.func, "attr", "") == "command" for d in f.decorator_list)}
    assert len(sizes) == len(_leaf_commands())
    assert {name: n for name, n in sizes.items() if n > 20} == {}


def test_option_groups_take_the_place_the_command_gives_them():
    """with_groups: a group's options appear where the command names the group; the command gets one object."""
    seen = []
    toy = typer.Typer(add_completion=False)

    @toy.command()
    @with_groups(MODEL)
    def cmd(first: str = typer.Argument(...), model_options: ModelOptions = None,
            last: int = typer.Option(1, "--last")) -> None:
        seen.append((first, model_options, last))

    names = [p.name for p in typer.main.get_command(toy).params]
    assert names == ["first", "model", "pretrained", "device", "precision", "last"]
    result = runner.invoke(toy, ["x", "--model", "vlsearch-tiny", "--precision", "fp32", "--last", "3"])
    assert result.exit_code == 0, result.output
    assert seen == [("x", ModelOptions(model="vlsearch-tiny", precision="fp32"), 3)]
    with pytest.raises(TypeError, match="model_options"):
        with_groups(MODEL)(lambda first="x": None)


def test_encode_needs_a_text_or_an_image():
    result = runner.invoke(app, ["encode", "--model", "no-such-model"])
    assert result.exit_code == 2 and "give at least one text or --image" in result.output


@pytest.mark.parametrize("args, message", [
    (["q", "--image", "a.png"], "exactly one"),
    ([], "exactly one"),
    (["--image", "a.png", "--rerank", "10"], "text queries only"),
])
def test_search_takes_a_text_or_an_image(tmp_path, args, message):
    result = runner.invoke(app, ["search", str(tmp_path / "no-collection"), *args])
    assert result.exit_code == 2 and message in result.output
