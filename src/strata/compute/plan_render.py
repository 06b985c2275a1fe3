"""A Plan for people (rich tables, the command to run, the YAML to paste) and for programs (JSON)."""

from __future__ import annotations

import orjson
import yaml
from rich.console import Console
from rich.table import Table
from rich.text import Text

from strata.compute.planner import Plan, format_bytes, format_count


def plan_to_dict(plan: Plan) -> dict[str, object]:
    """Everything the plan says, in plain JSON types; command and config only when it fits."""
    shape, request = plan.shape, plan.request
    return {
        "model": {
            "name": shape.name,
            "model_id": shape.model_id,
            "num_params": shape.num_params,
            "active_params": shape.active_params,
            "num_layers": shape.num_layers,
            "num_attention_heads": shape.num_attention_heads,
            "num_key_value_heads": shape.num_key_value_heads,
            "head_dim": shape.head_dim,
            "max_position_embeddings": shape.max_position_embeddings,
            "is_moe": shape.is_moe,
        },
        "request": {
            "dtype": request.dtype,
            "quant": request.quant,
            "kv_cache_dtype": request.kv_cache_dtype,
            "max_context": request.max_context,
            "concurrency": request.concurrency,
            "gpu_memory_utilization": request.gpu_memory_utilization,
        },
        **_summary(plan),
        "reason": plan.reason,
        "nvlinked": plan.nvlinked,
        "gpus": [
            {
                "index": g.index,
                "name": g.name,
                "memory_bytes": g.memory_bytes,
                "budget_bytes": g.budget_bytes,
                "weight_bytes": g.weight_bytes,
                "overhead_bytes": g.overhead_bytes,
                "kv_cache_bytes": g.kv_cache_bytes,
                "unused_bytes": g.unused_bytes,
            }
            for g in plan.gpus
        ],
        "weight_bytes": plan.weight_bytes,
        "weight_bytes_per_gpu": plan.weight_bytes_per_gpu,
        "overhead_bytes_per_gpu": plan.overhead_bytes_per_gpu,
        "kv_cache_bytes_per_gpu": plan.kv_cache_bytes_per_gpu,
        "kv_bytes_per_token": plan.kv_bytes_per_token,
        "kv_bytes_per_token_per_gpu": plan.kv_bytes_per_token_per_gpu,
        "warnings": list(plan.warnings),
        "alternatives": [{"summary": a.summary, **_summary(a.plan)} for a in plan.alternatives],
    }


def _summary(plan: Plan) -> dict[str, object]:
    return {
        "fits": plan.fits,
        "tensor_parallel_size": plan.tensor_parallel_size,
        "gpu_indices": list(plan.gpu_indices),
        "kv_token_capacity": plan.kv_token_capacity,
        "max_concurrency": plan.max_concurrency,
        "vllm_command": plan.vllm_command() if plan.fits else None,
        "strata_model": plan.strata_model_entry() if plan.fits else None,
    }


def plan_json(plan: Plan) -> str:
    return orjson.dumps(plan_to_dict(plan), option=orjson.OPT_INDENT_2).decode()


def strata_yaml(plan: Plan) -> str:
    """The `models:` block to paste into strata.yaml."""
    return yaml.safe_dump({"models": [plan.strata_model_entry()]}, sort_keys=False)


VLLM_IMAGE = "vllm/vllm-openai:v0.11.0"


def kubernetes_manifests(plan: Plan, name: str | None = None, image: str = VLLM_IMAGE) -> str:
    """A vLLM Deployment and Service for this plan (one replica = one tensor-parallel group of GPUs on one
    node), for Strata to reach as an `openai` model at http://<name>:8000/v1."""
    plan._require_fit()
    app = name or f"vllm-{plan.shape.name}".replace(".", "-").lower()
    labels = {"app.kubernetes.io/name": app, "app.kubernetes.io/component": "inference"}
    gpus = plan.tensor_parallel_size
    args = [plan.shape.model_id, "--host", "0.0.0.0", "--port", "8000", *plan.vllm_args()]
    args += ["--served-model-name", plan.shape.name, "--api-key", "$(VLLM_API_KEY)"]
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": app, "labels": dict(labels)},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": dict(labels)},
            "strategy": {"type": "Recreate"},  # its GPUs are freed before the new pod wants them
            "template": {
                "metadata": {"labels": dict(labels)},
                "spec": {
                    "containers": [
                        {
                            "name": "vllm",
                            "image": image,
                            "command": ["vllm", "serve"],
                            "args": args,
                            "env": [
                                {"name": "VLLM_API_KEY", "valueFrom": {"secretKeyRef": {"name": "strata-secrets",
                                                                                       "key": "vllm-api-key"}}},
                                {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "strata-secrets",
                                                                                   "key": "hf-token",
                                                                                   "optional": True}}},
                            ],
                            "ports": [{"name": "http", "containerPort": 8000}],
                            "resources": {"limits": {"nvidia.com/gpu": gpus}, "requests": {"nvidia.com/gpu": gpus}},
                            "readinessProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 5},
                            "startupProbe": {
                                "httpGet": {"path": "/health", "port": "http"},
                                "periodSeconds": 10,
                                "failureThreshold": 90,  # weights download and load: up to 15 minutes
                            },
                            "volumeMounts": [{"name": "shm", "mountPath": "/dev/shm"},
                                             {"name": "cache", "mountPath": "/root/.cache/huggingface"}],
                        }
                    ],
                    # Tensor parallelism shares tensors between GPU processes through shared memory.
                    "volumes": [{"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}},
                                {"name": "cache", "emptyDir": {}}],
                },
            },
        },
    }  # fmt: skip
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": app, "labels": dict(labels)},
        "spec": {"selector": dict(labels), "ports": [{"name": "http", "port": 8000, "targetPort": "http"}]},
    }
    request, gpu = plan.request, plan.gpus[0].name
    header = (
        f"# vLLM for {plan.shape.name}, written by `strata plan --kubernetes` for {request.concurrency} sequences of "
        f"{request.max_context} tokens on {gpu} GPUs.\n# {plan.reason}\n"
    )
    return header + yaml.safe_dump_all([deployment, service], sort_keys=False)


def render_plan(plan: Plan, console: Console) -> None:
    shape, request = plan.shape, plan.request
    weights = request.quant or request.dtype
    kv = "fp8" if request.kv_fp8 else request.dtype
    moe = f", MoE {shape.num_experts}x{shape.experts_per_token} ({format_count(shape.active_params)} active)"
    console.print(
        f"[bold]{shape.name}[/] ({shape.model_id}): {format_count(shape.num_params)} parameters"
        f"{moe if shape.is_moe else ''}, {shape.num_layers} layers, {shape.num_attention_heads} heads / "
        f"{shape.num_key_value_heads} KV heads",
        highlight=False,
    )
    console.print(
        f"weights {weights} = {format_bytes(plan.weight_bytes)} ({plan.weight_bytes / 1e9:,.1f} GB); "
        f"KV cache {kv} = {plan.kv_bytes_per_token / 1024:,g} KiB per token; "
        f"{request.concurrency} x {request.max_context:,}-token sequences asked for",
        highlight=False,
    )
    console.print(_gpu_table(plan))
    verdict = Text("fits: " if plan.fits else "does not fit: ", style="bold green" if plan.fits else "bold red")
    console.print(verdict + Text(plan.reason))
    for warning in plan.warnings:
        console.print(f"[yellow]warning:[/] {warning}", highlight=False)
    if plan.alternatives:
        console.print(_alternatives_table(plan))
    elif not plan.fits:
        console.print("[red]no single change tried (fp8 KV cache, fp8 or 4-bit weights, more GPUs) makes it fit[/]")
    if plan.fits:  # unboxed and unwrapped, so both copy and paste cleanly
        console.rule("start it by hand", align="left")
        console.print(Text(plan.vllm_command()), soft_wrap=True)
        console.rule("or let Strata launch it (strata.yaml)", align="left")
        console.print(Text(strata_yaml(plan).rstrip()), soft_wrap=True)


def _gpu_table(plan: Plan) -> Table:
    title = f"memory per GPU at TP={plan.tensor_parallel_size}" + ("" if plan.fits else " (closest attempt)")
    table = Table("GPU", "name", "memory", "budget", "weights", "overhead", "KV cache", "unused", title=title)
    for g in plan.gpus:
        unused = (
            format_bytes(g.unused_bytes) if g.unused_bytes >= 0 else f"[red]over by {format_bytes(-g.unused_bytes)}"
        )
        table.add_row(
            str(g.index),
            g.name,
            format_bytes(g.memory_bytes),
            format_bytes(g.budget_bytes),
            format_bytes(g.weight_bytes),
            format_bytes(g.overhead_bytes),
            format_bytes(g.kv_cache_bytes),
            unused,
        )
    return table


def _alternatives_table(plan: Plan) -> Table:
    table = Table("would fit with", "TP", "GPUs", "KV tokens", "concurrent sequences")
    table.title = "alternatives (each re-planned)"
    for alternative in plan.alternatives:
        p = alternative.plan
        table.add_row(
            alternative.summary,
            str(p.tensor_parallel_size),
            ",".join(map(str, p.gpu_indices)),
            f"{p.kv_token_capacity:,}",
            f"{p.max_concurrency} x {p.request.max_context:,} tokens",
        )
    return table
