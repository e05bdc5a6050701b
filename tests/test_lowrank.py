"""The low-rank report section and config/lowrank.yaml: figures only where the config has runs for
them, aggregated (never one curve or one table row per run) when there are hundreds of runs."""

import re
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from conftest import dnc_construction, measured_state, objective_of

from dnc.config import dufm_batches, expand_dufm_runs
from dnc.dufm.compare import compare_run
from dnc.dufm.model import DUFMState
from dnc.report.dufm import render_dufm_section
from dnc.report.helpers import MAX_ROWS, run_groups
from dnc.report.lowrank import render_lowrank_section
from dnc.report.summary import config_frame
from dnc.settings import DUFMConfig
from dnc.theory import dnc_optimum, triangle_optimum

ROOT = Path(__file__).resolve().parents[1]
K, L, N_PER, LAM = 10, 4, 5, 4e-3


def _tables(tmp, state, name):
    """Metrics, history (3 rows) and verdict of an explicit K = 10, L = 4 point."""
    cfg = DUFMConfig(K=K, L=L, n=N_PER, width=state.H1.shape[0], lambda_H1=LAM, lambda_W=LAM, lr=1.0, steps=1)
    obj = objective_of(state, cfg)
    row = {"loss": obj.loss, "fit": obj.fit, "reg_H1": obj.reg_H1, "grad_norm": 0.0,
           **{f"reg_W{l + 1}": v for l, v in enumerate(obj.reg_W)}}
    history = pd.DataFrame([{**row, "step": 0, "loss": 0.5}, {**row, "step": 500, "loss": 0.2},
                            {**row, "step": 1000}])
    metrics, weights, _ = measured_state(tmp / f"{name}.parquet", state, run=name)
    settings = {"K": K, "L": L, "n": N_PER, "lambda_H1": LAM, "lambda_W": LAM}
    comparison, verdict = compare_run(name, settings, history.assign(run=name), metrics, weights)
    return metrics, history, comparison, verdict


@pytest.fixture(scope="module")
def points(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lowrank")
    tri = triangle_optimum(5, L, N_PER, LAM, LAM)
    low = DUFMState(H1=torch.tensor(tri.H1), W=[torch.tensor(W) for W in tri.W])
    full = dnc_construction(K, L, N_PER, 12, list(dnc_optimum(K, L, N_PER, LAM, LAM).mean_norms))
    return {"low-rank": _tables(tmp, low, "low"), "dnc": _tables(tmp, full, "full")}


def _fake(points, runs, kind_of):
    """Report inputs for the runs, each a copy of the low-rank or the DNC point (kind_of(settings))."""
    out = {"histories": [], "metrics": [], "comparisons": [], "verdicts": []}
    for rid, s in runs.items():
        metrics, history, comparison, verdict = points[kind_of(s)]
        for key, frame in zip(out, (history.assign(run=rid), metrics, comparison, verdict)):
            out[key].append(frame.assign(run=rid))
    return {k: pd.concat(v, ignore_index=True) for k, v in out.items()}


def _config(experiments):
    return {"dufm": {"defaults": {"K": K, "L": L, "n": N_PER, "width": 30, "lambda": LAM, "lr": 0.5,
                                  "steps": 1000}, "experiments": experiments}}


def test_points_are_classified_by_rank(points):
    assert points["low-rank"][3]["rank_verdict"].iloc[0] == "low-rank"
    assert points["dnc"][3]["rank_verdict"].iloc[0] == "dnc"


def test_section_is_empty_without_k3_l3_runs(points):
    runs = expand_dufm_runs({"dufm": {"defaults": {"K": 2, "L": 3, "n": 5, "width": 8, "lambda": LAM,
                                                   "lr": 0.5, "steps": 10}, "experiments": {"a": {}}}})
    t = _fake(points, runs, lambda s: "dnc")
    assert render_lowrank_section(config_frame(runs), t["histories"], t["metrics"], t["verdicts"]) == ""
    assert render_lowrank_section(pd.DataFrame(), t["histories"], t["metrics"], t["verdicts"]) == ""


def test_figures_appear_only_for_the_scans_the_config_has(points):
    runs = expand_dufm_runs(_config({"ref": {"seeds": [0, 1, 2]}}))
    t = _fake(points, runs, lambda s: "low-rank" if s["seed"] % 2 else "dnc")
    html = render_lowrank_section(config_frame(runs), t["histories"], t["metrics"], t["verdicts"])
    assert "(a) Loss against L_DNC and L_tri" in html and "(b) L_tri / L_DNC against r" in html
    assert "(c)" not in html and "(d)" not in html
    assert "NC1 is shown per layer at convergence rather than over training" in html
    assert html.count("<img") == 2


@pytest.fixture
def no_png(monkeypatch):
    """Figures built in full but neither laid out nor rasterised (about a second each)."""
    import matplotlib.figure

    import dnc.report.dufm
    import dnc.report.lowrank
    from dnc.report.page import plt

    def fake(fig):
        plt.close(fig)
        return "x"

    monkeypatch.setattr(dnc.report.dufm, "png", fake)
    monkeypatch.setattr(dnc.report.lowrank, "png", fake)
    monkeypatch.setattr(matplotlib.figure.Figure, "tight_layout", lambda self, *a, **k: None)


def test_scans_count_rank_verdicts_per_lambda_and_width(points, no_png):
    runs = expand_dufm_runs(_config({"lam": {"seeds": [0, 1], "grid": {"lambda": [0.002, 0.004, 0.008]}},
                                     "wid": {"seeds": [0, 1, 2], "grid": {"width": [10, 30, 128]}}}))
    t = _fake(points, runs, lambda s: "dnc" if s["width"] >= 100 or s["lambda_W"] < 3e-3 else "low-rank")
    html = render_lowrank_section(config_frame(runs), t["histories"], t["metrics"], t["verdicts"])
    assert "(c) Class-mean rank against weight decay" in html and "(d) Reaching DNC against width" in html
    assert html.count("<img") == 2 + 1 + 1 + 1  # (a) per experiment, (b), (c), (d)
    cells = re.findall(r"<tr><td>128</td><td>(\d+)</td><td>(\d+)</td><td>(\d+)</td>", html)
    assert cells == [("3", "3", "0")]  # width 128: 3 runs, 3 dnc, 0 low-rank
    cells = re.findall(r"<tr><td>0.008</td><td>(\d+)</td><td>(\d+)</td><td>(\d+)</td>", html)
    assert cells == [("2", "0", "2")]


def _outside_details(html: str) -> str:
    """The page text outside every <details> element (nested ones included)."""
    out, depth = [], 0
    for part in re.split(r"(<details>|</details>)", html):
        depth += part == "<details>"
        depth -= part == "</details>"
        if depth == 0 and part not in ("<details>", "</details>"):
            out.append(part)
    return "".join(out)


def test_lowrank_config_is_valid_big_and_batched():
    config = yaml.safe_load((ROOT / "config" / "lowrank.yaml").read_text())
    runs = expand_dufm_runs(config)
    assert len(runs) >= 500
    assert {s["K"] for s in runs.values()} == {10} and {s["L"] for s in runs.values()} == {4}
    batches = dufm_batches(config, runs)
    assert len(batches) <= 40  # one job per batch of one shape: a few dozen jobs, not hundreds
    lams = {s["lambda_W"] for s in runs.values() if s["experiment"] == "lowrank_lambda"}
    widths = {s["width"] for s in runs.values() if s["experiment"].startswith("lowrank_width")}
    assert len(lams) >= 8 and min(widths) == 10 and max(widths) == 256
    ref = [s for s in runs.values() if s["experiment"] == "lowrank_reference"]
    assert len(ref) == 10 and {(s["width"], s["lr"], s["lambda_W"]) for s in ref} == {(30, 0.5, LAM)}


def test_hundreds_of_runs_stay_readable(points, no_png):
    runs = expand_dufm_runs(yaml.safe_load((ROOT / "config" / "lowrank.yaml").read_text()))
    config = config_frame(runs)
    t = _fake(points, runs, lambda s: "low-rank" if s["width"] <= 30 and s["seed"] % 3 else "dnc")
    html = render_dufm_section(config, t["histories"], t["metrics"], t["comparisons"], t["verdicts"])
    html += render_lowrank_section(config, t["histories"], t["metrics"], t["verdicts"])
    visible = _outside_details(html)
    for tbl in re.findall(r"<table>.*?</table>", visible):
        assert tbl.count("<tr>") <= MAX_ROWS + 1
    assert html.count("<img") <= 12
    assert all(rid in html for rid in runs)  # every run is still named (inside <details>)
    assert run_groups(config).nunique() < 40


def _claims(rows):
    from dnc.report.claims import claims_table

    config = pd.DataFrame([{"run": r["run"], "experiment": r["exp"], "K": 10, "L": 4, "width": r["width"],
                            "lambda_H1": r["lam"]} for r in rows])
    verdicts = pd.DataFrame([{"run": r["run"], "regime": "nonzero optimum", "verdict": "dnc", "rel_gap": 0.0,
                              "rank_verdict": r["code"], "deciding_rank": r["rank"],
                              "min_hidden_rank_pre": r["rank"]} for r in rows])
    table = claims_table(config, verdicts, pd.DataFrame(), pd.DataFrame())
    return table.set_index("claim")


def test_lowrank_claims_follow_the_rank_verdicts():
    def run(exp, i, width, lam, code, rank):
        return {"run": f"{exp}{i}", "exp": exp, "width": width, "lam": lam, "code": code, "rank": rank}

    widths = [run("w", 0, 10, 0.004, "low-rank", 6), run("w", 1, 10, 0.004, "dnc", 10),
              run("w", 2, 50, 0.004, "dnc", 10), run("w", 3, 50, 0.004, "dnc", 10)]
    lams = [run("l", 0, 30, 0.001, "dnc", 10), run("l", 1, 30, 0.01, "low-rank", 4)]
    t = _claims(widths + lams)
    assert t.loc["K >= 3, L >= 3: low-rank solutions beat DNC at small width", "code"] == "holds"
    assert "1 of 2 runs low-rank" in t.loc["K >= 3, L >= 3: low-rank solutions beat DNC at small width",
                                           "evidence"]
    assert t.loc["The share of runs that reach DNC rises with width", "code"] == "holds"  # 0.5 -> 1
    assert t.loc["The class-mean rank falls as weight decay grows", "code"] == "holds"  # 10 -> 4
    flipped = [dict(r, code={"dnc": "low-rank", "low-rank": "dnc"}[r["code"]]) for r in widths]
    rising = [dict(lams[0], rank=4), dict(lams[1], rank=10)]
    t = _claims(flipped + rising)
    assert t.loc["The share of runs that reach DNC rises with width", "code"] == "does_not_hold"
    assert t.loc["The class-mean rank falls as weight decay grows", "code"] == "does_not_hold"
    assert _claims(widths[2:]).loc["The class-mean rank falls as weight decay grows", "code"] == "not_tested"
    # A saturated scan (all wide runs at DNC) does not count against the trend shown by another.
    wide = [run("v", 0, 128, 0.004, "dnc", 10), run("v", 1, 256, 0.004, "dnc", 10)]
    assert _claims(widths + wide).loc["The share of runs that reach DNC rises with width", "code"] == "holds"
    assert _claims(wide).loc["The share of runs that reach DNC rises with width", "code"] == "does_not_hold"
