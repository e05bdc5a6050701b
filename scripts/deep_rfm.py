"""Run Deep RFM on a prepared dataset and measure every layer with the shared metrics engine.

Outputs: metrics (tidy, docs/schemas.md; step 0), layers (one row per layer: dims, seconds, AGOP
scale), grams (Gram matrices of the chosen layers, at most 1,000 train rows) and a features folder
(layer representations per split, only when write_features is set).
Each layer is measured on the compute device as it is made; a run whose memory estimate exceeds
the device's free memory, or host RAM within the job's mem_mb, is refused before layer 1.
"""

from pathlib import Path

import torch

from dnc.data import read_split
from dnc.device import configure_determinism
from dnc.io import write_features, write_parquet
from dnc.layout import rfm_feature_file
from dnc.logs import configure_logging
from dnc.metrics import Convention
from dnc.rfm.stage import feature_columns, layer_table, run_rfm
from dnc.settings import RFMConfig

log = configure_logging(snakemake.log[0])
configure_determinism()  # before anything starts CUDA
run_id, p, out, inp = snakemake.wildcards.run, snakemake.params, snakemake.output, snakemake.input
torch.set_num_threads(snakemake.threads)

cfg = RFMConfig.from_settings(p.settings, device=p.device)
splits = {s: read_split(inp.dataset, s) for s in ("train", "test")}
meta = splits["train"][2]
log.info("Deep RFM %s on %s: %s", run_id, meta["name"], cfg)
data = {s: (X.numpy(), y.numpy()) for s, (X, y, _) in splits.items()}
# The job's own memory limit (Snakemake's mem_mb, MB = 10^6 bytes; also what --set-resources
# gives), read from the resources rather than a param so that changing it reruns nothing.
mem_mb = getattr(snakemake.resources, "mem_mb", None)
res = run_rfm(cfg, data["train"], data["test"], meta["num_classes"], run_id, Convention(**p.convention),
              host_limit=None if mem_mb is None else int(mem_mb) * 10**6,
              on_layer=lambda rec: log.info("layer %d of %d: %.1f s", rec.layer, cfg.depth, rec.seconds))
table = res.metrics
nc1 = table[(table["metric"] == "nc1_trace") & (table["split"] == "train")]
log.info("NC1 (trace) per layer and representation:\n%s", nc1.pivot(index="layer", columns="representation",
                                                                       values="value").to_string())
Path(out.features).mkdir(parents=True, exist_ok=True)  # declared output: exists, empty when off
for split in ("train", "test") if cfg.write_features else ():
    write_features(rfm_feature_file(out.features, split), res.labels[split],
                   feature_columns(res.layers, split))
write_parquet(table, out.metrics, {"dnc:config": p.settings, "dnc:run": run_id})
write_parquet(layer_table(res.layers, run_id), out.layers, {"dnc:config": p.settings, "dnc:run": run_id})
write_parquet(res.grams, out.grams, {"dnc:config": p.settings, "dnc:run": run_id})
