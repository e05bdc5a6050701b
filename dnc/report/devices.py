"""What each result was computed on: the ``dnc:device`` record that every Parquet output carries
(dnc.io; written by the process that computed it, docs/schemas.md), read from the report's input
files and shown per stage, one row per distinct device, torch build and determinism setting."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import pandas as pd

from dnc.io import DEVICE_KEY, read_metadata
from dnc.report.helpers import pick
from dnc.report.page import esc, table
from dnc.report.status import run_of

__all__ = ["STAGES", "DEVICE_COLUMNS", "read_devices", "render_device_section"]

# Report input key -> the stage (rule) that computed those files. A language model's metrics are
# computed by its measure_lm jobs; lm_metrics only gathers them, with their device record.
STAGES = {"histories": "dufm_train", "metrics": "dufm_measure", "comparisons": "dufm_measure",
          "verdicts": "dufm_measure", "net_histories": "train_network", "net_metrics": "compute_metrics",
          "net_comparisons": "compare_network", "net_verdicts": "compare_network",
          "analyses": "analyze_network / analyze_model", "rfm_metrics": "deep_rfm", "rfm_layers": "deep_rfm",
          "model_metrics": "model_metrics / measure_lm", "grams": "deep_rfm / analyze_network",
          "lm_histories": "train_lm"}
DEVICE_COLUMNS = ["stage", "run", "device", "name", "torch", "cuda", "deterministic", "tf32"]
UNRECORDED = "not recorded"  # a file written before dnc:device existed


def _tf32(flags: object) -> str:
    """'off' / 'on', or the flag of each of matmul and cuDNN where they differ."""
    if not isinstance(flags, Mapping):
        return UNRECORDED if flags is None else str(flags)
    values = set(map(bool, flags.values()))
    if len(values) == 1:
        return "on" if values.pop() else "off"
    return ", ".join(f"{k} {'on' if v else 'off'}" for k, v in flags.items())


def _cells(record: Mapping[str, object]) -> dict[str, str]:
    """The text of each column but stage and run, from one dnc:device record."""
    if not record:
        return dict.fromkeys(DEVICE_COLUMNS[2:], UNRECORDED)
    if "torch" not in record:  # the record of a process that never resolved a device
        return {"device": str(record.get("device", "cpu")), "name": "cpu", "torch": "", "cuda": "",
                "deterministic": "", "tf32": ""}
    det = record.get("deterministic")
    return {"device": str(record.get("device")), "name": str(record.get("name", "")),
            "torch": str(record["torch"]),
            "cuda": "none (CPU build)" if record.get("cuda") is None else str(record["cuda"]),
            "deterministic": UNRECORDED if det is None else ("yes" if det else "no"),
            "tf32": _tf32(record.get("tf32"))}


def read_devices(files: Mapping[str, Sequence[str]]) -> pd.DataFrame:
    """One row per (stage, run) and device record: columns DEVICE_COLUMNS, strings.

    Args:
        files: report input key (STAGES) -> the per-run files results/<stage>/<run>/<file> it reads.
    """
    rows = []
    for key, paths in files.items():
        for path in paths:
            try:
                record = read_metadata(path, DEVICE_KEY)
            except KeyError:
                record = {}
            rows.append({"stage": STAGES.get(key, key), "run": run_of(os.fspath(path)),
                         **_cells(record if isinstance(record, Mapping) else {})})
    return pd.DataFrame(rows, columns=DEVICE_COLUMNS).drop_duplicates(ignore_index=True)


def render_device_section(devices: pd.DataFrame) -> str:
    """The "Devices" section: per stage, each distinct device record with its number of runs and
    some of their ids; a note where one stage's results come from more than one device."""
    if devices.empty:
        return ""
    keys = [c for c in DEVICE_COLUMNS if c != "run"]
    rows = []
    for values, group in devices.groupby(keys, sort=True, dropna=False):
        runs = sorted(set(group["run"]))
        shown = ", ".join(pick(runs, 6)) + (f" ... ({len(runs)})" if len(runs) > 6 else "")
        rows.append({**dict(zip(keys, values)), "runs": len(runs), "run ids": shown})
    frame = pd.DataFrame(rows).rename(columns={"name": "GPU / CPU", "cuda": "CUDA",
                                               "deterministic": "deterministic algorithms", "tf32": "TF32"})
    mixed = sorted(stage for stage, g in devices.groupby("stage")
                   if len(g[["device", "name"]].drop_duplicates()) > 1)
    note = (f"<p class='note'><b>Mixed devices</b> in {esc(', '.join(mixed))}: results of one stage come "
            "from different devices, which agree only to rounding (docs/cluster.md, \"Determinism\").</p>"
            if mixed else "")
    return ("<h2>Devices</h2><p class='note'>What each result was computed on, from the "
            "<code>dnc:device</code> record of its files (docs/schemas.md): the device, the GPU, torch and "
            "its CUDA build, and the determinism settings in force. Stages that compute nothing with torch "
            "record the CPU only.</p>" + note + table(frame, text_cols=("run ids",)))
