"""Training and evaluation of glmv's demo model (not imported by glmv at run time)."""
