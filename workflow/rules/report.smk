rule build_report:
    input:
        histories=per_run("results/dufm/{run}/history.parquet"),
        metrics=per_run("results/metrics/{run}/metrics.parquet"),
        comparisons=per_run("results/theory/{run}/comparison.parquet"),
        verdicts=per_run("results/theory/{run}/verdict.parquet"),
        net_histories=per_run("results/nets/{run}/history.parquet", NET_RUNS),
        net_metrics=per_run("results/metrics/{run}/metrics.parquet", NET_RUNS),
        net_comparisons=per_run("results/theory/{run}/comparison.parquet", NET_RUNS),
        net_verdicts=per_run("results/theory/{run}/verdict.parquet", NET_RUNS),
        analyses=per_run("results/analysis/{run}/analysis.parquet", NET_RUNS),
        rfm_metrics=per_run("results/metrics/{run}/metrics.parquet", RFM_RUNS),
        rfm_layers=per_run("results/rfm/{run}/layers.parquet", RFM_RUNS),
    output:
        summary=report("results/report/summary.parquet", caption="../report/summary.rst",
                       category="Report"),
        html=report("results/report/index.html", caption="../report/index.rst", category="Report"),
    log:
        "logs/build_report/report.log",
    params:
        runs=RUNS,
        net_runs=NET_RUNS,
        rfm_runs=RFM_RUNS,
        configfiles=[str(f) for f in workflow.configfiles],
        version=DNC_VERSION,
    threads: 1
    script:
        "../../scripts/build_report.py"


def build_partial_report():
    """After a failed run (with --keep-going, once every other job has finished): build the report
    from the runs that finished and list those that did not (dnc.report.status). Only when the
    report was a target of this invocation, and not when partial_report is false."""
    if not config.get("partial_report", True):
        return
    if not any(job.rule.name == "build_report" for job in workflow.dag.jobs):
        return
    report_rule = workflow.get_rule("build_report")
    inputs = {key: list(report_rule.input[key]) for key in report_rule.input.keys()}
    try:
        missing = write_report(inputs, RUNS, NET_RUNS, RFM_RUNS, [str(f) for f in workflow.configfiles],
                               *report_rule.output, partial=True)
    except Exception as e:  # the failed jobs are the error to report; this is a convenience
        logger.warning(f"could not build a partial report: {type(e).__name__}: {e}")
        return
    logger.warning(f"partial report of the runs that finished, {len(missing)} run(s) missing: "
                   f"{report_rule.output[1]}")
