# dnc: deep neural collapse benchmark pipeline.
# DUFM, network and Deep RFM runs -> per-layer collapse metrics -> comparison with theory -> report.
from snakemake.utils import min_version, validate

min_version("9.0")


# The embedded default, unless the user passes --configfile (which then replaces it whole
# instead of being merged into it); --config key=value still overrides single keys.
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"



validate(config, "workflow/schemas/config.schema.yaml")


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/dufm.smk"
include: "workflow/rules/metrics.smk"
include: "workflow/rules/theory.smk"
include: "workflow/rules/nets.smk"
include: "workflow/rules/rfm.smk"
include: "workflow/rules/analysis.smk"
include: "workflow/rules/models.smk"
include: "workflow/rules/lm.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        get_final_outputs(),
    default_target: True


# A failed job (with --keep-going, after the others finished): report what did finish.
onerror:
    build_partial_report()
