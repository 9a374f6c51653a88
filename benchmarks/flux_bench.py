"""GPU benchmark entry point (see loraplug/bench.py): COMPILE=1, ND=.., NS=.., ITERS=.., OUT=.."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from loraplug.bench import main  # noqa: E402

if __name__ == "__main__":
    main()
