"""Print the ``run_dir`` a config resolves to under the given overrides (``scripts/quickstart.sh`` and
``scripts/rlhf.sh`` check it before any phase runs). A bad config or override is one line on stderr, exit 2, as
``tracerl`` reports it; ``--verbose``/``--debug`` and other options among the overrides are left to the phases.

    python scripts/run_dir.py CONFIG.yaml [key=value ...]
"""

from __future__ import annotations

import sys

from tracerl.config import ConfigError, load


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__, file=sys.stderr if not argv else sys.stdout)
        return 2 if not argv else 0
    config, overrides = argv[0], [a for a in argv[1:] if not a.startswith("--")]
    try:
        print(load(config, overrides).run_dir)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
