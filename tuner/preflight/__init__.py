"""Before the first launch: `kttune doctor` (interpreters, flags, GPUs, CPU, model, storage),
the server's dialect and accepted flags (from its own parser), the bench client's, `kttune plan` (one configuration's memory
breakdown, nothing launched) and `kttune init` (a search space for a model and a machine)."""
from __future__ import annotations

from tuner.preflight.compat import CompatReport, check_space_compat, server_options
from tuner.preflight.dialect import ParserCache, ServerDialect, ServerOptions, detect_dialect, is_simulated
from tuner.preflight.doctor import DoctorOptions, exit_code, render_checks, run_checks
from tuner.preflight.init import InitOptions, build_space, write_space
from tuner.preflight.parser_probe import TAG as PARSER_TAG
from tuner.preflight.parser_probe import dump_parser
from tuner.preflight.plan import plan_data, plan_report
from tuner.preflight.profile_check import ProfileVerdict, check_profile

__all__ = [
    "CompatReport",
    "DoctorOptions",
    "InitOptions",
    "build_space",
    "PARSER_TAG",
    "ParserCache",
    "ProfileVerdict",
    "ServerDialect",
    "ServerOptions",
    "check_profile",
    "check_space_compat",
    "detect_dialect",
    "is_simulated",
    "dump_parser",
    "server_options",
    "exit_code",
    "plan_data",
    "plan_report",
    "render_checks",
    "run_checks",
    "write_space",
]
