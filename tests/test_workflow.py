"""End-to-end Snakemake runs of a tiny config: outputs, incremental reruns, config and run errors.

Snakemake runs in a subprocess on a copy of the workflow (robust across Snakemake 9.x, whose Python
API signatures move). Which jobs a change reruns is read from Snakemake's own dry-run output.
"""

import copy
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import wait_for_checkpoint

from dnc.dufm.compare import VERDICTS
from dnc.io import read_metadata
from dnc.theory import dnc_optimum

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

TINY = {
    "device": "cpu",
    "dufm": {
        "defaults": {"K": 2, "L": 2, "n": 4, "width": 6, "lambda_H1": 5e-3, "lambda_W": 5e-3,
                     "lr": 1.0, "steps": 40000, "tol": 1e-10, "log_every": 100, "seeds": [0]},
        "experiments": {
            "scan": {"grid": {"lambda": [0.005, 0.01]}},
            "other": {"L": 3, "lambda": 0.01, "init_std": 0.5},
        },
    },
    "datasets": {"blobs": {"name": "gaussian", "gaussian": {"K": 3, "dim": 5, "separation": 4.0, "n": 30}},
                 "other": {"name": "gaussian", "seed": 7,
                           "gaussian": {"K": 2, "dim": 5, "separation": 4.0, "n": 20}}},
    "networks": {
        "defaults": {"dataset": "blobs", "arch": "mlp", "mlp_widths": [16], "bias": True, "init_gain": 1.0,
                     "head_layers": 2, "head_width": 16, "loss": "mse", "optimizer": "sgd", "lr": 0.02,
                     "momentum": 0.9, "schedule": "cosine", "epochs": 4, "batch_size": 16,
                     "lambda_H1": 1e-4, "lambda_W": 1e-3, "weight_decay": 5e-4, "checkpoint_every": 1,
                     "feature_epochs": [1, 4], "seeds": [0]},
        "experiments": {"net": {"ood_dataset": "other"}},
    },
    "rfm": {"experiments": {"rfm": {"dataset": "blobs", "depth": 3, "width": 32,
                                    "grid": {"agop": [True, False]}}}},
}  # metrics and theory sections left out: their documented defaults apply


def workdir_copy(tmp: Path) -> Path:
    for name in ("Snakefile", "workflow", "scripts", "config", "examples"):
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp / name)
    return tmp


def snakemake(wd: Path, config: dict, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    (wd / "test-config.yaml").write_text(yaml.safe_dump(config))
    # --configfile takes several values: everything else goes before it.
    cmd = [sys.executable, "-m", "snakemake", "--directory", str(wd), "--snakefile",
           str(wd / "Snakefile"), "--cores", "2", "--workflow-profile", "none", *args,
           "--configfile", str(wd / "test-config.yaml")]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


def planned_jobs(wd: Path, config: dict) -> set[tuple[str, str]]:
    """(rule, run) pairs of a dry run; run is '' for rules without a run wildcard."""
    out = snakemake(wd, config, "-n")
    assert out.returncode == 0, out.stderr
    text = out.stdout + out.stderr
    jobs = set()
    for block in re.split(r"\n(?=rule \w+:)", text)[1:]:
        rule = re.match(r"rule (\w+):", block).group(1)
        run = re.search(r"wildcards: run=(\S+)", block)
        jobs.add((rule, run.group(1) if run else ""))
    return jobs


def train_job(batch: str) -> tuple[str, str]:
    """The training job of a DUFM batch."""
    return ("dufm_train_" + re.sub(r"\W", "_", batch), "")


def measure_job(experiment: str) -> tuple[str, str]:
    """The job that measures a DUFM experiment's runs and compares them with theory."""
    return ("dufm_measure_" + experiment, "")


REPORT = {("build_report", ""), ("all", "")}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    wd = workdir_copy(tmp_path_factory.mktemp("wf"))
    out = snakemake(wd, TINY)
    assert out.returncode == 0, out.stderr[-3000:]
    return wd


def test_full_run_writes_report_and_tables(finished):
    report = finished / "results" / "report"
    html = (report / "index.html").read_text()
    assert html.count("data:image/png;base64,") >= 2 and "Claims tested by this run" in html
    summary = pd.read_parquet(report / "summary.parquet")
    assert set(summary["run"]) == {"scan-lambda0.005-s0", "scan-lambda0.01-s0", "other-s0", "net-s0",
                                   "rfm-agopTrue-s0", "rfm-agopFalse-s0"}
    for col in ("layer", "representation", "split", "step", "metric", "value", "convention",
                "K", "L", "lambda_H1", "lambda_W", "seed", "verdict", "L_DNC"):
        assert col in summary.columns, col
    assert set(summary.loc[summary["kind"] != "rfm", "verdict"]) <= set(VERDICTS)
    assert set(summary["kind"]) == {"dufm", "network", "rfm"}
    rfm = summary[summary["kind"] == "rfm"]
    assert set(rfm["representation"]) == {"input", "projected", "mapped"} and set(rfm["layer"]) == {1, 2, 3}
    assert set(rfm["split"]) == {"train", "test"}
    assert "Deep Recursive Feature Machines" in html and "Without the AGOP (M = I)" in html
    net = summary[summary["run"] == "net-s0"]
    assert set(net["split"]) == {"train", "test", "ood"} and set(net["step"]) == {1, 4}
    # NC5 of the OOD dataset against the train class means, at every layer and feature epoch.
    nc5 = net[(net["split"] == "ood") & (net["metric"] == "nc5")]
    reps = net.loc[net["split"] == "train", ["layer", "representation"]].drop_duplicates()
    assert len(nc5) == 2 * len(reps)
    assert nc5["value"].between(0, 1).all()
    assert "NC5: out-of-distribution features move towards orthogonality" in html
    assert "Trained networks with a DUFM head" in html
    analysis = pd.read_parquet(finished / "results/analysis/net-s0/analysis.parquet")
    assert set(analysis["representation"]) == {"input", "svd", "layer", "agop", "weights"}
    assert set(analysis["step"]) == {1, 4} and set(analysis["layer"]) == {1, 2}
    hist = pd.read_parquet(finished / "results/dufm/other-s0/history.parquet")
    assert {"loss", "fit", "reg_H1", "reg_W1", "reg_W2", "reg_W3", "grad_norm"} <= set(hist.columns)
    assert not list(finished.rglob("*.tmp"))


def test_every_output_records_its_device_and_the_report_lists_them(finished):
    """Each stage's Parquet outputs carry dnc:device from the process that computed them
    (docs/schemas.md): TINY's device, the CPU, with the settings of configure_determinism in the
    stages that compute with torch; stages that never resolve a device record the CPU alone. The
    report's Devices section lists each stage."""
    res = finished / "results"
    features = sorted((res / "nets/net-s0/features").glob("*.parquet"))
    determined = [res / "dufm/other-s0/history.parquet", res / "dufm/other-s0/features.parquet",
                  res / "metrics/other-s0/metrics.parquet", res / "theory/other-s0/verdict.parquet",
                  res / "nets/net-s0/history.parquet", res / "nets/net-s0/objective.parquet",
                  res / "metrics/net-s0/metrics.parquet", *features]
    for path in determined:
        record = read_metadata(path, "dnc:device")
        assert record["device"] == "cpu" and record["deterministic"] is True, (path, record)
        assert record["tf32"] == {"matmul": False, "cudnn": False} and record["torch"] == torch.__version__
    for path in (res / "analysis/net-s0/analysis.parquet", res / "metrics/rfm-agopTrue-s0/metrics.parquet"):
        assert read_metadata(path, "dnc:device")["device"] == "cpu", path
    for path in (res / "datasets/blobs.parquet", res / "theory/net-s0/verdict.parquet",
                 res / "report/summary.parquet"):
        assert read_metadata(path, "dnc:device") == {"device": "cpu"}, path  # no device resolved there
    html = (res / "report/index.html").read_text()
    section = html[html.index("<h2>Devices</h2>"):]
    for stage in ("dufm_train", "dufm_measure", "train_network", "compute_metrics", "compare_network",
                  "analyze_network / analyze_model", "deep_rfm"):
        assert f"<td>{stage}</td>" in section, stage
    assert "Mixed devices" not in section


def test_k2_runs_reach_the_closed_form_optimum_end_to_end(finished):
    """The pipeline's verdict on the tiny K = 2 runs: the closed-form optimum, loss within 1e-7."""
    for run, lam, L in (("scan-lambda0.005-s0", 0.005, 2), ("scan-lambda0.01-s0", 0.01, 2),
                        ("other-s0", 0.01, 3)):
        verdict = pd.read_parquet(finished / f"results/theory/{run}/verdict.parquet").iloc[0]
        final = pd.read_parquet(finished / f"results/dufm/{run}/history.parquet")["loss"].iloc[-1]
        opt = dnc_optimum(2, L, 4, lam, lam)
        assert verdict["verdict"] == "global_optimum", (run, verdict["verdict_text"])
        assert abs(final - opt.loss) / opt.loss < 1e-7, run


def test_report_names_every_run_and_verdict_and_summary_is_tidy(finished):
    html = (finished / "results/report/index.html").read_text()
    summary = pd.read_parquet(finished / "results/report/summary.parquet")
    for run in summary["run"].unique():
        assert run in html
        if not run.startswith("rfm-"):  # Deep RFM runs have no theory verdict
            text = pd.read_parquet(finished / f"results/theory/{run}/verdict.parquet")["verdict_text"].iloc[0]
            assert text in html
    key = ["run", "layer", "representation", "split", "step", "metric"]
    assert not summary.duplicated(key).any()
    tables = finished.glob("results/metrics/*/metrics.parquet")
    assert len(summary) == sum(len(pd.read_parquet(f)) for f in tables)


def test_nothing_to_do_after_a_full_run(finished):
    assert planned_jobs(finished, TINY) == set()


def test_changing_one_setting_reruns_only_its_run(finished):
    cfg = copy.deepcopy(TINY)
    cfg["dufm"]["experiments"]["other"]["lambda"] = 0.006
    assert planned_jobs(finished, cfg) == {train_job("other-s0"), measure_job("other")} | REPORT


def _reordered(value):
    """The same config with the keys of every mapping, at every level, in reverse order."""
    if isinstance(value, dict):
        return {k: _reordered(value[k]) for k in reversed(list(value))}
    return [_reordered(v) for v in value] if isinstance(value, list) else value


def test_reordering_or_respelling_config_keys_reruns_nothing(finished):
    """Snakemake compares params by their repr: canonical params make key order irrelevant, and an
    int written for a float setting (lr: 1 for 1.0) is the same setting."""
    cfg = _reordered(copy.deepcopy(TINY))
    assert list(cfg["datasets"]["blobs"]) == ["gaussian", "name"]  # the reordering is real
    cfg["dufm"]["defaults"]["lr"] = 1
    assert planned_jobs(finished, cfg) <= REPORT


def test_metric_setting_reruns_measurement_never_training(finished, tmp_path):
    """A metric convention change: the DUFM batches are measured again from their files on disk and
    the networks' metrics and analysis recomputed; no training or extraction output is touched."""
    wd = tmp_path / "wf"
    shutil.copytree(finished, wd)  # copy2 keeps the mtimes that Snakemake compares
    cfg = copy.deepcopy(TINY)
    cfg["metrics"] = {"convention": {"global_mean": "samples"}}
    assert planned_jobs(wd, cfg) == {measure_job("scan"), measure_job("other")} | REPORT | {
        ("compute_metrics", "net-s0"), ("compare_network", "net-s0"), ("analyze_network", "net-s0"),
        ("deep_rfm", "rfm-agopTrue-s0"), ("deep_rfm", "rfm-agopFalse-s0")}
    trained = sorted([*wd.glob("results/dufm/*/*.parquet"), *wd.glob("results/nets/*/*.parquet"),
                      *wd.glob("results/nets/*/snapshots/*"), *wd.glob("results/nets/*/features/*")])
    before = {f: f.stat().st_mtime_ns for f in trained}
    old = pd.read_parquet(wd / "results/metrics/other-s0/metrics.parquet")
    out = snakemake(wd, cfg)
    assert out.returncode == 0, out.stderr[-3000:]
    assert {f: f.stat().st_mtime_ns for f in trained} == before
    new = pd.read_parquet(wd / "results/metrics/other-s0/metrics.parquet")
    assert "muG=classes" in old["convention"].iloc[0] and "muG=samples" in new["convention"].iloc[0]
    assert planned_jobs(wd, cfg) == set()


def test_changing_one_grid_value_trains_only_that_point(finished):
    cfg = copy.deepcopy(TINY)
    cfg["dufm"]["experiments"]["scan"]["grid"]["lambda"] = [0.005, 0.02]
    assert planned_jobs(finished, cfg) == {train_job("scan-lambda0.02-s0"), measure_job("scan")} | REPORT


def test_adding_a_seed_trains_only_the_new_run(finished):
    cfg = copy.deepcopy(TINY)
    cfg["dufm"]["experiments"]["other"]["seeds"] = [0, 1]
    assert planned_jobs(finished, cfg) == {train_job("other-s1"), measure_job("other")} | REPORT


@pytest.mark.parametrize(
    "path,value,expected",
    [
        (("dufm", "defaults", "widht"), 8, "widht"),
        (("dufm", "defaults", "K"), "two", "K"),
        (("dufm", "experiments", "scan", "optimizer"), "sgd", "optimizer"),
        (("metrics", "convention", "global_mean"), "median", "global_mean"),
    ],
)
def test_schema_errors_name_the_key(tmp_path, path, value, expected):
    wd = workdir_copy(tmp_path)
    cfg = copy.deepcopy(TINY)
    node = cfg
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value
    out = snakemake(wd, cfg, "-n")
    assert out.returncode != 0
    assert expected in out.stderr + out.stdout
    assert not (wd / "results").exists()


def test_inconsistent_lambda_names_the_experiment(tmp_path):
    wd = workdir_copy(tmp_path)
    cfg = copy.deepcopy(TINY)
    cfg["dufm"]["experiments"]["other"] = {"L": 3, "lambda_W": [0.1, 0.1]}
    out = snakemake(wd, cfg, "-n")
    assert out.returncode != 0
    assert "dufm.experiments.other (run other-s0): lambda_W: 2 values for L = 3" in out.stderr + out.stdout


def test_diverged_run_is_a_result_and_a_failed_job_leaves_a_partial_report(tmp_path):
    """lr 1e6 diverges: the job succeeds with verdict "diverged" at the step where the loss became
    non-finite; a network whose dataset cannot be read fails for real, --keep-going finishes the
    rest and the report is built from what finished, listing the missing run and its files."""
    wd = workdir_copy(tmp_path)
    cfg = copy.deepcopy(TINY)
    cfg["dufm"]["experiments"] = {"boom": {"lr": 1.0e6, "log_every": 1},
                                  "fine": {"steps": 300}}
    cfg["datasets"]["absent"] = {"name": "mnist", "root": str(tmp_path / "no-such-folder")}
    cfg["networks"]["experiments"] = {"net": {}, "lost": {"dataset": "absent"},
                                      "wild": {"lr": 1.0e6, "feature_epochs": [0, 4]}}
    cfg.pop("rfm")
    out = snakemake(wd, cfg, "--keep-going")
    assert out.returncode != 0  # the failed dataset job is still an error
    assert "Error in rule prepare_dataset" in out.stdout + out.stderr

    verdict = pd.read_parquet(wd / "results/theory/boom-s0/verdict.parquet").iloc[0]
    history = pd.read_parquet(wd / "results/dufm/boom-s0/history.parquet")
    assert verdict["verdict"] == "diverged"
    finite = np.isfinite(history["loss"]) & np.isfinite(history["grad_norm"])
    first_bad = int(history.loc[~finite, "step"].iloc[0])
    assert verdict["steps"] == first_bad == int(history["step"].iloc[-1])  # stopped there
    assert pd.read_parquet(wd / "results/metrics/boom-s0/metrics.parquet").empty  # nothing measured
    assert pd.read_parquet(wd / "results/theory/fine-s0/verdict.parquet")["verdict"].iloc[0] != "diverged"

    # A diverged network: measured at the feature epochs it reached (0), verdict "diverged".
    net_history = pd.read_parquet(wd / "results/nets/wild-s0/history.parquet")
    assert not np.isfinite(net_history["train_loss"].iloc[-1])
    net_verdict = pd.read_parquet(wd / "results/theory/wild-s0/verdict.parquet").iloc[0]
    assert net_verdict["verdict"] == "diverged" and net_verdict["steps"] == net_history["epoch"].iloc[-1]
    assert set(pd.read_parquet(wd / "results/metrics/wild-s0/metrics.parquet")["step"]) == {0}
    assert set(pd.read_parquet(wd / "results/analysis/wild-s0/analysis.parquet")["step"]) == {0}

    # The partial report stands beside the real one, never at its path.
    assert not (wd / "results/report/index.html").exists()
    html = (wd / "results/report/partial/index.html").read_text()
    assert "Incomplete report: 1 run(s) did not finish" in html
    assert "lost-s0" in html and "results/nets/lost-s0/history.parquet" in html
    assert "Diverged DUFM runs" in html and "boom-s0" in html
    assert "Diverged network runs" in html and "wild-s0" in html
    summary = pd.read_parquet(wd / "results/report/partial/summary.parquet")
    assert {"fine-s0", "net-s0"} <= set(summary["run"])
    assert not {"lost-s0", "boom-s0", "wild-s0"} & set(summary["run"])

    # The same invocation again (say, once the data is in place) plans the failed chain and the
    # report, not "Nothing to be done".
    assert planned_jobs(wd, cfg) == {("prepare_dataset", ""), ("train_network", "lost-s0"),
                                     ("extract_features", "lost-s0"), ("compute_metrics", "lost-s0"),
                                     ("compare_network", "lost-s0"), ("analyze_network", "lost-s0")} | REPORT


def test_no_partial_report_when_switched_off(tmp_path):
    wd = workdir_copy(tmp_path)
    cfg = copy.deepcopy(TINY)
    cfg["partial_report"] = False
    cfg["dufm"]["experiments"] = {"fine": {"steps": 100}}
    cfg["datasets"]["absent"] = {"name": "mnist", "root": str(tmp_path / "no-such-folder")}
    cfg["networks"]["experiments"] = {"lost": {"dataset": "absent"}}
    cfg.pop("rfm")
    out = snakemake(wd, cfg, "--keep-going")
    assert out.returncode != 0
    assert (wd / "results/theory/fine-s0/verdict.parquet").exists()
    assert not (wd / "results/report/index.html").exists()
    assert not (wd / "results/report/partial").exists()


def test_network_setting_change_reruns_only_the_network_chain(finished):
    cfg = copy.deepcopy(TINY)
    net = cfg["networks"]["experiments"]["net"]
    cfg["networks"]["experiments"]["net"] = {**net, "lr": 0.03}
    assert planned_jobs(finished, cfg) == {("train_network", "net-s0"), ("extract_features", "net-s0"),
                                           ("compute_metrics", "net-s0"), ("compare_network", "net-s0"),
                                           ("analyze_network", "net-s0")} | REPORT
    cfg["networks"]["experiments"]["net"] = {**net, "agop_samples": 20}  # analysis only: no retraining
    assert planned_jobs(finished, cfg) == {("analyze_network", "net-s0")} | REPORT
    cfg["networks"]["experiments"]["net"] = {}  # no OOD dataset: extraction onwards, not training
    assert planned_jobs(finished, cfg) == {("extract_features", "net-s0"), ("compute_metrics", "net-s0"),
                                           ("compare_network", "net-s0")} | REPORT


def test_paper_config_plans_the_right_jobs(tmp_path):
    wd = workdir_copy(tmp_path)
    paper = yaml.safe_load((ROOT / "config" / "paper.yaml").read_text())
    out = snakemake(wd, paper, "-n")
    assert out.returncode == 0, out.stderr[-2000:]
    counts = dict(re.findall(r"^(\w+)\s+(\d+)$", out.stdout, flags=re.M))
    n_dufm = 10 * (3 + 4)
    batch_jobs = sum(int(n) for rule, n in counts.items() if rule.startswith("dufm_train_"))
    measure_jobs = sum(int(n) for rule, n in counts.items() if rule.startswith("dufm_measure_"))
    assert measure_jobs == len(paper["dufm"]["experiments"])  # one per experiment
    # networks: resnet20_head on 2 datasets, the AGOP paper's MLP and ResNet-18 on 3 each
    assert counts["prepare_dataset"] == "8" and counts["train_network"] == "8"
    # seeds x (mnist, svhn, cifar cos with and without AGOP, cifar relu, mnist cos with and without)
    assert counts["deep_rfm"] == str(3 * (2 + 2 + 2 + 1 + 2))
    assert batch_jobs == n_dufm // 10 and counts["compare_network"] == "8"  # batches of 10 runs
    assert "--gpus" not in out.stdout  # local dry run: a resource (test_local_gpu_jobs_declare_one_gpu_each)


def _killed_then_resumed(tmp_path, cfg) -> tuple[str, pd.DataFrame]:
    """Start the training job, SIGKILL the whole Snakemake process group mid-training, rerun."""
    import os
    import signal

    import torch

    wd = workdir_copy(tmp_path)
    (wd / "test-config.yaml").write_text(yaml.safe_dump(cfg))
    target = "results/nets/slow-s0/history.parquet"

    def cmd(*extra: str) -> list[str]:
        return [sys.executable, "-m", "snakemake", "--directory", str(wd), "--snakefile",
                str(wd / "Snakefile"), "--cores", "1", "--workflow-profile", "none", *extra,
                "--configfile", str(wd / "test-config.yaml")]

    proc = subprocess.Popen(cmd(target), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    last = wd / "results/nets/slow-s0/resume/last.pt"
    wait_for_checkpoint(proc, last, 2, timeout=120, poll=0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = torch.load(last, weights_only=True)["epoch"]
    assert not (wd / target).exists()

    # What a user does after a crash: unlock, then rerun the incomplete job.
    subprocess.run(cmd("--unlock"), check=True, capture_output=True, timeout=120)
    out = subprocess.run(cmd("--rerun-incomplete", target), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    log = (wd / "logs/train_network/slow-s0.log").read_text()
    assert f"resumed after epoch {killed_at}" in log
    return log, pd.read_parquet(wd / target)


def test_killed_training_job_resumes_from_its_checkpoint(tmp_path):
    cfg = copy.deepcopy(TINY)
    cfg["dufm"]["experiments"] = {}
    cfg.pop("rfm")
    cfg["datasets"] = {"big": {"name": "gaussian", "standardize": True,
                               "gaussian": {"K": 4, "dim": 64, "separation": 3.0,
                                                                 "n": 1500}}}
    cfg["networks"]["experiments"] = {"slow": {"dataset": "big", "epochs": 12, "mlp_widths": [256, 256],
                                               "lambda_H1": 1e-6, "lr": 0.01,
                                               "head_width": 64, "feature_epochs": [12]}}
    (tmp_path / "killed").mkdir()
    (tmp_path / "clean").mkdir()
    _, resumed = _killed_then_resumed(tmp_path / "killed", cfg)
    clean = workdir_copy(tmp_path / "clean")
    out = snakemake(clean, cfg, "results/nets/slow-s0/history.parquet")
    assert out.returncode == 0, out.stderr[-2000:]
    reference = pd.read_parquet(clean / "results/nets/slow-s0/history.parquet")
    assert list(resumed["epoch"]) == list(range(1, 13))
    pd.testing.assert_frame_equal(resumed, reference)  # as if never interrupted


def test_ctrl_c_then_the_same_command_resumes_training(tmp_path):
    """Ctrl-C during a run (SIGINT to the whole foreground process group, as a terminal sends it):
    Snakemake stops cleanly and leaves a partial report beside the real one; the same command
    again resumes the training from its checkpoint and finishes the report."""
    import os
    import signal

    cfg = copy.deepcopy(TINY)
    cfg["dufm"]["experiments"] = {}
    cfg.pop("rfm")
    cfg["datasets"] = {"big": {"name": "gaussian", "standardize": True,
                               "gaussian": {"K": 4, "dim": 64, "separation": 3.0, "n": 1500}}}
    cfg["networks"]["experiments"] = {"slow": {"dataset": "big", "epochs": 12, "mlp_widths": [256, 256],
                                               "lambda_H1": 1e-6, "lr": 0.01, "head_width": 64,
                                               "feature_epochs": [12]}}
    wd = workdir_copy(tmp_path)
    (wd / "test-config.yaml").write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "snakemake", "--directory", str(wd), "--snakefile", str(wd / "Snakefile"),
           "--cores", "1", "--workflow-profile", "none", "--configfile", str(wd / "test-config.yaml")]
    # A shell that starts the tests in the background (`make test &`) ignores SIGINT, and an ignored
    # signal stays ignored across exec: give Snakemake the terminal's default back.
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    wait_for_checkpoint(proc, wd / "results/nets/slow-s0/resume/last.pt", 2, timeout=120, poll=0.05)
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=120) != 0
    assert not (wd / "results/report/index.html").exists()
    assert (wd / "results/report/partial/index.html").exists()  # written by the onerror hook

    assert ("train_network", "slow-s0") in planned_jobs(wd, cfg)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "resumed after epoch" in (wd / "logs/train_network/slow-s0.log").read_text()
    assert (wd / "results/report/index.html").exists()
    assert not (wd / "results/report/partial").exists()  # the stale partial report is gone


def test_snakemakes_own_report_holds_the_project_page(finished):
    out = snakemake(finished, TINY, "--report", str(finished / "snakemake_report.html"))
    assert out.returncode == 0, out.stderr[-2000:]
    page = (finished / "snakemake_report.html").read_text()
    assert "index.html" in page and "summary.parquet" in page


def test_snakemake_lint_finds_nothing_but_the_missing_conda_envs(tmp_path):
    """`snakemake --lint` on the default config (run by `make lint`). The one lint allowed: no
    conda env or container per rule, since the project installs one venv for every rule."""
    wd = workdir_copy(tmp_path)
    cmd = [sys.executable, "-m", "snakemake", "--directory", str(wd), "--snakefile", str(wd / "Snakefile"),
           "--workflow-profile", "none", "--lint"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    text = out.stdout + out.stderr
    assert "Traceback" not in text, text[-3000:]
    titles = set(re.findall(r"^\s+\* (.+?):$", text, flags=re.M))
    assert titles <= {"Specify a conda environment or container for each rule."}, text[-3000:]
    assert "Lints for rule build_report" in text or out.returncode == 0  # the linter did run


def test_parsing_the_workflow_imports_no_torch_and_no_plotting(tmp_path):
    """Snakemake parses the workflow on every invocation (and on a cluster's login node): the
    modules common.smk imports stay free of torch and matplotlib (python -X importtime lists
    every module the parsing process imported)."""
    wd = workdir_copy(tmp_path)
    cmd = [sys.executable, "-X", "importtime", "-m", "snakemake", "--directory", str(wd), "--snakefile",
           str(wd / "Snakefile"), "--workflow-profile", "none", "-n"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    imported = {line.split("|")[-1].strip() for line in out.stderr.splitlines()
                if line.startswith("import time:")}
    assert "dnc.config" in imported and "dnc.paths" in imported  # the listing is real
    assert not {m for m in imported if m.split(".")[0] in ("torch", "matplotlib", "torchvision")}


# The rules of TINY whose jobs compute on the config's device (params device=...).
DEVICE_RULES = {"dufm_train", "dufm_measure", "train_network", "extract_features", "compute_metrics",
                "analyze_network", "deep_rfm"}


def planned_gpus(wd: Path, config: dict, env: dict) -> dict[str, set[int]]:
    """Rule (a DUFM batch's rule as dufm_train / dufm_measure) -> the gpu resources of its planned jobs."""
    out = snakemake(wd, config, "-n", env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    gpus: dict[str, set[int]] = {}
    for block in re.split(r"\n(?=rule \w+:)", out.stdout + out.stderr)[1:]:
        rule = re.sub(r"^(dufm_train|dufm_measure)_.*", r"\1", re.match(r"rule (\w+):", block).group(1))
        gpu = re.search(r"resources: .*\bgpu=(\d+)", block)
        gpus.setdefault(rule, set()).add(int(gpu.group(1)) if gpu else 0)
    return gpus


def test_local_gpu_jobs_declare_one_gpu_each(tmp_path, monkeypatch):
    """On a machine with GPUs (here a stand-in nvidia-smi listing two, read where the driver has no
    /proc entries) every local job that computes on the device asks for one GPU and no other job
    does, so that make run's --resources gpu=N runs N of them at once, each on its own GPU; with
    device cpu none asks; a pinned cuda:0 takes every GPU (its jobs share that one GPU)."""
    from dnc.device import local_gpus

    fake = tmp_path / "bin" / "nvidia-smi"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'GPU 0: A (UUID: GPU-a)'\necho 'GPU 1: B (UUID: GPU-b)'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    machine = local_gpus()  # what the workflow counts in the same environment
    if machine == 0:
        pytest.skip("CUDA_VISIBLE_DEVICES hides every GPU")
    (tmp_path / "wd").mkdir()
    wd, env = workdir_copy(tmp_path / "wd"), dict(os.environ)
    for device, expected in (("auto", 1), ("cuda", 1), ("cpu", 0), ("cuda:0", machine)):
        gpus = planned_gpus(wd, {**TINY, "device": device}, env)
        assert DEVICE_RULES < set(gpus)
        assert {r: g for r, g in gpus.items() if r in DEVICE_RULES} == dict.fromkeys(DEVICE_RULES, {expected})
        assert all(g == {0} for r, g in gpus.items() if r not in DEVICE_RULES), (device, gpus)
