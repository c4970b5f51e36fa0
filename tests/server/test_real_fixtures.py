"""kttune's parsers against what real servers wrote (tests/fixtures/real/): upstream
sglang 0.5.11 with kt-kernel 0.5.0.post1 on an H100, started by scripts/realbox/.
Each figure asserted here is read off the fixture's own lines."""
from __future__ import annotations

from pathlib import Path

from tuner.outcome import Fault, Reason
from tuner.server import logscan

REAL = Path(__file__).resolve().parents[1] / "fixtures" / "real"


def read(name: str) -> str:
    return (REAL / name).read_text()


def test_upstream_0_5_11_memory_lines_parse_as_printed() -> None:
    # "Load weight begin. avail mem=78.50 GB" / "Load weight end. ..., avail mem=77.88 GB, mem usage=0.62 GB."
    # "KV Cache is allocated. #tokens: 10118320, K size: 19.30 GB, V size: 19.30 GB" (no dtype field
    # in 0.5.11) / "Memory pool end. avail mem=39.14 GB"
    mem = logscan.parse_memory_lines(read("upstream-0.5.11-h100-jit-failure.server.log"))
    assert mem["weight_begin_avail_gib"] == 78.5
    assert mem["weight_avail_gib"] == 77.88 and mem["weight_mem_gib"] == 0.62
    assert mem["kv_tokens"] == 10118320 and abs(mem["kv_size_gib"] - 38.6) < 1e-9
    assert mem["pool_avail_gib"] == 39.14


def test_upstream_0_5_11_start_up_phases_are_seen_in_order() -> None:
    phases = [p for line in read("upstream-0.5.11-h100-jit-failure.server.log").splitlines()
              if (p := logscan.startup_phase(line))]
    firsts = list(dict.fromkeys(phases))
    assert firsts == ["server args parsed", "distributed init", "weights loading", "weights loaded",
                      "KV cache allocated", "memory pool ready", "CUDA graphs capturing"]


def test_a_jit_build_failure_in_capture_is_a_kernel_build_failure_not_a_memory_one() -> None:
    # The real server wraps it as "Capture cuda graph failed: Ninja build failed" and advises a
    # smaller mem-fraction-static; the cause is a missing kernel source, the same for every config.
    text = read("upstream-0.5.11-h100-jit-failure.server.log")
    assert logscan.classify_failure(text) == "kernel_build_failed"
    reason = Reason(logscan.classify_failure(text))
    assert reason.fault is Fault.FATAL and not reason.memory
    decisive = logscan.decisive_line(text)
    assert decisive is not None and "Ninja build failed" in decisive


def test_the_help_of_real_upstream_0_5_11_lists_its_six_kt_flags_and_what_the_realbox_space_passes() -> None:
    from tuner.config import load_space
    from tuner.preflight.compat import parse_help_flags

    flags = parse_help_flags(read("upstream-0.5.11-launch_server-help.txt"))
    assert {f for f in flags if f.startswith("--kt-")} == {
        "--kt-weight-path", "--kt-method", "--kt-cpuinfer", "--kt-threadpool-count", "--kt-num-gpu-experts",
        "--kt-max-deferred-experts-per-token"}
    space = load_space(Path(__file__).resolve().parents[2] / "search_spaces" / "realbox-qwen3moe.yaml", check_paths=False)
    passed = {f"--{k}" for k in space.launch_flags(space.baseline or {})}
    assert passed <= flags, passed - flags
    # sglang-kt's placement flag is not upstream's: the refused-flag variant must be caught before a launch
    assert "--kt-expert-placement-strategy" not in flags
