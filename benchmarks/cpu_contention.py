"""The engine's speed when something else on the machine wants a core, by how its OpenMP threads wait.

Each (condition, setting) pair runs in a fresh process, because libgomp reads its environment once, when
torch loads it. Settings: libgomp's default wait (spin, then sleep), the environment Serve replicas and
tensor-parallel followers get (serving/utils/threads.py: OMP_WAIT_ENV) and, as the no-barrier reference, one
torch thread. Conditions: a quiet machine, and one busy-loop process beside the engine (a stand-in for the
HTTP path, Ray's processes or another replica taking a core), at nice 0 or 10. Measured in each: batch-1
decode ms/token (a long generation minus a one-token one, as benchmarks/throughput.py) and the throughput
of llama-prop's mixed workload (benchmarks/throughput.py's short-context workload). The pairs are
alternated over `--rounds`; the table shows each pair's range. Prints a table and writes JSON under
benchmarks/results/.

    python benchmarks/cpu_contention.py                 # 2 rounds, quiet and nice-10 busy process
    python benchmarks/cpu_contention.py --busy-nice 0   # the busy process at the engine's priority
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from serving.utils.threads import OMP_WAIT_ENV

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# Setting name -> (environment added to the child's, torch threads or None for the machine's default).
SETTINGS = {"libgomp default": ({}, None), "replica env": (dict(OMP_WAIT_ENV), None), "1 thread": ({}, 1)}
_WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def measure(model_dir: Path, threads: int | None, decode_tokens: int, num_requests: int) -> dict[str, float]:
    """In the child: batch-1 ms/token and the mixed workload's tok/s, best of two each."""
    import torch

    import throughput as bench
    from serving import LLM

    if threads:
        torch.set_num_threads(threads)
    llm = LLM(str(model_dir))
    generate_one = lambda prompt, n: bench.run_engine(llm, [(prompt, n)])  # noqa: E731
    ms_per_token = min(bench.decode_ms_per_token(generate_one, [5] * 16, decode_tokens) for _ in range(2))
    requests = bench.workload(num_requests, 0, 4096, *bench.WORKLOADS["llama-prop"])
    bench.run_engine(llm, requests[:4])
    elapsed = min(bench.run_engine(llm, requests) for _ in range(2))
    return {"batch1_ms_per_token": ms_per_token, "mixed_tok_per_s": sum(n for _, n in requests) / elapsed,
            "torch_threads": torch.get_num_threads()}


def run_child(model_dir: Path, setting: str, args: argparse.Namespace) -> dict[str, float]:
    env_added, threads = SETTINGS[setting]
    env = {k: v for k, v in os.environ.items() if k not in _WAIT_VARIABLES}
    env.update(env_added)
    cmd = [sys.executable, __file__, "--child", str(model_dir), "--decode-tokens", str(args.decode_tokens),
           "--num-requests", str(args.num_requests)] + (["--child-threads", str(threads)] if threads else [])
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{setting} child failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def busy_process(nice: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"], preexec_fn=lambda: os.nice(nice))


def print_table(rows: list[dict]) -> None:
    print(f"\n{'condition':<22} {'setting':<16} {'batch-1 ms/token':>18} {'mixed tok/s':>16}")
    for condition in dict.fromkeys(r["condition"] for r in rows):
        for setting in SETTINGS:
            runs = [r for r in rows if r["condition"] == condition and r["setting"] == setting]
            b1 = [r["batch1_ms_per_token"] for r in runs]
            mixed = [r["mixed_tok_per_s"] for r in runs]
            print(f"{condition:<22} {setting:<16} {min(b1):>8.2f}-{max(b1):<9.2f} {min(mixed):>7.0f}-{max(mixed):<8.0f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--busy-nice", type=int, default=10, help="the busy process's nice value")
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--num-requests", type=int, default=32, help="requests of the mixed workload")
    parser.add_argument("--output", type=Path, help="JSON path (default benchmarks/results/cpu_contention.json)")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child-threads", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child, args.child_threads, args.decode_tokens, args.num_requests)))
        return

    import throughput as bench
    from serving.models.tiny import resolve_model
    from serving.config import DEFAULT_MODEL

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-contention-") as tmp:
        model_dir = bench.build_random(Path(tmp) / "llama-prop", resolve_model(DEFAULT_MODEL),
                                       bench.MODEL_LLAMA_PROP)
        for round_index in range(args.rounds):
            for condition in ("quiet", f"busy process, nice {args.busy_nice}"):
                for setting in SETTINGS:
                    busy = busy_process(args.busy_nice) if condition != "quiet" else None
                    try:
                        result = run_child(model_dir, setting, args)
                    finally:
                        if busy is not None:
                            busy.kill()
                            busy.wait()
                    rows.append({"round": round_index, "condition": condition, "setting": setting, **result,
                                 "load_average": os.getloadavg()[0]})
                    print(f"round {round_index} {condition:<22} {setting:<16} "
                          f"{result['batch1_ms_per_token']:7.2f} ms/token {result['mixed_tok_per_s']:7.0f} tok/s "
                          f"(load {rows[-1]['load_average']:.1f})", flush=True)
    print_table(rows)
    output = args.output or RESULTS_DIR / "cpu_contention.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"cpus": os.cpu_count(), "settings": {k: v[0] for k, v in SETTINGS.items()},
                                  "rows": rows}, indent=2))
    print(f"\nwrote {output}")


if __name__ == "__main__":
    main()
