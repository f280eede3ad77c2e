"""The quality frontier of the denoising loop's levers on the shapes task's held-out edits (tools/synthetic_edits.py),
with their ground truth: smartedit-bench --frontier on a fixed set the renderer draws.

    python tools/frontier.py --model models/tiny-shapes --out bench/results/
    python tools/frontier.py --model models/tiny-shapes --count 4 --settings "dpm-solver++:20 ddim:30" --repeats 1

Writes <out>/frontier-<model folder name>.{json,md,png} (smartedit/bench/frontier.py). On a user's own checkpoint
and images, the same measurement is `smartedit-bench --frontier --model DIR --edits edits.json`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import synthetic_edits as task  # noqa: E402

from smartedit.bench.frontier import EditCase, run_frontier, to_markdown, write_outputs  # noqa: E402
from smartedit.bench.settings import FRONTIER_SETTINGS, parse_settings  # noqa: E402
from smartedit.errors import run_command  # noqa: E402


def heldout_edits(count: int) -> list[EditCase]:
    """The first `count` held-out edits: input, instruction and the renderer's ground truth."""
    return [EditCase(str(ex.seed), ex.image, ex.instruction, ex.target) for ex in task.heldout(count)]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--model", required=True, help="the trained model folder")
    ap.add_argument("--count", type=int, default=16, help="held-out edits (the first of tools/synthetic_edits.py's)")
    ap.add_argument("--settings", help="settings to compare with the official loop (default: the frontier's sweep)")
    ap.add_argument("--repeats", type=int, default=2, help="timing rounds (the first also makes the images)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the first edit's noise (edit i: seed + i)")
    ap.add_argument("--out", default="bench/results", help="folder for frontier-<model>.{json,md,png}")
    a = ap.parse_args(argv)

    def body() -> None:
        from smartedit.pipeline import SmartEditPipeline

        settings = parse_settings(a.settings) if a.settings else FRONTIER_SETTINGS
        pipe = SmartEditPipeline.from_pretrained(a.model)
        res = run_frontier(pipe, heldout_edits(a.count), settings, resolution=task.RESOLUTION, seed=a.seed,
                           repeats=a.repeats, model=Path(a.model).name, progress=lambda m: print(m, flush=True),
                           checkpoint=lambda r: write_outputs(r, Path(a.out)))
        res["edit_set"] = f"the first {a.count} held-out edits of tools/synthetic_edits.py (seeds " \
                          f"{task.HELDOUT_SEEDS[0]}..{task.HELDOUT_SEEDS[a.count - 1]}), with the renderer's ground truth"
        paths = write_outputs(res, Path(a.out))
        print(to_markdown(res))
        print("wrote " + ", ".join(str(p) for p in paths))

    run_command("tools/frontier.py", body)


if __name__ == "__main__":
    main()
