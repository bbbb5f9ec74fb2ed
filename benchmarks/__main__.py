"""``python -m benchmarks`` (``make bench``): every benchmark with its default preset for this device.

    python -m benchmarks [--preset NAME] [--only NAME] [--out DIR]

Without a GPU the benchmarks run their small ``cpu`` preset. A ``--preset`` that a
benchmark does not define falls back to that benchmark's default, with a note.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

# Every benchmark module, in the order they run (see benchmarks/__init__.py for the contract). Left out:
# dinov3_step (issue 20's DINOv3 training step), whose cpu preset takes minutes on 2 cores; run it alone.
BENCHMARKS = ["dino", "dinov3", "ema", "gram", "koleo", "multicrop", "paws", "train_step"]


def main(argv: list[str] | None = None) -> dict[str, dict[str, Path]]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    parser.add_argument("--preset",
                        help="preset for every benchmark (default: each one's default for the device)")
    parser.add_argument("--only", choices=BENCHMARKS, action="append",
                        help="run only this benchmark (repeatable)")
    parser.add_argument("--out", type=Path, help="results folder (default: benchmarks/results/<device>/)")
    args = parser.parse_args(argv)

    written: dict[str, dict[str, Path]] = {}
    for name in args.only or BENCHMARKS:
        module = importlib.import_module(f"benchmarks.{name}")
        sub_argv = []
        if args.preset:
            if args.preset in module.PRESETS:
                sub_argv += ["--preset", args.preset]
            else:
                print(f"[{name}] has no preset {args.preset!r} (it has {', '.join(module.PRESETS)}): "
                      "running its default", file=sys.stderr)
        if args.out is not None:
            sub_argv += ["--out", str(args.out)]
        print(f"\n## {name}\n", flush=True)
        written[name] = module.main(sub_argv)
    folders = sorted({str(p.parent) for paths in written.values() for p in paths.values()})
    print(f"\nResults written to {', '.join(folders)}")
    return written


if __name__ == "__main__":
    main()
