"""`kttune` command line: parse, build the config, call one library function.

Exit codes (EXIT_CODES, also in `kttune --help`): 0 ok, 1 a fault while running (the run
stopped on its cause), 2 bad input (one line, no traceback), 3 `kttune run` ended with no trial
of the study measured, 130 stopped by Ctrl-C or SIGTERM.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from tuner.cli_parser import build_parser
from tuner.errors import ConfigError, KttuneError

if TYPE_CHECKING:
    from tuner.config import SearchSpace

SHIPPED_SPACES = Path(__file__).resolve().parents[1] / "search_spaces"
EXIT_NOTHING_MEASURED = 3




def _resolve(args: argparse.Namespace, *, check_paths: bool = True,
             read_only: bool = False) -> tuple[SearchSpace, str, str]:
    """Space, study name and storage URL (nothing created). `read_only`: a command that only
    reads the study, which takes the space the study stored when --space is not given (and
    says so when a given one differs from it)."""
    from tuner.config import load_space
    from tuner.inputs import check_folder, check_storage_url, check_study_name
    from tuner.report import space_change_note, stored_study_space
    from tuner.storage import default_storage

    if args.storage:
        check_storage_url(args.storage)
    check_folder(Path(args.studies_dir), "--studies-dir")
    if args.space is None and read_only and args.study:
        storage = args.storage or default_storage(check_study_name(args.study), Path(args.studies_dir), create=False)
        return stored_study_space(args.study, storage), args.study, storage
    if args.space is None:
        shipped = sorted(SHIPPED_SPACES.glob("*.yaml"))
        listed = ", ".join(os.path.relpath(p) for p in shipped) or "none found"
        also = "; or, to read a study that has run, --study NAME (kttune studies lists them)" if read_only else ""
        raise ConfigError(f"--space: required; pass a search-space YAML (shipped: {listed}), "
                          f"or write one with kttune init --model DIR{also}")
    space = load_space(args.space, check_paths=check_paths)
    study_name = check_study_name(args.study) if args.study else check_study_name(space.name, "name (of the space)")
    storage = args.storage or default_storage(study_name, Path(args.studies_dir), create=False)
    if read_only:
        note = space_change_note(space, study_name, storage)
        if note:
            print(f"kttune: note: {note}", file=sys.stderr)
    return space, study_name, storage


def cmd_run(args: argparse.Namespace) -> int:
    from tuner.loop import RunOptions, dry_run, run_study

    if args.budget < 1:
        raise ConfigError(f"--budget: must be ≥ 1, got {args.budget}")
    if args.fault_streak < 1:
        raise ConfigError(f"--fault-streak: must be ≥ 1, got {args.fault_streak}")
    from tuner.inputs import check_env, check_seed

    check_seed(args.seed)
    space, study_name, storage = _resolve(args, check_paths=not args.dry_run)
    check_env(space.server.env, "server.env")
    check_env(space.bench.env, "bench.env")
    if not args.dry_run:
        from tuner.machine import resolve_hardware

        resolve_hardware(space.hardware or None)  # a bad hardware: block is known now, before the study folder
        if args.storage is None:
            Path(args.studies_dir).mkdir(parents=True, exist_ok=True)
    from tuner.cpubench import apply_stored

    avoid, notes = apply_stored(space, Path(args.studies_dir), study_name)  # before any launch
    for note in notes:
        print(note)
    if args.dry_run:
        dry_run(space, budget=args.budget, seed=args.seed, studies_dir=Path(args.studies_dir),
                check_feasibility=not args.no_feasibility)
        return 0
    from tuner.storage import check_reachable

    check_reachable(storage)  # in seconds, before the checks below take minutes
    server = None
    if not args.no_compat_check:  # refuse flags the installed server/bench reject, before any write
        from tuner.preflight import check_space_compat

        compat = check_space_compat(space)
        space, server = compat.space, compat.dialect.to_attr()
        print(f"server: {compat.dialect.describe()}, flags checked by its {compat.server_flags_from}; "
              f"bench client {space.bench.module}")
    opts = RunOptions(study_name=study_name, storage=storage, budget=args.budget, seed=args.seed,
                      studies_dir=Path(args.studies_dir), check_feasibility=not args.no_feasibility,
                      fault_streak=args.fault_streak, server=server, avoid=avoid)
    from tuner.loop import Progress

    with Progress(budget=opts.budget, objectives=[(o.key, o.direction) for o in space.objectives],
                  stream=sys.stdout) as progress:
        summary = run_study(space, opts, log=progress.log, progress=progress)
    print(f"study {study_name}: {summary.launched}/{summary.budget} launches done ({storage})")
    if not summary.new_trials and summary.launched >= summary.budget and not summary.stopped_reason:
        print(f"nothing launched: the study had already spent --budget {summary.budget}; the budget counts all of its "
              f"launches, so go on with a larger one, e.g. --budget {summary.budget + 10}")
    if summary.pick:
        print(f"pick: trial {', '.join(map(str, summary.pick))} (kttune best shows it, kttune export writes it)")
    if summary.stopped_reason:
        print(f"stopped early: {summary.stopped_reason}", file=sys.stderr)
        return 1
    if summary.measured == 0:
        from tuner.report import failure_lines
        from tuner.storage import load_study

        why = failure_lines(load_study(study_name, storage), summary.new_trials)
        print(f"kttune: nothing measured: no trial of study {study_name} has a result"
              + (":" if why else "; `kttune show N` shows each trial"), file=sys.stderr)
        for line in why:
            print(f"  {line}", file=sys.stderr)
        return EXIT_NOTHING_MEASURED
    from tuner.report import print_best
    print_best(space, study_name, storage)
    return 0


def _print_json(data: object) -> None:
    print(json.dumps(data, indent=1, default=str))


def cmd_remeasure(args: argparse.Namespace) -> int:
    from tuner.loop import RunOptions, remeasure

    space, study_name, storage = _resolve(args)
    opts = RunOptions(study_name=study_name, storage=storage, budget=0, seed=None, studies_dir=Path(args.studies_dir))
    summary = remeasure(space, opts, args.trial, args.runs)
    print(f"study {study_name}: {len(summary.new_trials)} re-launch(es) of trial {args.trial} added ({storage})")
    from tuner.report import print_best
    print_best(space, study_name, storage)
    return 1 if summary.stopped_reason else 0


def cmd_best(args: argparse.Namespace) -> int:
    from tuner.report import best_data, print_best

    space, study_name, storage = _resolve(args, check_paths=False, read_only=True)
    if args.format == "json":
        from tuner.storage import load_study

        data = best_data(space, load_study(study_name, storage))
        _print_json(data)
        return 0 if data["picked"] else 1
    return 0 if print_best(space, study_name, storage) else 1


def cmd_show(args: argparse.Namespace) -> int:
    from tuner.report import get_trial, headline_metrics, render_trial, text_console, trial_json
    from tuner.storage import load_study

    space, study_name, storage = _resolve(args, check_paths=False, read_only=True)
    study = load_study(study_name, storage)
    trial = get_trial(study, args.trial)
    if args.format == "json":
        _print_json(trial_json(study, trial))
    else:
        keys = [o.key for o in space.objectives]
        render_trial(study, trial, [*keys, *(k for k in headline_metrics(space) if k not in keys)], text_console())
    return 0


def cmd_studies(args: argparse.Namespace) -> int:
    from tuner.report import list_studies, render_studies, storages_in, studies_json, text_console

    storages = [args.storage] if args.storage else storages_in(Path(args.studies_dir))
    if args.storage and args.storage.startswith("sqlite:///") and not Path(args.storage[len("sqlite:///"):]).exists():
        raise ConfigError(f"--storage: no database at {args.storage[len('sqlite:///'):]}; give an existing one")
    rows = list_studies(storages)
    if args.format == "json":
        _print_json(studies_json(rows))
    elif rows:
        render_studies(rows, text_console())
    else:
        print(f"no study databases in {args.studies_dir} (kttune run writes them there; --storage URL for another)")
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    from tuner.preflight import InitOptions, build_space, write_space

    result = build_space(InitOptions(model=args.model, kt_weight_path=args.kt_weight_path, gpus=args.gpus, cpu=args.cpu,
                                     numa_nodes=args.numa_nodes, amx=args.amx, avx512=args.avx512, ram_gib=args.ram_gib,
                                     kt_method=args.kt_method, name=args.name, dataset=args.dataset))
    out = write_space(result, Path(args.out or f"{result.data['name']}.yaml"), force=args.force)
    print("\n".join(result.summary))
    print(f"wrote {out}; next: kttune plan --space {out}, then kttune run --space {out} --dry-run")
    return 0


def cmd_completion(args: argparse.Namespace) -> int:
    from tuner.completion import SHELLS

    print(SHELLS[args.shell](build_parser()), end="")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from tuner.report import export_profile

    space, study_name, storage = _resolve(args, check_paths=False, read_only=True)
    weights = None
    if args.weights is not None:
        from tuner.report import parse_weights

        weights = parse_weights(args.weights, [o.key for o in space.objectives])
    path, verdict = export_profile(space, study_name, storage, Path(args.out), trial_number=args.trial, weights=weights,
                                   keep_benchmark_flags=args.keep_bench_flags)
    print(f"wrote {path} (accepted by {verdict.checked_by})" if verdict.checked_by
          else f"wrote {path} (not parsed by a server: {verdict.skipped})")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from tuner.preflight import plan_report

    space, _study, _storage = _resolve(args, check_paths=False)
    if args.format == "json":
        from tuner.preflight import plan_data

        data = plan_data(space, args.set)
        _print_json(data)
        return 0 if data["feasible"] else 1
    text, fits = plan_report(space, args.set)
    print(text)
    return 0 if fits else 1


def cmd_report(args: argparse.Namespace) -> int:
    from tuner.report import check_out_dir, compute_report, write_report
    from tuner.storage import load_study

    space, study_name, storage = _resolve(args, check_paths=False, read_only=True)
    out = Path(args.out) if args.out else Path(args.studies_dir) / study_name / "report"
    check_out_dir(out)  # before the study is read
    files = write_report(compute_report(space, load_study(study_name, storage)), out)
    print(f"wrote {files.html} ({len(files.images)} figures, also as PNG files in {out})")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from tuner.inputs import check_seconds
    from tuner.preflight import DoctorOptions, exit_code, render_checks, run_checks

    check_seconds(args.timeout, "--timeout")

    checks = run_checks(DoctorOptions(space_path=args.space, study=args.study, storage=args.storage,
                                      studies_dir=Path(args.studies_dir), timeout_s=args.timeout))
    if args.format == "json":
        _print_json([dataclasses.asdict(c) for c in checks])
    else:
        print(render_checks(checks))
    return exit_code(checks)


def cmd_cpubench(args: argparse.Namespace) -> int:
    from tuner.cpubench import apply_stored, bench_dir, parse_ints, plan_for_space, run_sweep, save, table, worker_for_space
    from tuner.preflight import is_simulated

    space, study_name, _storage = _resolve(args, check_paths=False)
    if args.repeats < 2 or args.min_time <= 0:
        raise ConfigError("--repeats: at least 2 (the noise comes from them); --min-time: above 0")
    plan = plan_for_space(space, threads=parse_ints("--threads", args.threads) if args.threads else None,
                          pools=parse_ints("--pools", args.pools) if args.pools else None, method=args.method,
                          repeats=args.repeats, min_time_s=args.min_time)
    result = run_sweep(worker_for_space(space, is_simulated(space)), plan)
    files = save(result, bench_dir(Path(args.studies_dir), study_name))
    print(table(result))
    print("\n".join(apply_stored(space, Path(args.studies_dir), study_name)[1]))
    print(f"wrote {', '.join(map(str, files))}; kttune run --space {args.space} takes it up")
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    import optuna_dashboard

    from tuner.inputs import check_port, check_port_free
    from tuner.report import prepare_dashboard
    from tuner.storage import require_database

    check_port(args.port)
    space, study_name, storage = _resolve(args, check_paths=False, read_only=True)
    require_database(storage)  # the dashboard of a database that does not exist would create it
    check_port_free(args.host, args.port)
    store, store_dir = prepare_dashboard(study_name, storage, Path(args.studies_dir), space.confirm)
    print(f"optuna-dashboard on http://{args.host}:{args.port} (study {study_name}, {storage}; artifacts in {store_dir})")
    from tuner.storage import make_storage

    optuna_dashboard.run_server(make_storage(storage), host=args.host, port=args.port, artifact_store=store)
    return 0


COMMANDS = {"run": cmd_run, "remeasure": cmd_remeasure, "plan": cmd_plan, "best": cmd_best, "show": cmd_show, "studies": cmd_studies,
            "export": cmd_export, "report": cmd_report, "doctor": cmd_doctor, "dashboard": cmd_dashboard,
            "init": cmd_init, "completion": cmd_completion, "cpubench": cmd_cpubench}


# Commands that open a study say so when dead kttune runs left servers running (`run` stops them).
_NOTES_LEFTOVERS = frozenset({"best", "export", "report", "doctor", "dashboard"})


def _note_leftovers() -> None:
    from tuner.server import find_leftovers, leftover_note

    note = leftover_note(find_leftovers())
    if note is not None:
        print(f"kttune: warning: {note}", file=sys.stderr)


def _sigterm_as_interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


# Arguments naming paths: a `~` the shell left alone (quoted, or after `=`) means the home folder.
_PATH_ARGS = ("space", "studies_dir", "out", "model", "kt_weight_path", "dataset")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in _PATH_ARGS:
        if isinstance(getattr(args, name, None), str):
            setattr(args, name, os.path.expanduser(getattr(args, name)))
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # kttune drives heartbeats itself in its ask/tell loop (tuner/storage/workers.py Heartbeat).
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    try:
        from tuner.inputs import check_env

        check_env(os.environ)
        if args.command in _NOTES_LEFTOVERS:
            _note_leftovers()
        return COMMANDS[args.command](args)
    except ConfigError as exc:
        print(f"kttune: error: {exc}", file=sys.stderr)
        return 2
    except KttuneError as exc:
        print(f"kttune: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `kttune ... | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes at exit
        return 0
    except KeyboardInterrupt:
        what = "; the running trial was marked interrupted and its server torn down" if args.command in ("run", "remeasure") else ""
        print(f"kttune: stopped{what}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
