wildcard_constraints:
    run="[A-Za-z0-9_.-]+",
    seed="[0-9]+",
    data="data-[0-9a-f]{8}",


rule run_config:
    output:
        f"{OUT}/configs/{{run}}-seed{{seed}}.yaml",
    params:
        # the merged mapping is a param so that editing the study file re-runs what it changes
        mapping=lambda wc: run_config(STUDY, wc.run, int(wc.seed), results_dir=RESULTS),
    log:
        f"{OUT}/logs/configs/{{run}}-seed{{seed}}.log",
    run:
        write_run_config(STUDY, wildcards.run, int(wildcards.seed), output[0], results_dir=RESULTS, log=log[0])


rule data_cache:
    conda:
        ENV_FILE
    # decodes the dataset of one data setting once into the tensor cache, before jobs run in parallel
    input:
        lambda wc: f"{OUT}/configs/{DATA_RUNS[wc.data][0]}-seed{SEEDS[0]}.yaml",
    output:
        touch(f"{OUT}/partitions/{{data}}/.data-cached"),
    log:
        f"{OUT}/logs/data_cache-{{data}}.log",
    shell:
        "fedselect cache-data --config {input} > {log} 2>&1"


rule partition:
    conda:
        ENV_FILE
    # one partition per data setting and seed, shared by every run of that setting
    input:
        config=lambda wc: f"{OUT}/configs/{DATA_RUNS[wc.data][0]}-seed{wc.seed}.yaml",
        cached=f"{OUT}/partitions/{{data}}/.data-cached",
    output:
        f"{OUT}/partitions/{{data}}/seed{{seed}}.json",
    log:
        f"{OUT}/logs/partition-{{data}}-seed{{seed}}.log",
    shell:
        "fedselect partition --config {input.config} --out {output} > {log} 2>&1"


rule train:
    conda:
        ENV_FILE
    input:
        config=f"{OUT}/configs/{{run}}-seed{{seed}}.yaml",
        partition=lambda wc: f"{OUT}/partitions/{DATA_OF[wc.run]}/seed{wc.seed}.json",
    output:
        f"{OUT}/runs/{{run}}-seed{{seed}}.json",
    log:
        f"{OUT}/logs/{{run}}-seed{{seed}}.log",
    threads: 1
    # GPUs per job (`--config gpus_per_job=1`): a cluster executor requests them per job, and
    # `--resources gpu=N` on one machine runs at most N GPU jobs at once; `device: auto` in the
    # run config uses a visible GPU and falls back to CPU.
    # Several jobs sharing one GPU (small models are launch-bound: one job leaves it mostly idle):
    # every training job holds one `gpu_slots`, so `--resources gpu_slots=J` runs J at once
    # (docs/GPU.md gives the measured J; without the flag the resource does not limit anything).
    resources:
        gpu=GPUS_PER_JOB,
        gpu_slots=1,
    shell:
        "OMP_NUM_THREADS={threads} fedselect run --config {input.config} " + PLUGIN_ARGS + " "
        "--set data.partition_file={input.partition} --out {output} --no-progress > {log} 2>&1"


# the paired differences' CSV: only for a study with a `paired:` key (summary.md then has the section)
PAIRED_OUTPUT = {"paired": f"{OUT}/summary_paired.csv"} if STUDY.paired else {}


rule summarize:
    conda:
        ENV_FILE
    # tables read from MLflow through the run records; the study file adds the paper's numbers
    # and the paired differences
    input:
        study=STUDY_FILE,
        records=expand(f"{OUT}/runs/{{run}}-seed{{seed}}.json", run=RUNS, seed=SEEDS),
    output:
        table=f"{OUT}/summary.md",
        csv=f"{OUT}/summary.csv",
        **PAIRED_OUTPUT,
    params:
        title=STUDY.name,
        paired="".join(f"--out-paired-csv {path} " for path in PAIRED_OUTPUT.values()),
    log:
        f"{OUT}/logs/summarize.log",
    shell:
        "python -m analysis.summarize --study {input.study} --title {params.title:q} --out-md {output.table} "
        "--out-csv {output.csv} {params.paired}{input.records} > {log} 2>&1 && cat {output.table}"


rule figures:
    conda:
        ENV_FILE
    input:
        study=STUDY_FILE,
        records=expand(f"{OUT}/runs/{{run}}-seed{{seed}}.json", run=RUNS, seed=SEEDS),
    output:
        directory(f"{OUT}/figures"),
    log:
        f"{OUT}/logs/figures.log",
    shell:
        "MPLBACKEND=Agg python -m analysis.figures --study {input.study} --out-dir {output} {input.records} "
        "> {log} 2>&1"


rule report:
    conda:
        ENV_FILE
    input:
        study=STUDY_FILE,
        summary=f"{OUT}/summary.md",
        figures=f"{OUT}/figures",
        records=expand(f"{OUT}/runs/{{run}}-seed{{seed}}.json", run=RUNS, seed=SEEDS),
    output:
        f"{OUT}/report.md",
    params:
        # the whole-study overrides (set=), so the report's Reproduce line and setting show them
        overrides="".join(f"--set {shlex.quote(o)} " for o in STUDY.overrides),
    log:
        f"{OUT}/logs/report.log",
    shell:
        "python -m analysis.report --study {input.study} --summary {input.summary} --figures {input.figures} "
        "--out {output} {params.overrides}{input.records} > {log} 2>&1"
