"""The params guard: a stage stops, publishing nothing, when a param it depends on changes while it runs."""

from __future__ import annotations

import pytest

from cxrlab.config import guard
from cxrlab.errors import UserError
from cxrlab.io.fsio import atomic_file
from tests.conftest import set_params


@pytest.fixture
def watched(in_project):
    """train@baseline watched in a project copy (the current directory); unwatched afterwards."""
    guard.watch("train", ["baseline"])
    yield in_project
    guard.unwatch()


def test_a_stage_watches_exactly_the_params_dvc_yaml_lists_for_it(in_project):
    keys = guard.stage_params("train@baseline")
    assert "train" in keys and "experiments.baseline" in keys and "data.mean" in keys
    assert not any(k.startswith(("runtime", "experiments.contrast", "evaluate")) for k in keys)
    assert guard.stage_params("compare") == ["data.positive_class", "experiments", "ensembles", "stats.ci_level",
                                             "stats.resamples", "stats.seed", "stats.alpha", "compare"]
    assert guard.stage_params("no_such_stage") == []


def test_changes_outside_the_stage_params_pass(watched):
    set_params(watched / "params.yaml", {"runtime.num_workers": 3, "experiments.contrast.lr": 0.5,
                                         "evaluate.calibration_bins": 10})
    guard.check()
    with atomic_file(watched / "out.txt") as tmp:
        tmp.write_text("ok")
    assert (watched / "out.txt").read_text() == "ok"


def test_a_changed_param_stops_the_next_write_and_names_the_key(watched):
    set_params(watched / "params.yaml", {"train.lr": 0.5, "experiments.baseline.dropout": 0.1})
    expected = (r"changed while train@baseline ran \(experiments\.baseline\.dropout, train\.lr\); "
                r"its results were not recorded.*dvc exp run --queue")
    with pytest.raises(UserError, match=expected), atomic_file(watched / "out.txt") as tmp:
        tmp.write_text("computed with the old params")
    assert not (watched / "out.txt").exists() and not list(watched.glob("out.txt*"))
