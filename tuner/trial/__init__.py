"""One launched trial: start the server, wait until it is really ready, check its output,
run each workload, tear it down; the runner protocol the loop depends on."""
