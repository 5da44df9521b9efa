"""Tests of the `glmv` command line: one-line errors, checks made before a model loads."""
