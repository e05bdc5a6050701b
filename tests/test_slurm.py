"""The pipeline on a real SLURM cluster (tests/slurm/start_cluster.sh starts a single-node one).

Skipped where no idle SLURM node or no executor plugin is present; .ci/run starts the cluster
first. Each SLURM job costs seconds of polling, so the DAG is tiny: one DUFM run and one network
run whose training job asks for a GPU (a stand-in gres on the test cluster), and one Deep RFM run
that asks for one too.
"""

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import wait_for_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def slurm_ready() -> bool:
    if not shutil.which("sinfo") or importlib.util.find_spec("snakemake_executor_plugin_slurm") is None:
        return False
    out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True)
    return out.returncode == 0 and "idle" in out.stdout


pytestmark = [pytest.mark.slow, pytest.mark.skipif(not slurm_ready(), reason="no idle SLURM cluster")]

CONFIG = {
    "device": "cpu",
    "dufm": {"defaults": {"K": 2, "L": 2, "n": 4, "width": 6, "lambda_H1": 5e-3, "lambda_W": 5e-3, "lr": 1.0,
                          "steps": 2000, "tol": 1e-10, "log_every": 100, "seeds": [0]},
             "experiments": {"one": {}}},
    "net_resources": {"gpu": 1, "mem_mb": 1000, "runtime": 10, "threads": 1},
    "datasets": {"blobs": {"name": "gaussian", "standardize": True,
                           "gaussian": {"K": 3, "dim": 5, "separation": 4.0, "n": 30}}},
    "networks": {"defaults": {"dataset": "blobs", "arch": "mlp", "mlp_widths": [16], "bias": True,
                              "init_gain": 1.0, "head_layers": 2, "head_width": 16, "loss": "mse",
                              "optimizer": "sgd", "lr": 0.02, "momentum": 0.9, "schedule": "cosine",
                              "epochs": 3, "batch_size": 16, "lambda_H1": 1e-4, "lambda_W": 1e-3,
                              "weight_decay": 5e-4, "checkpoint_every": 1, "feature_epochs": [1, 3],
                              "seeds": [0]},
                 "experiments": {"net": {}}},
    "rfm_resources": {"gpu": 1, "mem_mb": 1000, "runtime": 10, "threads": 1},
    "rfm": {"experiments": {"rfm": {"dataset": "blobs", "depth": 2, "width": 16}}},
}


def test_pipeline_runs_on_slurm_and_requests_the_gpu(tmp_path):
    for name in ("Snakefile", "workflow", "scripts", "config", "profiles"):
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp_path / name)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(CONFIG))
    cmd = [sys.executable, "-m", "snakemake", "--directory", str(tmp_path), "--snakefile",
           str(tmp_path / "Snakefile"), "--workflow-profile", str(tmp_path / "profiles" / "slurm"),
           "--configfile", str(tmp_path / "c.yaml")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    summary = pd.read_parquet(tmp_path / "results/report/summary.parquet")
    assert set(summary["run"]) == {"one-s0", "net-s0", "rfm-s0"}
    # Jobs stay visible for MinJobAge (300 s on the test cluster): find this run's jobs.
    jobs = subprocess.run(["scontrol", "show", "jobs"], capture_output=True, text=True).stdout
    ours = [b for b in re.split(r"\n(?=JobId=)", jobs) if f"WorkDir={tmp_path}" in b]
    rules = {m.group(1): b for b in ours if (m := re.search(r"Comment=rule_(\w+?)(?:_wildcards|\s|$)", b))}
    every_rule = {"prepare_dataset", "dufm_train_one_s0", "dufm_measure_one", "compute_metrics",
                  "train_network", "extract_features",
                  "compare_network", "analyze_network", "deep_rfm", "build_report"}
    assert set(rules) == every_rule  # every rule of the DAG ran as a SLURM job
    gpu_rules = {"train_network", "deep_rfm"}  # the configs give GPUs to these only
    assert all("TresPerJob=gres:gpu:1" in rules[r] for r in gpu_rules)
    assert not [r for r in every_rule - gpu_rules if "TresPerJob=gres:gpu" in rules[r]]


def test_job_cancelled_by_slurm_resumes_from_its_checkpoint(tmp_path):
    """scancel the network training job mid-training: the profile's retry resubmits it and the new
    job resumes after the last checkpointed epoch; the history has every epoch once."""
    import torch

    for name in ("Snakefile", "workflow", "scripts", "config", "profiles"):
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp_path / name)
    cfg = {k: v for k, v in CONFIG.items() if k not in ("dufm", "rfm", "rfm_resources")}
    cfg["datasets"] = {"big": {"name": "gaussian", "standardize": True,
                               "gaussian": {"K": 4, "dim": 64, "separation": 3.0, "n": 1500}}}
    cfg["networks"] = {"defaults": CONFIG["networks"]["defaults"],
                       "experiments": {"slow": {"dataset": "big", "epochs": 12, "mlp_widths": [256, 256],
                                                "lambda_H1": 1e-6, "lr": 0.01, "head_width": 64,
                                                "feature_epochs": [12]}}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    target = "results/nets/slow-s0/history.parquet"
    cmd = [sys.executable, "-m", "snakemake", "--directory", str(tmp_path), "--snakefile",
           str(tmp_path / "Snakefile"), "--workflow-profile", str(tmp_path / "profiles" / "slurm"),
           target, "--configfile", str(tmp_path / "c.yaml")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    last = tmp_path / "results/nets/slow-s0/resume/last.pt"
    wait_for_checkpoint(proc, last, 2, timeout=600)
    jobs = subprocess.run(["squeue", "-h", "-o", "%i %k %Z"], capture_output=True, text=True).stdout
    job = next(line.split()[0] for line in jobs.splitlines()
               if "rule_train_network" in line and str(tmp_path) in line)
    subprocess.run(["scancel", job], check=True)
    killed_at = torch.load(last, weights_only=True)["epoch"]
    output, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, output[-3000:]
    state = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    assert "JobState=CANCELLED" in state  # SLURM did kill the first attempt
    log = (tmp_path / "logs/train_network/slow-s0.log").read_text()
    assert re.search(r"resumed after epoch (\d+)", log) and int(
        re.search(r"resumed after epoch (\d+)", log).group(1)) >= killed_at
    history = pd.read_parquet(tmp_path / target)
    assert list(history["epoch"]) == list(range(1, 13))
