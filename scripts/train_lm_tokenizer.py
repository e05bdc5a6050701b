"""Train the byte-level BPE tokenizer of a language model trained in the DAG on its corpus.

Output: tokenizer.json (dnc.lm.train.train_bpe_tokenizer).
"""

from dnc.lm.train import train_bpe_tokenizer
from dnc.logs import configure_logging

log = configure_logging(snakemake.log[0])
files, vocab_size = list(snakemake.input.corpus), snakemake.params.vocab_size
info = train_bpe_tokenizer(files, vocab_size, snakemake.output.tokenizer)
log.info("%s: %d tokens (asked %d) trained on %s in %.1f s", snakemake.output.tokenizer, info["vocab_size"],
         vocab_size, files, info["seconds"])
