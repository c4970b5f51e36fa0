"""Optuna storage as kttune's system of record: the attribute names it adds, opening
storages and studies, recording a verdict, and the rules workers sharing a study follow."""
