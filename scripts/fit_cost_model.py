"""Fit the analytic cost model to MuxServe's measured A100-80GB latencies, and check it.

Fits every `AnalyticParams` field that shapes a latency — efficiencies (GEMMs, weight reads,
KV reads), the per-step and per-prefill overheads, the per-sequence cost, the all-reduce
latency, and the SM-share curves (bandwidth saturation and exponent, compute exponent) — by
least squares on log(predicted / measured) over every point of the table (LLaMA-7B/13B/30B/
65B, fp16, tp 1-8, SM 30-100 %, prefill and decode; spikes replaced as
`convert_muxserve_profile.py` does). Reports, for prefill and decode, the median predicted /
measured and the share of points within 0.8-1.25x:

- as the cluster file configured the model before (the roofline as first written),
- fitted on every model (and `AnalyticParams`' defaults: the fit, rounded),
- fitted on 7B, 13B and 65B, checked on 30B (held out).

Writes cost_fit.json and cost_fit.png (predicted against measured, log-log, by tp and SM
share) to --out.

    git -C MuxServe show 2231480:examples/placement/llama.json > llama.json
    python scripts/fit_cost_model.py llama.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from convert_muxserve_profile import SOURCE, despike  # noqa: E402

from muxserve.models.hf_config import load_hf_config  # noqa: E402
from placement.cost_model import AnalyticCostModel  # noqa: E402
from placement.gpus import BUILTIN_GPUS  # noqa: E402
from placement.params import ROOFLINE, AnalyticParams  # noqa: E402
from placement.specs import PlannerModel, spec_from_config  # noqa: E402

# the fields fitted, with their bounds
FIELDS: dict[str, tuple[float, float]] = {
    "compute_efficiency": (0.2, 1.0),
    "bandwidth_efficiency": (0.2, 1.0),
    "kv_bandwidth_efficiency": (0.05, 1.0),
    "step_overhead_s": (0.0, 0.02),
    "prefill_overhead_s": (0.0, 0.02),
    "per_seq_overhead_s": (0.0, 2e-4),
    "allreduce_latency_s": (0.0, 5e-4),
    "sm_bandwidth_saturation": (0.3, 1.0),
    "sm_bandwidth_exponent": (0.05, 1.0),
    "sm_compute_exponent": (0.3, 1.2),
}
BAND = (0.8, 1.25)


def load_points(path: Path) -> list[tuple[str, int, float, str, int, int, float]]:
    """(model, tp, SM share, phase, batch, length, seconds) for every measured point."""
    raw = json.loads(path.read_text())
    out = []
    for name, by_tp in raw.items():
        for tp, by_sm in by_tp.items():
            for sm, cell in by_sm.items():
                for phase in ("prefill", "decoding"):
                    grid = {
                        int(b): {int(n): float(v[phase]) for n, v in row.items() if v[phase] > 0}
                        for b, row in cell.items()
                    }
                    despike(grid)
                    for b, row in grid.items():
                        for n, ms in row.items():
                            out.append((name, int(tp), int(sm) / 100, phase, b, n, ms / 1e3))
    return out


def specs() -> dict[str, PlannerModel]:
    return {
        f"llama-{k}": spec_from_config(
            k, "", load_hf_config(ROOT / "configs" / "models" / f"llama-{k}"), "float16"
        )
        for k in ("7b", "13b", "30b", "65b")
    }


def predict(params: AnalyticParams, points: list, models: dict[str, PlannerModel]) -> np.ndarray:
    cm = AnalyticCostModel(BUILTIN_GPUS["A100-80GB"], params)
    out = np.empty(len(points))
    for k, (name, tp, sm, phase, b, n, _) in enumerate(points):
        spec = models[name]
        if phase == "prefill":
            out[k] = cm.prefill_latency(spec, tp, sm, b, n)
        else:
            out[k] = cm.decode_latency(spec, tp, sm, b, n)
    return out


def with_values(base: AnalyticParams, x: np.ndarray) -> AnalyticParams:
    return base.model_copy(update={f: float(v) for f, v in zip(FIELDS, x, strict=True)})


def fit(points: list, models: dict[str, PlannerModel], start: AnalyticParams) -> AnalyticParams:
    from scipy.optimize import least_squares

    measured = np.array([p[-1] for p in points])
    prefill = np.array([p[3] == "prefill" for p in points])
    # prefill and decode count alike, whatever their number of points
    weight = np.where(prefill, 1 / prefill.sum(), 1 / (~prefill).sum()) ** 0.5
    lo = np.array([b[0] for b in FIELDS.values()])
    hi = np.array([b[1] for b in FIELDS.values()])
    scale = np.maximum(hi, 1e-9)

    def residuals(z: np.ndarray) -> np.ndarray:
        pred = predict(with_values(start, z * scale), points, models)
        return weight * np.log(pred / measured)

    x0 = np.clip(np.array([getattr(start, f) for f in FIELDS]), lo, hi) / scale
    res = least_squares(residuals, x0, bounds=(lo / scale, hi / scale), loss="soft_l1",
                        f_scale=0.02, max_nfev=200)  # fmt: skip
    return with_values(start, res.x * scale)


def metrics(params: AnalyticParams, points: list, models: dict[str, PlannerModel]) -> dict:
    ratio = predict(params, points, models) / np.array([p[-1] for p in points])
    out = {}
    for phase, key in (("prefill", "prefill"), ("decoding", "decode")):
        r = ratio[np.array([p[3] == phase for p in points])]
        out[key] = {
            "points": int(r.size),
            "median": float(np.median(r)),
            "within_0.8_1.25": float(np.mean((r >= BAND[0]) & (r <= BAND[1]))),
            "p10": float(np.percentile(r, 10)),
            "p90": float(np.percentile(r, 90)),
        }
    return out


def plot(params: AnalyticParams, points: list, models: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pred = predict(params, points, models)
    meas = np.array([p[-1] for p in points])
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.2))
    for ax, phase in zip(axes, ("prefill", "decoding"), strict=True):
        for tp, color in zip((1, 2, 4, 8), ("C0", "C1", "C2", "C3"), strict=True):
            for sm, marker in ((1.0, "o"), (0.5, "s"), (0.3, "^")):
                sel = [k for k, p in enumerate(points)
                       if p[3] == phase and p[1] == tp and abs(p[2] - sm) < 1e-9]  # fmt: skip
                if sel:
                    ax.scatter(meas[sel] * 1e3, pred[sel] * 1e3, s=6, c=color, marker=marker,
                               alpha=0.5, label=f"tp {tp}, SM {sm:.0%}")  # fmt: skip
        lo, hi = meas.min() * 1e3 * 0.8, meas.max() * 1e3 * 1.25
        ax.plot([lo, hi], [lo, hi], "k-", lw=0.8)
        ax.plot([lo, hi], [lo * BAND[0], hi * BAND[0]], "k:", lw=0.6)
        ax.plot([lo, hi], [lo * BAND[1], hi * BAND[1]], "k:", lw=0.6)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("measured (ms)")
        ax.set_ylabel("predicted (ms)")
        ax.set_title(f"{phase}: fitted analytic model vs A100-80GB table")
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source", type=Path, help="MuxServe's examples/placement/llama.json")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "placement")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    points, models = load_points(args.source), specs()
    before, defaults = ROOFLINE, AnalyticParams()
    start = before.model_copy(update={"kv_read": "separate"})
    fitted = fit(points, models, start)
    train = [p for p in points if p[0] != "llama-30b"]
    held = [p for p in points if p[0] == "llama-30b"]
    fitted_wo30 = fit(train, models, start)
    result = {
        "source": SOURCE,
        "gpu": "A100-80GB",
        "before": {"params": before.model_dump(), "all": metrics(before, points, models)},
        "fitted": {"params": fitted.model_dump(), "all": metrics(fitted, points, models)},
        "defaults": {"params": defaults.model_dump(), "all": metrics(defaults, points, models)},
        "held_out_30b": {
            "params": fitted_wo30.model_dump(),
            "train": metrics(fitted_wo30, train, models),
            "30b": metrics(fitted_wo30, held, models),
        },
    }
    (args.out / "cost_fit.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(fitted, points, models, args.out / "cost_fit.png")
    for name, m in (("roofline as written", result["before"]["all"]),
                    ("fitted", result["fitted"]["all"]),
                    ("defaults (rounded)", result["defaults"]["all"]),
                    ("fit w/o 30B, on 30B", result["held_out_30b"]["30b"])):  # fmt: skip
        print(
            f"{name:>20}: prefill median {m['prefill']['median']:.2f}, "
            f"{m['prefill']['within_0.8_1.25']:.0%} within 0.8-1.25; decode median "
            f"{m['decode']['median']:.2f}, {m['decode']['within_0.8_1.25']:.0%} within"
        )
    print(json.dumps({f: getattr(fitted, f) for f in FIELDS}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
