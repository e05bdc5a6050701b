"""Run Deep RFM on a prepared dataset and measure every layer with the shared metrics engine.

Outputs: metrics (tidy, docs/schemas.md; step 0), layers (one row per layer: dims, seconds, AGOP
scale) and a features folder (layer representations per split, only when write_features is set).
"""

from pathlib import Path

import torch

from dnc.data import read_split
from dnc.io import write_features, write_parquet
from dnc.layout import rfm_feature_file
from dnc.logs import configure_logging
from dnc.metrics import Convention
from dnc.rfm.stage import feature_columns, layer_table, rfm_metrics, run_rfm
from dnc.settings import RFMConfig

log = configure_logging(snakemake.log[0])
run_id, p, out, inp = snakemake.wildcards.run, snakemake.params, snakemake.output, snakemake.input
torch.set_num_threads(snakemake.threads)

cfg = RFMConfig.from_settings(p.settings, device=p.device)
splits = {s: read_split(inp.dataset, s) for s in ("train", "test")}
meta = splits["train"][2]
log.info("Deep RFM %s on %s: %s", run_id, meta["name"], cfg)
data = {s: (X.numpy(), y.numpy()) for s, (X, y, _) in splits.items()}
layers, labels = run_rfm(cfg, data["train"], data["test"], meta["num_classes"])
table = rfm_metrics(layers, labels, run_id, Convention(**p.convention))
nc1 = table[(table["metric"] == "nc1_trace") & (table["split"] == "train")]
log.info("NC1 (trace) per layer and representation:\n%s", nc1.pivot(index="layer", columns="representation",
                                                                       values="value").to_string())
Path(out.features).mkdir(parents=True, exist_ok=True)  # declared output: exists, empty when off
for split in ("train", "test") if cfg.write_features else ():
    write_features(rfm_feature_file(out.features, split), labels[split], feature_columns(layers, split))
write_parquet(table, out.metrics, {"dnc:config": p.settings, "dnc:run": run_id})
write_parquet(layer_table(layers, run_id), out.layers, {"dnc:config": p.settings, "dnc:run": run_id})
