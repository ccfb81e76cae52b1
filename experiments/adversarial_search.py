"""The search for an adversarial-only recipe (``toy_gan_only``), and the discriminator's diagnostics.

Each setting is the ``toy_gan_only`` config (or the ``toy`` one) with a few overrides, trained for the
same number of steps from the same store and scored on the same prompts, unpaired (docs/evaluation.md).
The table (``OUT/search.md``, ``OUT/search.json``) gives for each: gap closed, FD to the 8-step
reference, all named right, recall, omitted-attribute TV, and the discriminator's held-out accuracy
and the adversarial terms' gradient share over the last logged steps. Finished runs are skipped.

    python experiments/adversarial_search.py --store out/demo/store [--settings gan_only conv_heads ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from toyruns import reference_row, run_one, summarise, table

from twostep.common.logs import configure_logging

# The discriminator of the default toy config: conv heads, per-token hinge, misaligned caption pairs.
CONV = ["model.disc_head=conv", "loss.gan_reduce=token", "loss.misaligned_fakes=true"]

# The discriminator that separated naive 2 steps from 8 best in the probe (docs/results/discriminator_probe.md).
PROBE_D = ["loss.sigma_mean=-3.0", "loss.sigma_std=0.3", "model.disc_text=true", "optim.disc_lr=3e-3"]

# name: (config, overrides, what it tests)
SETTINGS: dict[str, tuple[str, list[str], str]] = {
    "gan_only": ("toy_gan_only", [], "the shipped adversarial-only recipe: MLP heads, hinge on the token-averaged "
                 "logit, three discriminator updates per student update"),
    "conv_heads": ("toy_gan_only", CONV, "conv heads, per-token hinge, misaligned pairs"),
    "conv_g_every1": ("toy_gan_only", [*CONV, "optim.g_every=1"],
                      "conv heads …, one discriminator update per student update"),
    "conv_g_every5": ("toy_gan_only", [*CONV, "optim.g_every=5"],
                      "conv heads …, five discriminator updates per student update (DMD2's)"),
    "conv_g_every1_lr3e-5": ("toy_gan_only", [*CONV, "optim.g_every=1", "optim.lr=3e-5"],
                             "conv heads …, one discriminator update per student update, student lr 3e-5"),
    "token_hinge": ("toy_gan_only", ["loss.gan_reduce=token"], "per-token hinge"),
    "misaligned": ("toy_gan_only", ["loss.misaligned_fakes=true"], "misaligned caption pairs as fakes"),
    "sigma0": ("toy_gan_only", ["loss.sigma_mean=0.0"], "re-noising logit mean 0 instead of −0.6"),
    "sigma_low": ("toy_gan_only", ["loss.sigma_mean=-1.2"], "re-noising logit mean −1.2"),
    "g_every5": ("toy_gan_only", ["optim.g_every=5"], "five discriminator updates per student update"),
    "lr2e-5": ("toy_gan_only", ["optim.lr=2e-5"], "student lr 2e-5"),
    "no_g_start": ("toy_gan_only", ["optim.g_start=0"], "no discriminator-only start"),
    "dlr1e-4": ("toy_gan_only", ["optim.disc_lr=1e-4"], "discriminator lr 1e-4"),
    "logistic": ("toy_gan_only", ["loss.gan_loss=logistic"], "non-saturating logistic loss instead of hinge"),
    "r1": ("toy_gan_only", ["loss.r1_weight=1.0"], "approximate R1, weight 1"),
    "final_only": ("toy_gan_only", ["loss.step1_loss=none"], "no step-1 adversarial term"),
    "gan_only_probe_d": ("toy_gan_only", [*CONV, *PROBE_D, "optim.g_every=1"],
                         "the probe's best discriminator, student every step"),
    "gan_only_probe_d_lr3e-5": ("toy_gan_only", [*CONV, *PROBE_D, "optim.g_every=1", "optim.lr=3e-5"],
                                "the probe's best discriminator, student every step at lr 3e-5"),
    "gan_only_probe_d_g3": ("toy_gan_only", [*CONV, *PROBE_D],
                            "the probe's best discriminator, student every third step (toy_gan_only's balance)"),
    "gan_only_probe_d_mlp": ("toy_gan_only", [*PROBE_D, "optim.g_every=1"],
                             "the probe's best re-noising, text and lr on toy_gan_only's MLP heads, student every step"),
    "full": ("toy", [], "the default toy config (regressions + adversarial terms)"),
    "full_low_noise": ("toy", ["loss.sigma_mean=-3.0", "loss.sigma_std=0.3", "model.disc_text=true",
                               "optim.disc_lr=3e-3"],
                       "the default toy config with the probe's best discriminator: re-noising near σ = 0, "
                       "text-conditioned heads, discriminator lr 3e-3"),
    "full_mlp_d": ("toy", ["model.disc_head=mlp", "loss.gan_reduce=image", "loss.misaligned_fakes=false",
                           "optim.disc_lr=2e-4", "loss.sigma_mean=0.0"],
                   "the toy config with its earlier discriminator"),
    "regress_only": ("toy", ["loss.adv_weight=0", "loss.step1_loss=regress"], "the regressions alone"),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", required=True, help="a toy teacher store (twostep generate, or twostep demo's)")
    ap.add_argument("--out", default="runs/adversarial_search", help="runs and the table")
    ap.add_argument("--steps", type=int, default=250, help="training steps per run (default: 250)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds per setting (default: 0)")
    ap.add_argument("--eval-samples", type=int, default=1000, help="eval prompts per run (default: 1000)")
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    ap.add_argument("--table-only", action="store_true",
                    help="only tabulate the finished runs of the chosen settings and seeds; train nothing")
    ap.add_argument("--set", dest="extra", nargs="*", default=[], metavar="KEY=VALUE",
                    help="overrides applied to every setting (e.g. log_with=none)")
    args = ap.parse_args(argv)
    configure_logging(quiet=True)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    out = Path(args.out)
    results: dict[str, list[dict]] = {}
    for seed in args.seeds:
        for name in args.settings:
            config, overrides, _ = SETTINGS[name]
            if args.table_only and not (out / f"{name}-seed{seed}" / "eval" / "metrics.json").exists():
                continue
            m = run_one(name, config, overrides, seed, args.store, args.steps, args.eval_samples, out, args.extra)
            results.setdefault(name, []).append(m)
            summary = summarise(results)
            for k, ms in results.items():
                diag = [x["run"]["diagnostics"] for x in ms]
                summary[k]["diagnostics"] = diag
                summary[k]["what"] = SETTINGS[k][2]
                summary[k]["overrides"] = [SETTINGS[k][0], *SETTINGS[k][1]]
            refs = reference_row(next(iter(results.values())))
            (out / "search.json").write_text(json.dumps({"args": vars(args), "summary": summary, "reference": refs},
                                                        indent=1))
            (out / "search.md").write_text(table(summary, refs) + "\n")
            print(f"{name} seed {seed}: gap closed {m['gap_closed']}, all named right "
                  f"{m['student2']['accuracy']['all']:.3f}, recall {m['student2']['recall']:.3f}, "
                  f"D held-out accuracy {m['run']['diagnostics'].get('disc/heldout_accuracy')}", flush=True)
    print(table(summarise(results), reference_row(next(iter(results.values())))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
