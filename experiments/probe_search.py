"""The discriminator probe across recipe points: which discriminator can see the gap between the
teacher's naive 2 steps and its 8 steps? (docs/results/discriminator_probe.md)

Each setting is a config plus overrides, probed with ``twostep probe-disc``'s code: a fresh
discriminator trained for ``--steps`` steps against the frozen naive sampler, scored every ``--every``
steps on the store's held-out slice (store samples never streamed to it, naive samples from their
noise). The table gives the last and best held-out AUC and accuracy of the final term and the step-1
term, and the seconds each probe took (their costs differ; the steps are equal). Finished probes are
read back, not redone.

    python experiments/probe_search.py --store out/demo/store [--settings toy low_noise ...] [--seeds 0]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from twostep.common.logs import configure_logging

# The discriminator of the toy config before the probe (re-noising logit-normal(−0.6, 1), untied heads, lr 1e-3):
# every "toy" setting below starts from it, so the rows stay what they were when the toy config moves on.
OLD_TOY = ["loss.sigma_mean=-0.6", "loss.sigma_std=1.0", "model.disc_text=false", "optim.disc_lr=1e-3"]

# name: (config, overrides, what it changes)
SETTINGS: dict[str, tuple[str, list[str], str]] = {
    "toy": ("toy", [], "the toy config's discriminator: conv heads on layers 1 and 3, per-token hinge, misaligned "
            "pairs, re-noising logit mean −0.6"),
    "gan_only": ("toy_gan_only", [], "toy_gan_only's: MLP heads, hinge on the token-averaged logit"),
    "high_noise": ("toy", ["loss.sigma_mean=1.0"], "re-noising logit mean +1 (median σ 0.73)"),
    "uniform": ("toy", ["loss.sigma_dist=uniform"], "re-noising σ uniform on [0.02, 0.98]"),
    "low_noise": ("toy", ["loss.sigma_mean=-3.0", "loss.sigma_std=0.3"], "re-noising near σ = 0 (median 0.05)"),
    "independent": ("toy", ["loss.independent_renoise=true"], "real and fake re-noised independently"),
    "text": ("toy", ["model.disc_text=true"], "text-conditioned (projection) heads"),
    "deep_wide": ("toy", ["model.disc_layers=[0, 1, 2, 3]", "model.disc_hidden=256"],
                  "all four layers, heads 256 wide"),
    "logistic": ("toy", ["loss.gan_loss=logistic"], "non-saturating logistic loss"),
    "r1": ("toy", ["loss.r1_weight=1.0"], "approximate R1, weight 1"),
    "step1_x0": ("toy", ["loss.step1_adv_on=x0"], "step-1 term on x̂0₁ re-noised across noise levels"),
    "image_hinge": ("toy", ["loss.gan_reduce=image"], "hinge on the token-averaged logit"),
    "dlr3e-3": ("toy", ["optim.disc_lr=3e-3"], "discriminator lr 3e-3"),
    "low_noise_text": ("toy", ["loss.sigma_mean=-3.0", "loss.sigma_std=0.3", "model.disc_text=true"],
                       "near σ = 0, text-conditioned heads"),
    "low_noise_deep": ("toy", ["loss.sigma_mean=-3.0", "loss.sigma_std=0.3", "model.disc_layers=[0, 1, 2, 3]",
                               "model.disc_hidden=256"], "near σ = 0, all four layers, heads 256 wide"),
    "low_noise_image": ("toy", ["loss.sigma_mean=-3.0", "loss.sigma_std=0.3", "loss.gan_reduce=image"],
                        "near σ = 0, hinge on the token-averaged logit"),
    "low_noise_text_deep": ("toy", ["loss.sigma_mean=-3.0", "loss.sigma_std=0.3", "model.disc_text=true",
                                    "model.disc_layers=[0, 1, 2, 3]", "model.disc_hidden=256"],
                            "near σ = 0, text-conditioned heads on all four layers, 256 wide"),
    "low_noise_text_lr": ("toy", ["loss.sigma_mean=-3.0", "loss.sigma_std=0.3", "model.disc_text=true",
                                  "optim.disc_lr=3e-3"], "near σ = 0, text-conditioned heads, discriminator lr 3e-3 "
                          "(the toy config's discriminator since)"),
    "low_noise_text_logistic": ("toy", ["loss.sigma_mean=-3.0", "loss.sigma_std=0.3", "model.disc_text=true",
                                        "loss.gan_loss=logistic"], "near σ = 0, text-conditioned heads, logistic loss"),
    "low_noise_text_mlp": ("toy", ["loss.sigma_mean=-3.0", "loss.sigma_std=0.3", "model.disc_text=true",
                                   "model.disc_head=mlp"], "near σ = 0, text-conditioned MLP heads"),
    "lowish_noise": ("toy", ["loss.sigma_mean=-2.0", "loss.sigma_std=0.5"], "re-noising logit mean −2 (median 0.12)"),
}


def table(rows: dict[str, dict]) -> str:
    lines = ["| setting | seed | what | held-out AUC, last (best) | held-out accuracy, last | step-1 term AUC, last "
             "(best) | seconds |", "|---|---|---|---|---|---|---|"]
    for key, r in rows.items():
        name, seed = key.rsplit("-seed", 1)
        mid = f"{r['last_auc_mid']:.3f} ({r['best_auc_mid']:.3f})" if "last_auc_mid" in r else "—"
        lines.append(f"| {name} | {seed} | {SETTINGS[name][2]} | {r['last_auc']:.3f} ({r['best_auc']:.3f}) | "
                     f"{r['last_accuracy']:.3f} | {mid} | {r.get('seconds', float('nan')):.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", required=True, help="a toy teacher store (twostep demo's out/demo/store)")
    ap.add_argument("--out", default="runs/probe_search", help="probe runs and the table")
    ap.add_argument("--steps", type=int, default=200, help="discriminator updates per probe (default: 200)")
    ap.add_argument("--every", type=int, default=25, help="steps between held-out checks (default: 25)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="probe seeds (default: 0)")
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    args = ap.parse_args(argv)
    configure_logging(quiet=True)
    from twostep.trainer.probe import probe, probe_config

    out = Path(args.out)
    table_json = out / "probe_search.json"
    rows: dict[str, dict] = json.loads(table_json.read_text())["rows"] if table_json.exists() else {}
    for seed in args.seeds:
        for name in args.settings:
            config, overrides, _ = SETTINGS[name]
            overrides = [*OLD_TOY, *overrides] if config == "toy" else overrides
            run = out / f"{name}-seed{seed}"
            if (run / "probe.json").exists():
                r = json.loads((run / "probe.json").read_text())
            else:
                t0 = time.perf_counter()
                cfg = probe_config(config, args.store, args.steps, args.every,
                                   [*overrides, f"seed={seed}", "log_with=none"])
                r = {**probe(cfg, run), "seconds": time.perf_counter() - t0}
                (run / "probe.json").write_text(json.dumps(r, indent=1))
            rows[f"{name}-seed{seed}"] = {k: v for k, v in r.items() if k != "config"}
            table_json.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
            (out / "probe_search.md").write_text(table(rows) + "\n")
            print(f"{name} seed {seed}: AUC last {r['last_auc']:.3f} best {r['best_auc']:.3f}", flush=True)
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
