"""Capacity planning for vLLM: which GPUs, what tensor-parallel size, how much KV cache, or why not.

Memory per GPU is modelled in the terms vLLM's start-up profiler logs ("model weights take X; non_torch
memory takes Y; PyTorch activation peak memory takes Z; the rest of the memory reserved for KV Cache is W"),
so a plan can be checked against a real start:

- budget: `gpu_memory_utilization` x the GPU's memory. vLLM captures CUDA graphs after sizing the KV cache,
  out of the remaining headroom, so they are not charged here.
- weights / TP: vLLM shards every linear layer and the vocabulary; norms (replicated) are negligible.
- overhead, per GPU:
  * 1 GiB runtime: CUDA context, cuBLAS workspaces and allocator slack. vLLM reports 0.2-0.6 GiB of
    non-torch memory on one GPU; rounded up because an optimistic plan fails at start, not on paper.
  * +0.5 GiB under TP > 1: NCCL communicators and vLLM's custom all-reduce buffers.
  * activations of the profiling pass: max_num_batched_tokens (8192) tokens through one layer, holding
    the residual and normed hidden states, this GPU's share of the QKV projection and of the MLP's
    gate/up/activation outputs in 16 bits, plus fp32 logits for max_num_seqs (256) sequences. This
    depends on layer widths, not parameter count, so it is computed from the shape rather than taken
    as a fraction of the weights.
- KV cache: what is left, in 16-token blocks; every rank holds the same number of tokens, so the group's
  smallest GPU decides. Per token and GPU: 2 (K and V) x layers x KV heads on that GPU x head_dim x bytes.
"""

from __future__ import annotations

import math
import shlex
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from itertools import combinations

from strata.compute.catalog import ModelShape

GIB = 1024**3
KV_BLOCK_TOKENS = 16  # vLLM's default block size
RUNTIME_BYTES = GIB
TP_COMM_BYTES = GIB // 2
PROFILE_TOKENS = 8192  # max_num_batched_tokens of vLLM's profiling pass
ACTIVATION_BYTES = 2  # activations stay bf16/fp16 whatever the weight format
DEFAULT_MAX_NUM_SEQS = 256
MAX_TP = 64  # VllmModelConfig.tensor_parallel_size's upper bound
EXACT_SEARCH_LIMIT = 5000  # GPU groups tried exhaustively per TP size; beyond it, a few good candidates


class PlanError(ValueError):
    """The request itself cannot be planned: an unknown format, a context beyond the model's, no GPUs."""


@dataclass(frozen=True)
class GpuSlot:
    index: int  # NVML index, as in nvidia-smi and CUDA_DEVICE_ORDER=PCI_BUS_ID
    name: str
    memory_bytes: int


@dataclass(frozen=True)
class GpuTopology:
    """Which GPU pairs NVLink joins (by index); every other pair talks over PCIe."""

    nvlink_pairs: frozenset[frozenset[int]] = frozenset()

    @classmethod
    def from_pairs(cls, pairs: Iterable[Iterable[int]]) -> GpuTopology:
        return cls(frozenset(frozenset(pair) for pair in pairs))

    @classmethod
    def full_mesh(cls, indices: Iterable[int]) -> GpuTopology:
        """Every pair joined, as behind an NVSwitch (HGX/DGX boards)."""
        return cls.from_pairs(combinations(sorted(set(indices)), 2))

    @cached_property
    def _neighbours(self) -> dict[int, frozenset[int]]:
        pairs = [tuple(pair) for pair in self.nvlink_pairs if len(pair) == 2]
        ends = {i for pair in pairs for i in pair}
        return {i: frozenset(b if a == i else a for a, b in pairs if i in (a, b)) for i in ends}

    def linked(self, a: int, b: int) -> bool:
        return b in self._neighbours.get(a, ())

    def fully_linked(self, indices: Sequence[int]) -> bool:
        return all(self.linked(a, b) for a, b in combinations(indices, 2))


def hypothetical_gpus(
    count: int, memory_gib: float, name: str = "GPU", nvlink: bool = True
) -> tuple[list[GpuSlot], GpuTopology]:
    """`count` identical GPUs (indices 0..count-1), all NVLink-joined unless `nvlink` is false."""
    if count < 1 or memory_gib <= 0:
        raise PlanError("hypothetical GPUs need a count of at least 1 and a positive memory size")
    gpus = [GpuSlot(index, name, int(memory_gib * GIB)) for index in range(count)]
    return gpus, GpuTopology.full_mesh(range(count)) if nvlink else GpuTopology()


@dataclass(frozen=True)
class WeightFormat:
    """How many bits a weight takes on the GPU, scales and zero points included."""

    bits_per_weight: float
    vllm_quantization: str | None  # passed as --quantization; None: vLLM reads it from the checkpoint
    quantizes_embeddings: bool  # GGUF files quantise embeddings too; the others keep them 16-bit


DTYPES = {"bf16": "bfloat16", "fp16": "float16"}  # our name -> vLLM's --dtype
QUANTIZATIONS: dict[str, WeightFormat] = {
    "fp8": WeightFormat(8.0, "fp8", False),  # per-tensor scale: negligible
    "awq": WeightFormat(4.25, None, False),  # 4-bit + fp16 scale and zero per 128-weight group, rounded up
    "gptq": WeightFormat(4.25, None, False),
    "bitsandbytes": WeightFormat(4.13, "bitsandbytes", False),  # NF4, 64-weight blocks, double-quantised scales
    "gguf-q4_k_m": WeightFormat(4.85, "gguf", True),  # llama.cpp's measured averages over a whole file
    "gguf-q5_k_m": WeightFormat(5.69, "gguf", True),
    "gguf-q6_k": WeightFormat(6.56, "gguf", True),
    "gguf-q8_0": WeightFormat(8.5, "gguf", True),
}
FP8_KV_DTYPES = ("fp8", "fp8_e4m3", "fp8_e5m2")
_DTYPE_ALIASES = {"bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16", "half": "fp16"}


@dataclass(frozen=True)
class PlanRequest:
    """A validated request: what to serve and how much of it."""

    dtype: str  # activation (and unquantised weight) dtype: bf16 | fp16
    quant: str | None  # a QUANTIZATIONS key
    kv_cache_dtype: str  # "auto" (= dtype) or an fp8 variant
    max_context: int
    concurrency: int
    gpu_memory_utilization: float

    @property
    def kv_fp8(self) -> bool:
        return self.kv_cache_dtype in FP8_KV_DTYPES

    @property
    def max_num_seqs(self) -> int:
        return max(DEFAULT_MAX_NUM_SEQS, self.concurrency)


def make_request(
    shape: ModelShape,
    *,
    dtype: str = "bf16",
    quant: str | None = None,
    kv_cache_dtype: str | None = None,
    max_context: int | None = None,
    concurrency: int = 1,
    gpu_memory_utilization: float = 0.9,
) -> PlanRequest:
    """Normalise and check the user's choices; `dtype="fp8"` means FP8 weights over bf16 activations."""
    wanted = dtype.lower()
    quant = quant.lower() if quant else None
    if wanted == "fp8":
        if quant not in (None, "fp8"):
            raise PlanError(f"dtype fp8 already quantises the weights; it cannot be combined with {quant}")
        wanted, quant = "bf16", "fp8"
    if wanted not in _DTYPE_ALIASES:
        raise PlanError(f"unknown dtype {dtype!r}: use bf16, fp16 or fp8")
    if quant is not None and quant not in QUANTIZATIONS:
        raise PlanError(f"unknown quantisation {quant!r}: use one of {', '.join(QUANTIZATIONS)}")
    act = _DTYPE_ALIASES[wanted]
    kv = (kv_cache_dtype or "auto").lower()
    if kv in ("auto", act, DTYPES[act]):
        kv = "auto"
    elif kv not in FP8_KV_DTYPES:
        raise PlanError(f"KV cache dtype {kv_cache_dtype!r} is not possible with {act}: use auto or fp8")
    context = shape.max_position_embeddings if max_context is None else max_context
    if not 1 <= context <= shape.max_position_embeddings:
        raise PlanError(
            f"max context {context:,} is outside 1..{shape.max_position_embeddings:,}, {shape.name}'s context window"
        )
    if concurrency < 1:
        raise PlanError("concurrency must be at least 1")
    if not 0 < gpu_memory_utilization <= 1:
        raise PlanError("gpu_memory_utilization must be in (0, 1]")
    return PlanRequest(act, quant, kv, context, concurrency, gpu_memory_utilization)


def weight_bytes(shape: ModelShape, quant: str | None) -> int:
    """All weights of the model in memory (every expert of an MoE model)."""
    if quant is None:
        return shape.num_params * 2
    fmt = QUANTIZATIONS[quant]
    if fmt.quantizes_embeddings:
        return math.ceil(shape.num_params * fmt.bits_per_weight / 8)
    embeddings = shape.embedding_params
    return math.ceil((shape.num_params - embeddings) * fmt.bits_per_weight / 8) + embeddings * 2


def kv_heads_per_gpu(shape: ModelShape, tp: int) -> int:
    """KV heads each rank holds; beyond one head per rank vLLM replicates them."""
    return max(1, shape.num_key_value_heads // tp)


def kv_bytes_per_token(shape: ModelShape, kv_cache_dtype: str = "auto", tp: int = 1) -> int:
    """K and V of one token on one rank of a TP group (tp=1: the whole model's)."""
    element = 1 if kv_cache_dtype in FP8_KV_DTYPES else 2
    return 2 * shape.num_layers * kv_heads_per_gpu(shape, tp) * shape.head_dim * element


def runtime_overhead_bytes(shape: ModelShape, tp: int, max_num_seqs: int = DEFAULT_MAX_NUM_SEQS) -> int:
    """Per-GPU memory that is neither weights nor KV cache (see the module docstring)."""
    fixed = RUNTIME_BYTES + (TP_COMM_BYTES if tp > 1 else 0)
    qkv = (shape.num_attention_heads // tp + 2 * kv_heads_per_gpu(shape, tp)) * shape.head_dim
    mlp = (3 if shape.gated_mlp else 2) * shape.intermediate_size * (shape.experts_per_token or 1) // tp
    activations = PROFILE_TOKENS * ACTIVATION_BYTES * (2 * shape.hidden_size + qkv + mlp)
    logits = max_num_seqs * shape.vocab_size * 4
    return fixed + activations + logits


def valid_tp_sizes(shape: ModelShape, limit: int) -> list[int]:
    """TP sizes vLLM accepts for this model: they divide the attention heads, and the KV heads either
    split evenly or are replicated a whole number of times."""
    heads, kv = shape.num_attention_heads, shape.num_key_value_heads
    return [tp for tp in range(1, min(limit, MAX_TP) + 1) if heads % tp == 0 and (kv % tp == 0 or tp % kv == 0)]


@dataclass(frozen=True)
class GpuUsage:
    index: int
    name: str
    memory_bytes: int
    budget_bytes: int  # gpu_memory_utilization x memory
    weight_bytes: int
    overhead_bytes: int
    kv_cache_bytes: int

    @property
    def unused_bytes(self) -> int:
        """Inside the budget but unused (negative: over budget)."""
        return self.budget_bytes - self.weight_bytes - self.overhead_bytes - self.kv_cache_bytes


@dataclass(frozen=True)
class Alternative:
    """A change to the request that was re-planned and fits."""

    summary: str
    plan: Plan


@dataclass(frozen=True)
class Plan:
    """The verdict for one model on a set of GPUs; when it does not fit, the closest attempt's numbers."""

    shape: ModelShape
    request: PlanRequest
    fits: bool
    reason: str
    tensor_parallel_size: int
    gpu_indices: tuple[int, ...]
    nvlinked: bool
    gpus: tuple[GpuUsage, ...]
    weight_bytes: int
    weight_bytes_per_gpu: int
    overhead_bytes_per_gpu: int
    kv_cache_bytes_per_gpu: int
    kv_bytes_per_token: int  # the whole model's, unsharded
    kv_bytes_per_token_per_gpu: int
    kv_token_capacity: int
    max_concurrency: int  # sequences of max_context tokens the KV cache holds at once
    warnings: tuple[str, ...] = ()
    alternatives: tuple[Alternative, ...] = ()

    @property
    def headroom_bytes(self) -> int:
        """Left for KV cache on the tightest GPU (negative: weights and overhead alone overflow)."""
        return min(g.budget_bytes for g in self.gpus) - self.weight_bytes_per_gpu - self.overhead_bytes_per_gpu

    @property
    def vllm_dtype(self) -> str:
        # vLLM's plain AWQ/GPTQ kernels (its fallback below Ampere) accept only float16 activations.
        return "float16" if self.request.quant in ("awq", "gptq") else DTYPES[self.request.dtype]

    def vllm_env(self) -> dict[str, str]:
        # NVML numbers GPUs by PCI bus; CUDA's default order differs, so pin it for the indices to agree.
        return {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": ",".join(map(str, self.gpu_indices))}

    def vllm_args(self) -> list[str]:
        """`vllm serve` arguments after the model. AWQ/GPTQ are left to vLLM to read from the checkpoint:
        naming them forces its slower non-Marlin kernels."""
        args = [
            "--tensor-parallel-size", str(self.tensor_parallel_size),
            "--gpu-memory-utilization", f"{self.request.gpu_memory_utilization:g}",
            "--max-model-len", str(self.request.max_context),
            "--dtype", self.vllm_dtype,
        ]  # fmt: skip
        if self.request.kv_fp8:
            args += ["--kv-cache-dtype", self.request.kv_cache_dtype]
        if quantization := self._vllm_quantization():
            args += ["--quantization", quantization]
        return args + self._extra_args()

    def vllm_command(self) -> str:
        """The shell line that starts this plan by hand."""
        self._require_fit()
        env = " ".join(f"{k}={v}" for k, v in self.vllm_env().items())
        return f"{env} vllm serve {shlex.quote(self.shape.model_id)} {shlex.join(self.vllm_args())}"

    def strata_model_entry(self, name: str | None = None) -> dict[str, object]:
        """The `models:` entry (a VllmModelConfig) that makes Strata launch this plan; defaults left out."""
        self._require_fit()
        entry: dict[str, object] = {
            "kind": "vllm",
            "name": name or self.shape.name,
            "model": self.shape.model_id,
            "gpus": list(self.gpu_indices),
            "tensor_parallel_size": self.tensor_parallel_size,
            "gpu_memory_utilization": self.request.gpu_memory_utilization,
            "max_model_len": self.request.max_context,
            "dtype": self.vllm_dtype,
        }
        if self.request.kv_fp8:
            entry["kv_cache_dtype"] = self.request.kv_cache_dtype
        if quantization := self._vllm_quantization():
            entry["quantization"] = quantization
        if extra := self._extra_args():
            entry["extra_args"] = extra
        entry["env"] = {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
        return entry

    def _vllm_quantization(self) -> str | None:
        return QUANTIZATIONS[self.request.quant].vllm_quantization if self.request.quant else None

    def _extra_args(self) -> list[str]:
        return (
            ["--max-num-seqs", str(self.request.concurrency)] if self.request.concurrency > DEFAULT_MAX_NUM_SEQS else []
        )

    def _require_fit(self) -> None:
        if not self.fits:
            raise PlanError(f"{self.shape.name} does not fit: {self.reason}")


def plan(
    shape: ModelShape,
    *,
    dtype: str = "bf16",
    quant: str | None = None,
    kv_cache_dtype: str | None = None,
    max_context: int | None = None,
    concurrency: int = 1,
    gpus: Sequence[GpuSlot],
    nvlink: GpuTopology | None = None,
    gpu_memory_utilization: float = 0.9,
) -> Plan:
    """The smallest tensor-parallel group of `gpus` (NVLink-joined where possible) that holds the weights
    and `concurrency` sequences of `max_context` tokens (default: the model's window); if none does,
    the closest attempt with the reason and re-planned alternatives that would fit."""
    request = make_request(
        shape,
        dtype=dtype,
        quant=quant,
        kv_cache_dtype=kv_cache_dtype,
        max_context=max_context,
        concurrency=concurrency,
        gpu_memory_utilization=gpu_memory_utilization,
    )
    if not gpus:
        raise PlanError("no GPUs to plan for")
    if len({g.index for g in gpus}) != len(gpus):
        raise PlanError("GPU indices must be unique")
    topology = nvlink or GpuTopology()
    result = _search(shape, request, gpus, topology)
    if result.fits:
        return result
    return replace(result, alternatives=tuple(_alternatives(shape, request, gpus, topology, result)))


def _search(shape: ModelShape, request: PlanRequest, gpus: Sequence[GpuSlot], topology: GpuTopology) -> Plan:
    """Smallest TP that fits; within a TP size: fits, NVLink-joined, most KV cache, lowest indices."""
    attempts: list[Plan] = []
    sizes = valid_tp_sizes(shape, len(gpus))
    for tp in sizes:
        sizing = _Sizing.of(shape, request, tp)
        largest = sorted(gpus, key=lambda g: -g.memory_bytes)[:tp]
        ceiling = sizing.rank(largest, nvlinked=True)  # no group can do better: stop at the first that does
        best_group, best_rank = None, None
        for group in _groups(gpus, tp, topology):  # in index order, so ties go to the lowest indices
            rank = sizing.rank(group, topology.fully_linked([g.index for g in group]))
            if best_rank is None or rank > best_rank:
                best_group, best_rank = group, rank
            if rank == ceiling:
                break
        assert best_group is not None
        best = _evaluate(shape, request, best_group, topology)
        if best.fits:
            return best
        attempts.append(best)
    closest = max(attempts, key=lambda p: (p.kv_token_capacity, p.headroom_bytes))
    return replace(closest, reason=_why_not(shape, request, closest, len(gpus), sizes))


def _groups(gpus: Sequence[GpuSlot], size: int, topology: GpuTopology) -> Iterator[tuple[GpuSlot, ...]]:
    """Every group of `size` GPUs when there are few; otherwise NVLink cliques grown from each GPU,
    the largest GPUs, and runs of consecutive indices."""
    ordered = sorted(gpus, key=lambda g: g.index)
    if math.comb(len(ordered), size) <= EXACT_SEARCH_LIMIT:
        yield from combinations(ordered, size)
        return
    by_memory = sorted(ordered, key=lambda g: (-g.memory_bytes, g.index))
    candidates = [by_memory[:size]] + [ordered[i : i + size] for i in range(len(ordered) - size + 1)]
    for seed in ordered:
        clique = [seed]
        for gpu in by_memory:
            if len(clique) == size:
                break
            if gpu not in clique and all(topology.linked(gpu.index, c.index) for c in clique):
                clique.append(gpu)
        candidates.append(clique)
    unique = {tuple(sorted(g.index for g in group)): group for group in candidates if len(group) == size}
    for key in sorted(unique):
        yield tuple(sorted(unique[key], key=lambda g: g.index))


@dataclass(frozen=True)
class _Sizing:
    """What each GPU of a TP group must hold: the same for every group of that size."""

    weights: int
    overhead: int
    kv_per_token: int
    needed_tokens: int
    utilization: float

    @classmethod
    def of(cls, shape: ModelShape, request: PlanRequest, tp: int) -> _Sizing:
        return cls(
            weights=math.ceil(weight_bytes(shape, request.quant) / tp),
            overhead=runtime_overhead_bytes(shape, tp, request.max_num_seqs),
            kv_per_token=kv_bytes_per_token(shape, request.kv_cache_dtype, tp),
            needed_tokens=request.max_context * request.concurrency,
            utilization=request.gpu_memory_utilization,
        )

    def budget(self, gpu: GpuSlot) -> int:
        return math.floor(gpu.memory_bytes * self.utilization)

    def headroom(self, group: Sequence[GpuSlot]) -> int:
        return min(self.budget(g) for g in group) - self.weights - self.overhead

    def capacity(self, headroom: int) -> int:
        """KV tokens in whole blocks; every rank holds as many as the tightest one can."""
        return max(0, headroom) // (self.kv_per_token * KV_BLOCK_TOKENS) * KV_BLOCK_TOKENS

    def rank(self, group: Sequence[GpuSlot], nvlinked: bool) -> tuple[bool, bool, int, int]:
        """Fits first, then NVLink, then the most KV cache."""
        headroom = self.headroom(group)
        capacity = self.capacity(headroom)
        return 0 < capacity >= self.needed_tokens, nvlinked, capacity, headroom


def _evaluate(shape: ModelShape, request: PlanRequest, group: Sequence[GpuSlot], topology: GpuTopology) -> Plan:
    tp = len(group)
    sizing = _Sizing.of(shape, request, tp)
    weights, overhead, per_token = sizing.weights, sizing.overhead, sizing.kv_per_token
    budgets = [sizing.budget(g) for g in group]
    capacity = sizing.capacity(sizing.headroom(group))
    kv_cache = capacity * per_token
    indices = tuple(g.index for g in group)
    nvlinked = topology.fully_linked(indices)
    fits = 0 < capacity >= sizing.needed_tokens
    max_concurrency = capacity // request.max_context
    where = f"GPU{'s' if tp > 1 else ''} {','.join(map(str, indices))}" + (
        (" (NVLink)" if nvlinked else " (PCIe)") if tp > 1 else ""
    )
    return Plan(
        shape=shape,
        request=request,
        fits=fits,
        reason=f"TP={tp} on {where}: the KV cache holds {capacity:,} tokens, {max_concurrency} concurrent "
        f"sequence{'s' if max_concurrency != 1 else ''} of {request.max_context:,}",
        tensor_parallel_size=tp,
        gpu_indices=indices,
        nvlinked=nvlinked,
        gpus=tuple(
            GpuUsage(g.index, g.name, g.memory_bytes, budget, weights, overhead, kv_cache)
            for g, budget in zip(group, budgets, strict=True)
        ),
        weight_bytes=weight_bytes(shape, request.quant),
        weight_bytes_per_gpu=weights,
        overhead_bytes_per_gpu=overhead,
        kv_cache_bytes_per_gpu=kv_cache,
        kv_bytes_per_token=kv_bytes_per_token(shape, request.kv_cache_dtype),
        kv_bytes_per_token_per_gpu=per_token,
        kv_token_capacity=capacity,
        max_concurrency=max_concurrency,
        warnings=tuple(_warnings(shape, request, group, nvlinked)),
    )


def _warnings(shape: ModelShape, request: PlanRequest, group: Sequence[GpuSlot], nvlinked: bool) -> Iterator[str]:
    tp, kv = len(group), shape.num_key_value_heads
    if tp > 1 and not nvlinked:
        yield "these GPUs are not all joined by NVLink: tensor-parallel all-reduces cross PCIe, expect lower throughput"
    if len({g.memory_bytes for g in group}) > 1:
        yield "the GPUs differ in memory: vLLM gives every rank the KV cache the smallest one can hold"
    if tp > kv:
        yield f"TP={tp} exceeds the {kv} KV heads: each is replicated on {tp // kv} GPUs, so is the KV cache"
    if shape.is_moe:
        yield (
            f"mixture of experts: all {shape.num_experts} experts ({format_count(shape.num_params)} parameters) "
            f"stay in memory though {shape.experts_per_token} run per token ({format_count(shape.active_params)})"
        )
    quant = request.quant
    if quant in ("awq", "gptq"):
        yield f"{quant} needs a pre-quantised {quant.upper()} checkpoint: set the model to one of {shape.name}"
        if (shape.intermediate_size // tp) % 128 or shape.intermediate_size % tp:
            yield (
                f"intermediate_size {shape.intermediate_size} / TP={tp} is not a multiple of the 128-weight "
                "quantisation group: the checkpoint must pad it (Qwen's own AWQ/GPTQ releases do)"
            )
    elif quant == "fp8":
        yield "fp8 weights run W8A8 on Ada/Hopper or newer; older GPUs use slower weight-only FP8 kernels"
    elif quant == "bitsandbytes":
        yield "bitsandbytes quantises the 16-bit checkpoint while loading; its kernels are slower than AWQ/GPTQ"
    elif quant and quant.startswith("gguf"):
        yield "vLLM loads GGUF from one local .gguf file (set the model to it, with --tokenizer of the base model)"
    if request.kv_fp8:
        yield "an fp8 KV cache without calibrated scales can cost a little accuracy"


def _why_not(shape: ModelShape, request: PlanRequest, closest: Plan, count: int, sizes: list[int]) -> str:
    tp, top = closest.tensor_parallel_size, sizes[-1]
    if tp < top:
        limit = f"TP={tp} came closest of the sizes tried (up to {top})"
    elif top < count:
        heads = f"{shape.num_attention_heads} attention and {shape.num_key_value_heads} KV heads"
        limit = f"TP={tp} is the largest the {heads} allow on {count} GPUs"
    else:
        limit = f"TP={tp} uses every GPU given"
    if closest.headroom_bytes <= 0:
        tight = min(closest.gpus, key=lambda g: g.budget_bytes)
        return (
            f"the weights need {format_bytes(closest.weight_bytes_per_gpu)} per GPU at TP={tp} and vLLM's runtime "
            f"about {format_bytes(closest.overhead_bytes_per_gpu)} more, over the {format_bytes(tight.budget_bytes)} "
            f"usable on GPU {tight.index} ({request.gpu_memory_utilization:.0%} of "
            f"{format_bytes(tight.memory_bytes)}); {limit}"
        )
    cap, need = closest.kv_token_capacity, request.max_context * request.concurrency
    if cap < request.max_context:
        return (
            f"at TP={tp} the KV cache holds {cap:,} tokens, less than one {request.max_context:,}-token sequence "
            f"(vLLM would refuse to start); {limit}"
        )
    return (
        f"at TP={tp} the KV cache holds {cap:,} tokens: {closest.max_concurrency} sequences of "
        f"{request.max_context:,}, fewer than the {request.concurrency} asked for ({need:,} tokens); {limit}"
    )


def _alternatives(
    shape: ModelShape, request: PlanRequest, gpus: Sequence[GpuSlot], topology: GpuTopology, closest: Plan
) -> list[Alternative]:
    """The nearest changes that fit, each verified by planning again, least disruptive first."""
    found: list[Alternative] = []

    def attempt(
        summary: str, changed: PlanRequest, on: Sequence[GpuSlot] = gpus, links: GpuTopology = topology
    ) -> bool:
        candidate = _search(shape, changed, on, links)
        if candidate.fits:
            found.append(Alternative(summary, candidate))
        return candidate.fits

    kv_fp8_fits = False
    if not request.kv_fp8:
        kv_fp8_fits = attempt("fp8 KV cache (--kv-cache-dtype fp8)", replace(request, kv_cache_dtype="fp8"))
    for quant, label in (("fp8", "fp8 weights (--quantization fp8)"), ("awq", "4-bit AWQ weights (an AWQ checkpoint)")):
        if weight_bytes(shape, quant) >= weight_bytes(shape, request.quant):
            continue
        changed = replace(request, quant=quant)
        if not attempt(label, changed) and not request.kv_fp8 and not kv_fp8_fits:
            attempt(f"{label} and an fp8 KV cache", replace(changed, kv_cache_dtype="fp8"))
    biggest = max(gpus, key=lambda g: (g.memory_bytes, -g.index))
    linked = topology.fully_linked([g.index for g in gpus])  # more of the same hardware, wired the same way
    for tp in valid_tp_sizes(shape, MAX_TP):
        if tp > len(gpus):
            more, mesh = hypothetical_gpus(tp, biggest.memory_bytes / GIB, biggest.name, nvlink=linked)
            wiring = "joined by NVLink" if linked else "over PCIe"
            label = f"{tp} x {biggest.name} ({format_bytes(biggest.memory_bytes)}) {wiring}"
            if attempt(label, request, more, mesh):
                break
    if closest.kv_token_capacity > 0:
        context = closest.kv_token_capacity // request.concurrency
        context = context // 1024 * 1024 if context >= 1024 else context // KV_BLOCK_TOKENS * KV_BLOCK_TOKENS
        if 0 < context < request.max_context:
            attempt(f"a shorter context (--max-model-len {context})", replace(request, max_context=context))
        fewer = closest.kv_token_capacity // request.max_context
        if 1 <= fewer < request.concurrency:
            attempt(f"{fewer} concurrent sequence{'s' if fewer > 1 else ''} instead of {request.concurrency}",
                    replace(request, concurrency=fewer))  # fmt: skip
    return found


def format_bytes(count: int | float) -> str:
    return f"{count / GIB:,.1f} GiB"


def format_count(count: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.1f}{unit}"
    return str(count)
