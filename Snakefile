# dnc: deep neural collapse benchmark pipeline.
# DUFM training -> per-layer collapse metrics -> comparison with theory -> aggregated report.
from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config/config.yaml"


validate(config, "workflow/schemas/config.schema.yaml")


include: "workflow/rules/common.smk"
include: "workflow/rules/dufm.smk"
include: "workflow/rules/metrics.smk"
include: "workflow/rules/theory.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        get_final_outputs(),
    default_target: True
