"""Export Python's own English documentation (pydoc_data.topics) as the text corpus of a language
model trained in the DAG (config lm_training, corpus: pydoc_data).

Output: the corpus, one UTF-8 text file (dnc.lm.train.export_pydoc_corpus).
"""

from dnc.lm.train import export_pydoc_corpus
from dnc.logs import configure_logging

log = configure_logging(snakemake.log[0])
info = export_pydoc_corpus(snakemake.output.corpus)
if info["python"] != snakemake.params.python:
    log.warning("exported by Python %s, the workflow runs Python %s: another Python writes another corpus",
                info["python"], snakemake.params.python)
log.info("%s: %d characters in %d topics (Python %s)", snakemake.output.corpus, info["characters"],
         info["topics"], info["python"])
