"""engine.loader: locating checkpoints offline and streaming their weights."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig

from engine.loader import (
    ModelNotFoundError,
    ModelSource,
    WeightsError,
    iter_weights,
    load_hf_config,
    load_tokenizer,
    resolve_model,
)
from engine.loader.safetensors import iter_safetensors_weights

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


def _write_config(directory: Path, num_hidden_layers: int = 1) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=num_hidden_layers,
                         num_attention_heads=2, vocab_size=64, architectures=["LlamaForCausalLM"])
    config.save_pretrained(directory)
    return directory


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An HF hub cache holding org/tiny at two commits: main -> COMMIT, tag v2 -> OTHER_COMMIT."""
    cache = tmp_path / "hf-cache"
    repo = cache / "models--org--tiny"
    _write_config(repo / "snapshots" / COMMIT, num_hidden_layers=1)
    _write_config(repo / "snapshots" / OTHER_COMMIT, num_hidden_layers=2)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    (repo / "refs" / "v2").write_text(OTHER_COMMIT)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_resolve_local_directory(tmp_path: Path) -> None:
    directory = _write_config(tmp_path / "model")
    assert resolve_model(str(directory)) == ModelSource(directory.resolve())
    assert resolve_model(directory).gguf_file is None


def test_resolve_directory_without_config_names_it(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match=r"empty.*no config\.json"):
        resolve_model(tmp_path / "empty")


def test_resolve_gguf_file(tmp_path: Path) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_model(str(gguf)) == ModelSource(tmp_path.resolve(), gguf_file=gguf.resolve())


def test_resolve_hub_id_from_cache(hf_cache: Path) -> None:
    snapshots = hf_cache / "models--org--tiny" / "snapshots"
    assert resolve_model("org/tiny").path == snapshots / COMMIT
    assert resolve_model("org/tiny", revision="v2").path == snapshots / OTHER_COMMIT
    assert resolve_model("org/tiny", revision=OTHER_COMMIT).path == snapshots / OTHER_COMMIT
    assert load_hf_config("org/tiny", revision="v2").num_hidden_layers == 2


def test_hf_home_locates_the_cache(hf_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = hf_cache.parent / "hf-home"
    home.mkdir()
    hf_cache.rename(home / "hub")
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(home))
    assert resolve_model("org/tiny").path == home / "hub" / "models--org--tiny" / "snapshots" / COMMIT


@pytest.mark.parametrize("model", ["org/absent", "no-such-dir/at/all", "./missing.gguf"])
def test_unknown_model_says_what_was_tried(hf_cache: Path, model: str) -> None:
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model(model)
    message = str(info.value)
    assert repr(model) in message
    assert "not a local directory" in message and ".gguf" in message
    assert str(hf_cache) in message and "never downloaded" in message
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, ValueError)


def test_unknown_revision_is_not_found(hf_cache: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="revision 'nope'"):
        resolve_model("org/tiny", revision="nope")


def test_config_without_architectures_is_a_clear_error(tmp_path: Path) -> None:
    directory = _write_config(tmp_path / "m")
    config = json.loads((directory / "config.json").read_text())
    del config["architectures"]
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="names no architectures"):
        load_hf_config(resolve_model(directory))
    fixed = load_hf_config(resolve_model(directory), hf_overrides={"architectures": ["LlamaForCausalLM"]})
    assert fixed.architectures == ["LlamaForCausalLM"]


def test_hf_overrides_dict_and_callable(tmp_path: Path) -> None:
    source = resolve_model(_write_config(tmp_path / "m"))
    assert load_hf_config(source, hf_overrides={"max_position_embeddings": 77}).max_position_embeddings == 77

    def halve(config):
        config.num_attention_heads //= 2
        return config

    assert load_hf_config(source, hf_overrides=halve).num_attention_heads == 1


# --- safetensors -----------------------------------------------------------------------------------

def _tensors() -> dict[str, torch.Tensor]:
    return {f"layer.{i}.weight": torch.full((2, 3), float(i)) for i in range(4)}


def _write_sharded(directory: Path, tensors: dict[str, torch.Tensor]) -> None:
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:2], "model-00002-of-00002.safetensors": names[2:]}
    for shard, shard_names in shards.items():
        save_file({n: tensors[n] for n in shard_names}, directory / shard)
    weight_map = {n: shard for shard, shard_names in shards.items() for n in shard_names}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_single_file_safetensors(tmp_path: Path) -> None:
    save_file(_tensors(), tmp_path / "model.safetensors")
    loaded = dict(iter_weights(ModelSource(tmp_path)))
    assert loaded.keys() == _tensors().keys()
    assert all(torch.equal(loaded[n], t) for n, t in _tensors().items())


def test_sharded_safetensors(tmp_path: Path) -> None:
    _write_sharded(tmp_path, _tensors())
    loaded = dict(iter_safetensors_weights(tmp_path))
    assert all(torch.equal(loaded[n], t) for n, t in _tensors().items()) and len(loaded) == 4


def test_missing_shard_is_named_before_any_tensor(tmp_path: Path) -> None:
    _write_sharded(tmp_path, _tensors())
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    weights = iter_safetensors_weights(tmp_path)
    with pytest.raises(WeightsError, match="model-00002-of-00002.safetensors"):
        next(weights)


def test_shard_lacking_an_indexed_tensor(tmp_path: Path) -> None:
    _write_sharded(tmp_path, _tensors())
    save_file({"layer.2.weight": torch.zeros(2, 3)}, tmp_path / "model-00002-of-00002.safetensors")
    with pytest.raises(WeightsError, match=r"model-00002-of-00002.*layer\.3\.weight"):
        list(iter_safetensors_weights(tmp_path))


def test_no_safetensors_names_the_directory(tmp_path: Path) -> None:
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(WeightsError, match=rf"no safetensors weights in {tmp_path}.*pytorch_model\.bin"):
        list(iter_safetensors_weights(tmp_path))


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors_names_the_file(tmp_path: Path, damage: str) -> None:
    file = tmp_path / "model.safetensors"
    save_file(_tensors(), file)
    data = file.read_bytes()
    file.write_bytes(data[: len(data) - 10] if damage == "truncate" else b"\x07" * len(data))
    with pytest.raises(WeightsError, match=rf"corrupt or truncated safetensors file {file}"):
        list(iter_safetensors_weights(tmp_path))


# --- GGUF --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_gguf() -> Path:
    from harness.zoo.smollm2 import ZooUnavailableError, gguf_path

    try:
        return gguf_path()
    except ZooUnavailableError as exc:
        pytest.skip(str(exc))


def test_gguf_config_names_the_causal_lm_class(smollm2_gguf: Path) -> None:
    config = load_hf_config(resolve_model(smollm2_gguf))
    assert config.architectures == ["LlamaForCausalLM"]
    assert (config.num_hidden_layers, config.vocab_size, config.tie_word_embeddings) == (30, 49152, True)


def test_gguf_weights_equal_transformers_gguf_load(smollm2_gguf: Path) -> None:
    """The zoo's SmolLM2 directory is transformers' own from_pretrained(gguf_file=...) saved as safetensors."""
    from harness import zoo

    reference = dict(iter_safetensors_weights(zoo.model_path("smollm2-135m-instruct")))
    seen = set()
    for name, tensor in iter_weights(resolve_model(smollm2_gguf)):
        assert tensor.dtype == torch.float32, name
        assert torch.equal(tensor, reference[name]), name
        seen.add(name)
    # Tied: neither side stores lm_head.weight.
    assert seen == reference.keys() and "lm_head.weight" not in seen


def test_gguf_tokenizer_matches_the_saved_one(smollm2_gguf: Path) -> None:
    from harness import zoo

    from_gguf = load_tokenizer(resolve_model(smollm2_gguf))
    from_dir = load_tokenizer(str(zoo.model_path("smollm2-135m-instruct")))
    text = "Hello, world! <|im_start|>user\nnaïve café 東京<|im_end|>"
    assert from_gguf(text).input_ids == from_dir(text).input_ids
    assert (from_gguf.eos_token, from_gguf.eos_token_id) == ("<|im_end|>", 2)


def test_tokenizer_directory_needs_no_config(smollm2_gguf: Path, tmp_path: Path) -> None:
    from harness.zoo.smollm2 import tokenizer

    tokenizer().save_pretrained(tmp_path)
    assert not (tmp_path / "config.json").exists()
    assert len(load_tokenizer(str(tmp_path))) == 49152
