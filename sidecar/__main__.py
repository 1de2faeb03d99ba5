"""`python -m adaspec.sidecar serve|status|...` (the same commands as `adaspec sidecar ...`)."""

from adaspec.sidecar.cli import main

if __name__ == "__main__":
    main()
