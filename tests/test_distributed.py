"""torchrun with 2 CPU processes (gloo) on tiny synthetic data matches single-process evaluation."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_loaders import ShardedSampler
from synthetic_data import make_synthetic_dataset
from engine import main

ROOT = Path(__file__).resolve().parents[1]


def test_sharded_sampler_splits_one_epoch_without_overlap():
    ranks = [list(ShardedSampler(10, rank=r, world=3, seed=1)) for r in range(3)]
    assert all(len(r) == 4 for r in ranks)  # ceil(10 / 3), padded
    drawn = sorted(i for r in ranks for i in r)
    assert sorted(set(drawn)) == list(range(10)) and len(drawn) == 12  # 2 padding repeats
    a = ShardedSampler(10, rank=0, world=3, seed=1)
    a.set_epoch(1)
    assert list(a) != ranks[0]  # a new order every epoch
    weighted = ShardedSampler(1000, rank=1, world=2, seed=0, weights=torch.tensor([9.0] + [1.0] * 999))
    assert list(weighted).count(0) > 1  # weights: drawn with replacement, index 0 nine times as likely


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not built in")
def test_torchrun_two_processes_match_single_process_evaluation(tmp_path):
    """Every rank validates with the weights and buffers that are saved, so scoring the saved
    checkpoint reproduces metrics.json patient by patient. The model has the default size: with
    4 features the ranks' BatchNorm statistics drifted too little to show that rank 1 validated
    with its own (bug 6 of the restructuring issue)."""
    data = make_synthetic_dataset(tmp_path / "syn" / "kaggle_3m", patients=5, slices=6, size=64)
    run = tmp_path / "run"
    args = ["--data-dir", str(data), "--image-size", "32", "--epochs", "2",
            "--batch-size", "4", "--device", "cpu", "--amp", "off", "--val-fraction", "0.4",
            "--tumor-weight", "2", "--out-dir", str(run)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(ROOT / "engine.py"), *args],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("Validation after epoch 2") == 1  # rank 0 alone reports
    assert "2 processes, gloo" in proc.stdout
    metrics = json.loads((run / "metrics.json").read_text())
    config = json.loads((run / "config.json").read_text())
    val = config["patients"]["validation"]
    assert len(val) == 2 and [p["patient"] for p in metrics["per_patient"]] == val
    assert metrics["slices"] == 6 * len(val)  # every validation slice exactly once across ranks

    out = tmp_path / "single"
    assert main(["evaluate", "--checkpoint", str(run / "last.pt"), "--device", "cpu", "--amp", "off",
                 "--out-dir", str(out)]) == 0
    single = json.loads((out / "metrics.json").read_text())
    for key in ("dice_per_volume_mean", "dice_per_volume_median", "dice_global", "iou_global",
                "precision", "recall", "hd95_px_mean"):
        assert single[key] == pytest.approx(metrics[key], abs=1e-9), key
    assert single["per_patient"] == metrics["per_patient"]
