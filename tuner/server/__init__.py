"""Server process management: launch, readiness, log classification, the server-info
read-back, teardown."""
from __future__ import annotations

from tuner.server.argv import build_server_argv, flag_args
from tuner.server.launch import (
    PID_FILE_NAME,
    TOKEN_ENV,
    ServerHandle,
    client_host,
    find_free_port,
    port_is_free,
    start_server,
)
from tuner.server.leftovers import Leftover, find_leftovers, leftover_note, reap_leftovers
from tuner.server.logscan import (
    ABORT_REASONS,
    FAILURE_REASONS,
    FALLBACK_REASONS,
    HTTP_UP_MARKERS,
    OOM_REASONS,
    PHASES,
    READY_LINE,
    WARNING_REASONS,
    FailureMatch,
    classify_failure,
    decisive_line,
    find_failures,
    first_failure,
    parse_memory_lines,
    runtime_oom,
    silent_fallback,
    worst_memory_figures,
)
from tuner.server.readiness import LogTail, failure_message, is_alive, wait_ready
from tuner.server.recorder import (
    RECORDER_DIR_ENV,
    RECORDER_FLAGS,
    find_dump,
    recorder_dir,
    start_recording,
    stop_and_dump,
)
from tuner.server.server_info import SERVER_INFO_ENDPOINTS, fetch_server_info, memory_from_server_info
from tuner.server.teardown import GpuMonitor, TeardownReport, kill_orphan, stop_server
from tuner.server.watchdog import die_with_tuner

__all__ = [
    "ABORT_REASONS",
    "FAILURE_REASONS",
    "FALLBACK_REASONS",
    "FailureMatch",
    "GpuMonitor",
    "HTTP_UP_MARKERS",
    "Leftover",
    "LogTail",
    "OOM_REASONS",
    "PHASES",
    "PID_FILE_NAME",
    "READY_LINE",
    "RECORDER_DIR_ENV",
    "RECORDER_FLAGS",
    "SERVER_INFO_ENDPOINTS",
    "ServerHandle",
    "TOKEN_ENV",
    "TeardownReport",
    "WARNING_REASONS",
    "build_server_argv",
    "classify_failure",
    "decisive_line",
    "failure_message",
    "client_host",
    "die_with_tuner",
    "find_dump",
    "fetch_server_info",
    "find_failures",
    "find_leftovers",
    "find_free_port",
    "first_failure",
    "flag_args",
    "is_alive",
    "kill_orphan",
    "leftover_note",
    "memory_from_server_info",
    "parse_memory_lines",
    "port_is_free",
    "reap_leftovers",
    "recorder_dir",
    "runtime_oom",
    "silent_fallback",
    "start_recording",
    "start_server",
    "stop_and_dump",
    "stop_server",
    "wait_ready",
    "worst_memory_figures",
]
