"""Ray job entrypoint: package a run's model, with the arguments of `fedray export`.

    fedray submit -- python jobs/export.py RUN_DIR --output PACKAGE_DIR

RUN_DIR is read where the job runs: the cluster's shared storage, not this machine.
"""

import sys

from fedray.cli import main

if __name__ == "__main__":
    sys.exit(main(["export", *sys.argv[1:]]))
