"""Host time of building a decode step's sampling tensors when every sequence has penalties.

A batch of `--seqs` sequences (prompts of `--prompt-len` tokens) that already generated `--generated`
tokens, with presence, frequency and repetition penalties, steps on: each step appends one token to every
sequence and times `ModelRunner._sampling_tensors` (what `prepare` spends on sampling), then the sampler on
random logits (on this machine's CPU: the device side when the model runs on the CPU). The first step of a
run (a sequence's whole history uploaded once) is reported apart from the steady state.

Run it against another tree (say, an older commit) with that tree first on PYTHONPATH:

    python benchmarks/penalty_tensors.py              # ~30 s
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch

from serving import LLM, SamplingParams
from serving.engine.sequence import Request, Sequence


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seqs", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--generated", type=int, default=512)
    parser.add_argument("--steps", type=int, default=50)
    args = parser.parse_args()
    torch.set_num_threads(1)
    llm = LLM("tiny-llama-2-chat", max_num_seqs=args.seqs, num_kv_blocks=64)
    runner = llm.engine.executor.runner
    vocab = runner.vocab_size
    rng = random.Random(0)
    params = SamplingParams(temperature=1.0, max_tokens=args.generated + args.steps + 1, ignore_eos=True,
                            presence_penalty=0.5, frequency_penalty=0.5, repetition_penalty=1.2)
    seqs = []
    for i in range(args.seqs):
        request = Request(f"r{i}", None, [rng.randrange(vocab) for _ in range(args.prompt_len)], params)
        seq = Sequence(request, 0, None)
        seq.token_ids.extend(rng.randrange(vocab) for _ in range(args.generated))
        seqs.append(seq)
    # Absent before the counts moved to the device: lets this script time an older tree too.
    slots = getattr(runner, "_penalty_slots", None)
    logits = torch.randn(args.seqs, vocab)
    build, sample = [], []
    for _ in range(args.steps + 1):
        start = time.perf_counter()
        tensors = runner._sampling_tensors(seqs)
        build.append(time.perf_counter() - start)
        start = time.perf_counter()
        out = runner.sampler(logits, tensors)
        sample.append(time.perf_counter() - start)
        if slots is not None:
            slots.commit()
        for seq, token in zip(seqs, out.token_ids.tolist()):
            seq.token_ids.append(token)
    print(json.dumps({
        "seqs": args.seqs, "prompt_len": args.prompt_len, "generated": args.generated, "vocab": vocab,
        "counts_on_device": slots is not None,
        "first_step_build_ms": build[0] * 1e3,
        "build_ms_median": statistics.median(build[1:]) * 1e3,
        "sampler_cpu_ms_median": statistics.median(sample[1:]) * 1e3,
    }))


if __name__ == "__main__":
    main()
