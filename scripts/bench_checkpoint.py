"""What the checkpoint manifest costs: writing a state dict of N MB (``torch.save`` + fsync, what a save does
anyway) against sealing it (size and SHA-256 of every file) and verifying it before a resume (hashes again,
then every pickle opened with the weights-only unpickler), in the same run.

    python scripts/bench_checkpoint.py --mb 1024          # a table
    python scripts/bench_checkpoint.py --mb 1024 --json   # one JSON object
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from tracerl.manifest import seal, verify_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=512, help="size of the state, split over --files files")
    parser.add_argument("--files", type=int, default=4, help="files (one per rank or engine in a real checkpoint)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()

    per_file = args.mb * (1 << 20) // 4 // args.files  # float32 elements per file
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as root:
        folder = Path(root) / "step-1"
        folder.mkdir()
        states = [{"module": {"w": torch.randn(per_file)}, "step": i} for i in range(args.files)]
        start = time.perf_counter()
        for i, state in enumerate(states):
            path = folder / f"zero_pp_rank_{i}_model_states.pt"
            torch.save(state, path)
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        written = time.perf_counter() - start
        start = time.perf_counter()
        seal(folder, 1)
        sealed = time.perf_counter() - start
        start = time.perf_counter()
        verify_checkpoint(folder)
        verified = time.perf_counter() - start
    result = {
        "mb": args.mb,
        "files": args.files,
        "save_s": round(written, 3),
        "seal_s": round(sealed, 3),
        "verify_s": round(verified, 3),
        "seal_over_save": round(sealed / written, 2),
        "verify_mb_per_s": round(args.mb / verified),
        "cores": os.cpu_count(),
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"{args.mb} MB in {args.files} files: save {written:.2f}s, seal {sealed:.2f}s ({sealed / written:.2f}x the "
          f"save), verify {verified:.2f}s ({result['verify_mb_per_s']} MB/s)")  # fmt: skip


if __name__ == "__main__":
    main()
