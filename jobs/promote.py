"""Move `champion` to a registered version only if its test bound beats the current champion's.

    python -m jobs.promote --model kpp-digits --version 3 [--data URL]

Both bounds are read from the versions' tags (test.neg_elbo, measured by their training runs) and compared only
when they were measured on the same test episodes (the test.episodes fingerprint); with --data, both are
recomputed now on that prepared dataset's test episodes (the candidate's count, episode mode and seeds), so
versions measured on other episodes can be compared too. Prints both numbers and the decision, which also goes on
the version's tags (champion.decision, champion.reason, champion.bound_at_decision). The same function decides
after jobs.train and jobs.tune register a version (pipeline.registry.promotion.promote).
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
    ap.add_argument("--data", default="", help="recompute both bounds on this prepared dataset's test episodes")
    ap.add_argument("--tracking-uri", default="", help="default: MLFLOW_TRACKING_URI, else jobs.train's store")
    return ap.parse_args(argv)


def _measure(uri: str, name: str, version: str, data: str):
    """measure(champion_version) for promotion.promote: the -ELBO of both versions on the candidate's test
    episodes of `data`, with the same draws."""
    from pipeline.registry import evaluation, loading

    def measure(champion: str) -> tuple[float, float, str]:
        candidate = loading.load(f"models:/{name}/{version}", uri)
        tests = evaluation.test_set(candidate, data)
        holder = loading.load(f"models:/{name}/{champion}", uri)
        evaluation.test_set(holder, data)  # the same checks of the data for the champion
        bounds = []
        for reg in (candidate, holder):
            r = evaluation.evaluate(reg, tests, iwae_samples=1, leave_one_out=False)
            bounds.append(r["bounds"]["neg_elbo"]["mean"])
            print(f"  {reg.label}: {r['bounds']['neg_elbo']['mean']:.3f} {r['unit']} "
                  f"(95% interval [{r['bounds']['neg_elbo']['low']:.3f}, {r['bounds']['neg_elbo']['high']:.3f}])")
        return bounds[0], bounds[1], f"{tests.count} test episodes of {data} (fingerprint {tests.fingerprint})"
    return measure


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    from pipeline.registry import loading, promotion
    from pipeline.urls import redact_text
    try:
        uri = loading.tracking_uri(args.tracking_uri)
        ref = loading.parse_model_uri(f"models:/{args.model}/{args.version}")
        mv = loading.resolve(ref, uri)
        measure = _measure(uri, args.model, str(mv.version), args.data) if args.data else None
        decision = promotion.promote(uri, args.model, str(mv.version), args.alias, measure=measure)
    except (loading.RegistryError, ValueError) as e:  # ValueError: a version without a bound
        print(f"jobs.promote: {redact_text(str(e))}", file=sys.stderr)
        return 2
    unit = mv.tags.get(promotion.UNIT_TAG, "")
    champ = ("none" if decision.champion_bound is None
             else f"{decision.champion_bound:.3f} {unit} (version {decision.champion_version})")
    print(f"{args.model} version {mv.version}: test bound {decision.bound:.3f} {unit}; {args.alias} before: {champ}")
    already = decision.promoted and str(decision.champion_version) == str(mv.version)
    moved = "already on version " + str(mv.version) if already else (
        "moved to version " + str(mv.version) if decision.promoted else "not moved")
    print(f"{args.alias}: {moved}: {decision.reason}")
    print(json.dumps({"model": args.model, "version": str(mv.version), "alias": args.alias,
                      "promoted": decision.promoted, "bound": decision.bound,
                      "champion_bound": decision.champion_bound, "champion_version": decision.champion_version,
                      "reason": decision.reason}))
    return 0


if __name__ == "__main__":
    from pipeline.redaction import install
    install()  # no credential in what this process writes (pipeline.redaction)
    sys.exit(main())
