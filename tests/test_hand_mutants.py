"""tools/hand_mutants.py: the list still matches the code, and the verdicts are what pytest says.

The list names the mistakes of issue 15 (docs/testing.md, "Hand-made mutants"); an entry whose text no
longer occurs exactly once would silently test nothing, so every entry is checked against the code here.
"""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import hand_mutants  # noqa: E402


def test_every_entry_applies_to_the_code_and_names_existing_tests():
    mutants = hand_mutants.load()
    assert {m.category for m in mutants} >= {"wiring", "injection", "correspondence", "pairs", "offline",
                                             "durability", "sharding", "ablation", "readme"}
    for m in mutants:
        assert hand_mutants.stale(m) is None, m.id
        assert m.original != m.mutant, m.id
        for test in m.tests:
            path, _, name = test.partition("::")
            assert (ROOT / path).is_file(), (m.id, path)
            assert not name or f"def {name}(" in (ROOT / path).read_text(), (m.id, test)


def test_verdicts_on_a_small_tree(tmp_path):
    """killed / survived / stale / a baseline that fails, on a one-function module and its test."""
    (tmp_path / "calc.py").write_text("def double(x):\n    return 2 * x\n\n\ndef unused():\n    return 1\n")
    (tmp_path / "test_calc.py").write_text("from calc import double\n\n\ndef test_double():\n"
                                           "    assert double(3) == 6\n")
    (tmp_path / "test_broken.py").write_text("def test_always_fails():\n    assert False\n")

    def mutant(id, original, mutant, tests=("test_calc.py",)):
        return hand_mutants.Mutant(id, "unit", id, "calc.py", original, mutant, list(tests), seconds=120)

    mutants = [mutant("plus", "2 * x", "2 + x"), mutant("dead", "return 1", "return 2"),
               mutant("gone", "3 * x", "4 * x"), mutant("broken", "2 * x", "3 * x", ["test_broken.py"])]
    hand_mutants.run(mutants, tmp_path, baseline=True, log=lambda line: None)
    verdicts = {m.id: m.verdict for m in mutants}
    assert verdicts["plus"] == "killed" and mutants[0].killed_by == ["test_calc.py::test_double"]
    assert verdicts["dead"] == "survived"
    assert verdicts["gone"] == "stale: its original text occurs 0 times in calc.py, not once"
    assert verdicts["broken"].startswith("baseline fails (exit 1): test_broken.py::test_always_fails")
    assert (tmp_path / "calc.py").read_text().startswith("def double(x):\n    return 2 * x\n")  # restored


@pytest.mark.parametrize("text, count", [("return 2 * x", 1), ("return", 2)])
def test_stale_counts_occurrences(tmp_path, text, count):
    (tmp_path / "calc.py").write_text("def double(x):\n    return 2 * x\n\n\ndef unused():\n    return 1\n")
    m = hand_mutants.Mutant("m", "unit", "m", "calc.py", text, "x", ["t.py"])
    assert hand_mutants.stale(m, tmp_path) == (None if count == 1 else
                                              f"its original text occurs {count} times in calc.py, not once")
