"""Experiment configs: one file per experiment, each with `get_config()` and its launch command in the docstring.

Installed as `nsync_jax.configs` (setup.py), so that the commands whose settings live here (`nsync-jax demo`,
`nsync-jax toyworld pretrain`) find them from any install; load one with `nsync_jax.config.load_config(path)`.
"""
