"""`smartedit-export`: a thin argparse shell over smartedit.export.run.run_export."""

from __future__ import annotations

import argparse
import logging
import time
import warnings

from smartedit.arguments import add_model_source, model_source
from smartedit.config import EXPORT_PRECISIONS, PRECISIONS, QUANTIZED_PRECISIONS
from smartedit.deepcache import DEFAULT_CACHE_BRANCH
from smartedit.errors import InputError, run_command
from smartedit.graphs import GRAPH_NAMES
from smartedit.graphs.spec import ProfileOptions

from .run import run_export
from .quantize import QUANTIZING, QuantizeOptions
from .targets import TARGETS


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="smartedit-export", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Merge the LoRA, split SmartEdit into graphs (llava, qformer_bim, unet, vae_encoder, "
                    "vae_decoder), export each to ONNX (or AOTInductor), and check it against PyTorch.",
        epilog="Writes OUT/onnx/<graph>.onnx, OUT/manifest.json (versions, source hash, specs, profiles, sha256) and "
               "OUT/report.json (error of each graph against fp32 PyTorch); --target trt/trt-rtx adds OUT/<target>/"
               "<graph>.plan, --target aoti OUT/aoti/<graph>.pt2. A rerun skips graphs whose inputs did not "
               "change. Example: smartedit-export --preset tiny --random-weights --target onnx --out out/",
    )
    add_model_source(p)
    p.add_argument("--target", choices=list(TARGETS), default="onnx",
                   help="; ".join(f"{t.name}: {t.summary}" for t in TARGETS.values()))
    _add_target_flags(p)
    q = p.add_argument_group(f"--precision {', '.join(QUANTIZED_PRECISIONS)}")
    for flag, kw in QuantizeOptions.FLAGS.items():  # absent when not given: refused without a quantized precision
        default = kw["default"]
        q.add_argument(flag, **{**kw, "default": argparse.SUPPRESS,
                                "help": kw["help"] + (f" (default: {default})" if default is not None else "")})
    device = next(a for a in p._actions if "--device" in a.option_strings)
    device.help += (f"; {QUANTIZING}: where the calibration and report edits and Model Optimizer's calibration run "
                    "(cuda: ONNX Runtime's CUDA provider, onnxruntime-gpu)")
    p.add_argument("--out", required=True,
                   help="output folder: new, empty, or an earlier smartedit-export output (a folder holding anything "
                        "else is refused, naming it: there is no override, use an empty folder); locked while the "
                        "export runs, so a second export into it fails at once")
    p.add_argument("--precision", choices=EXPORT_PRECISIONS, default="fp16",
                   help=f"fp16 (default; what TensorRT builds strongly typed), fp32 for debugging, or "
                        f"{' / '.join(QUANTIZED_PRECISIONS)}: the UNet quantized (Q/DQ, calibrated on edits, with a "
                        "quality report), the other graphs fp16")
    p.add_argument("--graphs", default="all", help=f"comma-separated subset of {','.join(GRAPH_NAMES)}")
    p.add_argument("--deepcache", type=int, nargs="?", const=DEFAULT_CACHE_BRANCH, default=None, metavar="BRANCH",
                   help="also export the DeepCache graphs unet_deep and unet_shallow at skip branch BRANCH (0 .. the "
                        f"UNet's layers per block; without a value: {DEFAULT_CACHE_BRANCH}, the shallowest path): "
                        "edits may then ask for --deepcache N (the whole UNet every N steps)")
    p.add_argument("--opset", type=int, default=18)
    p.add_argument("--fold-cfg", action="store_true",
                   help="fold the scheduler input scaling, the 3-way CFG batch and the combine into the unet graph")
    p.add_argument("--max-batch", type=int, default=ProfileOptions.max_batch)
    p.add_argument("--min-res", type=int, default=ProfileOptions.min_res,
                   help="smallest image side (multiple of 64); --min-res = --opt-res = --max-res exports one static "
                        "size")
    p.add_argument("--opt-res", type=int, default=ProfileOptions.opt_res, help="image side to optimise for (multiple of 64)")
    p.add_argument("--max-res", type=int, default=ProfileOptions.max_res, help="largest image side (multiple of 64)")
    p.add_argument("--max-prompt", type=int, default=ProfileOptions.max_prefix, help="longest prefix / suffix, in tokens")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the check against fp32 PyTorch (it needs the fp32 model in host RAM: 28 GB for the "
                        "7b LLM)")
    a = p.parse_args(argv)
    source = model_source(p, a)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)  # torchvision absent
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message="# The axis name")  # torch.onnx naming chatter
    t0 = time.perf_counter()

    def body() -> None:
        precision = PRECISIONS[a.precision]
        given = [flag for flag, kw in QuantizeOptions.FLAGS.items() if hasattr(a, kw["dest"])]
        if given and not precision.quantized:
            raise InputError(f"{', '.join(given)}: for --precision {' or '.join(QUANTIZED_PRECISIONS)} (this export "
                             f"is --precision {precision.name}, which does not quantize)")
        opts = ProfileOptions(max_batch=a.max_batch, min_res=a.min_res, opt_res=a.opt_res, max_res=a.max_res,
                              max_prefix=a.max_prompt, max_suffix=a.max_prompt,
                              opt_prefix=min(96, a.max_prompt), opt_suffix=min(96, a.max_prompt))
        run_export(a.out, source, target=a.target, precision=precision,
                   graph_names=a.graphs, opset=a.opset, profile=opts, fold_cfg=a.fold_cfg, verify=not a.no_verify,
                   target_options=TARGETS[a.target].options.from_flags(a),
                   quantize=QuantizeOptions.from_flags(precision, a) if precision.quantized else None,
                   progress=lambda m: print(f"[{time.perf_counter() - t0:6.1f}s] {m}", flush=True),
                   cache_branch=a.deepcache)

    run_command("smartedit-export", body)
    print(f"done in {time.perf_counter() - t0:.1f} s: {a.out}")


def _add_target_flags(p: argparse.ArgumentParser) -> None:
    """Each target's own flags (its TargetOptions.FLAGS), once each: a flag several targets take gets their help
    texts joined."""
    users: dict[type, list[str]] = {}  # options class -> the targets that take it
    for t in TARGETS.values():
        users.setdefault(t.options, []).append(t.name)
    flags: dict[str, tuple[str, dict]] = {}  # flag -> (the group it is listed in, argparse keywords)
    for options, names in users.items():
        for flag, kw in options.FLAGS.items():
            if flag not in flags:
                flags[flag] = ("--target " + ", ".join(names), dict(kw))
            elif kw["help"] not in flags[flag][1]["help"]:
                flags[flag][1]["help"] += "; " + kw["help"]
    groups: dict[str, argparse._ArgumentGroup] = {}
    for flag, (title, kw) in flags.items():
        groups.setdefault(title, p.add_argument_group(title)).add_argument(flag, **kw)


if __name__ == "__main__":
    main()
