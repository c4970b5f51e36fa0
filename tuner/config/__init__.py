"""The search space: a YAML file loaded and validated into frozen specs (params, server,
workloads, objectives, SLOs, bench, confirmation, probe, quality), the one seam to Optuna's
distributions and to launch flags."""
