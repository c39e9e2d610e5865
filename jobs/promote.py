"""Move `champion` to a registered version only if its test bound beats the current champion's.

    python -m jobs.promote --model kpp-digits --version 3 [--metric chain_neg_elbo] [--data URL]

The bound is --metric (default chain_neg_elbo, the chain bound: a proper bound on -ln p(X)/T; the memory-conditional
neg_elbo, the paper's, is lowered by a memory that copies each image to its own prior). Both versions' values are
read from their tags (test.<metric>, measured by their training runs) and compared only when they were measured on
the same test episodes (the test.episodes fingerprint); a champion registered before that bound was measured has
no such tag and is not compared. With --data, both are recomputed now on that prepared dataset's test episodes (the
candidate's count, episode mode and seeds), so versions measured on other episodes can be compared too. Prints
both numbers and the decision, which also goes on the version's tags (champion.decision, champion.reason,
champion.metric, champion.bound_at_decision). The same function decides after jobs.train and jobs.tune register a
version (pipeline.registry.promotion.promote, on the job's tracking.champion_metric).
Exit status: 0 decided (moved or not), 2 bad input (unknown model or version, a version without a bound, tracking
server down, data that does not match).
"""
from __future__ import annotations

import argparse
import json
import sys


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m jobs.promote", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="registered model name, e.g. kpp-digits")
    ap.add_argument("--version", required=True, help="the version that may become champion")
    ap.add_argument("--alias", default="champion", help="the alias to move (default champion)")
    ap.add_argument("--metric", default="chain_neg_elbo",
                    help="the test bound compared (default chain_neg_elbo; chain_iwae, loo_neg_elbo, loo_iwae, "
                         "neg_elbo, iwae: kpp/bounds.py)")
    ap.add_argument("--data", default="", help="recompute both bounds on this prepared dataset's test episodes")
    ap.add_argument("--tracking-uri", default="", help="default: MLFLOW_TRACKING_URI, else jobs.train's store")
    return ap.parse_args(argv)


def _measure(uri: str, name: str, version: str, data: str, metric: str):
    """measure(champion_version) for promotion.promote: bound `metric` of both versions on the candidate's test
    episodes of `data`, with the same draws."""
    from pipeline.registry import evaluation, loading, naming

    def measure(champion: str) -> tuple[float, float, str]:
        candidate = loading.load(f"models:/{name}/{version}", uri)
        tests = evaluation.test_set(candidate, data)
        holder = loading.load(f"models:/{name}/{champion}", uri)
        evaluation.test_set(holder, data)  # the same checks of the data for the champion
        # an IWAE bound with the candidate's recorded sample count for both; an ELBO needs one draw
        samples = int(candidate.tags.get(naming.IWAE_SAMPLES, 16)) if metric.endswith("iwae") else 1
        bounds = []
        for reg in (candidate, holder):
            r = evaluation.evaluate(reg, tests, iwae_samples=samples, leave_one_out=metric.startswith("loo_"))
            b = r["bounds"][metric]
            bounds.append(b["mean"])
            print(f"  {reg.label}: {metric} {b['mean']:.3f} {r['unit']} (95% interval [{b['low']:.3f}, "
                  f"{b['high']:.3f}])")
        return bounds[0], bounds[1], f"{tests.count} test episodes of {data} (fingerprint {tests.fingerprint})"
    return measure


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    from pipeline.registry import loading, promotion
    from pipeline.urls import redact_text
    try:
        promotion.check_metric(args.metric, "--metric")
        uri = loading.tracking_uri(args.tracking_uri)
        ref = loading.parse_model_uri(f"models:/{args.model}/{args.version}")
        mv = loading.resolve(ref, uri)
        measure = _measure(uri, args.model, str(mv.version), args.data, args.metric) if args.data else None
        decision = promotion.promote(uri, args.model, str(mv.version), args.alias, measure=measure,
                                     metric=args.metric)
    except (loading.RegistryError, ValueError) as e:  # ValueError: an unknown --metric, a version without it
        print(f"jobs.promote: {redact_text(str(e))}", file=sys.stderr)
        return 2
    unit = mv.tags.get(promotion.UNIT_TAG, "")
    champ = ("none" if decision.champion_bound is None
             else f"{decision.champion_bound:.3f} {unit} (version {decision.champion_version})")
    print(f"{args.model} version {mv.version}: test {promotion.BOUNDS[decision.metric]} {decision.bound:.3f} {unit}; "
          f"{args.alias} before: {champ}")
    already = decision.promoted and str(decision.champion_version) == str(mv.version)
    moved = "already on version " + str(mv.version) if already else (
        "moved to version " + str(mv.version) if decision.promoted else "not moved")
    print(f"{args.alias}: {moved}: {decision.reason}")
    print(json.dumps({"model": args.model, "version": str(mv.version), "alias": args.alias,
                      "metric": decision.metric, "promoted": decision.promoted, "bound": decision.bound,
                      "champion_bound": decision.champion_bound, "champion_version": decision.champion_version,
                      "reason": decision.reason}))
    return 0


if __name__ == "__main__":
    from pipeline.redaction import install
    install()  # no credential in what this process writes (pipeline.redaction)
    sys.exit(main())
