"""Write one dataset (train and test splits) as Parquet, the schema of docs/schemas.md: image and
vector datasets one row per sample (dnc.data), text datasets one row per token window (dnc.lm.corpus)."""

from dnc.data import TextSpec, make_spec, prepare_dataset
from dnc.logs import configure_logging

log = configure_logging(snakemake.log[0])
spec = make_spec(snakemake.params.spec)
if isinstance(spec, TextSpec):
    from dnc.lm.corpus import prepare_text_dataset

    meta = prepare_text_dataset(spec, snakemake.output.dataset)
    log.info("%s: %d tokens in %d train and %d test windows of %d, %d label classes in train",
             spec.path, meta["tokens"], meta["windows"]["train"], meta["windows"]["test"], spec.context,
             meta["num_classes"])
else:
    meta = prepare_dataset(spec, snakemake.output.dataset)
    log.info("%s: shape %s, %d classes, counts %s", spec.name, meta["shape"], meta["num_classes"],
             meta["counts"])
