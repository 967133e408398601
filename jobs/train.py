"""Ray job entrypoint: a federated training, with the arguments of `fedray train`.

Runs unchanged on a laptop's local Ray and inside a Ray job on a cluster, where init_ray joins
the cluster the job supervisor names in RAY_ADDRESS:

    fedray submit -- python jobs/train.py --config configs/demo.yaml --output-dir /shared/runs

Give --output-dir a folder on the cluster's storage: a relative one lands inside the job's
unpacked copy of the working dir, which Ray deletes.
"""

import sys

from fedray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
