"""Causal language models: token-level collapse with the vocabulary as the classes
(docs/language_models.md).

files: the corpus, tokenizer and model files, found without torch (the workflow parses with it);
corpus: the text dataset (tokens cut into windows, written as Parquet); hf: loading a local
Hugging Face causal LM and its output embedding; measure: per-layer collapse metrics of every
hidden state in two streaming passes of the model (no feature files); train: the byte-level BPE
tokenizer and the small GPT-2 that config/lm.yaml trains inside the DAG.
"""
