# `snakemake all` from the repository root runs the study in configs/<study>.yaml
# (default: configs/default.yaml); pick another with `--config study=NAME`.
include: "workflows/Snakefile"
