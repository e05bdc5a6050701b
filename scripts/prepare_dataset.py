"""Write one dataset (train and test splits) as Parquet, the schema of docs/schemas.md."""

from dnc.data import DatasetSpec, prepare_dataset
from dnc.logs import configure_logging

log = configure_logging(snakemake.log[0])
spec = DatasetSpec(**snakemake.params.spec)
meta = prepare_dataset(spec, snakemake.output.dataset)
log.info("%s: shape %s, %d classes, counts %s", spec.name, meta["shape"], meta["num_classes"], meta["counts"])
