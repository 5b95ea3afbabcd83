from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from vlsearch.app.cli import app

runner = CliRunner()


def _commands() -> list[str]:
    import typer.main

    group = typer.main.get_command(app)
    return sorted(group.commands)


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
