"""`kttune`'s argument parser: every subcommand and option, the exit codes its help prints,
and bad arguments as one line with exit 2. The commands themselves are in `tuner.cli`."""
from __future__ import annotations

import argparse
from typing import NoReturn

EXIT_CODES = ("exit codes: 0 ok; 1 a fault while running (a run stops with its cause after a fatal fault or "
              "--fault-streak environment faults in a row); 2 bad input; 3 the run ended with no trial measured; "
              "130 stopped (Ctrl-C, SIGTERM)")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, exit 2, like every other bad input
        command = self.prog.split()[-1]
        usage = "kttune --help" if command == "kttune" else f"kttune {command} --help"
        self.exit(2, f"kttune: error: {message} (see {usage})\n")


def _add_format(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", choices=("text", "json"), default="text", help="output format (default: %(default)s)")


def _add_study_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--space", help="search-space YAML (kttune init writes one); best, show, export, report and "
                                   "dashboard take the space the study stored when it is left out")
    p.add_argument("--study", help="study name (default: the space's name)")
    p.add_argument("--storage", help="SQLAlchemy URL (default: sqlite:///studies/<study>.db)")
    p.add_argument("--studies-dir", default="studies", help="where trial folders and default databases go")


def build_parser() -> argparse.ArgumentParser:
    from tuner import __version__

    parser = _Parser(prog="kttune", description="Tune SGLang + KTransformers launch flags with Optuna.",
                     epilog=EXIT_CODES)
    parser.add_argument("--version", action="version", version=f"kttune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = sub.add_parser("run", help="run (or resume) a study until --budget launches are done", epilog=EXIT_CODES)
    _add_study_args(run)
    run.add_argument("--budget", type=int, default=20, help="server launches in total (default: %(default)s)")
    run.add_argument("--seed", type=int, default=None, help="sampler seed")
    run.add_argument("--dry-run", action="store_true", help="print the argv of the trials; launch nothing")
    run.add_argument("--no-feasibility", action="store_true", help="launch even configs predicted not to fit")
    run.add_argument("--fault-streak", type=int, default=3, metavar="N",
                     help="stop after N launches in a row with an environment fault of any kind, or with the same "
                          "non-memory fault whatever the configuration (default: %(default)s)")
    run.add_argument("--no-compat-check", action="store_true",
                     help="do not read --help of the server and bench client before the first launch")
    rem = sub.add_parser("remeasure", help="re-launch a measured configuration and add its runs to the study")
    _add_study_args(rem)
    rem.add_argument("--trial", type=int, required=True, help="trial number whose configuration to re-launch")
    rem.add_argument("--runs", type=int, default=2, help="launches to add (default: %(default)s)")
    best = sub.add_parser("best", help="show the best trial (the Pareto front for several objectives)")
    _add_study_args(best)
    _add_format(best)
    show = sub.add_parser("show", help="show one trial as stored: params, flags, metrics, constraints, phases, files")
    show.add_argument("trial", type=int, metavar="TRIAL", help="trial number")
    _add_study_args(show)
    _add_format(show)
    studies = sub.add_parser("studies", help="list the studies of a storage: name, trials, best, storage")
    studies.add_argument("--storage", help="SQLAlchemy URL (default: every study database in --studies-dir)")
    studies.add_argument("--studies-dir", default="studies", help="where kttune run puts databases (default: %(default)s)")
    _add_format(studies)
    exp = sub.add_parser("export", help="write a trial as a YAML profile for sglang.launch_server --config")
    _add_study_args(exp)
    exp.add_argument("--out", required=True, help="output .yaml file")
    exp.add_argument("--trial", type=int, help="trial number (default: the best)")
    exp.add_argument("--keep-bench-flags", action="store_true",
                     help="keep the benchmark-only switches (disable-radix-cache, disable-chunked-prefix-cache)")
    exp.add_argument("--weights", metavar="KEY=W,...",
                     help="pick off the Pareto front by preference, e.g. decode.output_throughput=2,prefill.input_throughput=1 "
                          "(objectives rescaled to [0, 1] over the front)")
    rep = sub.add_parser("report", help="write an HTML report with plots (and the PNGs) for the study")
    _add_study_args(rep)
    rep.add_argument("--out", help="output folder (default: <studies-dir>/<study>/report)")
    doc = sub.add_parser("doctor", help="check interpreters, flags, GPUs, CPU, model, bench inputs and storage")
    doc.add_argument("--space", help="search-space YAML to check (default: only this machine)")
    doc.add_argument("--study", help="study name (default: the space's name)")
    doc.add_argument("--storage", help="SQLAlchemy URL (default: sqlite:///<studies-dir>/<study>.db)")
    doc.add_argument("--studies-dir", default="studies", help="where trial folders and default databases go")
    doc.add_argument("--timeout", type=float, default=120.0, help="seconds per interpreter probe (default: %(default)s)")
    _add_format(doc)
    plan = sub.add_parser("plan", help="predict memory, KV capacity and CPU layout of a config; launch nothing")
    _add_study_args(plan)
    plan.add_argument("--set", action="append", default=[], metavar="FLAG=VALUE",
                      help="override a flag (default values: the space's baseline); repeatable")
    _add_format(plan)
    bench = sub.add_parser("cpubench", help="time kt-kernel's CPU expert kernels per kt-cpuinfer/threadpool point; "
                           "kttune run then skips the clearly slower ones")
    _add_study_args(bench)
    bench.add_argument("--threads", help="kt-cpuinfer values, e.g. 8-32 or 16,24,32 (default: the space's)")
    bench.add_argument("--pools", help="kt-threadpool-count values, e.g. 1,2 (default: the space's)")
    bench.add_argument("--method", help="kt-method to time (default: the space's)")
    bench.add_argument("--repeats", type=int, default=3, help="timed repeats per batch size (default: %(default)s)")
    bench.add_argument("--min-time", type=float, default=0.6, help="seconds timed per batch size (default: %(default)s)")
    init = sub.add_parser("init", help="write a search space for a model on this machine (or one described by --gpus/--cpu)")
    init.add_argument("--model", required=True, help="the model's Hugging Face folder (with config.json)")
    init.add_argument("--kt-weight-path", help="the CPU expert weights (default: the model folder)")
    init.add_argument("--kt-method", help="CPU expert format of --kt-weight-path (default: AMXINT4 where the CPU has "
                                           "AMX or AVX-512)")
    init.add_argument("--gpus", metavar="COUNTx NAME-MEM", help='describe the GPUs, e.g. "8x L20-48G" or "4x H100-81559MiB"')
    init.add_argument("--cpu", metavar="SOCKETSxCORES", help="describe the CPU, e.g. 2x32 (two sockets of 32 physical cores)")
    init.add_argument("--numa-nodes", type=int, help="NUMA nodes of the described CPU (default: one per socket)")
    init.add_argument("--amx", action=argparse.BooleanOptionalAction, default=None,
                      help="the described CPU has AMX (default: no, said on screen)")
    init.add_argument("--avx512", action=argparse.BooleanOptionalAction, default=None,
                      help="the described CPU has AVX-512 (default: as --amx)")
    init.add_argument("--ram-gib", type=int, help="host RAM of the described machine in GiB (required with --gpus/--cpu)")
    init.add_argument("--dataset", help="ShareGPT JSON for bench_serving (offline benchmarks)")
    init.add_argument("--name", help="the space's name (default: model and GPUs)")
    init.add_argument("--out", help="output YAML (default: <name>.yaml)")
    init.add_argument("--force", action="store_true", help="overwrite --out")
    comp = sub.add_parser("completion", help="print a shell completion script: eval \"$(kttune completion bash)\"")
    comp.add_argument("shell", choices=("bash", "zsh"))
    dash = sub.add_parser("dashboard", help="serve optuna-dashboard on the study's storage")
    _add_study_args(dash)
    dash.add_argument("--host", default="127.0.0.1")
    dash.add_argument("--port", type=int, default=8080)
    return parser
