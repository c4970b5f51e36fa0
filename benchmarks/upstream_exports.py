"""Do kttune's exports run on upstream sglang? A short sim study on every shipped sim space, its
export, and upstream sglang 0.5.23's own ``--config`` merger and argument parser on it.

    bash scripts/upstream-venv.sh && .venv/bin/python benchmarks/upstream_exports.py [--budget 2]

For each ``search_spaces/sim-*.yaml``: ``kttune run --budget N`` (the simulator, the real bench
client), ``kttune export``, then ``tuner/preflight/parser_probe.py check-config`` run by the
upstream venv's interpreter (scripts/upstream-venv.sh: the 0.5.23 wheel --no-deps + CPU torch),
and a look for flags that belong to the simulator (``sim-*``) or only to a benchmark
(``disable-radix-cache``, ``disable-chunked-prefix-cache``). A refusal that names only flags
sglang-kt 0.7.2 defines (read from its ``srt/server_args.py``, as installed in the bench venv by
scripts/setup.sh) is a space that tunes a fork-only lever, such as
``kt-expert-placement-strategy``: upstream cannot serve it by design. Such an export is then
merged and parsed again by upstream's parser extended with the fork's own ``add_argument``
declarations of those flags (type, choices, action, read from its source as text), so their
values are checked too, and the row says so. Prints one row per space; exits 1 when an export
carries a simulator or benchmark-only flag or is refused for anything else. Studies go to a
temporary directory.
"""
from __future__ import annotations

import argparse
import ast
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tuner.preflight import PARSER_TAG  # noqa: E402
from tuner.report.profile import BENCHMARK_ONLY_FLAGS, SIMULATOR_PREFIX  # noqa: E402

PROBE = REPO / "tuner" / "preflight" / "parser_probe.py"


def kttune(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tuner.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=1800)


def parse_with(python: Path, profile: Path) -> tuple[bool, str]:
    res = subprocess.run([str(python), "-W", "ignore", str(PROBE), "check-config", str(profile)], capture_output=True,
                         text=True, timeout=600)
    line = next((ln for ln in res.stdout.splitlines() if ln.startswith(PARSER_TAG)), None)
    if line is None:
        return False, f"no verdict (rc {res.returncode}): {res.stderr.strip().splitlines()[-1:] or ''}"
    data = json.loads(line[len(PARSER_TAG):])
    return bool(data.get("ok")), str(data.get("error") or f"{len(data.get('argv', []))} argv tokens")


# Run by the upstream venv's interpreter: upstream's parser plus the given declarations, then the
# same --config merge and parse as parser_probe.py check-config.
_EXTENDED_CHECK = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("parser_probe", sys.argv[1])
probe = importlib.util.module_from_spec(spec); spec.loader.exec_module(probe)
parser = probe._server_parser()
for decl in json.loads(sys.argv[3]):
    kwargs = dict(decl["kwargs"])
    if "type" in kwargs:
        kwargs["type"] = {"int": int, "float": float, "str": str}[kwargs["type"]]
    parser.add_argument(decl["option"], **kwargs)
out = probe.check_config(parser, sys.argv[2], probe._MERGERS[0])
print(probe.TAG + json.dumps(out), flush=True)
"""


def fork_declarations(source: str, flags: set[str]) -> list[dict[str, object]]:
    """The fork's ``parser.add_argument("--flag", ...)`` calls for `flags`, literal keywords only
    (type as its name; a default read from ServerArgs is left out: it does not decide acceptance)."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "add_argument"
                and node.args and isinstance(node.args[0], ast.Constant) and str(node.args[0].value)[2:] in flags):
            continue
        kwargs: dict[str, object] = {}
        for kw in node.keywords:
            if kw.arg == "type" and isinstance(kw.value, ast.Name) and kw.value.id in ("int", "float", "str"):
                kwargs["type"] = kw.value.id
            elif kw.arg in ("choices", "action", "nargs"):
                try:
                    kwargs[kw.arg] = ast.literal_eval(kw.value)
                except ValueError:
                    continue
        decl: dict[str, object] = {"option": str(node.args[0].value), "kwargs": kwargs}
        out.append(decl)
    return out


def parse_extended(python: Path, profile: Path, declarations: list[dict[str, object]]) -> tuple[bool, str]:
    res = subprocess.run([str(python), "-W", "ignore", "-c", _EXTENDED_CHECK, str(PROBE), str(profile),
                          json.dumps(declarations)], capture_output=True, text=True, timeout=600)
    line = next((ln for ln in res.stdout.splitlines() if ln.startswith(PARSER_TAG)), None)
    if line is None:
        return False, f"no verdict (rc {res.returncode}): {res.stderr.strip().splitlines()[-1:] or ''}"
    data = json.loads(line[len(PARSER_TAG):])
    return bool(data.get("ok")), str(data.get("error") or "")


def unrecognized(error: str) -> list[str]:
    """The flags argparse's "unrecognized arguments: --a x --b" names (values left out)."""
    _, found, rest = error.partition("unrecognized arguments:")
    return [tok[2:] for tok in rest.split() if tok.startswith("--")] if found else []


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=int, default=2)
    ap.add_argument("--upstream-python", type=Path, default=REPO / ".cache" / "upstream-venv" / "bin" / "python")
    ap.add_argument("--kt-source", type=Path, help="sglang-kt 0.7.2's srt/server_args.py (default: the bench venv's)",
                    default=next((REPO / ".venv-bench" / "lib").glob("python*/site-packages/sglang/srt/server_args.py"), None))
    ap.add_argument("--spaces", nargs="*", type=Path, default=sorted((REPO / "search_spaces").glob("sim-*.yaml")))
    args = ap.parse_args(argv)
    if not args.upstream_python.exists():
        print(f"--upstream-python: {args.upstream_python} does not exist; run scripts/upstream-venv.sh", file=sys.stderr)
        return 2
    if args.kt_source is None or not args.kt_source.is_file():
        print("--kt-source: sglang-kt's srt/server_args.py not found; run scripts/setup.sh (the bench venv)", file=sys.stderr)
        return 2
    fork_source = args.kt_source.read_text()
    fork_flags = set(re.findall(r'"--([a-z0-9-]+)"', fork_source))
    rows = [("space", "dialect", "launches", "export", "upstream 0.5.23 parser", "sim/bench flags")]
    bad = 0
    with tempfile.TemporaryDirectory(prefix="kttune-upstream-") as tmp:
        for space in args.spaces:
            study = ["--space", str(space), "--study", space.stem, "--storage", f"sqlite:///{tmp}/{space.stem}.db",
                     "--studies-dir", f"{tmp}/studies"]
            dialect = str((yaml.safe_load(space.read_text())["server"]["args"]).get("sim-dialect", "sglang-kt"))
            run = kttune("run", *study, "--budget", str(args.budget), "--seed", "0")
            launches = next((ln.split(":")[1].split()[0] for ln in run.stdout.splitlines()
                             if ln.startswith(f"study {space.stem}:") and "launches done" in ln), "?")
            out = Path(tmp) / f"{space.stem}.yaml"
            exp = kttune("export", *study, "--out", str(out))
            if run.returncode != 0 or exp.returncode != 0:
                why = (exp.stderr or run.stderr or run.stdout).strip().splitlines()[-1:] or ["?"]
                rows.append((space.stem, dialect, launches, f"failed: {why[0][:60]}", "-", "-"))
                bad += 1
                continue
            ok, detail = parse_with(args.upstream_python, out)
            keys = [str(k) for k in (yaml.safe_load(out.read_text()) or {})]
            extra = [k for k in keys if k.startswith(SIMULATOR_PREFIX) or k in BENCHMARK_ONLY_FLAGS]
            refused = [] if ok else unrecognized(detail)
            fork_only = dialect != "upstream" and bool(refused) and set(refused) <= fork_flags
            if ok:
                cell = "accepted"
            elif fork_only:
                declared = fork_declarations(fork_source, set(refused))
                ok, detail = parse_extended(args.upstream_python, out, declared)
                cell = (f"{', '.join(refused)}: sglang-kt 0.7.2 only; accepted with the fork's declarations of them"
                        if ok and len(declared) == len(refused) else f"REFUSED with the fork's declarations: {detail[:80]}")
                ok = ok and len(declared) == len(refused)
            else:
                cell = f"REFUSED: {detail[:80]}"
            rows.append((space.stem, dialect, launches, f"ok ({len(keys)} keys)", cell, ", ".join(extra) or "none"))
            bad += (not ok) + bool(extra)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, row in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print(f"\n{len(rows) - 1} spaces, {bad} problem(s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
