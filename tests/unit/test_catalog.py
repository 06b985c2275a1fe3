"""Model shapes: the catalog against published figures, and the config.json reader against the catalog."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from strata.compute.catalog import CATALOG, ModelNotFound, ModelShape, find_model, load_hf_config

# Published parameter counts (model cards / safetensors metadata): (total, active).
PUBLISHED = {
    "llama-3.1-8b": (8.03e9, None),
    "llama-3.1-70b": (70.6e9, None),
    "llama-3.1-405b": (405.9e9, None),
    "qwen2.5-7b": (7.61e9, None),
    "qwen2.5-32b": (32.8e9, None),
    "qwen2.5-72b": (72.7e9, None),
    "mixtral-8x7b": (46.7e9, 12.9e9),
    "smollm2-135m": (134.5e6, None),
}

# The models' own Hugging Face config.json files (fields the planner does not read trimmed).
LLAMA_31_8B = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "rope_scaling": {"factor": 8.0, "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "vocab_size": 128256,
}
MIXTRAL_8X7B = {
    "architectures": ["MixtralForCausalLM"],
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "max_position_embeddings": 32768,
    "model_type": "mixtral",
    "num_attention_heads": 32,
    "num_experts_per_tok": 2,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "num_local_experts": 8,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "vocab_size": 32000,
}
QWEN25_7B = {  # no attention_bias key: Qwen2 always has q/k/v biases
    "architectures": ["Qwen2ForCausalLM"],
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "max_position_embeddings": 32768,
    "model_type": "qwen2",
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "sliding_window": 131072,
    "tie_word_embeddings": False,
    "vocab_size": 152064,
}
SMOLLM2_135M = {
    "architectures": ["LlamaForCausalLM"],
    "head_dim": 64,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "max_position_embeddings": 8192,
    "model_type": "llama",
    "num_attention_heads": 9,
    "num_hidden_layers": 30,
    "num_key_value_heads": 3,
    "tie_word_embeddings": True,
    "vocab_size": 49152,
}


def write_config(directory: Path, config: dict[str, object]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.json"
    path.write_text(json.dumps(config))
    return path


def by_name(name: str) -> ModelShape:
    return next(shape for shape in CATALOG if shape.name == name)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_catalog_parameter_counts_match_the_published_ones(name: str) -> None:
    shape = by_name(name)
    total, active = PUBLISHED[name]
    assert shape.num_params == pytest.approx(total, rel=0.005)
    assert shape.active_params == pytest.approx(active or total, rel=0.005)


@pytest.mark.parametrize("shape", CATALOG, ids=lambda s: s.name)
def test_every_catalog_count_follows_from_its_shape(shape: ModelShape) -> None:
    assert shape.counted_params() == (shape.num_params, shape.active_params)


def test_exact_counts_of_well_known_checkpoints() -> None:
    assert by_name("llama-3.1-8b").num_params == 8_030_261_248
    assert by_name("llama-3.1-70b").num_params == 70_553_706_496
    assert by_name("mixtral-8x7b").num_params == 46_702_792_704


def test_names_aliases_and_ids_resolve_in_any_case() -> None:
    seventy = by_name("llama-3.1-70b")
    assert find_model("LLAMA-3.1-70B") is seventy
    assert find_model("llama-3-70b") is seventy
    assert find_model("meta-llama/llama-3.1-70b-instruct") is seventy
    assert find_model("mixtral") is by_name("mixtral-8x7b")
    names = [n.lower() for shape in CATALOG for n in shape.names()]
    assert len(names) == len(set(names)), "a name or alias points at two models"


def test_an_unknown_model_lists_the_catalog(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelNotFound) as caught:
        find_model("gpt-5-open")
    message = str(caught.value)
    assert "gpt-5-open" in message
    assert all(shape.name in message for shape in CATALOG)
    with pytest.raises(ModelNotFound, match=r"without a config\.json"):
        find_model(str(tmp_path))


@pytest.mark.parametrize(
    ("config", "name"),
    [(LLAMA_31_8B, "llama-3.1-8b"), (MIXTRAL_8X7B, "mixtral-8x7b"), (QWEN25_7B, "qwen2.5-7b"),
     (SMOLLM2_135M, "smollm2-135m")],
)  # fmt: skip
def test_config_json_reproduces_the_catalog_shape(tmp_path: Path, config: dict[str, object], name: str) -> None:
    loaded = load_hf_config(write_config(tmp_path / "My_Model", config))
    expected = by_name(name)
    assert replace(loaded, name=expected.name, model_id=expected.model_id, aliases=expected.aliases) == expected
    assert loaded.name == "my_model"
    assert loaded.model_id == str((tmp_path / "My_Model").resolve())


def test_llama_8b_parameter_count_from_config_json(tmp_path: Path) -> None:
    write_config(tmp_path / "llama", LLAMA_31_8B)
    for where in (tmp_path / "llama", tmp_path / "llama" / "config.json"):
        shape = find_model(str(where))
        assert shape.num_params == by_name("llama-3.1-8b").num_params == 8_030_261_248
        assert shape.head_dim == 128  # not in the file: hidden_size / heads


def test_the_count_changes_with_the_shape(tmp_path: Path) -> None:
    tied = load_hf_config(write_config(tmp_path / "tied", {**LLAMA_31_8B, "tie_word_embeddings": True}))
    assert by_name("llama-3.1-8b").num_params - tied.num_params == 128256 * 4096  # no separate lm_head
    no_bias = load_hf_config(write_config(tmp_path / "qwen", {**QWEN25_7B, "attention_bias": False}))
    assert by_name("qwen2.5-7b").num_params - no_bias.num_params == 28 * (3584 + 2 * 512)


def test_a_stated_count_wins_and_wrapped_text_configs_are_read(tmp_path: Path) -> None:
    stated = load_hf_config(write_config(tmp_path / "a", {**LLAMA_31_8B, "num_parameters": 123}))
    assert stated.num_params == 123
    wrapped = {"model_type": "llava", "text_config": LLAMA_31_8B, "vision_config": {"hidden_size": 1024}}
    assert load_hf_config(write_config(tmp_path / "b", wrapped)).num_params == 8_030_261_248


def test_shapes_it_cannot_size_are_refused_not_guessed(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="latent attention"):
        load_hf_config(write_config(tmp_path / "ds", {**LLAMA_31_8B, "kv_lora_rank": 512}))
    with pytest.raises(ValueError, match="shared experts"):
        load_hf_config(write_config(tmp_path / "qm", {**MIXTRAL_8X7B, "shared_expert_intermediate_size": 5632}))
    missing = {k: v for k, v in LLAMA_31_8B.items() if k != "vocab_size"}
    with pytest.raises(ValueError, match="vocab_size"):
        load_hf_config(write_config(tmp_path / "mv", missing))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{not json")
    with pytest.raises(ModelNotFound, match="cannot read"):
        load_hf_config(tmp_path / "bad")


def test_a_downloaded_hugging_face_id_is_found_in_the_hub_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    write_config(tmp_path / "models--acme--Tiny-1B" / "snapshots" / "abc123", SMOLLM2_135M)
    shape = find_model("acme/Tiny-1B")
    assert (shape.name, shape.model_id, shape.num_params) == ("tiny-1b", "acme/Tiny-1B", 134_515_008)


def test_inconsistent_shapes_are_rejected() -> None:
    with pytest.raises(ValueError, match="key/value heads"):
        replace(by_name("llama-3.1-8b"), num_key_value_heads=5)
    with pytest.raises(ValueError, match="MoE"):
        replace(by_name("llama-3.1-8b"), is_moe=True)
