"""Compare two quantized models image by image on the same evaluation images, with standard errors.

Reads two per-image files written by ``benchmarks/mptq_ablation.py --per-image FILE`` and, for every model
in both, pairs their rows in order (the i-th row of that model in A with the i-th in B; both must have the
same protocol and the same image list). For each pair it prints B minus A: top-1, agreement with FP and
KL from FP, each with the paired standard error over images (docs/design.md "Uncertainty"), and on how
many images B's KL is lower than A's. 1.96 SE is a 95 % interval; a difference inside about 2 SE is not
distinguishable from the choice of images.

    python benchmarks/mptq_ablation.py --models deit_tiny --variants single:standard:6:mptq --per-image runs/a.json
    python benchmarks/mptq_ablation.py --models deit_tiny --variants single:standard:6:mptq --rotate \\
        --per-image runs/b.json
    python benchmarks/paired_compare.py runs/a.json runs/b.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vitq.evaluation import paired_difference


def load(path: str) -> dict:
    """Read a per-image file; exits with a message naming the file when it is not one."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"{path}: cannot read a per-image file ({e})")
    if not isinstance(data, dict) or "rows" not in data or "images" not in data:
        raise SystemExit(f"{path}: not a per-image file of mptq_ablation.py --per-image (no 'rows'/'images')")
    for r in data["rows"]:
        if r.get("kl") is None or r.get("agree") is None:
            raise SystemExit(f"{path}: row {r.get('variant')!r} has no agreement/KL (evaluated without FP reference)")
    return data


def compare(a: dict, b: dict, a_rows: list[int] | None = None, b_rows: list[int] | None = None) -> list[dict]:
    """Paired differences (B - A) for every model in both files.

    Args:
        a, b: per-image files as written by ``mptq_ablation.py --per-image``.
        a_rows, b_rows: keep only these rows (0-based, per model, in file order) of A / of B; None keeps all.

    Returns:
        One dict per paired row: ``model``, the two variants, ``top1_a/b``, ``kl_a/b``, the differences
        ``d_top1``, ``d_agreement`` (points), ``d_kl`` with their standard errors (``*_se``), and
        ``kl_lower`` (images where B's KL is lower) out of ``n``.

    Raises:
        SystemExit: when a model's image lists, row counts or protocols differ between the files.
    """
    out = []
    for model in [m for m in a["images"] if m in b["images"]]:
        if a["images"][model] != b["images"][model]:
            raise SystemExit(f"{model}: the two files were evaluated on different images; nothing to pair")
        ra = _pick([r for r in a["rows"] if r["model"] == model], a_rows, model, "A")
        rb = _pick([r for r in b["rows"] if r["model"] == model], b_rows, model, "B")
        if len(ra) != len(rb):
            raise SystemExit(f"{model}: {len(ra)} rows in A but {len(rb)} in B; pair files with the same variants")
        for x, y in zip(ra, rb):
            if x["protocol"] != y["protocol"]:
                raise SystemExit(f"{model}: row {x['variant']!r} ({x['protocol']}) is paired with "
                                 f"{y['variant']!r} ({y['protocol']}); the protocols differ")
            n = len(x["kl"])
            d_top1, se_top1 = paired_difference([100.0 * v for v in x["correct"]], [100.0 * v for v in y["correct"]])
            d_agr, se_agr = paired_difference([100.0 * v for v in x["agree"]], [100.0 * v for v in y["agree"]])
            d_kl, se_kl = paired_difference(x["kl"], y["kl"])
            out.append(dict(model=model, protocol=x["protocol"], variant_a=x["variant"], variant_b=y["variant"], n=n,
                            top1_a=100.0 * sum(x["correct"]) / n, top1_b=100.0 * sum(y["correct"]) / n,
                            kl_a=sum(x["kl"]) / n, kl_b=sum(y["kl"]) / n, d_top1=d_top1, d_top1_se=se_top1,
                            d_agreement=d_agr, d_agreement_se=se_agr, d_kl=d_kl, d_kl_se=se_kl,
                            kl_lower=sum(q < p for p, q in zip(x["kl"], y["kl"]))))
    return out


def _se(v, spec: str = ".2f") -> str:
    return "n/a" if v is None else format(v, spec)


def _ratio(d: float, se) -> str:
    """A difference in units of its standard error (what rule R30 reads)."""
    return "n/a" if not se else f"{d / se:+.2f}"


def _pick(rows: list[dict], keep: list[int] | None, model: str, which: str) -> list[dict]:
    if keep is None:
        return rows
    if any(not 0 <= k < len(rows) for k in keep):
        raise SystemExit(f"{model}: --{which.lower()}-rows {keep} but {which} has {len(rows)} rows of this model")
    return [rows[k] for k in keep]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", help="per-image file of the first run (A)")
    ap.add_argument("b", help="per-image file of the second run (B); differences are B - A")
    for which in ("a", "b"):
        ap.add_argument(f"--{which}-rows", type=lambda t: [int(v) for v in t.split(",")],
                        help=f"pair only these rows of each model in {which.upper()} (0-based, comma-separated, "
                             "file order)")
    args = ap.parse_args()
    rows = compare(load(args.a), load(args.b), args.a_rows, args.b_rows)
    if not rows:
        raise SystemExit("the two files share no model")
    print(f"# B - A, paired over the same images; A = {args.a}, B = {args.b}")
    print("| model | protocol | A | B | top-1 A -> B | d top-1 (SE) | d agreement (SE) | KL A -> B | d KL (SE) | "
          "d KL / SE | d agreement / SE | images with lower KL in B |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['protocol']} | {r['variant_a']} | {r['variant_b']} | {r['top1_a']:.2f} -> "
              f"{r['top1_b']:.2f} | {r['d_top1']:+.2f} ({_se(r['d_top1_se'])}) | {r['d_agreement']:+.2f} "
              f"({_se(r['d_agreement_se'])}) | {r['kl_a']:.4f} -> {r['kl_b']:.4f} | {r['d_kl']:+.4f} "
              f"({_se(r['d_kl_se'], '.4f')}) | {_ratio(r['d_kl'], r['d_kl_se'])} | "
              f"{_ratio(r['d_agreement'], r['d_agreement_se'])} | {r['kl_lower']} of {r['n']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
