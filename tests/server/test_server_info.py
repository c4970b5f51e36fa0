"""The server-info read-back: both dialects' payload shapes, against the simulator's real HTTP server."""
from __future__ import annotations

import pytest

from tuner.server import fetch_server_info, memory_from_server_info
from tuner.server.server_info import graph_gib

KT_PAYLOAD = {"version": "0.7.2", "internal_states": [
    {"memory_usage": {"weight": 42.11, "kvcache": 2.42, "token_capacity": 37000, "graph": 0.61}}]}
UPSTREAM_PAYLOAD = {"version": "0.5.23", "internal_states": [
    {"memory_usage": {"weight": 42.113, "kvcache": 2.421, "startup_available": 1.694, "token_capacity": 37000,
                      "token_capacity_swa": None, "graph": {"prefill": 0.1, "decode": 0.51, "target_verify": 0.0}}},
    {"memory_usage": {"weight": 42.2, "kvcache": 2.421, "startup_available": 1.5, "token_capacity": 36000,
                      "token_capacity_swa": None, "graph": {"prefill": 0.1, "decode": 0.5}}}]}


def test_sglang_kt_payload() -> None:
    assert memory_from_server_info(KT_PAYLOAD) == {"weight_mem_gib": 42.11, "kv_size_gib": 2.42, "kv_tokens": 37000,
                                                   "max_total_num_tokens": 37000, "cuda_graph_mem_gib": 0.61}


def test_upstream_payload_worst_over_dp_ranks_and_graph_phases_summed() -> None:
    got = memory_from_server_info(UPSTREAM_PAYLOAD)
    assert got == {"weight_mem_gib": 42.2, "kv_size_gib": 2.421, "kv_tokens": 36000, "max_total_num_tokens": 36000,
                   "cuda_graph_mem_gib": pytest.approx(0.61), "available_gpu_mem_gib": 1.5}
    assert graph_gib({"a": 0.25, "b": None}) == 0.25 and graph_gib(True) is None


def test_disaggregated_and_malformed_payloads() -> None:
    assert memory_from_server_info({"decode": [KT_PAYLOAD]})["kv_tokens"] == 37000
    assert memory_from_server_info({"internal_states": "x"}) == {}
    assert memory_from_server_info({"internal_states": [{"memory_usage": {"weight": "big", "graph": float("nan")}}]}) == {}


def test_nothing_listening_is_no_read_back() -> None:
    from tuner.server import find_free_port

    assert fetch_server_info(f"http://127.0.0.1:{find_free_port('127.0.0.1')}", timeout_s=1) is None
