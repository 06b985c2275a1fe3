"""The capacity planner against published figures, vLLM's TP rules and the Strata config it emits."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from strata import cli
from strata.compute.catalog import CATALOG, find_model
from strata.compute.plan_render import plan_json, plan_to_dict, render_plan, strata_yaml
from strata.compute.planner import (
    GIB,
    GpuSlot,
    GpuTopology,
    Plan,
    PlanError,
    hypothetical_gpus,
    kv_bytes_per_token,
    plan,
    valid_tp_sizes,
    weight_bytes,
)
from strata.config import StrataConfig, VllmModelConfig

LLAMA_8B = find_model("llama-3.1-8b")
LLAMA_70B = find_model("llama-3.1-70b")
REPO = Path(__file__).resolve().parents[2]


def h100s(count: int, nvlink: bool = True) -> dict[str, object]:
    gpus, topology = hypothetical_gpus(count, 80, "H100", nvlink=nvlink)
    return {"gpus": gpus, "nvlink": topology}


def test_llama_70b_bf16_weights_are_141_gb() -> None:
    for dtype in ("bf16", "fp16"):
        planned = plan(LLAMA_70B, dtype=dtype, **h100s(8))
        assert planned.weight_bytes == pytest.approx(141e9, rel=0.02)
        assert planned.weight_bytes_per_gpu * planned.tensor_parallel_size == pytest.approx(planned.weight_bytes, abs=8)


def test_kv_cache_per_token_is_exact() -> None:
    assert kv_bytes_per_token(LLAMA_70B) == 2 * 80 * 8 * 128 * 2 == 320 * 1024
    assert kv_bytes_per_token(LLAMA_8B) == 128 * 1024
    assert kv_bytes_per_token(LLAMA_70B, "fp8") == 160 * 1024
    assert kv_bytes_per_token(LLAMA_70B, tp=4) == 320 * 1024 // 4  # KV heads split across the group


def test_70b_bf16_does_not_fit_two_80gb_gpus_but_picks_tp4_of_eight() -> None:
    two = plan(LLAMA_70B, max_context=8192, concurrency=16, **h100s(2))
    assert not two.fits
    assert two.tensor_parallel_size == 2
    assert 0 < two.kv_token_capacity < 8192 * 16
    assert "KV cache holds" in two.reason

    eight = plan(LLAMA_70B, **h100s(8))
    assert eight.fits
    assert (eight.tensor_parallel_size, eight.gpu_indices, eight.nvlinked) == (4, (0, 1, 2, 3), True)
    assert eight.kv_token_capacity >= LLAMA_70B.max_position_embeddings
    assert eight.max_concurrency == eight.kv_token_capacity // 131072
    assert eight.alternatives == ()


def test_tp_sizes_divide_the_heads() -> None:
    qwen_32b = find_model("qwen2.5-32b")  # 40 heads, 8 KV heads
    assert valid_tp_sizes(qwen_32b, 16) == [1, 2, 4, 8]
    mha_40 = replace(qwen_32b, num_key_value_heads=40)
    assert valid_tp_sizes(mha_40, 16) == [1, 2, 4, 5, 8, 10]
    assert valid_tp_sizes(find_model("smollm2-135m"), 16) == [1, 3, 9]  # 3 KV heads, replicated at TP=9


def test_a_40_head_model_never_gets_tp_3_or_16() -> None:
    qwen_32b = find_model("qwen2.5-32b")  # 65.5 GB in bf16
    three, topology = hypothetical_gpus(3, 28, "A")  # TP=2 is too small, TP=3 would do, but 40 % 3 != 0
    planned = plan(qwen_32b, max_context=4096, gpus=three, nvlink=topology)
    assert not planned.fits
    assert planned.tensor_parallel_size == 2
    assert "TP=2 is the largest" in planned.reason

    sixteen, topology = hypothetical_gpus(16, 10, "B")  # needs more than 8 GPUs; 16 does not divide 40
    planned = plan(qwen_32b, max_context=4096, gpus=sixteen, nvlink=topology)
    assert not planned.fits
    assert planned.tensor_parallel_size == 8


@pytest.mark.parametrize("shape", CATALOG, ids=lambda s: s.name)
def test_every_plan_uses_a_tp_size_vllm_accepts(shape: object) -> None:
    for count in (1, 3, 5, 6, 7, 12, 16):
        for memory_gib in (8, 24, 80):
            gpus, topology = hypothetical_gpus(count, memory_gib)
            planned = plan(shape, max_context=2048, gpus=gpus, nvlink=topology)  # type: ignore[arg-type]
            tp = planned.tensor_parallel_size
            assert tp in valid_tp_sizes(planned.shape, count)
            assert planned.shape.num_attention_heads % tp == 0
            for alternative in planned.alternatives:
                assert alternative.plan.shape.num_attention_heads % alternative.plan.tensor_parallel_size == 0


def test_a_tp2_plan_picks_an_nvlink_pair() -> None:
    gpus, _ = hypothetical_gpus(4, 16, "T4-ish")  # an 8B model needs two of them
    for pairs, expected in ((((0, 1), (2, 3)), (0, 1)), (((0, 2), (1, 3)), (0, 2)), (((1, 3),), (1, 3))):
        planned = plan(LLAMA_8B, max_context=8192, gpus=gpus, nvlink=GpuTopology.from_pairs(pairs))
        assert planned.fits
        assert planned.tensor_parallel_size == 2
        assert (planned.gpu_indices, planned.nvlinked) == (expected, True)
        assert not any("NVLink" in w for w in planned.warnings)
    pcie = plan(LLAMA_8B, max_context=8192, gpus=gpus, nvlink=GpuTopology())
    assert (pcie.gpu_indices, pcie.nvlinked) == ((0, 1), False)
    assert any("PCIe" in w for w in pcie.warnings)


def test_nvlink_islands_are_found_among_many_gpus() -> None:
    """64 GPUs in eight NVLink islands of eight: too many groups to try them all."""
    gpus, _ = hypothetical_gpus(64, 24, "L4-ish")
    islands = GpuTopology.full_mesh(range(40, 48)).nvlink_pairs | GpuTopology.full_mesh(range(8, 16)).nvlink_pairs
    planned = plan(LLAMA_70B, max_context=8192, gpus=gpus, nvlink=GpuTopology(islands))
    assert planned.fits and planned.nvlinked
    assert planned.tensor_parallel_size == 8
    assert planned.gpu_indices == tuple(range(8, 16))


def test_larger_gpus_are_preferred_when_both_fit_and_the_smallest_decides_the_kv_cache() -> None:
    gpus = [GpuSlot(0, "small", 24 * GIB), GpuSlot(1, "big", 80 * GIB), GpuSlot(2, "mid", 32 * GIB)]
    one = plan(LLAMA_8B, max_context=8192, gpus=gpus)
    assert (one.tensor_parallel_size, one.gpu_indices) == (1, (1,))
    two = plan(LLAMA_8B, gpus=gpus[:1] + gpus[2:])  # 131,072 tokens: neither alone holds them
    assert two.gpu_indices == (0, 2)
    assert len({g.kv_cache_bytes for g in two.gpus}) == 1
    assert any("differ in memory" in w for w in two.warnings)


def test_when_weights_alone_overflow_the_reason_says_so() -> None:
    planned = plan(find_model("llama-3.1-405b"), **h100s(4))
    assert not planned.fits
    assert planned.kv_token_capacity == 0
    assert planned.reason.startswith("the weights need")
    assert "TP=4 uses every GPU given" in planned.reason


def test_alternatives_are_verified_by_planning_again() -> None:
    gpus = h100s(2)
    planned = plan(LLAMA_70B, **gpus)
    assert not planned.fits
    summaries = [a.summary for a in planned.alternatives]
    assert any("fp8 weights" in s for s in summaries)
    assert any("AWQ" in s for s in summaries)
    assert any(s.startswith("4 x H100") for s in summaries)
    assert any("shorter context" in s for s in summaries)
    assert not any("KV cache" in s for s in summaries)  # fp8 KV alone: ~48k tokens, still < 131,072
    for alternative in planned.alternatives:
        assert alternative.plan.fits
        request = alternative.plan.request
        again = plan(
            LLAMA_70B,
            dtype=request.dtype,
            quant=request.quant,
            kv_cache_dtype=request.kv_cache_dtype,
            max_context=request.max_context,
            concurrency=request.concurrency,
            **(gpus if len(alternative.plan.gpu_indices) <= 2 else h100s(len(alternative.plan.gpu_indices))),
        )
        assert again.fits
        assert again.tensor_parallel_size == alternative.plan.tensor_parallel_size


def test_fp8_kv_is_offered_when_it_is_enough() -> None:
    planned = plan(LLAMA_70B, max_context=32768, concurrency=2, **h100s(2))  # needs 65,536 tokens; has ~24k
    assert not planned.fits
    kv_fp8 = plan(LLAMA_70B, max_context=32768, concurrency=2, kv_cache_dtype="fp8", **h100s(2))
    assert not kv_fp8.fits  # ~48k: not enough either, so it must not be offered
    assert all("fp8 KV" not in a.summary for a in planned.alternatives)
    near = plan(LLAMA_70B, max_context=16384, concurrency=2, **h100s(2))
    assert not near.fits
    assert near.alternatives[0].summary.startswith("fp8 KV cache")
    assert near.alternatives[0].plan.request.kv_cache_dtype == "fp8"


def test_fp8_kv_cache_doubles_the_token_capacity() -> None:
    bf16 = plan(LLAMA_8B, **h100s(1))
    fp8 = plan(LLAMA_8B, kv_cache_dtype="fp8", **h100s(1))
    assert fp8.kv_bytes_per_token * 2 == bf16.kv_bytes_per_token
    assert abs(fp8.kv_token_capacity - 2 * bf16.kv_token_capacity) <= 16  # one 16-token block of rounding
    assert fp8.kv_cache_bytes_per_gpu == pytest.approx(bf16.kv_cache_bytes_per_gpu, rel=1e-3)


def test_quantisation_shrinks_the_weights() -> None:
    full = weight_bytes(LLAMA_70B, None)
    assert 3.3 < full / weight_bytes(LLAMA_70B, "awq") < 4.0  # 4.25 bits; embeddings and lm_head stay 16-bit
    assert full / weight_bytes(LLAMA_70B, "gguf-q4_k_m") == pytest.approx(16 / 4.85, rel=1e-6)
    assert full / weight_bytes(LLAMA_70B, "gguf-q8_0") == pytest.approx(16 / 8.5, rel=1e-6)
    assert 1.9 < full / weight_bytes(LLAMA_70B, "fp8") < 2.0
    assert plan(LLAMA_70B, quant="awq", **h100s(8)).tensor_parallel_size == 2
    assert plan(LLAMA_70B, dtype="fp8", **h100s(8)).tensor_parallel_size == 2  # bf16 needs 4


def test_moe_models_keep_every_expert_in_memory() -> None:
    mixtral = plan(find_model("mixtral-8x7b"), **h100s(8))
    assert mixtral.weight_bytes == 46_702_792_704 * 2
    assert mixtral.fits and mixtral.tensor_parallel_size == 2
    assert any("experts" in w for w in mixtral.warnings)


def test_kv_heads_are_replicated_beyond_one_per_gpu() -> None:
    smol = find_model("smollm2-135m")
    assert kv_bytes_per_token(smol, tp=9) == 2 * 30 * 1 * 64 * 2
    assert kv_bytes_per_token(smol, tp=3) == kv_bytes_per_token(smol) // 3


def test_the_emitted_strata_entry_validates_as_vllm_config() -> None:
    planned = plan(LLAMA_70B, **h100s(8))
    entry = planned.strata_model_entry()
    model = VllmModelConfig.model_validate(entry)
    assert (model.kind, model.name, model.model) == ("vllm", "llama-3.1-70b", "meta-llama/Llama-3.1-70B-Instruct")
    assert (model.gpus, model.tensor_parallel_size, model.max_model_len) == ([0, 1, 2, 3], 4, 131072)
    assert (model.gpu_memory_utilization, model.dtype, model.kv_cache_dtype, model.quantization) == (
        0.9,
        "bfloat16",
        None,
        None,
    )
    assert StrataConfig.model_validate({"models": [entry]}).models[0] == model

    busy = plan(LLAMA_8B, dtype="fp8", kv_cache_dtype="fp8", max_context=2048, concurrency=300, **h100s(1))
    model = VllmModelConfig.model_validate(busy.strata_model_entry(name="llama-fast"))
    assert (model.name, model.quantization, model.kv_cache_dtype) == ("llama-fast", "fp8", "fp8")
    assert model.extra_args == ["--max-num-seqs", "300"]


def test_the_vllm_command_line() -> None:
    planned = plan(LLAMA_70B, kv_cache_dtype="fp8", max_context=32768, gpu_memory_utilization=0.92, **h100s(8))
    assert planned.vllm_command() == (
        "CUDA_DEVICE_ORDER=PCI_BUS_ID CUDA_VISIBLE_DEVICES=0,1 vllm serve meta-llama/Llama-3.1-70B-Instruct "
        "--tensor-parallel-size 2 --gpu-memory-utilization 0.92 --max-model-len 32768 --dtype bfloat16 "
        "--kv-cache-dtype fp8"
    )
    awq = plan(LLAMA_70B, quant="awq", **h100s(8)).vllm_command()
    assert "--dtype float16" in awq
    assert "--quantization" not in awq  # vLLM reads AWQ from the checkpoint and picks its Marlin kernels
    gguf = plan(LLAMA_8B, quant="gguf-q4_k_m", **h100s(1))
    assert "--quantization gguf" in gguf.vllm_command()
    assert any(".gguf" in w for w in gguf.warnings)


def test_a_plan_that_does_not_fit_emits_no_config() -> None:
    planned = plan(LLAMA_70B, **h100s(2))
    with pytest.raises(PlanError, match="does not fit"):
        planned.strata_model_entry()
    with pytest.raises(PlanError):
        planned.vllm_command()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_context": 200_000}, "context window"),
        ({"quant": "int3"}, "unknown quantisation"),
        ({"dtype": "fp8", "quant": "awq"}, "cannot be combined"),
        ({"dtype": "fp32"}, "unknown dtype"),
        ({"kv_cache_dtype": "int4"}, "KV cache dtype"),
        ({"concurrency": 0}, "concurrency"),
        ({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization"),
    ],
)
def test_invalid_requests_are_refused(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(PlanError, match=message):
        plan(LLAMA_70B, **h100s(8), **kwargs)  # type: ignore[arg-type]


def test_no_gpus_or_duplicate_indices_are_refused() -> None:
    with pytest.raises(PlanError, match="no GPUs"):
        plan(LLAMA_8B, gpus=[])
    with pytest.raises(PlanError, match="unique"):
        plan(LLAMA_8B, gpus=[GpuSlot(0, "a", 80 * GIB), GpuSlot(0, "b", 80 * GIB)])
    _, topology = hypothetical_gpus(2, 80, nvlink=False)
    assert topology.nvlink_pairs == frozenset()


def test_json_and_rich_rendering() -> None:
    fits = plan(LLAMA_70B, **h100s(8))
    data = json.loads(plan_json(fits))
    assert data == json.loads(json.dumps(plan_to_dict(fits)))
    assert (data["fits"], data["tensor_parallel_size"], data["kv_bytes_per_token"]) == (True, 4, 327680)
    assert VllmModelConfig.model_validate(data["strata_model"]).tensor_parallel_size == 4
    assert "models:" in strata_yaml(fits)

    console = Console(record=True, width=200)
    render_plan(fits, console)
    text = console.export_text()
    assert "fits: TP=4" in text and "vllm serve meta-llama/Llama-3.1-70B-Instruct" in text
    assert "tensor_parallel_size: 4" in text

    tight = plan(LLAMA_70B, **h100s(2))
    console = Console(record=True, width=200)
    render_plan(tight, console)
    text = console.export_text()
    assert "does not fit" in text and "4 x H100" in text and "vllm serve" not in text
    data = plan_to_dict(tight)
    assert data["fits"] is False and data["vllm_command"] is None and data["alternatives"]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "strata", "plan", *args], capture_output=True, text=True, cwd=REPO, timeout=120
    )


def test_cli_plans_for_hypothetical_gpus() -> None:
    result = run_cli("llama-3.1-70b", "--gpu-count", "8", "--gpu-memory-gib", "80", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["tensor_parallel_size"] == 4
    assert data["gpu_indices"] == [0, 1, 2, 3]

    result = run_cli("llama-3.1-70b", "--gpu-count", "2", "--gpu-memory-gib", "80", "--json")
    assert result.returncode == 1
    assert json.loads(result.stdout)["fits"] is False


def test_cli_plans_for_this_machines_gpus_or_says_there_are_none() -> None:
    result = run_cli("llama-3.1-70b")
    if cli._machine_gpus()[0]:  # a GPU machine: it plans for the GPUs it found (fits or not)
        assert result.returncode in (0, 1), result.stderr
    else:
        assert result.returncode == 2
        assert "no GPUs found" in result.stderr
        assert "--gpu-count" in result.stderr and "--gpu-memory-gib" in result.stderr


def test_cli_no_gpu_message_and_machine_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    runner = CliRunner()
    monkeypatch.setattr(cli, "_machine_gpus", lambda: ([], GpuTopology()))
    result = runner.invoke(cli.app, ["plan", "llama-3.1-8b"])
    assert result.exit_code == 2
    assert "no GPUs found" in result.output

    gpus = [GpuSlot(0, "H100", 80 * GIB), GpuSlot(1, "H100", 80 * GIB), GpuSlot(2, "H100", 80 * GIB)]
    monkeypatch.setattr(cli, "_machine_gpus", lambda: (gpus, GpuTopology.from_pairs([(1, 2)])))
    result = runner.invoke(cli.app, ["plan", "llama-3.1-70b", "--gpus", "0,1,2", "--max-context", "8192", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["gpu_indices"] == [1, 2]  # the NVLink pair
    result = runner.invoke(cli.app, ["plan", "llama-3.1-70b", "--gpus", "0,7"])
    assert result.exit_code == 2
    assert "no GPU 7" in result.output


def test_cli_refuses_unknown_models_and_half_described_hardware() -> None:
    result = run_cli("no-such-model", "--gpu-count", "1", "--gpu-memory-gib", "80")
    assert result.returncode == 2
    assert "llama-3.1-70b" in result.stderr
    result = run_cli("llama-3.1-8b", "--gpu-count", "1")
    assert result.returncode == 2
    assert "--gpu-memory-gib" in result.stderr


def test_plan_is_a_frozen_dataclass() -> None:
    planned: Plan = plan(LLAMA_8B, **h100s(1))
    with pytest.raises(AttributeError):
        planned.fits = False  # type: ignore[misc]
