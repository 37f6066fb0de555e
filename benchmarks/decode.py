"""Greedy decoding throughput of the encoder-decoder with and without its key/value cache.

    python benchmarks/decode.py [--repeats 30 --batch 64 --lengths 32 16]

A Seq2SeqTransformer of the reference sizes, with positions for 33 decoder tokens
(max_len 32), decodes a batch of sources of each length L and generates exactly L + 1
tokens (L symbols and the EOS position): the head's EOS bias is set to -1e4 so no row
stops early, and an untrained model's work is the same as a trained one's. The two
variants run alternately (the order flips every repeat) on the same batch; reports
sequences/s from the medians and the median of the pairwise speed-ups.
Writes benchmarks/results/decode.json.
"""
import argparse
import time

import numpy

import common
from models import build_model
from tinyattn.tasks import EOS, FIRST_SYMBOL

MAX_LEN = 32


def decode_once(model, source, tokens, use_cache):
    start = time.perf_counter()
    rows, _ = model.greedy_decode(source, tokens, use_cache=use_cache)
    return time.perf_counter() - start, rows


def measure(model, task, length, args):
    rng = numpy.random.default_rng(length)
    sources = rng.integers(FIRST_SYMBOL, FIRST_SYMBOL + task.vocab, size=(args.batch, length)).tolist()
    source = task.make_batch(sources).source
    tokens = length + 1
    variants = {"cache": True, "no cache": False}
    outputs = {}
    for name, use_cache in variants.items():  # warm-up, and the outputs to compare
        _, outputs[name] = decode_once(model, source, tokens, use_cache)
    times = {name: [] for name in variants}
    names = list(variants)
    for i in range(args.repeats):
        for name in (names if i % 2 == 0 else names[::-1]):
            times[name].append(decode_once(model, source, tokens, variants[name])[0])
    medians = {name: common.median(t) for name, t in times.items()}
    return {"source_length": length, "generated_tokens": tokens,
            "all_rows_full_length": all(len(row) == tokens for rows in outputs.values() for row in rows),
            "cache_and_no_cache_rows_identical": outputs["cache"] == outputs["no cache"],
            "median_ms": {name: m * 1e3 for name, m in medians.items()},
            "sequences_per_s": {name: args.batch / m for name, m in medians.items()},
            "tokens_per_s": {name: args.batch * tokens / m for name, m in medians.items()},
            "median_speedup_cache": common.median_ratio(times["no cache"], times["cache"])}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30, help="timed decodes per variant and length (default 30)")
    parser.add_argument("--batch", type=int, default=64, help="sources decoded together (default 64)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[32, 16], help=f"source lengths, at most {MAX_LEN} (default 32 16)")
    common.add_out_argument(parser, "decode")
    args = parser.parse_args()
    if any(not 1 <= length <= MAX_LEN for length in args.lengths):
        parser.error(f"--lengths must lie in 1..{MAX_LEN}")
    machine = common.start()
    config = common.REFERENCE.replace(max_len=MAX_LEN)
    task = common.task_for(config)
    model = build_model(config, task.vocab_size)  # Seq2SeqTransformer, positions for MAX_LEN + 1 decoder tokens
    model.head.bias.data[EOS] = -1e4  # never predict EOS: every row generates every token
    model.eval()
    results = []
    for length in args.lengths:
        print(f"decoding {args.batch} sources of length {length}, {args.repeats} times each way ...", flush=True)
        results.append(measure(model, task, length, args))
    settings = {"config": config.to_dict(), "batch": args.batch, "repeats": args.repeats, "lengths": args.lengths,
                "model": "Seq2SeqTransformer via models.build_model, untrained, head bias[EOS] = -1e4"}
    common.write_results("decode", machine, settings, {"by_length": results}, args.out)

    print(f"\ngreedy decoding, batch {args.batch}, reference sizes (d_model 64, 2+2 layers), sequences/s from medians")
    rows = []
    for r in results:
        sps = r["sequences_per_s"]
        rows.append([f"L={r['source_length']} ({r['generated_tokens']} tokens)", f"{sps['cache']:.0f}", f"{sps['no cache']:.0f}",
                     f"{r['median_speedup_cache']:.2f}x", "yes" if r["cache_and_no_cache_rows_identical"] else "NO"])
    common.table(["length", "cache seq/s", "no cache seq/s", "speed-up", "same output"], rows)


if __name__ == "__main__":
    main()
