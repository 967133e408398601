"""Submit a command to a Ray cluster as a Ray job (`fedray submit`, see fedray/submit.py).

    python jobs/submit.py --address http://127.0.0.1:8265 -- \\
        python jobs/train.py --config configs/demo.yaml
"""

import sys

from fedray.cli import main

if __name__ == "__main__":
    sys.exit(main(["submit", *sys.argv[1:]]))
