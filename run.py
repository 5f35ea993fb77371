"""Command-line entry point: `python run.py <command> ...`; see `python run.py --help`."""

from mamba_llama_jax.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
