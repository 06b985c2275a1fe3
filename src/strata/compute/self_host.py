"""Should this workload be self-hosted? The GPUs a profiled load needs, what they cost, and the break-even.

The profile gives the load (peak concurrency, token lengths, tokens per month, what the API charged); the
capacity planner (`planner.plan`) gives the tensor-parallel group that holds the weights and the KV cache of
that many sequences. What neither can know is how fast a replica decodes: that is measured by `strata
loadtest` against the real server when a report is given, and otherwise estimated from the GPU's memory
bandwidth (decoding reads every weight once per step, so a step takes about weight bytes / bandwidth). Every
such number is an `Assumption` with its source, printed with the verdict.

Break-even utilisation: the share of the replicas' full capacity the traffic must use for self-hosting to cost
no more than the API would for the same tokens. Above it, self-hosting is cheaper.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from strata.compute.catalog import ModelShape
from strata.compute.planner import Plan, PlanError, hypothetical_gpus, plan
from strata.compute.workload import WorkloadProfile

HOURS_PER_MONTH = 730.0
DECODE_EFFICIENCY = 0.5  # share of peak memory bandwidth a decode step achieves in practice


@dataclass(frozen=True, slots=True)
class GpuSpec:
    memory_gib: float
    bandwidth_gb_s: float  # peak memory bandwidth, from the vendor's datasheet


# Datasheet figures (memory and peak bandwidth); prices come from the config (`cost.gpu_prices`).
GPU_SPECS: dict[str, GpuSpec] = {
    "H200": GpuSpec(141, 4800),
    "H100": GpuSpec(80, 3350),  # SXM
    "A100-80GB": GpuSpec(80, 2039),
    "A100-40GB": GpuSpec(40, 1555),
    "L40S": GpuSpec(48, 864),
    "A10G": GpuSpec(24, 600),
    "L4": GpuSpec(24, 300),
}


@dataclass(frozen=True, slots=True)
class Assumption:
    name: str
    value: float
    unit: str
    source: str


@dataclass(frozen=True, slots=True)
class SelfHostEstimate:
    plan: Plan
    gpu: str
    replicas: int
    gpus_total: int
    self_host_usd_per_month: float
    api_usd_per_month: float
    output_tokens_per_month: float
    capacity_tokens_per_month: float
    utilisation: float  # of the replicas' capacity, by the observed traffic
    break_even_utilisation: float | None  # None: the API costs nothing for this traffic, self-hosting never pays
    assumptions: list[Assumption]

    @property
    def cheaper(self) -> str:
        if self.break_even_utilisation is None:
            return "api"
        return "self-host" if self.utilisation >= self.break_even_utilisation else "api"

    def to_json(self) -> dict[str, Any]:
        from strata.compute.plan_render import plan_to_dict

        return {
            "gpu": self.gpu,
            "replicas": self.replicas,
            "tensor_parallel_size": self.plan.tensor_parallel_size,
            "gpus_total": self.gpus_total,
            "vllm_command": self.plan.vllm_command(),
            "self_host_usd_per_month": self.self_host_usd_per_month,
            "api_usd_per_month": self.api_usd_per_month,
            "output_tokens_per_month": self.output_tokens_per_month,
            "capacity_tokens_per_month": self.capacity_tokens_per_month,
            "utilisation": self.utilisation,
            "break_even_utilisation": self.break_even_utilisation,
            "cheaper": self.cheaper,
            "assumptions": [_assumption(a) for a in self.assumptions],
            "plan": plan_to_dict(self.plan),
        }


def _assumption(a: Assumption) -> dict[str, Any]:
    return {"name": a.name, "value": a.value, "unit": a.unit, "source": a.source}


@dataclass(frozen=True, slots=True)
class Measured:
    """What `strata loadtest` measured on the real server: output tokens/s at the highest load within SLOs."""

    output_tokens_per_s: float
    load: float
    source: str


def measured_from_loadtest(report: dict[str, Any], source: str) -> Measured:
    best = report.get("best")
    steps = [s for s in report.get("steps", []) if s.get("load") == best]
    if best is None or not steps:
        raise ValueError("the loadtest report has no step that met its SLOs: nothing measured to size by")
    return Measured(float(steps[0]["output_tokens_per_s"]), float(best), source)


def estimate(
    profile: WorkloadProfile,
    shape: ModelShape,
    *,
    gpu: str,
    gpu_usd_per_hour: float,
    price_source: str,
    window_days: float,
    quant: str | None = None,
    api_usd_per_mtok: tuple[float, float] | None = None,
    measured: Measured | None = None,
    max_gpus: int = 8,
) -> SelfHostEstimate:
    """Size and price self-hosting `shape` for the load in `profile`, observed over `window_days`."""
    if profile.calls == 0 or profile.tokens.prompt is None or profile.tokens.completion is None:
        raise PlanError("the profile has no calls: there is no load to size for")
    if gpu not in GPU_SPECS:
        raise PlanError(f"unknown GPU {gpu!r}: use one of {', '.join(GPU_SPECS)}")
    spec = GPU_SPECS[gpu]
    concurrency = max(1, profile.traffic.peak_concurrency if profile.traffic else 1)
    context = int(profile.tokens.prompt.p(99) + profile.tokens.completion.p(99))
    context = min(max(context, 256), shape.max_position_embeddings)
    assumptions = [
        Assumption("concurrent sequences", concurrency, "sequences", "the profile's peak concurrency"),
        Assumption("tokens per sequence", context, "tokens", "the profile's p99 prompt + p99 completion"),
        Assumption(f"{gpu} price", gpu_usd_per_hour, "USD/GPU-hour", price_source),
        Assumption(f"{gpu} memory", spec.memory_gib, "GiB", "vendor datasheet"),
    ]
    fitted = _smallest_fit(shape, gpu, spec, concurrency, context, quant, max_gpus)
    tp = fitted.tensor_parallel_size
    if measured is not None:
        per_replica = measured.output_tokens_per_s
        assumptions.append(
            Assumption(
                "output tokens/s per replica",
                per_replica,
                "tokens/s",
                f"measured by strata loadtest ({measured.source}) at {measured.load:g}",
            )
        )
    else:
        step_s = fitted.weight_bytes / (spec.bandwidth_gb_s * 1e9 * tp * DECODE_EFFICIENCY)
        per_replica = min(concurrency, fitted.max_concurrency) / step_s
        assumptions.append(Assumption(f"{gpu} memory bandwidth", spec.bandwidth_gb_s, "GB/s", "vendor datasheet"))
        assumptions.append(
            Assumption(
                "decode efficiency",
                DECODE_EFFICIENCY,
                "of peak bandwidth",
                "assumed; run strata loadtest and pass --loadtest to measure instead",
            )
        )
        assumptions.append(
            Assumption(
                "output tokens/s per replica",
                per_replica,
                "tokens/s",
                "estimated: one decode step reads the weights once, for every sequence",
            )
        )
    scale = 30.0 / window_days
    completion_tokens = profile.tokens.completion.mean * profile.calls
    prompt_tokens = profile.tokens.prompt.mean * profile.calls
    tokens_per_month = completion_tokens * scale
    peak_tokens_per_s = _peak_output_tokens_per_s(profile)
    replicas = max(1, math.ceil(peak_tokens_per_s / per_replica)) if per_replica > 0 else 1
    assumptions.append(
        Assumption(
            "peak output tokens/s",
            peak_tokens_per_s,
            "tokens/s",
            "the profile's peak requests/min x mean completion tokens",
        )
    )
    assumptions.append(Assumption("month", HOURS_PER_MONTH, "hours", "replicas run around the clock"))
    if api_usd_per_mtok is not None:
        api_usd = (prompt_tokens * api_usd_per_mtok[0] + completion_tokens * api_usd_per_mtok[1]) * 1e-6
        assumptions.append(
            Assumption(
                "API price, input / output",
                api_usd_per_mtok[0],
                "USD/Mtok",
                f"given: {api_usd_per_mtok[0]:g} / {api_usd_per_mtok[1]:g}",
            )
        )
    else:
        api_usd = profile.spend.total_usd
        assumptions.append(
            Assumption("API spend of the profiled traffic", api_usd, "USD", f"the recorded cost in {profile.source}")
        )
    assumptions.append(Assumption("traffic observed over", window_days, "days", "the profile's window, scaled to 30"))
    self_host = replicas * tp * gpu_usd_per_hour * HOURS_PER_MONTH
    capacity = replicas * per_replica * HOURS_PER_MONTH * 3600
    api_per_completion_token = api_usd / completion_tokens if completion_tokens else 0.0
    break_even = self_host / (capacity * api_per_completion_token) if api_per_completion_token > 0 else None
    return SelfHostEstimate(
        plan=fitted,
        gpu=gpu,
        replicas=replicas,
        gpus_total=replicas * tp,
        self_host_usd_per_month=self_host,
        api_usd_per_month=api_usd * scale,
        output_tokens_per_month=tokens_per_month,
        capacity_tokens_per_month=capacity,
        utilisation=tokens_per_month / capacity if capacity else 0.0,
        break_even_utilisation=break_even,
        assumptions=assumptions,
    )


def _smallest_fit(
    shape: ModelShape, gpu: str, spec: GpuSpec, concurrency: int, context: int, quant: str | None, max_gpus: int
) -> Plan:
    last: Plan | None = None
    count = 1
    while count <= max_gpus:
        slots, topology = hypothetical_gpus(count, spec.memory_gib, gpu)
        last = plan(shape, quant=quant, max_context=context, concurrency=concurrency, gpus=slots, nvlink=topology)
        if last.fits:
            return last
        count *= 2
    assert last is not None
    raise PlanError(
        f"{shape.name} does not fit on {max_gpus} x {gpu} for {concurrency} x {context} tokens: {last.reason}"
    )


def _peak_output_tokens_per_s(profile: WorkloadProfile) -> float:
    assert profile.tokens.completion is not None
    rpm = profile.traffic.peak_rpm if profile.traffic else profile.calls
    return rpm / 60.0 * profile.tokens.completion.mean
