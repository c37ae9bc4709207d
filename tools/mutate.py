"""Mutation testing for g4seg's method and run-loop modules, on a copy of the working tree.

    python tools/mutate.py [MODULE ...] [--tests FILE ...] [--max-children 2] [--seconds S] [--dest DIR]

Drives mutmut 3 (``pip install -e '.[mutation]'``, or ``pip install --target DIR mutmut`` and pass
``--mutmut-lib DIR``). The repository is never touched: the files git knows about (tracked, plus
untracked files that are not ignored) are copied to ``DEST/tree``, the ``[tool.mutmut]`` settings are
written into the copy's pyproject.toml, and mutmut runs there (it mutates a further copy,
``DEST/tree/mutants/``, and puts it first on ``sys.path``). Each module is run on its own, in the order
given, so a ``--seconds`` budget that runs out still leaves complete results for the modules before it.
At the end every surviving mutant is printed as ``file:line: original -> mutant`` and the score per
module; ``DEST/summary.json`` holds the same.

``--retest`` (with the ``--dest`` of a finished run) does not run mutmut again: it copies the current test
files into that run's copy and runs them, with ``-x``, on each mutant the run left surviving or unchecked
(``MUTANT_UNDER_TEST`` selects it in mutmut's trampolines), so new tests are scored in minutes instead of a
whole new run; the verdicts go to ``DEST/retest.json`` and into the printed scores. With ``--sample N`` it
retests only N of the mutants mutmut did not kill (survivors and unchecked), drawn at random, and prints an
estimate of the module's score over all its mutants with a 95% interval (a run whose budget ran out
mid-module has checked the functions in file order, so its score alone says nothing of the rest; survivors
of a run with a shorter test list may fall to the full one). See docs/testing.md.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent

# module -> the test files that exercise it (mutmut then runs, per mutant, only the tests that reach
# the mutated function). Ordered by priority: the method first, then the run loop.
TESTS = {
    "g4seg/masks.py": ["test_masks", "test_mutation_masks", "test_mutation_gaps", "test_identity", "test_runner"],
    "g4seg/correspondence.py": ["test_correspondence", "test_mutation_gaps", "test_refiner"],
    "g4seg/diffusion_math.py": ["test_diffusion_math", "test_refiner"],
    "g4seg/metrics.py": ["test_mutation_metrics_config", "test_metrics", "test_eval_cli"],
    "g4seg/refiner.py": ["test_mutation_refiner", "test_refiner", "test_identity", "test_input_checks", "test_wiring",
                         "test_speed_options", "test_noise_modes", "test_image_batch", "test_injector_controlnet",
                         "test_postprocessor_densecrf"],
    "g4seg/manifest.py": ["test_mutation_manifest", "test_runner", "test_run_safety"],
    "g4seg/config.py": ["test_mutation_metrics_config", "test_config", "test_masks", "test_runner"],
    "g4seg/runner.py": ["test_runner", "test_run_safety", "test_sharding", "test_input_checks"],
    "g4seg/ablation.py": ["test_ablation"],
    "g4seg/fileid.py": ["test_mutation_fileid", "test_runner", "test_run_safety"],
    "g4seg/runlock.py": ["test_mutation_runlock", "test_run_safety"],
    "g4seg/io.py": ["test_mutation_io", "test_runner", "test_run_safety", "test_datasets", "test_input_checks"],
    "g4seg/checks.py": ["test_input_checks"],
    "g4seg/evaluation.py": ["test_mutation_evaluation", "test_eval_cli", "test_bootstrap", "test_ablation"],
    "g4seg/sharding.py": ["test_mutation_evaluation", "test_sharding"],
    "g4seg/builtin/injector_attn.py": ["test_injector_attn", "test_densediffusion_parity"],
}
DEFAULT = list(TESTS)[:8]
ALSO_COPY = ["docs", "examples", "README.md", "plugins", "benchmarks"]
PROBE = """

# added by tools/mutate.py in its copy only: record which g4seg the tests import
if __import__("os").environ.get("G4SEG_MUTATE_PROBE"):
    import g4seg as _g4seg_probe

    with open(__import__("os").environ["G4SEG_MUTATE_PROBE"], "a") as _probe_file:
        _probe_file.write(_g4seg_probe.__file__ + "\\n")
"""


def _toml_list(values: list[str]) -> str:
    return "[" + ", ".join(json.dumps(v) for v in values) + "]"


def copy_tree(tree: Path) -> Path:
    """A fresh copy of the files git knows about (tracked, and untracked files that are not ignored) at ``tree``."""
    if tree.exists():
        shutil.rmtree(tree)
    tree.mkdir(parents=True)
    files = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           check=True, capture_output=True).stdout
    for name in (n for n in files.decode().split("\0") if n and (REPO / n).is_file()):
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, tree / name)
    return tree


def make_copy(dest: Path, modules: list[str], tests: list[str]) -> Path:
    """A fresh copy of the working tree under ``dest/tree``, configured for mutmut."""
    tree = copy_tree(dest / "tree")
    config = (f"\n\n[tool.mutmut]\nsource_paths = [\"g4seg\"]\nonly_mutate = {_toml_list(modules)}\n"
              f"pytest_add_cli_args_test_selection = {_toml_list(tests)}\n"
              f"pytest_add_cli_args = [\"-p\", \"no:cacheprovider\", \"-q\"]\n"
              f"also_copy = {_toml_list(ALSO_COPY)}\n"
              # mutants are forked from a server that only collected the tests: forking a process that
              # already ran torch ops (OpenMP pool) can deadlock the child
              "process_isolation = \"forkserver\"\ntimeout_multiplier = 5.0\n")
    pyproject = tree / "pyproject.toml"
    text = re.sub(r"\n\[tool\.mutmut\][^\[]*", "\n", pyproject.read_text())
    pyproject.write_text(text + config)
    with (tree / "tests" / "conftest.py").open("a") as conftest:
        conftest.write(PROBE)
    return tree


def _overlay(lib: Path, overlay: Path) -> str:
    """The packages of a ``pip install --target`` folder that this interpreter lacks, linked into ``overlay``.

    Subprocesses started by the tests import the mutated g4seg, whose trampolines import mutmut, so
    mutmut must be on their PYTHONPATH, but the folder's own copies of pytest, pluggy... must not shadow
    the environment's.
    """
    import importlib.util

    if overlay.exists():
        shutil.rmtree(overlay)
    overlay.mkdir(parents=True)
    for entry in lib.iterdir():
        name = entry.name[:-3] if entry.name.endswith(".py") else entry.name
        if entry.name in ("bin", "__pycache__") or entry.suffix in (".pth", ".dist-info") or "." in name:
            continue
        if name == "mutmut" or importlib.util.find_spec(name) is None:
            (overlay / entry.name).symlink_to(entry)
            for info in lib.glob(f"{name}-*.dist-info"):  # mutmut reads its own version from here
                (overlay / info.name).symlink_to(info)
    return str(overlay)


def _mutmut_cmd(lib: str | None, *args: str) -> list[str]:
    boot = ("import sys\n" + (f"sys.path.append({lib!r})\n" if lib else "")
            + "from mutmut.__main__ import cli\nsys.argv[0] = 'mutmut'\ncli()")
    return [sys.executable, "-c", boot, *args]


def run_module(tree: Path, module: str, lib: str | None, children: int, seconds: float | None, env: dict) -> str:
    """``mutmut run`` on one module's mutants; returns 'done', 'timeout' or 'error'."""
    pattern = module[:-3].replace("/", ".") + ".*"
    proc = subprocess.Popen(_mutmut_cmd(lib, "run", "--max-children", str(children), pattern), cwd=tree, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=seconds)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)  # our own process group: mutmut and its forked children
        try:
            proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
        return "timeout"
    tail = output.decode(errors="replace").replace("\r", "\n").strip().splitlines()[-4:]
    if proc.returncode != 0:
        print(f"  mutmut exited {proc.returncode}: " + " | ".join(tail), file=sys.stderr)
        return "error"
    return "done"


def _function_start(source: str, key: str) -> int | None:
    """The first line (decorators included) of the function a mutmut key names (``x_f`` or ``xǁClassǁf``)."""
    name = key.rsplit(".", 1)[-1].split("__mutmut_")[0]
    parts = name[1:].split("ǁ")  # 'x_f' -> ['_f']; 'xǁCǁf' -> ['', 'C', 'f']
    target, cls = (parts[-1], parts[1]) if len(parts) == 3 else (parts[0][1:], None)
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef) and cls is not None and node.name == cls:
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and item.name == target:
                    return min([item.lineno] + [d.lineno for d in item.decorator_list])
        if cls is None and isinstance(node, ast.Module):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and item.name == target:
                    return min([item.lineno] + [d.lineno for d in item.decorator_list])
    return None


def describe(tree: Path, module: str, key: str, lib: str | None) -> tuple[int | None, str, str]:
    """(line in the original file, original line, mutated line) of one mutant, from mutmut's diff."""
    proc = subprocess.run(_mutmut_cmd(lib, "show", key), cwd=tree, capture_output=True, text=True)
    removed, added, first = [], [], None
    number = 0
    for line in proc.stdout.splitlines():
        hunk = re.match(r"@@ -(\d+)", line)
        if hunk:
            number = int(hunk.group(1)) - 1
            continue
        if line.startswith(("---", "+++", "#")):
            continue
        if line.startswith("-"):
            number += 1
            removed.append(line[1:].strip())
            first = first or number
        elif line.startswith("+"):
            added.append(line[1:].strip())
        else:
            number += 1
    source = (tree / module).read_text()
    start = _function_start(source, key)
    line = start + first - 1 if start and first else None
    return line, " / ".join(removed) or "?", " / ".join(added) or "(line removed)"


def _exit_codes(tree: Path, module: str) -> dict[str, int | None]:
    """mutmut's verdict (exit code) per mutant key of ``module``; {} before a run."""
    meta = tree / "mutants" / (module + ".meta")
    return json.loads(meta.read_text())["exit_code_by_key"] if meta.exists() else {}


def mutmut_statuses(tree: Path, module: str) -> dict[str, str]:
    """mutmut's status name ("killed", "survived", "not checked"...) per mutant key of ``module``."""
    from mutmut.stats import status_by_exit_code

    return {key: status_by_exit_code[code] for key, code in _exit_codes(tree, module).items()}


def collect(tree: Path, module: str, lib: str | None, retested: dict[str, str] | None = None) -> dict:
    """Counts per status and the survivors of ``module``; ``retested`` (key -> status) overrides mutmut's."""
    sys.path.append(lib) if lib and lib not in sys.path else None
    statuses = mutmut_statuses(tree, module)
    if not statuses:
        return {"module": module, "total": 0, "status": {}, "survivors": []}
    status: dict[str, int] = {}
    survivors = []
    for key, mutmut_status in statuses.items():
        name = (retested or {}).get(key) or mutmut_status
        status[name] = status.get(name, 0) + 1
        if name in ("survived", "no tests", "suspicious", "error"):
            line, before, after = describe(tree, module, key, lib)
            survivors.append({"key": key, "status": name, "line": line, "original": before, "mutant": after})
    return {"module": module, "total": len(statuses), "status": status, "survivors": survivors}


RETEST_STATUS = ("survived", "no tests", "suspicious", "not checked")
RETEST_TIMEOUT_S = 150  # per mutant (--mutant-seconds); a mutant that outlasts it counts as killed, as mutmut's
# timeouts do, so it must be well above the unmutated run of the --tests


def retest_keys(statuses: dict[str, str], sample: int | None, seed: int) -> tuple[list[str], list[str]]:
    """(keys to retest, the sampled ones): every mutant mutmut did not kill (survived, no tests, not checked...),
    or with ``sample`` only that many of them, drawn at random (seeded)."""
    left = sorted(k for k, s in statuses.items() if s in RETEST_STATUS)
    if sample is None:
        return left, []
    drawn = random.Random(seed).sample(left, min(sample, len(left)))
    return drawn, drawn


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion k / n (n > 0)."""
    p, d = k / n, 1 + z * z / n
    centre, half = (p + z * z / (2 * n)) / d, z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, centre - half), min(1.0, centre + half)


def estimate(statuses: dict[str, str], retested: dict[str, str], drawn: list[str]) -> dict | None:
    """The module's score over all its mutants when a random sample of those mutmut did not kill was retested:
    the mutants mutmut killed and those retested count as they are, the others at the sample's kill share."""
    tested = [k for k in drawn if k in retested]
    if not tested:
        return None
    hits = sum(retested[k] in ("killed", "timeout") for k in tested)
    lo, hi = wilson(hits, len(tested))
    verdicts = {k: retested.get(k, s) for k, s in statuses.items()}
    rest = sum(k not in retested and s in RETEST_STATUS for k, s in statuses.items())
    killed, total, share = sum(v in ("killed", "timeout") for v in verdicts.values()), len(statuses), hits / len(tested)
    return {"sample": len(tested), "sample_killed_share": share, "not_retested": rest,
            "score": (killed + share * rest) / total,
            "ci95": [(killed + lo * rest) / total, (killed + hi * rest) / total]}


def retest(tree: Path, tests: list[str], env: dict, deadline: float | None, keys: list[str],
           record: Callable[[str, str], None], limit: float = RETEST_TIMEOUT_S) -> None:
    """Run ``tests`` (already copied into the mutants folder) on each mutant ``keys`` names (see
    :func:`retest_keys`) and ``record`` each verdict as it comes: "killed", "survived", "timeout" or "error"
    (pytest could not run: exit 2, 4, 5)."""
    for key in keys:
        if deadline is not None and time.monotonic() > deadline:
            break
        command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
        try:
            mutant_env = {**env, "MUTANT_UNDER_TEST": key,  # the mutated copy first, for subprocesses too
                          "PYTHONPATH": os.pathsep.join([str(tree / "mutants"), env["PYTHONPATH"]])}
            rc = subprocess.run(command, cwd=tree / "mutants", env=mutant_env,
                                capture_output=True, timeout=limit).returncode
            # as mutmut counts: failed tests, a pytest internal error or death by a signal kill the mutant
            verdict = "survived" if rc == 0 else "killed" if rc in (1, 3) or rc < 0 else "error"
        except subprocess.TimeoutExpired:
            verdict = "timeout"
        print(f"  {key}: {verdict}", flush=True)
        record(key, verdict)


def _score(entry: dict) -> tuple[int, int]:
    checked = sum(n for s, n in entry["status"].items() if s not in ("not checked", "skipped"))
    killed = entry["status"].get("killed", 0) + entry["status"].get("timeout", 0)
    return killed, checked


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("modules", nargs="*", metavar="MODULE",
                        help=f"files under g4seg/ to mutate (default: {' '.join(DEFAULT)}); 'all' for every mapped one")
    parser.add_argument("--tests", nargs="+", metavar="FILE", help="test files to run (default: the mapped ones)")
    parser.add_argument("--max-children", type=int, default=2, help="mutants tested in parallel (forked workers)")
    parser.add_argument("--seconds", type=float, help="overall time budget; modules not reached are reported")
    parser.add_argument("--dest", type=Path, default=Path("/tmp/g4seg-mutants"), help="where the copy goes")
    parser.add_argument("--keep", action="store_true", help="reuse DEST/tree and mutmut's cached results")
    parser.add_argument("--retest", action="store_true",
                        help="no new mutmut run: run the current --tests on the survivors of the run in --dest")
    parser.add_argument("--sample", type=int, metavar="N",
                        help="with --retest: of the mutants the run did not kill, retest only N drawn at random and "
                             "estimate the module's score (with a 95%% interval) from them")
    parser.add_argument("--seed", type=int, default=0, help="seed of --sample's draw")
    parser.add_argument("--mutant-seconds", type=float, default=RETEST_TIMEOUT_S,
                        help="with --retest: time limit per mutant (a mutant past it counts as killed)")
    parser.add_argument("--mutmut-lib", default=os.environ.get("G4SEG_MUTMUT_LIB"),
                        help="a folder holding mutmut (pip install --target), if it is not installed")
    args = parser.parse_args(argv)

    modules = list(TESTS) if args.modules == ["all"] else [m if m.startswith("g4seg/") else f"g4seg/{m}"
                                                           for m in (args.modules or DEFAULT)]
    modules = [m if m.endswith(".py") else m + ".py" for m in modules]
    for m in modules:
        if not (REPO / m).is_file():
            parser.error(f"no such module: {m}")
    tests = args.tests or sorted({f"tests/{t}.py" for m in modules for t in TESTS.get(m, [])})
    if not tests:
        parser.error("no test files mapped for these modules: pass --tests")
    dest = args.dest.resolve()
    if dest == REPO or REPO in dest.parents:
        parser.error("--dest must be outside the repository")
    tree = dest / "tree"
    if args.retest:
        if not (tree / "mutants").is_dir():
            parser.error(f"--retest needs a finished run in {dest}")
        for test in tests:  # the current versions, into the copy and into mutmut's copy of it
            for root in (tree, tree / "mutants"):
                shutil.copy2(REPO / test, root / test)
    elif not (args.keep and tree.exists()):
        print(f"copying the working tree to {tree}")
        make_copy(dest, modules, tests)
    lib = args.mutmut_lib and _overlay(Path(args.mutmut_lib).resolve(), dest / "pylib")
    probe = dest / "probe.txt"
    probe.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree)] + ([lib] if lib else [])),
           "PYTHONDONTWRITEBYTECODE": "1", "G4SEG_MUTATE_PROBE": str(probe),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    started = time.monotonic()
    outcome = {}
    retests_file = dest / "retest.json"
    samples_file = dest / "sample.json"  # module -> the mutants a --sample retest drew
    if not args.retest:  # a new mutmut run: its verdicts replace any retest's
        retests_file.unlink(missing_ok=True)
        samples_file.unlink(missing_ok=True)
    retested = json.loads(retests_file.read_text()) if retests_file.exists() else {}
    samples = json.loads(samples_file.read_text()) if samples_file.exists() else {}
    for module in modules:
        left = None if args.seconds is None else args.seconds - (time.monotonic() - started)
        if left is not None and left < 30:
            outcome[module] = "not reached"
            continue
        if args.retest:
            print(f"retesting the survivors of {module} ...", flush=True)
            sys.path.append(lib) if lib and lib not in sys.path else None
            keys, drawn = retest_keys(mutmut_statuses(tree, module), args.sample, args.seed)
            samples[module] = drawn
            samples_file.write_text(json.dumps(samples, indent=1) + "\n")

            def record(key: str, verdict: str) -> None:  # after each mutant: a stopped retest keeps its verdicts
                retested[key] = verdict
                retests_file.write_text(json.dumps(retested, indent=1) + "\n")

            deadline = None if left is None else time.monotonic() + left
            retest(tree, tests, env, deadline, keys, record, args.mutant_seconds)
            outcome[module] = "retested"
            continue
        print(f"mutating {module} ...", flush=True)
        outcome[module] = run_module(tree, module, lib, args.max_children, left, env)

    imported = sorted(set(probe.read_text().split())) if probe.exists() else []
    print(f"\ntests imported g4seg from: {', '.join(imported) or '(probe not reached)'}")
    if any(not p.startswith(str(tree)) for p in imported):
        print("WARNING: some test run imported g4seg from outside the copy", file=sys.stderr)
    results = []
    for module in modules:
        entry = collect(tree, module, lib, retested)
        entry["run"] = outcome[module]
        drawn = samples.get(module)
        entry["estimate"] = estimate(mutmut_statuses(tree, module), retested, drawn) if drawn else None
        results.append(entry)
        for s in entry["survivors"]:
            print(f"{module}:{s['line'] or '?'}: {s['original']}  ->  {s['mutant']}"
                  + ("" if s["status"] == "survived" else f"  [{s['status']}]"))
    print("\nmodule                              killed/checked  score  run")
    total_killed = total_checked = 0
    for entry in results:
        killed, checked = _score(entry)
        total_killed, total_checked = total_killed + killed, total_checked + checked
        score = f"{100 * killed / checked:5.1f}%" if checked else "   n/a"
        print(f"{entry['module']:<36}{killed:>6}/{checked:<8} {score}  {entry['run']}")
        if entry["estimate"]:
            e = entry["estimate"]
            print(f"{'':<36}all {entry['total']} mutants, estimated: {100 * e['score']:.1f}% (95% interval "
                  f"{100 * e['ci95'][0]:.1f}-{100 * e['ci95'][1]:.1f}%): {e['sample']} drawn of those mutmut did "
                  f"not kill, {e['not_retested']} of them not retested")
    if total_checked:
        print(f"{'total':<36}{total_killed:>6}/{total_checked:<8} {100 * total_killed / total_checked:5.1f}%")
    (dest / "summary.json").write_text(json.dumps({"imported_from": imported, "modules": results}, indent=2) + "\n")
    print(f"\nwrote {dest / 'summary.json'}; inspect one mutant with: cd {tree} && mutmut show <key>")
    return 0


if __name__ == "__main__":
    sys.exit(main())
