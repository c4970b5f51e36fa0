"""`kttune doctor`: is this machine (and this search space) ready for `kttune run`?

Each check yields one row: status, what was found, and the fix. Interpreters are probed as
subprocesses with a timeout (they are usually other environments, and importing sglang can
hang on a broken CUDA install); nothing here raises for a failed check, so the table is
always complete, also on a CPU-only machine without sglang.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuner.errors import KttuneError
from tuner.preflight.dialect import is_simulated

OK, WARN, FAIL, SKIP = "ok", "warn", "FAIL", "skip"
_PROBE_TAG = "KTTUNE_PROBE "
_PROBE = r"""
import importlib, json, sys, time
import importlib.metadata as md
out = {"python": sys.version.split()[0], "executable": sys.executable, "modules": {}}
try:
    dists = md.packages_distributions()
except Exception:
    dists = {}
for name in sys.argv[1:]:
    t0 = time.time()
    try:
        m = importlib.import_module(name)
    except BaseException as e:
        out["modules"][name] = {"ok": False, "error": (type(e).__name__ + ": " + str(e))[-300:]}
        continue
    ds = []
    for d in sorted(set(dists.get(name.split(".")[0], []))):
        try:
            ds.append(d + " " + md.version(d))
        except Exception:
            pass
    out["modules"][name] = {"ok": True, "version": getattr(m, "__version__", None), "dists": ds,
                            "seconds": round(time.time() - t0, 1)}
print("KTTUNE_PROBE " + json.dumps(out), flush=True)
"""
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "tiktoken.model")


@dataclass(frozen=True)
class Check:
    name: str
    status: str
    detail: str
    fix: str = ""


@dataclass(frozen=True)
class DoctorOptions:
    space_path: str | None = None
    study: str | None = None
    storage: str | None = None
    studies_dir: Path = Path("studies")
    timeout_s: float = 120.0


@dataclass(frozen=True)
class ProcResult:
    rc: int | None  # None: timed out
    out: str


Runner = Callable[[Sequence[str], Mapping[str, str], float], ProcResult]


def run_process(argv: Sequence[str], env: Mapping[str, str], timeout_s: float) -> ProcResult:
    """Run argv in its own session; on timeout kill the whole group. Never raises."""
    try:
        proc = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, **env}, start_new_session=True)
    except OSError as exc:
        return ProcResult(127, f"{type(exc).__name__}: {exc}")
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        out, _ = proc.communicate()
        return ProcResult(None, out.decode(errors="replace"))
    return ProcResult(proc.returncode, out.decode(errors="replace"))


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1][-200:] if lines else "(no output)"


def probe_modules(python: str, modules: Sequence[str], env: Mapping[str, str], timeout_s: float,
                  run: Runner = run_process) -> tuple[dict[str, Any] | None, str]:
    """Import `modules` in `python`; returns (probe result, error text)."""
    res = run([python, "-c", _PROBE, *modules], env, timeout_s)
    if res.rc is None:
        return None, f"timed out after {timeout_s:g}s importing {', '.join(modules)}"
    for line in res.out.splitlines():
        if line.startswith(_PROBE_TAG):
            return json.loads(line[len(_PROBE_TAG):]), ""
    return None, f"{python} exited {res.rc}: {_last_line(res.out)}"


def help_flags(argv: Sequence[str], env: Mapping[str, str], timeout_s: float,
               run: Runner = run_process) -> tuple[frozenset[str] | None, str]:
    """The `--flags` a program's `--help` lists (read as :mod:`tuner.compat` does), or (None, why)."""
    from tuner.preflight.compat import parse_help_flags

    res = run([*argv, "--help"], env, timeout_s)
    if res.rc is None:
        return None, f"`{' '.join(argv)} --help` timed out after {timeout_s:g}s"
    flags = parse_help_flags(res.out)
    if res.rc != 0 or not flags:
        return None, f"`{' '.join(argv)} --help` exited {res.rc}: {_last_line(res.out)}"
    return flags, ""


def _module_check(name: str, probe: dict[str, Any] | None, err: str, module: str, fix: str) -> Check:
    if probe is None:
        return Check(name, FAIL, err, fix)
    info = probe["modules"].get(module, {})
    if not info.get("ok"):
        return Check(name, FAIL, f"import {module} failed in {probe['executable']}: {info.get('error', '?')}", fix)
    version = f" {info['version']}" if info.get("version") else ""
    dists = f" (installed as {', '.join(info['dists'])})" if info.get("dists") else ""
    return Check(name, OK, f"{module}{version}{dists}, python {probe['python']} ({probe['executable']}), "
                 f"import {info.get('seconds', 0)}s")


def _flags_check(name: str, wanted: Mapping[str, str], known: frozenset[str] | None, err: str, program: str) -> Check:
    """`wanted`: ``--flag`` → where in the space it comes from (tuner.compat.server_flags)."""
    from tuner.preflight.compat import unsupported

    if known is None:
        return Check(name, WARN, f"cannot list {program}'s flags: {err}", "fix the interpreter first (see the rows above)")
    bad = unsupported(known, wanted)
    if bad:
        return Check(name, FAIL, f"{program} does not accept: {'; '.join(bad)}",
                     "remove or rename them in the space (check the installed version's --help)")
    return Check(name, OK, f"all {len(wanted)} flags kttune would pass are accepted by {program}")


# --------------------------------------------------------------------------- machine


def _gpu_checks(space: Any, simulated: bool, probe_gpus: Callable[[], Sequence[Any]]) -> list[Check]:
    try:
        gpus = list(probe_gpus())
    except Exception as exc:  # a broken driver must not stop the table
        gpus, err = [], f"{type(exc).__name__}: {exc}"
    else:
        err = "NVML found no GPU (no NVIDIA driver, or no device visible)"
    tp = int((space.server.args.get("tensor-parallel-size") or space.server.args.get("tp-size") or 1) if space else 1)
    if not gpus:
        if simulated:
            return [Check("GPUs", SKIP, f"{err}; the simulated server needs none (the space's hardware: block stands in)")]
        return [Check("GPUs", FAIL, err, "install the NVIDIA driver and check `nvidia-smi`; set CUDA_VISIBLE_DEVICES")]
    gib = 1 << 30
    desc = "; ".join(f"{g.index}: {g.name} {g.free_bytes / gib:.1f}/{g.total_bytes / gib:.1f} GiB free" for g in gpus)
    out = [Check("GPUs", OK if len(gpus) >= tp or simulated else FAIL, f"{len(gpus)} GPU(s): {desc}",
                 "" if len(gpus) >= tp else f"tensor-parallel-size is {tp}: lower it or use a machine with {tp} GPUs")]
    busy = [g for g in gpus if g.total_bytes and g.free_bytes < 0.9 * g.total_bytes]
    if busy:
        out.append(Check("GPU memory free", WARN, f"GPU(s) {', '.join(str(g.index) for g in busy)} have <90% free",
                         "stop other GPU processes (`nvidia-smi`); leftover servers shrink what a trial can use"))
    else:
        out.append(Check("GPU memory free", OK, "every GPU is ≥90% free"))
    return out


def _cpu_checks(space: Any, simulated: bool) -> list[Check]:
    from tuner.machine import detect_cpu

    cpu = detect_cpu()
    detail = (f"{cpu.model}: {cpu.sockets} socket(s), {cpu.physical_cores} cores / {cpu.logical_cores} threads, "
              f"{cpu.numa_nodes} NUMA node(s) {list(cpu.cores_per_node)}, AMX {'yes' if cpu.amx else 'no'}, "
              f"AVX-512 {'yes' if cpu.avx512 else 'no'}")
    out = [Check("CPU", OK, detail)]
    if space is None:
        return out
    method = str(space.server.args.get("kt-method", ""))
    if method.upper().startswith("AMX") and not cpu.amx:
        out.append(Check("CPU AMX", SKIP if simulated else FAIL, f"kt-method {method} needs AMX; this CPU has none"
                         + (" (simulated server: not needed here)" if simulated else ""),
                         "" if simulated else "use a Sapphire Rapids or newer Xeon, or kt-method LLAMAFILE/RAWINT4 with matching CPU weights"))
    if simulated:
        return out
    hw = space.hardware.get("cpu") if isinstance(space.hardware, Mapping) else None
    if isinstance(hw, Mapping):
        want = {"numa_nodes": (hw.get("numa_nodes"), cpu.numa_nodes), "sockets": (hw.get("sockets"), cpu.sockets)}
        diffs = [f"{k} {a} (space) vs {b} (here)" for k, (a, b) in want.items() if a is not None and int(a) != b]
        if diffs:
            out.append(Check("CPU vs space", WARN, "the space's hardware: block disagrees: " + "; ".join(diffs),
                             "remove the hardware: cpu block to plan with what is detected, or run on the target machine"))
    for p in space.params:
        top = max((c for c in p.choices if isinstance(c, int)), default=None) if p.choices else p.high
        if p.flag == "kt-cpuinfer" and top is not None and top > cpu.physical_cores:
            out.append(Check("kt-cpuinfer range", WARN, f"up to {top:g} threads, this machine has {cpu.physical_cores} physical cores",
                             "cap kt-cpuinfer at the physical cores (more threads collapse throughput)"))
        if p.flag == "kt-threadpool-count" and top is not None and top > cpu.numa_nodes:
            out.append(Check("kt-threadpool-count range", WARN, f"up to {top:g} pools, this machine has {cpu.numa_nodes} NUMA node(s)",
                             "use at most one pool per NUMA node"))
    return out


def _model_checks(space: Any, simulated: bool) -> list[Check]:
    from tuner.machine import detect_hardware, load_model_sizes

    args = space.server.args
    path = args.get("model-path", args.get("model"))
    out = []
    try:
        m = load_model_sizes(str(path), space.model or None)
    except KttuneError as exc:
        return [Check("model config.json", FAIL, str(exc), "set server.args.model-path to the local model directory (with config.json)")]
    out.append(Check("model config.json", OK, f"{path}: {m.architecture}, {m.num_moe_layers} MoE layers × {m.n_routed_experts} experts "
                     f"(top-{m.top_k}), {m.attention.upper()}, context {m.max_position_embeddings}"))
    kt_path = args.get("kt-weight-path")
    if kt_path is None:
        out.append(Check("kt-weight-path", WARN, "not set: KT is off and every expert must fit on the GPUs",
                         "set server.args.kt-weight-path to the CPU expert weights for hybrid inference"))
    elif simulated:
        out.append(Check("kt-weight-path", SKIP, f"{kt_path} (simulated server: not read)"))
    elif missing := [p for p in space.fixed_arg_values("kt-weight-path") if not Path(p).is_dir()]:
        out.append(Check("kt-weight-path", FAIL, f"{', '.join(missing)}: not a directory",
                         "download or convert the CPU weights (see the seed guide) and fix the path"))
    else:
        out.append(Check("kt-weight-path", OK, ", ".join(space.fixed_arg_values("kt-weight-path"))))
    method = args.get("kt-method")
    if kt_path is not None and method:
        try:
            need = m.cpu_expert_bytes_total(str(method))
            ram = detect_hardware(probe=lambda: []).ram_bytes
        except KttuneError as exc:
            out.append(Check("host RAM", WARN, str(exc)))
        else:
            ok = need < 0.95 * ram
            status = OK if ok else (SKIP if simulated else FAIL)
            out.append(Check("host RAM", status, f"all experts as {method}: {need / 1e9:.0f} GB; this machine has {ram / 1e9:.0f} GB"
                             + (" (simulated server: not needed here)" if simulated and not ok else ""),
                             "" if ok or simulated else "use a host with more RAM or a smaller kt-method"))
    return out


def _bench_input_checks(space: Any, simulated: bool) -> list[Check]:
    from tuner.trial import bench_tokenizer

    out = []
    offline = space.bench.env.get("HF_HUB_OFFLINE", os.environ.get("HF_HUB_OFFLINE", "")) in ("1", "true", "True")
    tok = bench_tokenizer(space, space.server.args)
    if tok is None:
        out.append(Check("tokenizer", FAIL, "no bench.tokenizer and no model path", "set bench.tokenizer to a local tokenizer directory"))
    elif Path(tok).is_dir():
        files = [f for f in _TOKENIZER_FILES if (Path(tok) / f).exists()]
        out.append(Check("tokenizer", OK if files else FAIL, f"{tok}: {', '.join(files) or 'no tokenizer files'}",
                         "" if files else "point bench.tokenizer at a directory with tokenizer.json / tokenizer_config.json"))
    else:
        out.append(Check("tokenizer", FAIL if offline else WARN, f"{tok} is not a local directory" +
                         (" and HF_HUB_OFFLINE=1" if offline else "; bench_serving will fetch it from the Hub"),
                         "set bench.tokenizer to a local directory (the model directory usually has one)"))
    needs_file = [w.name for w in space.workloads if w.dataset_name in ("random", "sharegpt")]
    path = space.bench.dataset_path
    if not needs_file:
        out.append(Check("bench dataset", SKIP, "no workload reads a dataset file"))
    elif path is None:
        out.append(Check("bench dataset", FAIL, f"workloads {', '.join(needs_file)} use a ShareGPT file and bench.dataset_path is unset "
                         "(bench_serving would download it)", "set bench.dataset_path to a local ShareGPT JSON"))
    elif not Path(path).is_file():
        out.append(Check("bench dataset", FAIL, f"{path} does not exist", "download a ShareGPT-format JSON and fix bench.dataset_path"))
    else:
        with open(path, "rb") as fh:
            head = fh.read(64).lstrip()
        ok = head.startswith(b"[")
        out.append(Check("bench dataset", OK if ok else FAIL, f"{path} ({Path(path).stat().st_size / 1e6:.1f} MB)"
                         + ("" if ok else ": not a JSON list"), "" if ok else "use a ShareGPT-format JSON list"))
    if not offline and not simulated:
        out.append(Check("offline mode", WARN, "HF_HUB_OFFLINE is not set for the bench client",
                         "add bench.env: {HF_HUB_OFFLINE: \"1\"} so a missing file fails fast instead of downloading"))
    return out


def _storage_checks(url: str, study: str | None, artifact_dir: Path | None) -> list[Check]:
    out = []
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).exists():
        parent = Path(url[len("sqlite:///"):]).parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        ok = os.access(parent, os.W_OK)
        out.append(Check("storage", OK if ok else FAIL, f"{url}: not created yet ({parent} {'is' if ok else 'is not'} writable)",
                         "" if ok else "choose a writable --studies-dir or --storage"))
    else:
        from tuner.storage import make_storage

        try:
            import optuna

            summaries = optuna.get_all_study_summaries(make_storage(url))
        except Exception as exc:  # ConfigError from make_storage, driver/database errors
            out.append(Check("storage", FAIL, f"{url}: {str(exc).splitlines()[0][:200]}", "check the URL, the driver and that the database is up"))
        else:
            found = next((s for s in summaries if s.study_name == study), None)
            what = f"study {study}: {found.n_trials} trials" if found else (f"study {study} not created yet" if study else "")
            out.append(Check("storage", OK, f"{url}: reachable, {len(summaries)} stud{'y' if len(summaries) == 1 else 'ies'}"
                             + (f"; {what}" if what else "")))
    if artifact_dir is not None:
        probe = artifact_dir
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        ok = os.access(probe, os.W_OK)
        out.append(Check("artifact store", OK if ok else FAIL, f"{artifact_dir} ({'writable' if ok else 'not writable'})",
                         "" if ok else "choose a writable --studies-dir"))
    return out


# --------------------------------------------------------------------------- all together


def _server_checks(space: Any, simulated: bool, timeout_s: float, run: Runner) -> list[Check]:
    srv = space.server
    python = srv.command[0] if srv.command else srv.python
    uses_kt = "kt-weight-path" in srv.args or any(p.flag.startswith("kt-") for p in space.params)
    sim_module = srv.module or "tuner.sim"
    modules = [sim_module] if simulated else ["sglang"] + (["kt_kernel"] if uses_kt else [])
    out = []
    probe, err = probe_modules(python, modules, srv.env, timeout_s, run)
    fix = "point server.python at the interpreter of the env with sglang-kt + kt-kernel (pip install per the seed guide)"
    if simulated:
        out.append(_module_check("server: simulator", probe, err, sim_module, "run kttune from its checkout/venv"))
        out.append(Check("server: sglang", SKIP, "simulated server (tuner.sim): sglang is not needed"))
        out.append(Check("server: kt_kernel", SKIP, "simulated server (tuner.sim): kt-kernel is not needed"))
    else:
        out.append(_module_check("server: sglang", probe, err, "sglang", fix))
        if uses_kt:
            out.append(_module_check("server: kt_kernel", probe, err, "kt_kernel", "pip install kt-kernel in the server env (see the seed guide)"))
    out += _dialect_checks(space, timeout_s, run)
    return out


def _dialect_checks(space: Any, timeout_s: float, run: Runner) -> list[Check]:
    """The server's dialect, and its flags from its own parser (from --help where it has none)."""
    from tuner.errors import ConfigError
    from tuner.preflight.compat import check_server_options, server_flags, server_options
    from tuner.preflight.dialect import ParserCache

    dialect, opts, why = server_options(space, parsers=ParserCache(timeout_s=max(timeout_s, 1.0)), timeout_s=timeout_s)
    out = [Check("server dialect", OK if dialect.name != "unknown" else WARN,
                 f"{dialect.describe()}, server info at {dialect.server_info_endpoint or '?'}",
                 "point server.python at the interpreter that has sglang-kt or sglang")]
    if opts is None:
        known, herr = help_flags(space.server.launcher(), space.server.env, timeout_s, run)
        out.append(_flags_check("server flags", server_flags(space), known, herr,
                                f"{space.server.module or ' '.join(space.server.launcher())} --help (its parser: {why})"))
        return out
    try:
        check_server_options(space, opts, dialect)
    except ConfigError as exc:
        return [*out, Check("server flags", FAIL, str(exc), "remove or fix them in the space")]
    return [*out, Check("server flags", OK, f"all {len(server_flags(space))} flags kttune would pass are defined by "
                        f"{dialect.describe()}'s own parser ({len(opts.flags)} options)")]


def _bench_checks(space: Any, timeout_s: float, run: Runner) -> list[Check]:
    from tuner.bench import resolve_bench
    from tuner.preflight.compat import bench_flags

    b = space.bench
    probe, err = probe_modules(b.python, ["sglang"], b.env, timeout_s, run)
    out = [_module_check("bench: sglang", probe, err, "sglang",
                         "point bench.python at an env with sglang (scripts/bench-venv.sh makes one without torch)")]
    named = space.bench.module is not None
    try:
        space = resolve_bench(space)
        b = space.bench
    except KttuneError as exc:
        return [*out, Check("bench client", FAIL, str(exc), "install sglang in bench.python or set bench.module")]
    out.append(Check("bench client", OK, f"{b.module}" + (" (set in the space)" if named else " (found)")
                     + (", takes --goodput" if b.goodput else "")))
    known, herr = help_flags([b.python, "-m", str(b.module)], b.env, timeout_s, run)
    out.append(_flags_check("bench flags", bench_flags(space), known, herr, b.module))
    return out


def run_checks(opts: DoctorOptions, *, run: Runner = run_process,
               probe_gpus: Callable[[], Sequence[Any]] | None = None) -> list[Check]:
    from tuner.config import load_space
    from tuner.machine import probe_gpus as nvml_probe

    checks = [Check("kttune", OK, f"python {sys.version.split()[0]} at {sys.executable}")]
    space = None
    if opts.space_path:
        try:
            space = load_space(opts.space_path, check_paths=False)
            checks.append(Check("space", OK, f"{opts.space_path}: {len(space.params)} knobs, {len(space.workloads)} workloads, "
                                f"objective {', '.join(o.key for o in space.objectives)}"
                                + (f", SLOs {'; '.join(s.describe() for s in space.slos)}" if space.slos else "")))
        except KttuneError as exc:
            checks.append(Check("space", FAIL, str(exc), "fix the space file (see docs/search-space.md)"))
    simulated = space is not None and is_simulated(space)
    if space is not None:
        checks += _server_checks(space, simulated, opts.timeout_s, run)
        checks += _bench_checks(space, opts.timeout_s, run)
    else:
        probe, err = probe_modules(sys.executable, ["sglang", "kt_kernel"], {}, opts.timeout_s, run)
        fix = "install sglang-kt and kt-kernel here (docs/real-hardware-kimi-k2-8xl20.md), or pass --space to check the interpreters it names"
        checks.append(_module_check("sglang (this python)", probe, err, "sglang", fix))
        checks.append(_module_check("kt_kernel (this python)", probe, err, "kt_kernel", fix))
    checks += _gpu_checks(space, simulated, probe_gpus or nvml_probe)
    checks += _cpu_checks(space, simulated)
    if space is not None:
        checks += _model_checks(space, simulated)
        checks += _bench_input_checks(space, simulated)
    study = opts.study or (space.name if space else None)
    url = opts.storage or (f"sqlite:///{opts.studies_dir / (study + '.db')}" if study else None)
    if url is None:
        checks.append(Check("storage", SKIP, "no --space, --study or --storage given"))
    else:
        checks += _storage_checks(url, study, (opts.studies_dir / study / "artifacts") if study else None)
    if space is not None and study:
        from tuner.cpubench import doctor_row
        checks.append(Check("cpubench", *doctor_row(opts.studies_dir, study)))
    return checks


def render_checks(checks: Sequence[Check]) -> str:
    """A plain table: check, status, detail; the fix on the next line for rows not ok."""
    name_w = max(len(c.name) for c in checks)
    lines = [f"{'check'.ljust(name_w)}  {'status':6}  detail", f"{'-' * name_w}  ------  {'-' * 40}"]
    for c in checks:
        lines.append(f"{c.name.ljust(name_w)}  {c.status:6}  {c.detail}")
        if c.fix and c.status in (FAIL, WARN):
            lines.append(f"{' ' * name_w}  {'':6}  → fix: {c.fix}")
    fails, warns = sum(c.status == FAIL for c in checks), sum(c.status == WARN for c in checks)
    lines.append("")
    lines.append(f"{len(checks)} checks: {fails} failed, {warns} warnings" + ("" if fails else "; ready to run"))
    return "\n".join(lines)


def exit_code(checks: Sequence[Check]) -> int:
    return 1 if any(c.status == FAIL for c in checks) else 0
