"""Recipes: what the launch scripts, the notebook and users run, put together from the layers below.

loading       load a target and a draft, read and encode prompts, the decoding flags and mesh
demo          the one-command story: the shipped (or a freshly trained) draft, then the benchmark
accelerator   the accelerator check: kernels, decoding, step costs and training on one device
              (`decode_check`, `device_train`; its tables and plots come from `bench`)

Imports point one way: launch -> recipes -> bench / training / decoding -> models -> kernels;
nothing below imports `flexdraft_jax.recipes` (tests/test_layers.py holds the rule).
"""
