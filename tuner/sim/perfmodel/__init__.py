"""Analytical model of an sglang-kt server, a test double with a realistic shape and
unvalidated numbers: `config` (flags and their defaults), `startup` (memory checks at
launch) and `steptime` (decode/prefill step times). Submodules are imported directly."""
