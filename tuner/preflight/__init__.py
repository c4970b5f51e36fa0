"""Before the first launch: `kttune doctor` (interpreters, flags, GPUs, CPU, model, storage),
the server's and bench client's accepted flags, `kttune plan` (one configuration's memory
breakdown, nothing launched) and `kttune init` (a search space for a model and a machine)."""
from __future__ import annotations

from tuner.preflight.compat import check_space_compat
from tuner.preflight.doctor import DoctorOptions, exit_code, render_checks, run_checks
from tuner.preflight.init import InitOptions, build_space, write_space
from tuner.preflight.plan import plan_data, plan_report

__all__ = [
    "DoctorOptions",
    "InitOptions",
    "build_space",
    "check_space_compat",
    "exit_code",
    "plan_data",
    "plan_report",
    "render_checks",
    "run_checks",
    "write_space",
]
