"""`python -m glmv` runs the command-line interface."""

from glmv.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
