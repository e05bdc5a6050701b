"""Models trained elsewhere, measured from their checkpoints (docs/models.md).

Modules (import them directly; this package imports nothing, so that the torch-free ones can be
used while Snakemake parses the workflow):

- build.py: build_model(spec, kwargs, seed) for torchvision:, timm: and python: specs;
  ModelSpecError.
- checkpoints.py: read_state_dict (.pt/.pth with weights_only=True, .safetensors, training
  checkpoint dicts, DataParallel/compile prefixes) and load_checkpoint (strict, clear mismatches).
- layers.py: node names and output shapes, the classifier, the "auto" layer choice, pooling and
  the width check.
- extract.py: extract_checkpoint, one checkpoint's pooled layer features written as feature files.
- files.py: checkpoint discovery and step parsing (torch-free).
- measure.py: the tidy metrics of a model experiment's feature files (node names, accuracy).
"""
