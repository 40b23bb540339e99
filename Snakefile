# `snakemake all` from the repository root runs the study in configs/<study>.yaml
# (default: configs/default.yaml); pick another with `--config study=NAME`.
include: "workflows/Snakefile"


# Snakemake ignores the default target of an included file, so without this rule a bare
# `snakemake` would find no target and build nothing.
rule default:
    default_target: True
    input:
        rules.all.input,
