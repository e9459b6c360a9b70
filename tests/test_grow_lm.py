"""scripts/grow_lm.py --quick: the properties (not the speed-up)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from helpers import load_module

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "grow_lm.py"


@pytest.fixture(scope="module")
def grow_lm():
    yield load_module(SCRIPT, "grow_lm")
    sys.modules.pop("grow_lm", None)


@pytest.fixture(scope="module")
def quick(grow_lm, tmp_path_factory):
    pytest.importorskip("transformers")
    out = tmp_path_factory.mktemp("grow-lm-quick")
    grow_lm.main(["--quick", "--out", str(out)])
    return out, json.loads((out / "results.json").read_text())


def test_quick_run_records_every_arm_with_compute(quick, grow_lm):
    out, results = quick
    run = results["seeds"]["0"]
    assert set(run["runs"]) == {"teacher", *grow_lm.ARMS}
    for name, r in run["runs"].items():
        h = r["history"]
        assert h[0]["step"] == 0 and all(math.isfinite(p["val_loss"]) for p in h)
        assert all(b["flops"] > a["flops"] and b["wall_s"] >= a["wall_s"] for a, b in zip(h, h[1:])), name
    fl = run["flops_per_step"]
    # equal total compute: the scratch arm's budget is the teacher's plus the students'
    total = {arm: run["runs"][arm]["history"][-1]["flops"] for arm in grow_lm.ARMS}
    assert abs(total["scratch"] - total["n2n"]) <= fl["student"] / 2
    assert len({total[a] for a in grow_lm.ARMS if a != "scratch"}) == 1
    assert results["threads"] == 1 and results["setting"]["teacher_steps"] == grow_lm.QUICK.teacher_steps
    if results["plot"]:
        assert (out / "val_loss.png").stat().st_size > 0


def test_function_preserving_arms_start_at_the_teachers_loss(quick):
    _, results = quick
    run = results["seeds"]["0"]
    teacher_end = run["runs"]["teacher"]["history"][-1]["val_loss"]
    for arm in ("n2n_opt", "n2n"):
        assert abs(run["runs"][arm]["loss_after_growth"] - teacher_end) < 1e-4 * teacher_end
    # the baselines are not function-preserving: their loss moves at growth
    assert abs(run["runs"]["random_new"]["after_growth_minus_teacher"]) > 1e-3
    assert abs(run["runs"]["stack"]["after_growth_minus_teacher"]) > 1e-4
    assert run["growth"]["verification_passed"] is True
    # the optimizer state was grown by n2n: inserted blocks start fresh
    assert run["growth"]["optimizer_state"]["inserted_fresh"] > 0


def test_speedup_is_measured_against_the_scratch_arms_final_loss(quick, grow_lm):
    _, results = quick
    sp = results["seeds"]["0"]["speedup"]
    assert sp["scratch"]["speedup_flops"] == pytest.approx(1.0)
    assert sp["target_val_loss"] == results["seeds"]["0"]["runs"]["scratch"]["history"][-1]["val_loss"]
    assert set(results["summary"]) >= set(grow_lm.ARMS)


def test_to_target_interpolates(grow_lm):
    h = [{"flops": 0.0, "wall_s": 0.0, "val_loss": 4.0}, {"flops": 10.0, "wall_s": 2.0, "val_loss": 2.0}]
    assert grow_lm.to_target(h, 3.0) == (5.0, 1.0)
    assert grow_lm.to_target(h, 1.0) == (None, None)
    assert grow_lm.to_target(h, 5.0) == (0.0, 0.0)


def test_corpus_split_is_by_file_and_seeded(grow_lm):
    a, b = grow_lm.load_corpus(0, 0.2), grow_lm.load_corpus(0, 0.2)
    assert a["train"].equal(b["train"]) and a["val"].equal(b["val"])
    assert a["files"]["val"] >= 1 and a["files"]["train"] >= 1
    c = grow_lm.load_corpus(1, 0.2)
    assert not c["val"].equal(a["val"])
