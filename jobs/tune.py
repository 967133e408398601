"""Ray job entrypoint: a Ray Tune sweep of federated runs, with the arguments of `fedray tune`.

    fedray submit -- python jobs/tune.py --config SWEEP_YAML --output-dir /shared/sweeps
"""

import sys

from fedray.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
