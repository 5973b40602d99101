import csv
import json

import numpy as np

from kgpt.callbacks import best_logged, completed_steps, trim_history


def _write_history(path, losses):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["epoch", "loss", "val_loss"])
        for epoch, loss in enumerate(losses):
            writer.writerow([epoch, loss + 1, loss])


def test_trim_history_keeps_the_backed_up_evaluations(tmp_path):
    path = tmp_path / "history.csv"
    _write_history(path, [3.0, 2.0, 1.5, 1.0])
    trim_history(path, 2)
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert [row["epoch"] for row in rows] == ["0", "1"]
    assert best_logged(path) == 2.0
    assert [p.name for p in tmp_path.iterdir()] == ["history.csv"]  # no temporary left


def test_best_logged_and_completed_steps_when_nothing_is_there(tmp_path):
    assert best_logged(tmp_path / "history.csv") is None
    assert completed_steps(tmp_path / "backup") == 0
    (tmp_path / "backup").mkdir()
    (tmp_path / "backup" / "training_metadata.json").write_text(json.dumps({"epoch": 3, "step": 750}))
    assert completed_steps(tmp_path / "backup") == 750


def test_best_logged_is_the_minimum(tmp_path):
    path = tmp_path / "history.csv"
    _write_history(path, [3.0, 1.25, 2.0])
    assert np.isclose(best_logged(path), 1.25)
