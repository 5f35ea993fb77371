"""Fuzzes every parser of outside data and reports inputs tried, outcomes and line coverage per parser.

    nice python benchmarks/fuzz_parsers.py [--inputs 10000] [--only gguf ...]

The fuzzers are tests/reliability/fuzz_lib.py's (structure-aware mutations of valid files). Each parser gets its
own coverage.py measurement (plus the lines its modules run at import), so the coverage column says how much of
the parser's module the mutated inputs reached. Exit status 1 if any input crashed. Writes the "fuzz" section of
benchmarks/results/reliability.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path

import coverage

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "reliability"))
sys.path.insert(0, str(Path(__file__).parent))

MODULES = ["mamba_llama_jax/convert/gguf.py", "mamba_llama_jax/convert/hf.py",
           "mamba_llama_jax/convert/torch_pickle.py",
           "mamba_llama_jax/convert/mambainllama.py", "mamba_llama_jax/config.py", "mamba_llama_jax/data/sources.py",
           "mamba_llama_jax/data/tokenizer.py"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inputs", type=int, default=10_000, help="inputs per parser")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--time-limit", type=float, default=10.0, help="seconds allowed per input")
    ap.add_argument("--mem-limit-gib", type=float, default=4.0, help="address space allowed above start-up")
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--no-report", action="store_true")
    args = ap.parse_args()
    warnings.simplefilter("ignore")  # dequantizing mutated blocks overflows by design

    include = [str(ROOT / m) for m in MODULES]
    at_import = coverage.Coverage(data_file=None, include=include)
    at_import.start()
    import fuzz_lib  # noqa: F401 - imports every parser module under measurement
    from mamba_llama_jax.convert import gguf, hf, mambainllama, torch_pickle  # noqa: F401
    from mamba_llama_jax import config  # noqa: F401
    from mamba_llama_jax.data import sources, tokenizer  # noqa: F401
    at_import.stop()

    results = []
    work = Path(tempfile.mkdtemp(prefix="fuzz_parsers_"))
    for name, make in fuzz_lib.FUZZERS.items():
        if args.only and name not in args.only:
            continue
        fz = make(work / name if (work / name).mkdir() is None else work)
        cov = coverage.Coverage(data_file=None, include=include)
        cov.start()
        r = fuzz_lib.run_fuzzer(fz, args.inputs, seed=args.seed, time_limit_s=args.time_limit,
                                mem_limit_bytes=int(args.mem_limit_gib * 2 ** 30))
        cov.stop()
        cov.get_data().update(at_import.get_data())
        r["coverage"] = {}
        for m in fz.modules:
            _, statements, _, missing, missing_text = cov.analysis2(str(ROOT / m))
            r["coverage"][m] = {"statements": len(statements), "missing": len(missing),
                                "percent": round(100 * (1 - len(missing) / max(len(statements), 1)), 1),
                                "missing_lines": missing_text}
        results.append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "crash_examples"}), flush=True)
        for ex in r["crash_examples"]:
            print("  CRASH", ex["outcome"], ex["input"][:300], "\n", ex["detail"][-800:], flush=True)
    if args.only and not args.no_report:
        # re-running some parsers keeps the others' figures from the last full run
        import reliability_report

        path = reliability_report.RESULTS / "reliability.json"
        old = json.loads(path.read_text()).get("fuzz", {}) if path.exists() else {}
        mine = {r["parser"] for r in results}
        results = [r for r in old.get("parsers", []) if r["parser"] not in mine] + results
        order = list(fuzz_lib.FUZZERS)
        results.sort(key=lambda r: order.index(r["parser"]) if r["parser"] in order else len(order))
    total_crashes = sum(sum(r["crashes"].values()) for r in results)
    doc = {"inputs_per_parser": min(r["inputs"] for r in results), "seed": args.seed, "time_limit_s": args.time_limit,
           "mem_limit_gib": args.mem_limit_gib, "total_inputs": sum(r["inputs"] for r in results),
           "total_crashes": total_crashes, "parsers": results}
    if not args.no_report:
        import reliability_report

        print("wrote", reliability_report.update("fuzz", doc))
    return 1 if total_crashes else 0


if __name__ == "__main__":
    sys.exit(main())
