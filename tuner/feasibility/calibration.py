"""What the memory model learned beyond the model's sizes: the calibration and its variants."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

from tuner.feasibility.plan import GB

BOUNDARY_F0_SD_PRIOR_GB = 0.2
BOUNDARY_SD_WEIGHT = 0.5
# Activation estimates in the field differ about fourfold (facts §4: SGLang's reserve heuristic
# assumes 1.5 MB per chunk token where the seed deployment only fits with <= 0.4 MB), so a
# launch inside the margin may test whether they are a quarter of the estimate.
BOUNDARY_ACTIVATION_SHARE = 0.25


@dataclass(frozen=True)
class MemoryCalibration:
    """Overheads the sizes in :mod:`tuner.model` do not cover; correct them during a study from
    :func:`calibrate_from_log` through :func:`calibration_from_observed`."""

    cuda_context_gb: float = 0.5  # per-process CUDA/torch context, taken from free memory
    runtime_base_gb: float = 0.2  # graph pool base, attention/cuBLAS workspaces
    nccl_gb: float = 0.25  # communicator buffers per GPU when TP > 1
    activation_scale: float = 1.3  # caching-allocator slack on the per-token activation estimate
    graph_scale: float = 2.0  # graph pools hold inputs, outputs and intermediates per batch slot
    activation_bytes_per_token: float | None = None  # measured α replaces the estimate
    graph_bytes_per_batch: float | None = None  # measured g1 replaces the estimate
    nonexpert_weight_gb: float | None = None  # measured W_nonexpert per GPU at this TP
    host_base_gb: float = 4.0  # launcher, tokenizer, detokenizer
    host_gb_per_gpu: float = 2.0  # RSS of each scheduler process (torch, CUDA libraries)
    sglang_kt_profile_quirk: bool = True  # sglang-kt 0.7.2 profiles MLA KV with a 1/3 cell
    # Anchor (see :func:`anchor_from_observed`): what a launch at TP ``ref_tp`` logged, and what the
    # plain model said for that launch. Other configs at that TP are predicted as observed + model
    # difference; the startup margin is replaced by ``anchor_rel`` x |difference| + ``anchor_extra_gb``.
    ref_tp: int | None = None
    f0_gb: float | None = None  # free per GPU before weights: mean over launches (min over ranks)
    f0_n: int = 0  # launches behind f0_gb
    f0_m2: float = 0.0  # sum of squared deviations (Welford): their spread widens the margin
    f0_sd_weight: float = 1.0  # standard deviations of free memory kept free
    f0_sd_prior_gb: float = 0.0  # prior spread of free memory (worth f0_sd_prior_df launches)
    f0_sd_prior_df: float = 0.0
    weights_offset_gb: float = 0.0  # logged weights - modelled weights at the reference
    graphs_offset_gb: float = 0.0  # logged graph memory - modelled graph memory
    ref_weights_gb: float = 0.0
    ref_kv_gb: float = 0.0
    ref_rtt_gb: float = 0.0
    ref_graphs_gb: float = 0.0
    ref_chunk: int = 0
    graph_ref_bs: int = 0  # captured batch size at the reference
    graph_slope_bytes: float | None = None  # fitted from two logged launches at different batch sizes
    anchor_rel: float = 0.05  # trust model differences to within this share
    anchor_extra_gb: float = 0.0  # grown by launches that failed for memory although predicted to fit
    act_upper_bytes_per_token: float | None = None  # a full chunk survived: α is at most this
    act_lower_bytes_per_token: float | None = None  # a chunk ran out of memory: α is above this
    activation_share: float = 1.0  # the share of the α estimate assumed (after its upper bound)


def anchor_margin(cal: MemoryCalibration, spread: float) -> float:
    """Bytes an anchored prediction keeps free: a share of its difference from the reference,
    the launch-to-launch spread (standard deviation) of free memory, and what failures added."""
    df = max(cal.f0_n - 1, 0) + cal.f0_sd_prior_df
    sd = math.sqrt((cal.f0_m2 + cal.f0_sd_prior_df * cal.f0_sd_prior_gb ** 2) / df) if df > 0 else 0.0
    return cal.anchor_rel * spread + (cal.f0_sd_weight * sd + cal.anchor_extra_gb) * GB


def boundary_calibration(cal: MemoryCalibration) -> MemoryCalibration:
    """The anchored model trusted exactly in its differences from the reference launch, still
    keeping free memory's launch-to-launch spread and what failures taught: a configuration
    admitted by it is one whose launch tests the model, not one that fails every few starts.
    Until launches measure that spread, it is taken as BOUNDARY_F0_SD_PRIOR_GB (worth two
    launches), the scale of the fuzzy OOM band near the cliff (perf-model §3.7: ±0.4 GB).
    BOUNDARY_SD_WEIGHT standard deviations kept free: a fresh launch fits about 70 % of the time."""
    return replace(cal, anchor_rel=0.0, f0_sd_weight=BOUNDARY_SD_WEIGHT,
                   f0_sd_prior_gb=BOUNDARY_F0_SD_PRIOR_GB, f0_sd_prior_df=2.0)


def band_calibration(cal: MemoryCalibration) -> MemoryCalibration:
    """What a launch inside the margin may test: :func:`boundary_calibration` with activations at
    BOUNDARY_ACTIVATION_SHARE of their estimate (never below what a run-time OOM proved). No log
    line reports activations; only a run next to little free memory bounds them, so such runs
    are how an overestimate is found (a survival bounds α from above, an OOM from below)."""
    return replace(boundary_calibration(cal), activation_share=BOUNDARY_ACTIVATION_SHARE)


def unlearned_calibration(cal: MemoryCalibration) -> MemoryCalibration:
    """The model without anything learned from launches (keeps the configured scales)."""
    return replace(cal, nonexpert_weight_gb=None, graph_bytes_per_batch=None, f0_gb=None, ref_tp=None,
                   act_upper_bytes_per_token=None, act_lower_bytes_per_token=None)
