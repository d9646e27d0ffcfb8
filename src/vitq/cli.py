"""The ``vitq`` command line: ``models``, ``eval``, ``quantize``, ``cost``, ``export``.

This module only parses (it imports no torch, so ``vitq --help`` answers at once); ``vitq.commands`` runs
the command through the API. Every problem with the input ends in one line ``vitq: error: ...`` naming the
file, layer or option, and a non-zero exit; results are written under temporary names and renamed when
complete.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import threading

from .output import Terminated, deferred_signals, raise_on_signals

# Every user-facing error type of vitq (ZooError, DataError, ConfigError, ArtifactError, HardwareError,
# OutputError, NonFiniteError) is a ValueError.
USER_ERRORS = (ValueError, FileNotFoundError)


def _add_data_opts(p) -> None:
    p.add_argument("--batch-size", type=int, default=32, help="images per batch (default 32)")
    p.add_argument("--workers", type=int, default=2, help="image decoding worker processes")
    p.add_argument("--skip-bad-images", action="store_true", help="skip unreadable images (counted in the report)")


def _add_overwrite(p) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out when it holds an earlier vitq result (anything else is never replaced)")


def _add_model_opts(p) -> None:
    p.add_argument("--checkpoint", help="weights file (.safetensors, .pth, .pt); default: $VITQ_ASSETS/models")
    p.add_argument("--random-init", action="store_true", help="random weights (structure/cost work only)")
    p.add_argument("--num-classes", type=int,
                   help="classes of the model's head (default: the checkpoint's, e.g. a fine-tuned head; else timm's)")


def _add_device(p) -> None:
    p.add_argument("--device", default="auto",
                   help="where the model runs: auto (a CUDA GPU when there is one, else the CPU), cpu, cuda or "
                        "cuda:N; under torchrun, auto gives each process its LOCAL_RANK GPU")


def _add_labels(p) -> None:
    p.add_argument("--labels", default="auto",
                   help="where labels come from: imagenet (synset folders or file-name prefixes), folders (one "
                        "sub-folder per class, sorted, as torchvision's ImageFolder), none (no top-1: agreement "
                        "and KL against the float model only), or a file mapping class folder to index (JSON, or one "
                        "class name per line); default auto: imagenet if every image has a synset, else folders")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vitq", description="Post-training quantization of vision transformers")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"vitq {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("messages")
    loud = g.add_mutually_exclusive_group()
    loud.add_argument("-v", "--verbose", action="store_true", help="also print per-layer tables and details")
    loud.add_argument("-q", "--quiet", action="store_true", help="print only warnings, errors and the result")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", parents=[common], help="list the zoo (pinned, measured models)")
    p.add_argument("--coverage", action="store_true",
                   help="also build each zoo model and other timm models users ask about (random weights) and show "
                        "what vitq quantizes in each, and what it leaves in float and why")
    p.set_defaults(func="models")

    p = sub.add_parser("eval", parents=[common], help="evaluate a model or a quantized artifact folder")
    p.add_argument("model", help="zoo name, timm name, a folder written by `vitq quantize`, a packed file, or an "
                                 "ONNX file or .pt2 program written by `vitq export`")
    _add_model_opts(p)
    _add_device(p)
    p.add_argument("--data", required=True, help="image folder (class sub-folders, or flat synset-prefixed files)")
    _add_labels(p)
    p.add_argument("--list", help="file list, one path relative to --data per line")
    p.add_argument("--limit", type=int, help="use only the first N images")
    p.add_argument("--out", help="write the result as JSON (a new file, or an earlier result with --overwrite)")
    _add_overwrite(p)
    _add_data_opts(p)
    p.set_defaults(func="eval")

    p = sub.add_parser("export", parents=[common], help="write a quantized folder as a packed integer artifact")
    p.add_argument("model", help="a folder written by `vitq quantize`")
    p.add_argument("--format", choices=["vitq", "onnx", "pt2e"], default="vitq",
                   help="vitq: one safetensors file, weights as bit-packed integer codes; "
                        "onnx: the scored model in ONNX (QDQ with vitq's grids) for integer kernels; "
                        "pt2e: a torch.export program (.pt2) that torch.compile runs on oneDNN int8 kernels")
    p.add_argument("--target", choices=["ort", "portable", "tensorrt"], default="ort",
                   help="onnx: ort (int8 weight codes, 4-bit per-group weights as MatMulNBits), portable (standard "
                        "operators only; weights of at most 4 bits as INT4 codes, opset 21) or tensorrt (signed int8 "
                        "activations with zero point 0: quantize with --set quant.a_symmetric=true for 8 bits)")
    p.add_argument("--allow-approx", action="store_true",
                   help="onnx: write grids ONNX cannot hold exactly in float instead of refusing (listed in the log)")
    p.add_argument("--data", help="onnx, pt2e: images to check the file against the model on (default: the artifact's "
                                  "calibration images, when its folder is still there)")
    p.add_argument("--list", help="file list for --data")
    p.add_argument("--out", required=True, help="output file (.safetensors or .onnx; a new file, or an earlier "
                                                "export with --overwrite)")
    _add_overwrite(p)
    p.set_defaults(func="export")

    p = sub.add_parser("cost", parents=[common], help="energy, latency and EDP on the modelled accelerator, per layer")
    p.add_argument("model", help="zoo name, timm name, or a folder written by `vitq quantize`")
    _add_model_opts(p)
    p.add_argument("--hw", help="accelerator YAML merged over the defaults (vitq/hardware/accelerator.yaml)")
    p.add_argument("--baseline", choices=["int8"], default="int8", help="reference for edp_saving")
    p.add_argument("--w-bits", type=int, default=None, help="weight bits, 2-8 (default 8)")
    p.add_argument("--a-bits", type=int, default=None, help="activation bits, 2-8 (default 8)")
    p.add_argument("--w-scheme", choices=["uniform", "pot", "apot", "mixed"],
                   help="weight grid: uniform, power-of-two, additive power-of-two (APoT), or mixed (each output "
                        "channel uniform or APoT, whichever has the lower error)")
    p.add_argument("--config", help="settings YAML (its quant section) or QuantConfig JSON (per-layer bits and "
                                    "schemes), e.g. a mixed_config.json")
    p.add_argument("--out", help="write the cost report as JSON (a new file, or an earlier one with --overwrite)")
    _add_overwrite(p)
    p.set_defaults(func="cost")

    p = sub.add_parser("quantize", parents=[common], help="calibrate, quantize and evaluate against the FP model",
                       description="Quantize MODEL with a recipe, evaluate it against the float model on the same "
                                   "images, and write the model, report.json, report.html and config.yaml to --out. "
                                   "Every pass's setting is in config.yaml's layout: give a file with --config, "
                                   "change one field with --set (docs/usage.md).")
    p.add_argument("model", help="zoo name or timm name (any timm model of a supported family)")
    g = p.add_argument_group("model")
    _add_model_opts(g)
    _add_device(g)
    g = p.add_argument_group("data")
    g.add_argument("--calib", required=True, help="calibration image folder")
    g.add_argument("--calib-list", help="calibration file list (default: a seeded random subset not in --eval-list)")
    g.add_argument("--calib-size", type=int, default=32, help="images in the random calibration subset (default 32)")
    g.add_argument("--eval", required=True, help="evaluation image folder")
    g.add_argument("--eval-list", help="evaluation file list, one path relative to --eval per line")
    g.add_argument("--limit", type=int, help="evaluate only the first N images")
    g.add_argument("--allow-overlap", action="store_true",
                   help="run even when calibration and evaluation images overlap (the report says so)")
    _add_labels(g)
    _add_data_opts(g)
    g = p.add_argument_group("quantization")
    g.add_argument("--method", choices=["minmax", "mptq", "m2q", "m2q-paper"],
                   help="the recipe (default mptq): mptq = SQ-b, rotation, token scaling, OPT-m, GPTQ and block "
                        "reconstruction, with Greedy MP under a bit or size budget; minmax = the engine alone "
                        "(a baseline); m2q = M2-ViT's scheme and precision search under a cost budget; m2q-paper = "
                        "M2-ViT's fixed recipe (depthwise W4, other layers W8 with uniform/APoT output channels)")
    g.add_argument("--w-bits", type=int, help="weight bits, 2-8 (default 8; with a bit budget, from the budget)")
    g.add_argument("--a-bits", type=int, help="activation bits, 2-8 (default 8; with a bit budget, from the budget)")
    g.add_argument("--protocol", choices=["standard", "full"],
                   help="standard: Linear/conv inputs and weights and attention matmuls; full: also LayerNorm, "
                        "softmax, GELU and residual additions (default standard)")
    g.add_argument("--config", help="settings file (YAML, as the config.yaml every --out holds) or a QuantConfig "
                                    "JSON such as mixed_config.json; the options here override it")
    g.add_argument("--set", dest="settings", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="change one setting, e.g. gptq.enabled=false, recon.iters=100, quant.seed=1, "
                        "budget.gbops=15 (repeatable; the sections and fields: docs/usage.md)")
    g = p.add_argument_group("budget (mixed precision)")
    g.add_argument("--budget-w", type=float, help="average weight bits (Greedy MP)")
    g.add_argument("--budget-a", type=float, help="average activation bits (Greedy MP)")
    g.add_argument("--budget-mb", type=float, help="model size in MB (Greedy MP)")
    g.add_argument("--budget-edp", type=float,
                   help="m2q: at most this fraction of the INT8 baseline's energy-delay product on the modelled "
                        "accelerator (budget.energy or budget.latency instead, and budget.hardware=FILE.yaml for "
                        "another accelerator, through --set)")
    g = p.add_argument_group("output")
    g.add_argument("--out", required=True, help="output folder (a new path, or an earlier vitq result with "
                                                "--overwrite)")
    _add_overwrite(g)
    p.set_defaults(func="quantize")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # report.json records the command
    # the API reports through the "vitq" logger; on the command line its messages are ordinary output
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("vitq")
    logger.addHandler(handler)
    level = logger.level
    # under torchrun only the first process reports; the others print warnings and errors only
    other_rank = int(os.environ.get("RANK", "0")) > 0
    if other_rank:
        os.environ["TQDM_DISABLE"] = "1"  # read when tqdm is imported, below
    logger.setLevel(logging.DEBUG if args.verbose else logging.WARNING if args.quiet or other_rank else logging.INFO)
    try:
        if threading.current_thread() is threading.main_thread():
            with deferred_signals() as seen:
                from . import commands  # torch, timm: the long part of start-up
            if seen:
                print("vitq: interrupted while starting; nothing was written", file=sys.stderr)
                return 130
        from . import commands

        with raise_on_signals():
            return getattr(commands, f"cmd_{args.func}")(args)
    except USER_ERRORS as exc:
        _close_bars()
        print(f"vitq: error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _close_bars()
        print("vitq: interrupted; no partial output was written", file=sys.stderr)
        return 130
    except Terminated as exc:
        _close_bars()
        print(f"vitq: stopped by {exc}; no partial output was written", file=sys.stderr)
        return 143
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _close_bars() -> None:
    """Clear progress bars an error left open, so the error starts its own line on a terminal."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


if __name__ == "__main__":
    sys.exit(main())
