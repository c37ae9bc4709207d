"""Apply the hand-made mutants of ``tools/hand_mutants.toml`` one at a time and name the test that kills each.

    python tools/hand_mutants.py [ID ...] [--dest DIR] [--no-baseline] [--list]

mutmut (``tools/mutate.py``) makes small syntactic changes everywhere; these are the *mistakes* a reviewer
fears, one per line of the list: a setting that never reaches its effect, class k's tokens bound to class
k+1's region, Eq. 8's argmax turned into an argmin, a write renamed before its fsync, an ablation that
reloads every model... Each entry names the file, an exact piece of text that must occur once, its
replacement, and the tests that should catch it. The script copies the files git knows about to
``DEST/tree`` (the repository is never touched), runs each entry's tests there once unmutated (the
baseline: a test that fails anyway kills nothing), then applies each mutant alone and runs its tests
with ``-x``. A mutant is *killed* when pytest reports a failed test, *survived* when the tests pass, and
an *error* otherwise (collection failure, time limit). Results go to ``DEST/results.json``; the exit
code is 1 when any mutant survived or errored, or the list no longer matches the code.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mutate import REPO, copy_tree  # noqa: E402  (the same copy of the working tree as the mutmut runs)

LIST = REPO / "tools" / "hand_mutants.toml"
FAILED = re.compile(r"^(?:FAILED|ERROR) (\S+)", re.MULTILINE)


@dataclass
class Mutant:
    id: str
    category: str
    what: str
    file: str
    original: str
    mutant: str
    tests: list[str]
    k: str | None = None
    seconds: int = 900
    verdict: str = ""
    killed_by: list[str] = field(default_factory=list)
    run_seconds: float = 0.0

    def args(self) -> list[str]:
        return [*self.tests, *(["-k", self.k] if self.k else [])]


def load(path: Path = LIST) -> list[Mutant]:
    """The entries of the list, in order (ids must be unique)."""
    entries = [Mutant(**entry) for entry in tomllib.loads(path.read_text())["mutant"]]
    ids = [m.id for m in entries]
    if len(set(ids)) != len(ids):
        raise SystemExit(f"{path}: duplicate ids")
    return entries


def stale(mutant: Mutant, root: Path = REPO) -> str | None:
    """Why ``mutant`` cannot be applied to the code under ``root`` (None when its text occurs exactly once)."""
    target = root / mutant.file
    if not target.is_file():
        return f"{mutant.file} does not exist"
    count = target.read_text().count(mutant.original)
    return None if count == 1 else f"its original text occurs {count} times in {mutant.file}, not once"


def pytest(tree: Path, args: list[str], seconds: int) -> tuple[int | None, str]:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-rfE", *args],
                              cwd=tree, env=env, capture_output=True, text=True, timeout=seconds)
    except subprocess.TimeoutExpired:
        return None, ""
    return proc.returncode, proc.stdout + proc.stderr


def run(mutants: list[Mutant], tree: Path, baseline: bool, log=print) -> None:
    """Fill in each mutant's verdict: killed, survived, error (...), stale (...) or baseline fails."""
    broken: dict[tuple[str, ...], str] = {}
    if baseline:
        limits: dict[tuple[str, ...], int] = {}  # each test selection once, with its entries' longest limit
        for m in mutants:
            limits[tuple(m.args())] = max(limits.get(tuple(m.args()), 0), m.seconds)
        for args, seconds in limits.items():
            code, output = pytest(tree, list(args), seconds)
            if code != 0:
                broken[args] = f"baseline fails (exit {code}): {', '.join(FAILED.findall(output)[:2])}"
            log(f"baseline {' '.join(args)}: {'ok' if code == 0 else broken[args]}")
    for m in mutants:
        reason = stale(m, tree)
        if reason or tuple(m.args()) in broken:
            m.verdict = f"stale: {reason}" if reason else broken[tuple(m.args())]
            log(f"{m.id}: {m.verdict}")
            continue
        target = tree / m.file
        original = target.read_text()
        target.write_text(original.replace(m.original, m.mutant))
        start = time.perf_counter()
        try:
            code, output = pytest(tree, m.args(), m.seconds)
        finally:
            target.write_text(original)
        m.run_seconds = round(time.perf_counter() - start, 1)
        m.killed_by = FAILED.findall(output)
        if code == 1 and m.killed_by:
            m.verdict = "killed"
        elif code == 0:
            m.verdict = "survived"
        else:
            m.verdict = "error (time limit)" if code is None else f"error (pytest exit {code})"
        log(f"{m.id}: {m.verdict} in {m.run_seconds} s {' '.join(m.killed_by[:1])}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ids", nargs="*", metavar="ID", help="only these entries (default: all)")
    parser.add_argument("--dest", type=Path, default=Path("/tmp/g4seg-hand-mutants"), help="where the copy goes")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of each test selection")
    parser.add_argument("--list", action="store_true", help="print the entries and whether each still applies")
    args = parser.parse_args()
    mutants = load()
    unknown = set(args.ids) - {m.id for m in mutants}
    if unknown:
        parser.error(f"unknown ids: {', '.join(sorted(unknown))}")
    mutants = [m for m in mutants if not args.ids or m.id in args.ids]
    if args.list:
        reasons = [stale(m) for m in mutants]
        for m, reason in zip(mutants, reasons):
            print(f"{m.id:24} {m.category:12} {reason or 'applies'}: {m.what}")
        return 1 if any(reasons) else 0
    tree = copy_tree(args.dest / "tree")
    run(mutants, tree, baseline=not args.no_baseline)
    results = [{"id": m.id, "category": m.category, "what": m.what, "file": m.file, "verdict": m.verdict,
                "killed_by": m.killed_by, "seconds": m.run_seconds} for m in mutants]
    (args.dest / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"\n{'id':24} {'category':12} verdict, first failing test")
    for m in mutants:
        print(f"{m.id:24} {m.category:12} {m.verdict}{', ' + m.killed_by[0] if m.killed_by else ''}")
    killed = sum(m.verdict == "killed" for m in mutants)
    print(f"\n{killed} of {len(mutants)} killed; results in {args.dest / 'results.json'}")
    return 0 if killed == len(mutants) else 1


if __name__ == "__main__":
    sys.exit(main())
