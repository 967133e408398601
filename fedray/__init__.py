"""fedray: federated training of blood-smear classifiers on Ray, and serving the result."""

import os as _os

# A Ray started by fedray on this machine listens on loopback only and sends no usage stats.
# Ray reads the first variable when it is imported, so it is set here, before any Ray import;
# a driver that joins a real cluster has RAY_ADDRESS set and is left alone.
if not _os.environ.get("RAY_ADDRESS"):
    _os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
_os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

__version__ = "0.1.0"
