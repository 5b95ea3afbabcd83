"""Inference precision: resolution (capability + cached micro-benchmark), overrides, the bf16
quality guard, and the collection manifest's record of it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vlsearch.models import factory as models, precision as P
from vlsearch.core.errors import PrecisionError

X86_AMX = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
X86_AVX2 = "processor\t: 0\nflags\t\t: fpu sse avx avx2 fma f16c\n"
ARM_BF16 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"


def _cap(text: str) -> P.CpuCapability:
    return P.cpu_capability(text)


def test_capability_reads_bf16_instructions_from_cpuinfo():
    assert _cap(X86_AMX).bf16_flags == ("amx_bf16", "avx512_bf16") and _cap(X86_AMX).native_bf16
    assert _cap(ARM_BF16).native_bf16 is True
    assert _cap(X86_AVX2).native_bf16 is False and "no bf16" in _cap(X86_AVX2).describe()
    assert _cap("").native_bf16 is None  # unknown platform: the benchmark decides


class _FakeBench:
    """Stands in for the timing itself (the only part mocked): returns fixed speed-ups, counts calls."""

    def __init__(self, matmul: float, conv: float):
        self.speedup, self.calls = {"matmul": matmul, "conv": conv}, 0

    def __call__(self, budget_s: float = 0.25) -> P.Bf16Benchmark:
        self.calls += 1
        return P.Bf16Benchmark(dict(self.speedup), 0.01, "fake")


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("VLSEARCH_CACHE_DIR", str(tmp_path))
    return tmp_path


VIT_LIKE = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 4, stride=4), torch.nn.Flatten(), torch.nn.Linear(8, 8))
CONVNET = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.Linear(8, 8))


def test_op_kinds_separate_spatial_convolutions_from_matmuls():
    assert P.op_kinds(VIT_LIKE) == ("matmul",)  # a patch embedding (kernel == stride) is a matmul
    assert P.op_kinds(CONVNET) == ("matmul", "conv")
    assert P.op_kinds(None) == P.OP_KINDS


def test_auto_on_a_cpu_without_bf16_is_fp32_without_benchmarking(cache_dir, monkeypatch):
    fake = _FakeBench(5.0, 5.0)
    monkeypatch.setattr(P, "benchmark_bf16", fake)
    choice = P.resolve_precision("auto", "cpu", VIT_LIKE, capability=_cap(X86_AVX2))
    assert (choice.name, choice.mode) == ("fp32", "none") and "emulated" in choice.reason
    assert fake.calls == 0


@pytest.mark.parametrize("model, matmul, conv, expected", [
    (VIT_LIKE, 4.9, 0.5, "bf16"),   # fast matmuls: a transformer tower gains
    (CONVNET, 4.9, 0.5, "fp32"),    # slow bf16 convolutions: a conv tower would lose
    (CONVNET, 3.0, 2.0, "bf16"),
    (VIT_LIKE, 1.1, 3.0, "fp32"),   # below MIN_SPEEDUP
])
def test_auto_decides_from_the_benchmark_per_op_kind(cache_dir, monkeypatch, model, matmul, conv, expected):
    monkeypatch.setattr(P, "benchmark_bf16", _FakeBench(matmul, conv))
    choice = P.resolve_precision("auto", "cpu", model, capability=_cap(X86_AMX))
    assert choice.name == expected
    assert ("weights" if expected == "bf16" else "none") == choice.mode
    assert "micro-benchmark" in choice.reason and f"{matmul:.2f}x" in choice.reason


def test_benchmark_result_is_cached_per_cpu_torch_and_threads(cache_dir, monkeypatch):
    fake = _FakeBench(3.0, 3.0)
    monkeypatch.setattr(P, "benchmark_bf16", fake)
    cap = _cap(X86_AMX)
    for _ in range(3):
        assert P.resolve_precision("auto", "cpu", VIT_LIKE, capability=cap).name == "bf16"
    assert fake.calls == 1
    stored = json.loads((cache_dir / P.CACHE_FILE).read_text())
    assert stored[cap.key]["speedup"] == {"matmul": 3.0, "conv": 3.0}
    assert f"torch {torch.__version__}" in cap.key and "amx_bf16" in cap.key
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if before > 1 else 2)  # another thread count: another measurement
        P.resolve_precision("auto", "cpu", VIT_LIKE, capability=cap)
    finally:
        torch.set_num_threads(before)
    assert fake.calls == 2 and len(json.loads((cache_dir / P.CACHE_FILE).read_text())) == 2


def test_an_entry_of_the_old_probe_is_measured_again(cache_dir, monkeypatch):
    """Version 1 of the probe could cache "bf16 is no faster" from one burst of load; its entries
    (keys without the probe version) are not trusted: the interleaved probe runs again."""
    fake = _FakeBench(3.0, 3.0)
    monkeypatch.setattr(P, "benchmark_bf16", fake)
    cap = _cap(X86_AMX)
    old_key = cap.key.rsplit("|probe ", 1)[0]
    (cache_dir / P.CACHE_FILE).write_text(json.dumps({old_key: {"speedup": {"matmul": 0.998, "conv": 1.5},
                                                                 "seconds": 0.4}}))
    assert P.resolve_precision("auto", "cpu", VIT_LIKE, capability=cap).name == "bf16" and fake.calls == 1


def test_a_corrupt_or_unwritable_cache_is_not_fatal(cache_dir, monkeypatch):
    fake = _FakeBench(3.0, 3.0)
    monkeypatch.setattr(P, "benchmark_bf16", fake)
    (cache_dir / P.CACHE_FILE).write_text("{not json")
    assert P.resolve_precision("auto", "cpu", VIT_LIKE, capability=_cap(X86_AMX)).name == "bf16"
    assert json.loads((cache_dir / P.CACHE_FILE).read_text())  # rewritten whole
    monkeypatch.setenv("VLSEARCH_CACHE_DIR", str(cache_dir / "file-not-dir" / "x"))
    (cache_dir / "file-not-dir").write_text("")
    assert P.resolve_precision("auto", "cpu", VIT_LIKE, capability=_cap(X86_AMX)).name == "bf16"


def test_real_micro_benchmark_measures_both_op_kinds():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    result = P.benchmark_bf16(budget_s=0.05)
    assert torch.equal(torch.rand(3), expected)  # the caller's RNG stream is left alone
    assert set(result.speedup) == set(P.OP_KINDS)
    assert all(np.isfinite(v) and v > 0 for v in result.speedup.values())


def test_explicit_precision_overrides_auto_and_bad_values_are_clear_errors():
    cap = _cap(X86_AVX2)
    assert P.resolve_precision("BF16", "cpu", capability=cap) == P.PrecisionChoice("bf16", "weights", "requested bf16")
    assert P.resolve_precision("int8", "cpu").mode == "quantized"
    assert P.resolve_precision("fp32", "cpu").mode == "none"
    with pytest.raises(PrecisionError, match="one of auto, fp32, bf16, fp16, int8.*'fp8'"):
        P.resolve_precision("fp8", "cpu")
    with pytest.raises(PrecisionError, match="CPU only"):
        P.resolve_precision("int8", "cuda")


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (48 + 8 * i, 64, 3), dtype=np.uint8)) for i in range(8)]


TEXTS = ["a red circle on the left", "two dogs play in the snow", "a man rides a bike", "blue square"]


def test_bf16_embeddings_agree_with_fp32(tiny_checkpoint, one_torch_thread):
    """The quality guard: bf16 weights+inputs give float32 unit vectors within cosine 0.999 of fp32."""
    from vlsearch.models.factory import TINY_MODEL, load_model

    out = {}
    for name in ("fp32", "bf16", "int8"):
        enc = load_model(TINY_MODEL, pretrained=tiny_checkpoint, device="cpu", precision=name)
        assert enc.precision == name
        out[name] = (enc.encode_images(_images(), batch_size=4), enc.encode_texts(TEXTS))
    for name, vectors in out.items():
        for v in vectors:
            assert v.dtype == np.float32 and np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5), name
    for ref, bf16 in zip(out["fp32"], out["bf16"]):
        assert (ref * bf16).sum(1).min() >= 0.999
        assert not np.array_equal(ref, bf16)  # it really computed in bf16


def test_unknown_precision_fails_before_the_model_loads(monkeypatch):
    monkeypatch.setattr(models, "_create", lambda *a: pytest.fail("model built before the check"))
    with pytest.raises(PrecisionError):
        models.load_model(models.TINY_MODEL, device="cpu", precision="half")


def test_manifest_records_precision_and_old_manifests_still_open(tmp_path, tiny_checkpoint):
    from indexing.embed import EmbedConfig, embed
    from vlsearch.store.layout import MANIFEST
    from vlsearch.store.collection import Collection
    from vlsearch.models.factory import TINY_MODEL, load_model

    (tmp_path / "src").mkdir()
    for i, img in enumerate(_images()[:3]):
        img.save(tmp_path / "src" / f"{i}.jpg")
    config = EmbedConfig(model=TINY_MODEL, workers=0, batch_size=2, shard_size=2, device="cpu")
    bf16 = load_model(TINY_MODEL, pretrained=tiny_checkpoint, device="cpu", precision="bf16")
    coll = embed(tmp_path / "src", tmp_path / "c", config, encoder=bf16)
    assert coll.manifest.precision == "bf16"
    data = json.loads((tmp_path / "c" / MANIFEST).read_text())
    assert data["precision"] == "bf16"
    ids, vectors = coll.read_embeddings()
    assert len(ids) == 3 and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=2e-3)  # unit norm (stored as fp16)
    del data["precision"]  # a collection written before precision was recorded
    (tmp_path / "c" / MANIFEST).write_text(json.dumps(data))
    old = Collection.open(tmp_path / "c")
    assert old.manifest.precision is None and "precision" not in old.manifest.to_dict()


def test_a_resume_in_another_precision_is_recorded(tmp_path, tiny_checkpoint, monkeypatch):
    from indexing.embed import EmbedConfig, embed
    from vlsearch.store.collection import Collection
    from vlsearch.models.factory import TINY_MODEL, load_model

    (tmp_path / "src").mkdir()
    for i, img in enumerate(_images()[:4]):
        img.save(tmp_path / "src" / f"{i}.jpg")
    config = EmbedConfig(model=TINY_MODEL, workers=0, batch_size=2, shard_size=2, device="cpu")
    real_write = Collection.write_shard

    def crash_on_second_shard(self, number, *args, **kwargs):
        if number == 1:
            raise KeyboardInterrupt
        return real_write(self, number, *args, **kwargs)

    monkeypatch.setattr(Collection, "write_shard", crash_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        embed(tmp_path / "src", tmp_path / "c", config,
              encoder=load_model(TINY_MODEL, pretrained=tiny_checkpoint, device="cpu", precision="fp32"))
    monkeypatch.setattr(Collection, "write_shard", real_write)
    coll = embed(tmp_path / "src", tmp_path / "c", config,
                 encoder=load_model(TINY_MODEL, pretrained=tiny_checkpoint, device="cpu", precision="bf16"))
    assert coll.manifest.complete and coll.manifest.precision == "fp32+bf16"


def test_cli_precision_option_and_info(tiny_checkpoint):
    from typer.testing import CliRunner

    from vlsearch.app.cli import app

    runner = CliRunner()
    bad = runner.invoke(app, ["encode", "a dog", "--model", "vlsearch-tiny", "--pretrained", str(tiny_checkpoint),
                              "--precision", "fp8"])
    assert bad.exit_code == 1 and "precision must be one of" in bad.output
    ok = runner.invoke(app, ["encode", "a dog", "--model", "vlsearch-tiny", "--pretrained", str(tiny_checkpoint),
                             "--precision", "bf16"])
    assert ok.exit_code == 0, ok.output
    vec = np.array(json.loads(ok.output.strip().splitlines()[-1])["embedding"])
    assert abs(np.linalg.norm(vec) - 1) < 1e-4
    info = json.loads(runner.invoke(app, ["info", "--json"]).output)
    assert info["precision_auto"] in ("fp32", "bf16", "fp16") and info["precision_reason"]
    for command in ("embed", "index", "search", "encode", "classify", "demo"):
        assert "--precision" in runner.invoke(app, [command, "--help"]).output, command
