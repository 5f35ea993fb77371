"""Preemption soak: kill a CPU distillation at random moments, resume, and prove nothing was lost.

    nice python benchmarks/soak_preemption.py [--kills 10] [--steps 72] [--every 3]

Runs `tests/reliability/train_worker.py` (a one-stage distillation of the fixture teacher, async checkpoints
every `--every` steps) once uninterrupted, then again interrupted by: SIGKILLs at random moments — during a
checkpoint save (as soon as orbax's temporary directory appears), during start-up/restore, at a random step —,
SIGTERMs (must save a final checkpoint and exit 143) and write faults (RLIMIT_FSIZE: the OS refuses the
checkpoint's writes, the run must name the intact previous checkpoint). Each interruption is followed by a resume.
Checks: every checkpoint that was complete before an interruption is still there, byte for byte; the final
parameters equal the uninterrupted run's bit for bit. Writes the "soak" section of benchmarks/results/reliability.*.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT / "tests" / "reliability"))
sys.path.insert(0, str(Path(__file__).parent))

import train_worker  # noqa: E402

WORKER = ROOT / "tests" / "reliability" / "train_worker.py"


def complete_steps(ckdir: Path) -> list[int]:
    return sorted(int(p.name) for p in ckdir.iterdir() if p.name.isdigit()) if ckdir.is_dir() else []


def saving(ckdir: Path) -> bool:
    return ckdir.is_dir() and any("orbax-checkpoint-tmp" in p.name for p in ckdir.iterdir())


def digest(d: Path) -> tuple[str, int]:
    h, n = hashlib.sha256(), 0
    for f in sorted(p for p in d.rglob("*") if p.is_file()):
        data = f.read_bytes()
        h.update(str(f.relative_to(d)).encode() + b"\0" + data)
        n += len(data)
    return h.hexdigest(), n


def progress(metrics: Path) -> int:
    if not metrics.exists():
        return 0
    steps = [0]
    for ln in metrics.read_text().splitlines():
        try:
            steps.append(int(json.loads(ln)["step"]))
        except (ValueError, KeyError, TypeError):
            pass
    return max(steps)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=10)
    ap.add_argument("--sigterms", type=int, default=2)
    ap.add_argument("--write-faults", type=int, default=2)
    ap.add_argument("--steps", type=int, default=72)
    ap.add_argument("--every", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/mamba_llama_soak"))
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    ap.add_argument("--no-report", action="store_true", help="do not update benchmarks/results/reliability.*")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    import shutil

    shutil.rmtree(args.workdir, ignore_errors=True)
    env = train_worker.subprocess_env(args.workdir / "xla")
    t_start = time.perf_counter()

    def launch(recipe: Path, *flags: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, str(WORKER), str(recipe), *flags], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    full = train_worker.write_recipe(args.workdir / "full", steps=args.steps, every=args.every)
    p = launch(full)
    out, err = p.communicate(timeout=1200)
    if p.returncode != 0:
        print(err[-3000:])
        raise SystemExit("the uninterrupted run failed")
    print(f"uninterrupted run: {time.perf_counter() - t_start:.0f} s", flush=True)

    recipe = train_worker.write_recipe(args.workdir / "soak", steps=args.steps, every=args.every)
    run = args.workdir / "soak" / "run"
    ckdir, metrics = run / "distill" / "checkpoints", run / "distill" / "metrics.jsonl"
    kinds = (["save"] * max(1, args.kills * 4 // 10) + ["startup"] * max(1, args.kills // 5))[: args.kills]
    kinds += ["random"] * (args.kills - len(kinds))
    events = kinds + ["sigterm"] * args.sigterms + ["fsize"] * args.write_faults
    rng.shuffle(events)
    ledger: dict[int, tuple[str, int]] = {}  # complete checkpoints seen before an interruption
    stats = dict(kills_during_save=0, kills_at_startup=0, kills_random=0, sigterms_ok=0, write_faults_ok=0,
                 sigterms_sent=0, write_faults_injected=0, restarts=0, finished_early=0)
    log: list[dict[str, Any]] = []

    def record_complete() -> None:
        for s in complete_steps(ckdir):
            if s not in ledger:
                ledger[s] = digest(ckdir / str(s))

    for kind in events:
        start = progress(metrics)
        if start >= args.steps - 2:
            stats["finished_early"] += 1
            continue
        flags: list[str] = []
        if kind == "fsize":
            flags = ["--fsize-at", str(start + rng.randint(1, 3))]
        p = launch(recipe, *flags)
        stats["restarts"] += 1
        outcome = ""
        if kind in ("save", "random", "sigterm"):
            target = start + rng.randint(1, 3)
            deadline = time.monotonic() + 600
            seen_tmp = False
            while p.poll() is None and time.monotonic() < deadline:
                if kind == "save" and progress(metrics) > start and saving(ckdir):
                    seen_tmp = True
                    break
                if kind != "save" and progress(metrics) >= target:
                    time.sleep(rng.uniform(0, 0.05))  # a step takes tens of ms: land anywhere inside one
                    break
                time.sleep(0.002 if kind == "save" else 0.02)
            if p.poll() is None:
                if kind == "sigterm":
                    stats["sigterms_sent"] += 1
                    record_complete()
                    p.send_signal(signal.SIGTERM)
                    _, err = p.communicate(timeout=600)
                    last = complete_steps(ckdir)
                    ok = (p.returncode == 143 and last and "preempted:" in err
                          and f"saved checkpoint step {last[-1]}" in err)
                    stats["sigterms_ok"] += bool(ok)
                    outcome = f"rc {p.returncode}, newest checkpoint {last[-1] if last else None}"
                else:
                    record_complete()
                    p.send_signal(signal.SIGKILL)
                    p.wait()
                    key = "kills_during_save" if seen_tmp else "kills_random"
                    stats[key] += 1
                    outcome = f"SIGKILL at step ~{progress(metrics)}" + (" during a save" if seen_tmp else "")
        elif kind == "startup":
            time.sleep(rng.uniform(0.5, 4.0))
            if p.poll() is None:
                record_complete()
                p.send_signal(signal.SIGKILL)
                p.wait()
                stats["kills_at_startup"] += 1
                outcome = f"SIGKILL {'before training' if progress(metrics) == start else 'early in training'}"
        else:  # fsize
            stats["write_faults_injected"] += 1
            _, err = p.communicate(timeout=600)
            done = complete_steps(ckdir)
            # orbax's background threads may log after the worker's own message: take the worker's line
            line = next((ln for ln in reversed(err.splitlines()) if ln.startswith("error: ")), err[-300:])
            # a fault can also land in the final export, after the last checkpoint: that run reports the export
            # and that the checkpoints are intact (rerunning the command exports again)
            # (a fault in the first save leaves nothing complete, and the message must say so)
            ok = p.returncode == 2 and (
                ("writing a checkpoint failed" in line and "is intact" in line
                 and any(f"step {s} in" in line for s in done))
                or ("writing a checkpoint failed" in line and not done and "no complete checkpoint exists" in line)
                or ("exporting the trained model" in line and "are intact" in line and bool(done)))
            stats["write_faults_ok"] += bool(ok)
            outcome = f"rc {p.returncode}: {line[:160]}"
        if p.poll() is None:
            p.kill()
        if p.returncode == 0:
            stats["finished_early"] += 1
        p.stdout.close() if p.stdout else None
        p.stderr.close() if p.stderr else None
        record_complete()
        log.append({"event": kind, "from_step": start, "outcome": outcome})
        print(f"{kind:8s} from step {start:3d}: {outcome}", flush=True)

    p = launch(recipe)
    _, err = p.communicate(timeout=1200)
    stats["restarts"] += 1
    if p.returncode != 0:
        print(err[-3000:])
        raise SystemExit("the final resume failed")
    import numpy as np

    a, b = np.load(args.workdir / "full" / "run" / "final.npz"), np.load(run / "final.npz")
    identical = sorted(a.files) == sorted(b.files) and all(np.array_equal(a[k], b[k]) for k in a.files)
    lost, bytes_lost = 0, 0
    for s, (h, n) in ledger.items():
        d = ckdir / str(s)
        if not d.is_dir() or digest(d)[0] != h:
            lost, bytes_lost = lost + 1, bytes_lost + n
    kills = stats["kills_during_save"] + stats["kills_at_startup"] + stats["kills_random"]
    res = dict(steps=args.steps, every=args.every, seed=args.seed, kills_survived=kills, kills_planned=args.kills,
               checkpoints_tracked=len(ledger), checkpoints_lost=lost,
               bytes_lost=bytes_lost, bit_identical=bool(identical), seconds=time.perf_counter() - t_start,
               events=log, **stats)
    print(json.dumps({k: v for k, v in res.items() if k != "events"}, indent=1))
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    if not args.no_report:
        import reliability_report

        print("wrote", reliability_report.update("soak", res))
    ok = (identical and lost == 0 and kills >= min(args.kills, 1) and stats["sigterms_ok"] == stats["sigterms_sent"]
          and stats["write_faults_ok"] == stats["write_faults_injected"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
