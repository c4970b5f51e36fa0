"""Which configuration to launch next: the deployment recipe as warm start, the local search
with the capacity flag on its fitting boundary, TPE for exploration, re-measurements under
noise, and the early-stop pruner."""
