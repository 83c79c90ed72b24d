"""`python -m bench` runs the whole suite; see bench/run.py."""

from bench.run import main

main()
