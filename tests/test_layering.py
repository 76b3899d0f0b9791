"""The package's layering (scripts/layering.py): no import cycle, few imports inside functions, short modules."""

from __future__ import annotations

import importlib.util
import sys

from trainer_utils import ROOT

spec = importlib.util.spec_from_file_location("layering", ROOT / "scripts" / "layering.py")
layering = importlib.util.module_from_spec(spec)
sys.modules["layering"] = layering  # dataclasses look their module up there
spec.loader.exec_module(layering)


def test_no_import_cycle_counting_imports_inside_functions():
    found = layering.imports()
    assert any(i.module == "pipelines.trainer" and i.target == "pipelines.evaluation" for i in found)
    assert layering.cycles(found) == []


def test_the_cycle_finder_finds_a_cycle_through_a_function_level_import():
    edges = [layering.Import("a", "b", 1, False, False), layering.Import("b", "c", 1, True, False),
             layering.Import("c", "a", 9, True, False), layering.Import("c", "d", 2, False, False)]
    assert layering.cycles(edges) == [["a", "b", "c"]]


def test_imports_inside_functions_are_few_and_say_why():
    local = [i for i in layering.imports() if i.local]
    assert len(local) <= layering.MAX_LOCAL_IMPORTS, local
    assert all(i.commented for i in local), [i for i in local if not i.commented]


def test_no_module_is_over_the_limit():
    counts = layering.line_counts()
    assert counts["pipelines.trainer"] > 100  # it reads the package
    assert {m: n for m, n in counts.items() if n > layering.MAX_LINES} == {}
