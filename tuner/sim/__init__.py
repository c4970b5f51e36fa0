"""kttune's simulated SGLang/KTransformers server (`python -m tuner.sim`), a test double.

Kept free of imports: the simulator starts as its own process, and `tuner.sim.*` modules are
imported one by one where they are needed.
"""
