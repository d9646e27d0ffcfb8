"""The ``vitq`` command line: ``models``, ``eval``, ``quantize``, ``cost``, ``export``.

This module only parses (it imports no torch, so ``vitq --help`` answers at once); ``vitq.commands`` runs
the command through the API. Every problem with the input ends in one line ``vitq: error: ...`` naming the
file, layer or option, and a non-zero exit; results are written under temporary names and renamed when
complete.
"""
from __future__ import annotations

import argparse
import logging
import sys
import threading

from .methods.options import PTF_OBJECTIVES, SEARCHES, MethodOptions
from .output import Terminated, deferred_signals, raise_on_signals

# Every user-facing error type of vitq (ZooError, DataError, ConfigError, ArtifactError, HardwareError,
# OutputError, NonFiniteError) is a ValueError.
USER_ERRORS = (ValueError, FileNotFoundError)


def _add_data_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2, help="image decoding worker processes")
    p.add_argument("--skip-bad-images", action="store_true", help="skip unreadable images (counted in the report)")


def _add_overwrite(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out when it holds an earlier vitq result (anything else is never replaced)")


def _add_model_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", help="weights file (.safetensors, .pth, .pt); default: $VITQ_ASSETS/models")
    p.add_argument("--random-init", action="store_true", help="random weights (structure/cost work only)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vitq", description="Post-training quantization of vision transformers")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"vitq {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("models", help="list the supported models").set_defaults(func="models")

    p = sub.add_parser("eval", help="evaluate a model or a quantized artifact folder")
    p.add_argument("model", help="zoo name, timm name, a folder written by `vitq quantize`, or a packed file")
    _add_model_opts(p)
    p.add_argument("--data", required=True, help="image folder (synset sub-folders, or flat synset-prefixed files)")
    p.add_argument("--list", help="file list, one path relative to --data per line")
    p.add_argument("--limit", type=int, help="use only the first N images")
    p.add_argument("--out", help="write the result as JSON (a new file, or an earlier result with --overwrite)")
    _add_overwrite(p)
    _add_data_opts(p)
    p.set_defaults(func="eval")

    p = sub.add_parser("export", help="write a quantized folder as a packed integer artifact")
    p.add_argument("model", help="a folder written by `vitq quantize`")
    p.add_argument("--format", choices=["vitq", "onnx"], default="vitq",
                   help="vitq: one safetensors file, weights as bit-packed integer codes; "
                        "onnx: QDQ model with vitq's scales for ONNX Runtime's integer kernels")
    p.add_argument("--out", required=True, help="output file (.safetensors or .onnx; a new file, or an earlier "
                                                "export with --overwrite)")
    _add_overwrite(p)
    p.set_defaults(func="export")

    p = sub.add_parser("cost", help="energy, latency and EDP on the modelled accelerator, per layer")
    p.add_argument("model", help="zoo name, timm name, or a folder written by `vitq quantize`")
    _add_model_opts(p)
    p.add_argument("--hw", help="accelerator YAML merged over the defaults (vitq/hardware/accelerator.yaml)")
    p.add_argument("--baseline", choices=["int8"], default="int8", help="reference for edp_saving")
    p.add_argument("--w-bits", type=int, default=None)
    p.add_argument("--a-bits", type=int, default=None)
    p.add_argument("--w-scheme", choices=["uniform", "pot"])
    p.add_argument("--config", help="QuantConfig JSON (per-layer bits and schemes), e.g. a mixed_config.json")
    p.add_argument("--out", help="write the cost report as JSON (a new file, or an earlier one with --overwrite)")
    _add_overwrite(p)
    p.set_defaults(func="cost", protocol=None, observer=None, mse_objective=None, seed=None, w_granularity=None)

    p = sub.add_parser("quantize", help="calibrate, quantize and evaluate against the FP model")
    p.add_argument("model")
    _add_model_opts(p)
    p.add_argument("--calib", required=True, help="calibration image folder")
    p.add_argument("--calib-list", help="calibration file list (default: a seeded random subset not in --eval-list)")
    p.add_argument("--calib-size", type=int, default=32, help="images in the random calibration subset")
    p.add_argument("--eval", required=True, help="evaluation image folder")
    p.add_argument("--eval-list", help="evaluation file list")
    p.add_argument("--limit", type=int, help="evaluate only the first N images")
    p.add_argument("--w-bits", type=int)
    p.add_argument("--a-bits", type=int)
    p.add_argument("--protocol", choices=["standard", "full"])
    p.add_argument("--observer", choices=["minmax", "percentile", "mse"])
    p.add_argument("--mse-objective", choices=["tensor", "output"])
    p.add_argument("--w-granularity", choices=["per_tensor", "per_channel", "per_group"])
    p.add_argument("--w-scheme", choices=["uniform", "pot"])
    p.add_argument("--token-shift", dest="residual_token_shift", action=argparse.BooleanOptionalAction,
                   help="full protocol: the residual stream's PTF grids also get a static power-of-two factor per "
                        "token position (QuantConfig.residual_token_shift; on by default since rule R20, "
                        "docs/methods.md; --no-token-shift turns it off)")
    p.add_argument("--gelu-token-shift", dest="gelu_token_shift", action=argparse.BooleanOptionalAction,
                   help="full protocol: each GELU input's grid also gets a static power-of-two factor per token "
                        "position (QuantConfig.gelu_token_shift; on by default with --method mptq in the full "
                        "protocol since rules R33 and R47, together with --token-scale, docs/methods.md)")
    p.add_argument("--config", help="QuantConfig JSON (per-layer rules); explicit options override it")
    p.add_argument("--seed", type=int)
    p.add_argument("--method", choices=["minmax", "mptq", "m2q"],
                   help="the recipe (default mptq): mptq = SQ-b, rotation, token scaling, OPT-m, GPTQ and block "
                        "reconstruction, plus Greedy MP when a budget is given; minmax = the engine alone (a "
                        "baseline; --sq-b, --opt-m, --gptq, --recon add single methods); m2q = M2-ViT's scheme "
                        "(uniform/PoT) and precision search under a cost budget")
    p.add_argument("--sq-b", action="store_true", help="SmoothQuant with bias shift, folded into LayerNorm")
    p.add_argument("--sq-b-unnormed", action="store_true",
                   help="SQ-b also on proj/fc2 as an explicit per-channel shift and scale (costs a per-channel "
                        "subtract and multiply at inference)")
    p.add_argument("--rotate", action=argparse.BooleanOptionalAction, default=None,
                   help="Hadamard rotations of fc2's input (online, n log n adds per token), of v/proj and of q/k "
                        "(folded into qkv and proj), kept per layer where they lower its quantized output error "
                        "(vitq's addition, docs/methods.md). Default: on with --method mptq in the standard protocol at "
                        "<= 6 activation bits, single precision (rule R30) or with a budget or --config at base "
                        "widths <= 6 (rule R37), and with a budget or --config in the full protocol at base widths "
                        "<= 5 (rule R38); off otherwise; --no-rotate turns it off")
    p.add_argument("--rotate-parts", default=None,
                   help="with --rotate (implied): which rotations are searched, comma-separated of fc2, v (v/proj) "
                        "and qk (q and k per head, folded into qkv); default fc2,v,qk")
    p.add_argument("--token-scale", action=argparse.BooleanOptionalAction, default=None,
                   help="static power-of-two factors on the token positions of fc2's input whose values are massive "
                        "(ViT-Tiny's corner patches in block 7; one accumulator shift per such row), kept where they "
                        "lower its quantized output error (vitq's addition, docs/methods.md). Default: on with "
                        "--method mptq in the standard protocol at <= 6 activation bits, single precision (rule R31) "
                        "or with a budget or --config (rule R37), and in the full protocol wherever the GELU inputs "
                        "have token shifts (rule R33); off otherwise; --no-token-scale turns it off")
    p.add_argument("--opt-m", action="store_true", help="two-region quantizer search for post-GELU/softmax")
    p.add_argument("--m-max", type=int, default=None,
                   help="largest OPT-m ratio exponent (default: max(4, bits-1) per tensor)")
    p.add_argument("--opt-m-ptf", action=argparse.BooleanOptionalAction, default=None,
                   help="full protocol: OPT-m also searches the residual stream's PTF steps, objective set by "
                        "--opt-m-ptf-objective (default: on with OPT-m; --no-opt-m-ptf keeps per-channel min-max); "
                        "docs/methods.md")
    p.add_argument("--opt-m-ptf-objective", choices=list(PTF_OBJECTIVES), default=None,
                   help="what the PTF search minimizes: normalized (default: each token's error over the residual "
                        "stream's variance there, as the next LayerNorm sees it) or tensor (the grid's own squared "
                        "error, the default before session 12); docs/methods.md")
    p.add_argument("--gptq", action="store_true",
                   help="GPTQ weight rounding after calibration (vitq's addition to MPTQ-ViT; on with --method mptq)")
    p.add_argument("--no-gptq", action="store_true", help="--method mptq without GPTQ (the paper's methods only)")
    p.add_argument("--gptq-max-bits", type=int, default=5,
                   help="GPTQ re-rounds layers with at most this many weight bits; wider ones keep "
                        "round-to-nearest (default 5, see docs/methods.md)")
    p.add_argument("--recon", action="store_true",
                   help="block reconstruction of step sizes after GPTQ, at <= --recon-max-bits activation "
                        "bits (vitq's addition; on with --method mptq)")
    p.add_argument("--no-recon", action="store_true", help="--method mptq without block reconstruction")
    p.add_argument("--recon-iters", type=int, default=MethodOptions.recon_iters,
                   help=f"Adam steps per reconstruction stage (default {MethodOptions.recon_iters})")
    p.add_argument("--recon-drop", type=float, default=MethodOptions.recon_drop,
                   help="QDrop probability during reconstruction: each activation element stays float with "
                        f"this probability (default {MethodOptions.recon_drop}; docs/methods.md)")
    p.add_argument("--recon-max-bits", type=int, default=MethodOptions.recon_max_bits,
                   help="reconstruction runs when the default activation width is at most this "
                        f"(default {MethodOptions.recon_max_bits})")
    p.add_argument("--no-recon-ptf", action="store_true",
                   help="reconstruction keeps the PTF grids' steps (full protocol's residual stream)")
    p.add_argument("--mixed", action="store_true", help="Greedy MP mixed precision (needs a budget)")
    p.add_argument("--budget-w", type=float, help="target average weight bits")
    p.add_argument("--budget-a", type=float, help="target average activation bits")
    p.add_argument("--budget-mb", type=float, help="target model size in MB")
    p.add_argument("--budget-gbops", type=float, help="target GBOPs per image (MACs x W bits x A bits)")
    p.add_argument("--probe-images", type=int,
                   help="calibration images used to measure sensitivities (default 16 for the knapsack search, "
                        "8 for the greedy loop and m2q)")
    p.add_argument("--lower-per-step", type=int, default=4, help="items Greedy MP lowers before each re-run")
    p.add_argument("--mp-search", choices=list(SEARCHES),
                   help="how the mixed-precision assignment is searched: a knapsack on each tensor's measured loss "
                        "alone (default for bit and MB budgets), the paper's greedy loop (default for "
                        "--budget-gbops); docs/methods.md")
    p.add_argument("--budget-edp", type=float, help="m2q: at most this fraction of the INT8 baseline's EDP")
    p.add_argument("--budget-energy", type=float, help="m2q: at most this fraction of the INT8 baseline's energy")
    p.add_argument("--budget-latency", type=float, help="m2q: at most this fraction of the INT8 baseline's latency")
    p.add_argument("--hw", help="m2q: accelerator YAML merged over the defaults")
    p.add_argument("--w-candidates", help="candidate weight bits (default 4,5,6,8; m2q 4,8)")
    p.add_argument("--a-candidates", help="candidate activation bits (default 4,5,6,8; m2q 8)")
    p.add_argument("--mp-gptq-losses", action=argparse.BooleanOptionalAction, default=None,
                   help="knapsack search with GPTQ: measure each weight's loss at <= --gptq-max-bits "
                        "with the weights GPTQ would give it, not round-to-nearest (default: on where it applies, "
                        "rules R16/R17 in docs/methods.md; --no-mp-gptq-losses for round-to-nearest losses)")
    p.add_argument("--uniform-fallback", action=argparse.BooleanOptionalAction, default=None,
                   help="after the search, return a single width meeting the budget instead when it scores a lower "
                        "probe KL. Default: off with --method mptq at base widths <= 6 in the standard protocol "
                        "(rule R37) and <= 5 in the full (rule R38), on otherwise; --no-uniform-fallback keeps the searched assignment")
    p.add_argument("--out", required=True, help="output folder: report.json, model.safetensors, config.json; a new "
                                                "path, or an earlier vitq result with --overwrite")
    _add_overwrite(p)
    p.add_argument("--allow-overlap", action="store_true",
                   help="run even when calibration and evaluation images overlap (the report says so)")
    p.add_argument("--quiet", action="store_true", help="do not print the per-tensor table")
    _add_data_opts(p)
    p.set_defaults(func="quantize")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # the API reports through the "vitq" logger; on the command line its messages are ordinary output
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("vitq")
    logger.addHandler(handler)
    level, logger.level = logger.level, logging.INFO
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
