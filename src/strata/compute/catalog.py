"""Model shapes for capacity planning: a shipped catalog and a Hugging Face `config.json` reader.

The planner needs only a model's shape (layers, heads, widths, parameter count), never its weights,
so a few numbers per model are enough to size GPUs before anything is downloaded. Catalog values are
the published `config.json` fields of each model; parameter counts are exact for that shape.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_NAME_CHARS = re.compile(r"[^a-z0-9._:/-]+")


class ModelNotFound(LookupError):
    """Neither a catalog name nor a readable Hugging Face config: the message lists what is known."""


@dataclass(frozen=True, kw_only=True)
class ModelShape:
    """What memory planning needs to know about a decoder-only transformer (Llama-style layers)."""

    name: str  # short name, valid as a Strata model name
    model_id: str  # what vLLM loads: a Hugging Face id or a local directory
    aliases: tuple[str, ...] = ()
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int  # per expert for MoE models
    vocab_size: int
    max_position_embeddings: int
    num_params: int  # total: every expert of an MoE model is resident in memory
    num_active_params: int | None = None  # MoE: parameters used per token
    is_moe: bool = False
    num_experts: int | None = None
    experts_per_token: int | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # biases on q/k/v (Qwen2)
    gated_mlp: bool = True  # gate/up/down (SwiGLU) rather than up/down

    def __post_init__(self) -> None:
        for field in ("num_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim"):
            if getattr(self, field) < 1:
                raise ValueError(f"{self.name}: {field} must be positive")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"{self.name}: {self.num_attention_heads} attention heads do not group into "
                f"{self.num_key_value_heads} key/value heads"
            )
        if self.is_moe != (self.num_experts is not None and self.experts_per_token is not None):
            raise ValueError(f"{self.name}: an MoE model needs num_experts and experts_per_token, a dense one neither")

    @property
    def active_params(self) -> int:
        return self.num_active_params or self.num_params

    @property
    def embedding_params(self) -> int:
        """Input embeddings plus lm_head: the part that weight-only quantisation leaves in 16 bits."""
        return self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)

    def names(self) -> tuple[str, ...]:
        return (self.name, self.model_id, *self.aliases)

    def counted_params(self) -> tuple[int, int]:
        """(total, active) as computed from this shape, to check a stated count against."""
        return parameter_counts(
            num_layers=self.num_layers,
            hidden_size=self.hidden_size,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            intermediate_size=self.intermediate_size,
            vocab_size=self.vocab_size,
            tie_word_embeddings=self.tie_word_embeddings,
            attention_bias=self.attention_bias,
            gated_mlp=self.gated_mlp,
            num_experts=self.num_experts,
            experts_per_token=self.experts_per_token,
        )


def parameter_counts(
    *,
    num_layers: int,
    hidden_size: int,
    num_attention_heads: int,
    num_key_value_heads: int,
    head_dim: int,
    intermediate_size: int,
    vocab_size: int,
    tie_word_embeddings: bool,
    attention_bias: bool = False,
    gated_mlp: bool = True,
    num_experts: int | None = None,
    experts_per_token: int | None = None,
) -> tuple[int, int]:
    """(total, active) parameters of a Llama-style decoder: GQA attention, (gated) MLP or routed experts,
    two RMSNorms per layer and a final one, embeddings, and lm_head unless tied."""
    q_width, kv_width = num_attention_heads * head_dim, num_key_value_heads * head_dim
    attention = 2 * hidden_size * q_width + 2 * hidden_size * kv_width
    if attention_bias:
        attention += q_width + 2 * kv_width
    mlp = (3 if gated_mlp else 2) * hidden_size * intermediate_size
    norms = 2 * hidden_size
    if num_experts:
        router = hidden_size * num_experts
        layer_total = attention + num_experts * mlp + router + norms
        layer_active = attention + (experts_per_token or 1) * mlp + router + norms
    else:
        layer_total = layer_active = attention + mlp + norms
    embeddings = vocab_size * hidden_size * (1 if tie_word_embeddings else 2) + hidden_size  # + final norm
    return num_layers * layer_total + embeddings, num_layers * layer_active + embeddings


def _llama31(size: str, *, layers: int, hidden: int, heads: int, intermediate: int, params: int) -> ModelShape:
    return ModelShape(
        name=f"llama-3.1-{size.lower()}",
        model_id=f"meta-llama/Llama-3.1-{size}-Instruct",
        aliases=(f"llama-3-{size.lower()}", f"llama3-{size.lower()}", f"llama-3.1-{size.lower()}-instruct",
                 f"meta-llama/Llama-3.1-{size}", f"meta-llama/Meta-Llama-3.1-{size}-Instruct"),
        num_layers=layers, hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=8, head_dim=128,
        intermediate_size=intermediate, vocab_size=128256, max_position_embeddings=131072,
        num_params=params,
    )  # fmt: skip


def _qwen25(size: str, *, layers: int, hidden: int, heads: int, kv: int, intermediate: int, params: int) -> ModelShape:
    return ModelShape(
        name=f"qwen2.5-{size.lower()}",
        model_id=f"Qwen/Qwen2.5-{size}-Instruct",
        aliases=(f"qwen2.5-{size.lower()}-instruct", f"qwen-2.5-{size.lower()}", f"Qwen/Qwen2.5-{size}"),
        num_layers=layers, hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv, head_dim=128,
        intermediate_size=intermediate, vocab_size=152064, max_position_embeddings=32768,
        num_params=params, attention_bias=True,
    )  # fmt: skip


CATALOG: tuple[ModelShape, ...] = (
    _llama31("8B", layers=32, hidden=4096, heads=32, intermediate=14336, params=8_030_261_248),
    _llama31("70B", layers=80, hidden=8192, heads=64, intermediate=28672, params=70_553_706_496),
    _llama31("405B", layers=126, hidden=16384, heads=128, intermediate=53248, params=405_853_388_800),
    ModelShape(
        name="llama-3.3-70b", model_id="meta-llama/Llama-3.3-70B-Instruct", aliases=("llama3.3-70b",),
        num_layers=80, hidden_size=8192, num_attention_heads=64, num_key_value_heads=8, head_dim=128,
        intermediate_size=28672, vocab_size=128256, max_position_embeddings=131072, num_params=70_553_706_496,
    ),
    ModelShape(
        name="llama-3.2-1b", model_id="meta-llama/Llama-3.2-1B-Instruct", aliases=("llama3.2-1b",),
        num_layers=16, hidden_size=2048, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
        intermediate_size=8192, vocab_size=128256, max_position_embeddings=131072, num_params=1_235_814_400,
        tie_word_embeddings=True,
    ),
    ModelShape(
        name="llama-3.2-3b", model_id="meta-llama/Llama-3.2-3B-Instruct", aliases=("llama3.2-3b",),
        num_layers=28, hidden_size=3072, num_attention_heads=24, num_key_value_heads=8, head_dim=128,
        intermediate_size=8192, vocab_size=128256, max_position_embeddings=131072, num_params=3_212_749_824,
        tie_word_embeddings=True,
    ),
    _qwen25("7B", layers=28, hidden=3584, heads=28, kv=4, intermediate=18944, params=7_615_616_512),
    _qwen25("32B", layers=64, hidden=5120, heads=40, kv=8, intermediate=27648, params=32_763_876_352),
    _qwen25("72B", layers=80, hidden=8192, heads=64, kv=8, intermediate=29568, params=72_706_203_648),
    ModelShape(
        name="mistral-7b", model_id="mistralai/Mistral-7B-Instruct-v0.3", aliases=("mistral-7b-instruct",),
        num_layers=32, hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        intermediate_size=14336, vocab_size=32768, max_position_embeddings=32768, num_params=7_248_023_552,
    ),
    ModelShape(
        name="mixtral-8x7b", model_id="mistralai/Mixtral-8x7B-Instruct-v0.1",
        aliases=("mixtral", "mixtral-8x7b-instruct", "mistralai/Mixtral-8x7B-v0.1"),
        num_layers=32, hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        intermediate_size=14336, vocab_size=32000, max_position_embeddings=32768,
        num_params=46_702_792_704, num_active_params=12_879_925_248,
        is_moe=True, num_experts=8, experts_per_token=2,
    ),
    ModelShape(
        name="smollm2-135m", model_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        aliases=("smollm2", "smollm2-135m-instruct", "HuggingFaceTB/SmolLM2-135M"),
        num_layers=30, hidden_size=576, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
        intermediate_size=1536, vocab_size=49152, max_position_embeddings=8192, num_params=134_515_008,
        tie_word_embeddings=True,
    ),
)  # fmt: skip


def catalog_names() -> list[str]:
    return [shape.name for shape in CATALOG]


def find_model(name_or_path: str) -> ModelShape:
    """A catalog entry by name, alias or Hugging Face id (any case); else a config.json file, a directory
    holding one, or a Hugging Face id already in the local hub cache."""
    wanted = name_or_path.strip().lower()
    for shape in CATALOG:
        if wanted in (n.lower() for n in shape.names()):
            return shape
    path = Path(name_or_path).expanduser()
    if path.is_file() or (path.is_dir() and (path / "config.json").is_file()):
        return load_hf_config(path)
    if path.is_dir():
        raise ModelNotFound(f"{path} is a directory without a config.json")
    cached = _hub_cache_config(name_or_path)
    if cached is not None:
        return load_hf_config(cached, name=name_or_path.rsplit("/", 1)[-1], model_id=name_or_path)
    raise ModelNotFound(
        f"unknown model {name_or_path!r}: not in the catalog, not a path to a config.json and not in the "
        f"Hugging Face cache. Catalog: {', '.join(catalog_names())}"
    )


def _hub_cache_config(model_id: str) -> Path | None:
    """The newest snapshot's config.json of a model already downloaded by huggingface_hub."""
    if model_id.count("/") != 1:
        return None
    hub = os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", Path.home() / ".cache/huggingface")) / "hub"
    snapshots = Path(hub) / f"models--{model_id.replace('/', '--')}" / "snapshots"
    configs = sorted(snapshots.glob("*/config.json"), key=lambda p: p.stat().st_mtime) if snapshots.is_dir() else []
    return configs[-1] if configs else None


def _first(config: dict[str, Any], *keys: str, default: Any = None, source: Path) -> Any:
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    if default is None:
        raise ValueError(f"{source}: no {' / '.join(keys)} in the model config")
    return default


_UNGATED_MLP = {"gpt2", "gpt_neox", "gpt_bigcode", "opt", "falcon", "bloom", "phi", "starcoder2", "gptj"}
_QKV_BIAS = {"qwen2", "qwen2_moe", "qwen2_vl", "qwen2_5_vl"}


def load_hf_config(path: str | Path, *, name: str | None = None, model_id: str | None = None) -> ModelShape:
    """Read a Hugging Face `config.json` (or the directory holding it) into a ModelShape.

    The parameter count comes from the shape unless the file states it (`num_parameters`). Shapes the
    planner cannot size truthfully — latent attention (DeepSeek) and shared experts — are refused rather
    than guessed."""
    source = Path(path).expanduser()
    if source.is_dir():
        source = source / "config.json"
    try:
        config = json.loads(source.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelNotFound(f"cannot read a model config from {source}: {exc}") from None
    if not isinstance(config, dict):
        raise ModelNotFound(f"{source}: not a JSON object")
    if isinstance(config.get("text_config"), dict) and "num_hidden_layers" not in config:
        config = {**config, **config["text_config"]}  # multimodal wrappers keep the language model inside
    if config.get("kv_lora_rank") is not None:
        raise ValueError(f"{source}: multi-head latent attention (DeepSeek-style) is not modelled by the planner")
    if config.get("shared_expert_intermediate_size") or config.get("n_shared_experts"):
        raise ValueError(f"{source}: MoE with shared experts is not modelled by the planner")

    def get(*keys: str, default: Any = None) -> Any:
        return _first(config, *keys, default=default, source=source)

    layers = int(get("num_hidden_layers", "n_layer", "num_layers"))
    hidden = int(get("hidden_size", "n_embd", "d_model"))
    heads = int(get("num_attention_heads", "n_head"))
    kv_heads = int(get("num_key_value_heads", "num_kv_heads", default=1 if config.get("multi_query") else heads))
    head_dim = int(get("head_dim", default=hidden // heads))
    experts = int(get("num_local_experts", "num_experts", "n_routed_experts", default=0))
    is_moe = experts > 1
    per_token = int(get("num_experts_per_tok", "num_experts_per_token", "moe_topk", default=1)) if is_moe else None
    intermediate_keys = ("moe_intermediate_size",) if is_moe else ()
    intermediate = int(get(*intermediate_keys, "intermediate_size", "ffn_dim", "n_inner", default=4 * hidden))
    model_type = str(config.get("model_type", ""))
    shape_args: dict[str, Any] = dict(
        num_layers=layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        intermediate_size=intermediate,
        vocab_size=int(get("vocab_size")),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", True)),  # the transformers default
        attention_bias=bool(config.get("attention_bias", model_type in _QKV_BIAS)),
        gated_mlp=model_type not in _UNGATED_MLP,
    )
    total, active = parameter_counts(**shape_args, num_experts=experts if is_moe else None, experts_per_token=per_token)
    stated = config.get("num_parameters")
    directory = source.parent.resolve()
    return ModelShape(
        name=_model_name(name or directory.name),
        model_id=model_id or str(directory),
        max_position_embeddings=int(get("max_position_embeddings", "n_positions", "max_seq_len", "seq_length")),
        num_params=int(stated) if isinstance(stated, int) and stated > 0 else total,
        num_active_params=active if is_moe else None,
        is_moe=is_moe,
        num_experts=experts if is_moe else None,
        experts_per_token=per_token,
        **shape_args,
    )


def _model_name(raw: str) -> str:
    """A Strata model name (see config.MODEL_NAME_PATTERN) from a directory or repository name."""
    name = _NAME_CHARS.sub("-", raw.lower()).strip("-._:/") or "model"
    return name[:128]
