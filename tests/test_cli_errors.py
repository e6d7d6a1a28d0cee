"""Mistakes a user can make end in one clear line, exit code 2, no traceback, nothing half-written."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from cxrlab.data.synthetic import make_dataset
from cxrlab.errors import run_stage
from cxrlab.io.fsio import atomic_file
from tests.conftest import set_params, stage, written


def assert_user_error(result, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def files_under(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def test_missing_source(project):
    set_params(project / "params.yaml", {"data.source": str(project / "no-such-data")})
    result = stage("download", cwd=project)
    assert_user_error(result, "error: download: data.source", "does not exist", "Set data.source")
    assert files_under(project / "data") == []


def test_no_network_for_kaggle(project):
    # the default source is Kaggle; through a proxy where nothing listens, it is unreachable
    dead = "http://127.0.0.1:9"
    result = stage("download", cwd=project,
                   env={"https_proxy": dead, "HTTPS_PROXY": dead, "no_proxy": "", "NO_PROXY": ""})
    assert_user_error(result, "cannot reach https://www.kaggle.com to download kaggle:usmanshams/tbx-11",
                      "dvc exp run -S data.source=")
    assert files_under(project / "data") == []


def test_class_folder_not_found(project):
    make_dataset(project / "data" / "raw", n_per_class=5, size=16, subdir="")
    set_params(project / "params.yaml", {"data.classes": {"Healthy": "health", "TB": "tuberculosis"}})
    result = stage("split", cwd=project)
    assert_user_error(result, "class 'TB': no folder named 'tuberculosis'", "Folders there: health, tb",
                      "data.classes.TB")
    assert not (project / "data" / "split").exists()
    assert not (project / "metrics" / "split.json").exists()


def test_class_without_images(project):
    make_dataset(project / "data" / "raw", n_per_class=5, size=16, subdir="")
    for png in (project / "data" / "raw" / "tb").iterdir():
        png.unlink()
    (project / "data" / "raw" / "tb" / "notes.txt").write_text("no images here")
    result = stage("split", cwd=project)
    assert_user_error(result, "class 'TB': no images in data/raw/tb")
    assert not (project / "data" / "split").exists()


def test_params_typo_stops_a_stage_before_any_work(project):
    set_params(project / "params.yaml", {"train.learnig_rate": 0.1})
    result = stage("split", cwd=project)
    assert_user_error(result, "params.yaml: train.learnig_rate: unknown key (did you mean 'lr'?)")


@pytest.mark.parametrize("module", ["train", "evaluate"])
def test_unknown_variant(project, module):
    result = stage(module, "dropuot", cwd=project)
    assert_user_error(result, "unknown variant 'dropuot' (did you mean 'dropout'?)",
                      "baseline, regu_penalty, dropout, sharpness, contrast")
    assert not (project / "models").exists()


def test_training_before_the_data_is_prepared(project):
    result = stage("train", "baseline", cwd=project)
    assert_user_error(result, "data/prepared/train.npy does not exist; run the preprocess stage first")
    assert not (project / "models").exists() and not written(project / "metrics")


def test_a_full_disk_is_one_clear_line_and_leaves_no_partial_file(tmp_path, capsys):
    target = tmp_path / "metrics.json"

    def main(argv):
        with atomic_file(target) as tmp:
            tmp.write_text("half")
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp))

    with pytest.raises(SystemExit) as exit_info:
        run_stage(main, "evaluate")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: evaluate: the disk is full writing") and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []
