"""What the memory model knows beyond the model's sizes: :class:`MemoryCalibration` (overheads,
and the anchor on a launch that really started), how it is restored from a saved study, the
margin an anchored prediction keeps free, and the calibrations that judge a launch inside it."""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from tuner.feasibility.plan import GB

# Without the margin, free memory's spread is still kept free (see without_margin_calibration).
WITHOUT_MARGIN_FREE_SD_PRIOR_GB = 0.2
WITHOUT_MARGIN_FREE_SD_WEIGHT = 0.5
# Activation estimates differ about fourfold: SGLang's automatic mem-fraction-static reserves
# 1.5 MB per chunk token (plan.auto_mem_fraction), while the 8xL20 Kimi-K2 deployment only fits
# with at most 0.4 MB. So a launch inside the margin may test whether they are a quarter of the estimate.
LOWER_ACTIVATION_SHARE = 0.25


@dataclass(frozen=True)
class MemoryCalibration:
    """Overheads the sizes in :mod:`tuner.machine.model` do not cover, and what launches taught;
    corrected during a study from logs (:mod:`tuner.feasibility.anchor`). Saved in the study as
    :func:`dataclasses.asdict` gives it: a renamed field needs an entry in RENAMED_FIELDS."""

    cuda_context_gb: float = 0.5  # per-process CUDA/torch context, taken from free memory
    runtime_base_gb: float = 0.2  # graph pool base, attention/cuBLAS workspaces
    nccl_gb: float = 0.25  # communicator buffers per GPU when TP > 1
    activation_scale: float = 1.3  # caching-allocator slack on the per-token activation estimate
    graph_scale: float = 2.0  # graph pools hold inputs, outputs and intermediates per batch slot
    activation_bytes_per_token: float | None = None  # measured activation bytes per chunk token replace the estimate
    graph_bytes_per_batch: float | None = None  # measured graph bytes per captured batch slot replace the estimate
    nonexpert_weight_gb: float | None = None  # measured non-expert weights per GPU at this TP
    host_base_gb: float = 4.0  # launcher, tokenizer, detokenizer
    host_gb_per_gpu: float = 2.0  # RSS of each scheduler process (torch, CUDA libraries)
    sglang_kt_profile_quirk: bool = True  # sglang-kt 0.7.2 profiles MLA KV with a third of the cell
    # Anchor (see :func:`tuner.feasibility.anchor.anchor_from_observed`): what a launch at TP
    # ``reference_tp`` logged, and what the model without anchor said for that launch. Other
    # configs at that TP are predicted as observed + model difference, so the model's errors in
    # fixed costs cancel; the start-up margin becomes ``anchor_difference_share`` x |difference|
    # + the spread of free memory + ``anchor_extra_gb`` (:func:`anchor_margin`).
    reference_tp: int | None = None
    free_before_weights_gb: float | None = None  # free per GPU before weights: mean over launches (min over ranks)
    free_before_weights_launches: int = 0  # launches behind free_before_weights_gb
    free_before_weights_sum_sq_dev: float = 0.0  # their sum of squared deviations: the spread widens the margin
    free_sd_weight: float = 1.0  # standard deviations of free memory kept free
    free_sd_prior_gb: float = 0.0  # prior spread of free memory, worth free_sd_prior_launches launches
    free_sd_prior_launches: float = 0.0
    weights_offset_gb: float = 0.0  # logged weights - modelled weights at the reference
    graphs_offset_gb: float = 0.0  # logged graph memory - modelled graph memory
    reference_weights_gb: float = 0.0  # the model's figures for the reference launch
    reference_kv_gb: float = 0.0  # (the KV pool as logged, where the log says)
    reference_req_to_token_gb: float = 0.0
    reference_graphs_gb: float = 0.0
    reference_chunk: int = 0
    reference_graph_bs: int = 0  # captured batch size at the reference
    graph_slope_bytes: float | None = None  # per batch slot: from two logged launches at different batch sizes
    anchor_difference_share: float = 0.05  # trust model differences to within this share
    anchor_extra_gb: float = 0.0  # grown by launches that failed for memory although predicted to fit
    activation_upper_bytes_per_token: float | None = None  # a full chunk survived: activations are at most this
    activation_lower_bytes_per_token: float | None = None  # a chunk ran out of memory: activations are above this
    activation_share: float = 1.0  # the share of the activation estimate assumed (after its upper bound)


# Earlier field names, as older studies saved them: restored under the current names.
RENAMED_FIELDS = {
    "ref_tp": "reference_tp",
    "f0_gb": "free_before_weights_gb",
    "f0_n": "free_before_weights_launches",
    "f0_m2": "free_before_weights_sum_sq_dev",
    "f0_sd_weight": "free_sd_weight",
    "f0_sd_prior_gb": "free_sd_prior_gb",
    "f0_sd_prior_df": "free_sd_prior_launches",
    "ref_weights_gb": "reference_weights_gb",
    "ref_kv_gb": "reference_kv_gb",
    "ref_rtt_gb": "reference_req_to_token_gb",
    "ref_graphs_gb": "reference_graphs_gb",
    "ref_chunk": "reference_chunk",
    "graph_ref_bs": "reference_graph_bs",
    "anchor_rel": "anchor_difference_share",
    "act_upper_bytes_per_token": "activation_upper_bytes_per_token",
    "act_lower_bytes_per_token": "activation_lower_bytes_per_token",
}


def calibration_from_state(values: Mapping[str, Any]) -> MemoryCalibration:
    """The calibration stored as :func:`dataclasses.asdict` gave it, under current or earlier
    field names (a current name wins); unknown keys are dropped."""
    known = {f.name for f in fields(MemoryCalibration)}
    renamed = {RENAMED_FIELDS[k]: v for k, v in values.items() if k in RENAMED_FIELDS}
    return MemoryCalibration(**{**renamed, **{k: v for k, v in values.items() if k in known}})


def anchor_margin(cal: MemoryCalibration, difference: float) -> float:
    """Bytes an anchored prediction keeps free: a share of its difference from the reference,
    the launch-to-launch spread (standard deviation) of free memory, and what failures added."""
    df = max(cal.free_before_weights_launches - 1, 0) + cal.free_sd_prior_launches  # degrees of freedom
    sd = (math.sqrt((cal.free_before_weights_sum_sq_dev + cal.free_sd_prior_launches * cal.free_sd_prior_gb ** 2) / df)
          if df > 0 else 0.0)
    return cal.anchor_difference_share * difference + (cal.free_sd_weight * sd + cal.anchor_extra_gb) * GB


def without_margin_calibration(cal: MemoryCalibration) -> MemoryCalibration:
    """The anchored model without the safety margin: trusted exactly in its differences from
    the reference launch, still keeping free memory's launch-to-launch spread and what failures
    taught, so a configuration it admits is one whose launch tests the model, not one that fails
    every few starts. Until launches measure that spread it is taken as
    WITHOUT_MARGIN_FREE_SD_PRIOR_GB (worth two launches), the scale of the free-memory scatter
    that makes OOMs near the limit come and go (the simulator's ``oom_band_gib``, ±0.4 GiB in
    tuner/sim/scenario.py). WITHOUT_MARGIN_FREE_SD_WEIGHT standard deviations are kept free: a
    fresh launch then fits about 70 % of the time."""
    return replace(cal, anchor_difference_share=0.0, free_sd_weight=WITHOUT_MARGIN_FREE_SD_WEIGHT,
                   free_sd_prior_gb=WITHOUT_MARGIN_FREE_SD_PRIOR_GB, free_sd_prior_launches=2.0)


def lower_activations_calibration(cal: MemoryCalibration) -> MemoryCalibration:
    """:func:`without_margin_calibration` with activations at LOWER_ACTIVATION_SHARE of their
    estimate (never below what a run-time OOM proved): what a launch inside the margin may test.
    No log line reports activations; only a run next to little free memory bounds them, so such
    runs are how an overestimate is found (a survival bounds them from above, an OOM from below)."""
    return replace(without_margin_calibration(cal), activation_share=LOWER_ACTIVATION_SHARE)


def unlearned_calibration(cal: MemoryCalibration) -> MemoryCalibration:
    """The model without anything learned from launches (keeps the configured scales)."""
    return replace(cal, nonexpert_weight_gb=None, graph_bytes_per_batch=None, free_before_weights_gb=None,
                   reference_tp=None, activation_upper_bytes_per_token=None, activation_lower_bytes_per_token=None)
