#!/usr/bin/env python3
"""serve_workloads_bench: two serving workloads beyond serve_bench's loads.

Shared system prompt (prefix caching). Every request is the same long
system prompt followed by a question of its own, as a chat application
sends them; a closed loop of --clients clients. Three servers in turn:
tessera-serve (prefix caching on, its default), tessera-serve
--no-prefix-caching, and llama.cpp's llama-server (cache_prompt, its
default). One untimed request with the system prompt and another
question goes first, so the timed requests find the server as steady
traffic leaves it. Reported: TTFT and end-to-end latency per request,
output throughput per repetition, and the prefix-cache hit rate (cached
prompt tokens over prompt tokens: tessera-serve's
vllm:prefix_cache_hits / vllm:prefix_cache_queries counters, read from
/metrics before and after the load; llama-server's cache_n / (cache_n +
prompt_n) from the timings of its last streamed chunk).

Adapters. One tessera-serve loads 64 LoRA adapters (PEFT folders, rank
--rank on every projection, random weights: the cost does not depend on
the values) and serves a closed loop of --clients clients whose requests
name adapter i mod N in their "model" field, for N = 1, 8 and 64; the
base model (no adapter) is the cost of a server whose one adapter is
merged into its weights. "Merged, one adapter at a time" serves the same
requests as a merging server must: grouped by adapter, each group through
the base model with up to --clients at once, one group after another.
Its rows leave out the time to merge each adapter into the weights (and
re-pack them to int4), so they favour merging.

    serve_workloads_bench.py --tessera-serve build/release/bin/tessera-serve \\
        --llama-server ~/.cache/tessera-llama.cpp/build/bin/llama-server \\
        --model $(scripts/smollm2-path.sh) --json serve_workloads.json

Writes a tessera-bench/1 results document (benchmarks/render_docs.py).
Needs numpy (Debian's python3-numpy) to write the adapters.
"""
import argparse
import http.client
import json
import os
import random
import re
import shutil
import statistics
import struct
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import serve_bench  # noqa: E402  (its server, client and load helpers)

# SmolLM2-135M's linear layers: (module, input features, output features).
# The server refuses an adapter whose shapes do not match its model, naming
# the tensor, so a different model fails loudly rather than measuring nonsense.
SMOLLM2_LAYERS = 30
SMOLLM2_PROJECTIONS = (("self_attn.q_proj", 576, 576), ("self_attn.k_proj", 576, 192),
                       ("self_attn.v_proj", 576, 192), ("self_attn.o_proj", 576, 576),
                       ("mlp.gate_proj", 576, 1536), ("mlp.up_proj", 576, 1536),
                       ("mlp.down_proj", 1536, 576))


def write_safetensors(path, tensors):
    """tensors: list of (name, float32 numpy array), written in the safetensors layout."""
    header, offset, blobs = {}, 0, []
    for name, array in tensors:
        data = array.astype("<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(array.shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    header["__metadata__"] = {"format": "pt"}
    text = json.dumps(header).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for b in blobs:
            f.write(b)


def write_adapters(folder, count, rank, seed):
    """count PEFT LoRA folders under folder; returns their paths."""
    import numpy as np
    rng = np.random.default_rng(seed)
    paths = []
    for a in range(count):
        path = os.path.join(folder, f"lora{a}")
        os.makedirs(path)
        tensors = []
        for layer in range(SMOLLM2_LAYERS):
            for module, fan_in, fan_out in SMOLLM2_PROJECTIONS:
                base = f"base_model.model.model.layers.{layer}.{module}"
                bound = 1.0 / fan_in ** 0.5
                tensors.append((base + ".lora_A.weight", rng.uniform(-bound, bound, (rank, fan_in))))
                tensors.append((base + ".lora_B.weight", rng.normal(0.0, 0.02, (fan_out, rank))))
        write_safetensors(os.path.join(path, "adapter_model.safetensors"), tensors)
        with open(os.path.join(path, "adapter_config.json"), "w") as f:
            json.dump({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
                       "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
                       "target_modules": [m.split(".")[1] for m, _, _ in SMOLLM2_PROJECTIONS]}, f)
        paths.append(path)
    return paths


def scrape(port, names):
    """The values of these counters in tessera-serve's /metrics (summed over label sets)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    out = {n: 0.0 for n in names}
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:]+?)(?:_total)?(?:\{[^}]*\})? ([-+0-9.eE]+)$", line)
        if m and m.group(1) in out:
            out[m.group(1)] += float(m.group(2))
    return out


class Recorder:
    def __init__(self):
        self.series, self.facts = {}, {}

    def add(self, sid, unit, values, labels):
        s = self.series.setdefault(sid, {"id": sid, "unit": unit, "values": [], "labels": labels})
        s["values"].extend(values)

    def load(self, key, results, wall, max_tokens, labels):
        """Adds the per-request latencies and the throughput of one load; returns the good results."""
        ok = [r for r in results if "error" not in r]
        failed = [r for r in results if "error" in r]
        self.add(f"{key}.completed", "requests", [len(ok)], labels)
        self.add(f"{key}.failed", "requests", [len(failed)], labels)
        if failed:
            self.facts.setdefault(f"{key}.first_error", failed[0]["error"])
        if ok:
            self.add(f"{key}.output_throughput", "tokens/s", [len(ok) * max_tokens / wall], labels)
            self.add(f"{key}.ttft", "s", [r["first"] - r["start"] for r in ok], labels)
            self.add(f"{key}.e2e", "s", [r["end"] - r["start"] for r in ok], labels)
            self.add(f"{key}.tpot", "s", [(r["end"] - r["first"]) / max(1, max_tokens - 1) for r in ok], labels)
        return ok


def prefix_workload(args, rec, rep, sides):
    words = serve_bench.WORDS
    rng = random.Random(11)
    system = "You are a careful assistant. " + " ".join(rng.choice(words) for _ in range(args.system_words))
    questions = serve_bench.make_prompts(args.prefix_requests + 1, args.question_words, 5000 + rep)
    prompts = [f"{system}\n\nQuestion: {q}\nAnswer:" for q in questions]
    for side, argv in sides.items():
        port = serve_bench.free_port()
        server = serve_bench.Server(side, argv(port), port, os.path.join(args.logs, f"serve_prefix_{side}.log"))
        try:
            if rec.facts.get("machine") is None and side.startswith("tessera"):
                with open(server.log_path) as f:
                    rec.facts["machine"] = serve_bench.machine_info(f.read())
            serve_bench.stream_request(port, prompts[-1], args.prefix_tokens)  # steady state
            if rep == 0:
                p, _ = serve_bench.count_tokens(port, prompts[0], args.prefix_tokens)
                rec.facts[f"prefix.{side}.prompt_tokens"] = p
            before = scrape(port, ("vllm:prefix_cache_hits", "vllm:prefix_cache_queries")) \
                if side.startswith("tessera") else None
            jobs = [(p, None) for p in prompts[:-1]]
            results, wall = serve_bench.closed_loop(port, jobs, args.clients, args.prefix_tokens)
            labels = {"workload": "prefix", "server": side}
            ok = rec.load(f"prefix.{side}", results, wall, args.prefix_tokens, labels)
            if before is not None:
                after = scrape(port, ("vllm:prefix_cache_hits", "vllm:prefix_cache_queries"))
                queries = after["vllm:prefix_cache_queries"] - before["vllm:prefix_cache_queries"]
                hits = after["vllm:prefix_cache_hits"] - before["vllm:prefix_cache_hits"]
                rec.add(f"prefix.{side}.hit_rate", "fraction", [hits / queries if queries > 0 else 0.0], labels)
            else:
                cached = sum(r["timings"].get("cache_n", 0) for r in ok if r.get("timings"))
                computed = sum(r["timings"].get("prompt_n", 0) for r in ok if r.get("timings"))
                if cached + computed > 0:
                    rec.add(f"prefix.{side}.hit_rate", "fraction", [cached / (cached + computed)], labels)
            med = statistics.median
            print(f"rep {rep} prefix {side:24s} ok {len(ok)} TTFT med "
                  f"{med([r['first'] - r['start'] for r in ok]) if ok else float('nan'):.3f} s "
                  f"hit rate {rec.series.get(f'prefix.{side}.hit_rate', {}).get('values', ['?'])[-1]}", flush=True)
        finally:
            server.stop()


def adapter_workload(args, rec, rep, adapter_paths):
    argv = [args.tessera_serve, "--model", args.model, "--threads", str(args.threads),
            "--max-num-seqs", str(args.clients), "--quant", args.quant, "--max-model-len", "2048"]
    for i, p in enumerate(adapter_paths):
        argv += ["--adapters", f"lora{i}={p}"]
    port = serve_bench.free_port()
    server = serve_bench.Server("tessera", argv + ["--port", str(port)], port,
                                os.path.join(args.logs, "serve_adapters_tessera.log"))
    try:
        if rec.facts.get("machine") is None:
            with open(server.log_path) as f:
                rec.facts["machine"] = serve_bench.machine_info(f.read())
        prompts = serve_bench.make_prompts(args.adapter_requests, args.adapter_words, 7000 + rep)
        warm = serve_bench.make_prompts(1, args.adapter_words, 999)[0]
        # Every adapter once, untimed: each is loaded when first named.
        for i in range(len(adapter_paths)):
            serve_bench.stream_request(port, warm, 2, extra={"model": f"lora{i}"})
        serve_bench.stream_request(port, warm, args.adapter_tokens)
        med = statistics.median
        configs = [("base", 0)] + [(f"lora_x{n}", n) for n in args.adapter_counts]
        for name, n in configs:
            jobs = [(p, {"model": f"lora{i % n}"} if n else None) for i, p in enumerate(prompts)]
            results, wall = serve_bench.closed_loop(port, jobs, args.clients, args.adapter_tokens)
            ok = rec.load(f"adapters.{name}", results, wall, args.adapter_tokens,
                          {"workload": "adapters", "config": name, "adapters": n})
            print(f"rep {rep} adapters {name:10s} ok {len(ok)} out "
                  f"{len(ok) * args.adapter_tokens / wall:.1f} tok/s TPOT med "
                  f"{med([(r['end'] - r['first']) / (args.adapter_tokens - 1) for r in ok]) * 1e3:.1f} ms",
                  flush=True)
        # A merging server: the same requests, grouped by adapter, through the base model.
        for n in args.adapter_counts:
            if n == 1:
                continue
            groups = [[p for i, p in enumerate(prompts) if i % n == g] for g in range(n)]
            start = time.perf_counter()
            results = []
            for g in groups:
                part, _ = serve_bench.closed_loop(port, [(p, None) for p in g], args.clients, args.adapter_tokens)
                results += part
            wall = time.perf_counter() - start
            ok = rec.load(f"adapters.merged_x{n}", results, wall, args.adapter_tokens,
                          {"workload": "adapters", "config": f"merged_x{n}", "adapters": n})
            print(f"rep {rep} adapters merged_x{n:<3d} ok {len(ok)} out "
                  f"{len(ok) * args.adapter_tokens / wall:.1f} tok/s", flush=True)
    finally:
        server.stop()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tessera-serve", required=True)
    ap.add_argument("--llama-server", default="", help="llama.cpp's llama-server (omit: Tessera only)")
    ap.add_argument("--model", required=True, help="SmolLM2-135M-Instruct GGUF (the adapters match its shapes)")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--clients", type=int, default=8, help="closed-loop clients (and sequences at once)")
    ap.add_argument("--quant", default="w4a16")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--system-words", type=int, default=384, help="words of the shared system prompt")
    ap.add_argument("--question-words", type=int, default=16)
    ap.add_argument("--prefix-requests", type=int, default=16)
    ap.add_argument("--prefix-tokens", type=int, default=16, help="output tokens per prefix-workload request")
    ap.add_argument("--adapter-counts", default="1,8,64")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--adapter-requests", type=int, default=64)
    ap.add_argument("--adapter-words", type=int, default=64)
    ap.add_argument("--adapter-tokens", type=int, default=16)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one repetition (a smoke test)")
    ap.add_argument("--logs", default=".")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    if args.quick:
        args.reps, args.system_words, args.prefix_requests, args.prefix_tokens = 1, 64, 4, 4
        args.adapter_counts, args.adapter_requests, args.adapter_tokens, args.adapter_words = "1,2", 4, 4, 16
        args.llama_server = ""
    args.adapter_counts = [int(x) for x in args.adapter_counts.split(",") if x]
    if args.adapter_requests % max(args.adapter_counts) != 0:
        ap.error("--adapter-requests must be a multiple of the largest adapter count")
    os.makedirs(args.logs, exist_ok=True)
    ctx = 2048
    base_argv = [args.tessera_serve, "--model", args.model, "--threads", str(args.threads), "--max-num-seqs",
                 str(args.clients), "--quant", args.quant, "--max-model-len", str(ctx)]
    sides = {"tessera": lambda port: base_argv + ["--port", str(port)],
             "tessera-no-prefix-cache": lambda port: base_argv + ["--port", str(port), "--no-prefix-caching"]}
    if args.llama_server:
        sides["llama.cpp"] = lambda port: [args.llama_server, "-m", args.model, "--host", "127.0.0.1",
                                           "--port", str(port), "-t", str(args.threads), "-tb", str(args.threads),
                                           "--parallel", str(args.clients), "-c", str(ctx * args.clients)]
    rec = Recorder()
    scratch = tempfile.mkdtemp(prefix="tessera-serve-adapters-")
    try:
        adapter_paths = write_adapters(scratch, max(args.adapter_counts), args.rank, seed=1)
        for rep in range(args.reps):
            prefix_workload(args, rec, rep, sides)
            adapter_workload(args, rec, rep, adapter_paths)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    machine = rec.facts.pop("machine", None) or {}
    doc = {"schema": "tessera-bench/1", "benchmark": "serve_workloads",
           "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "commit": os.environ.get("TESSERA_BENCH_COMMIT", "unknown"),
           "dirty": os.environ.get("TESSERA_BENCH_DIRTY", "0") == "1",
           "command": serve_bench.command_line(), "quick": bool(args.quick),
           "config": {"model": os.path.basename(args.model), "threads": args.threads, "clients": args.clients,
                      "quant": args.quant, "reps": args.reps, "servers": list(sides),
                      "system_words": args.system_words, "question_words": args.question_words,
                      "prefix_requests": args.prefix_requests, "prefix_tokens": args.prefix_tokens,
                      "adapter_counts": args.adapter_counts, "rank": args.rank,
                      "adapter_targets": [m.split(".")[1] for m, _, _ in SMOLLM2_PROJECTIONS],
                      "adapter_requests": args.adapter_requests, "adapter_words": args.adapter_words,
                      "adapter_tokens": args.adapter_tokens},
           "facts": rec.facts, "machine": machine, "series": list(rec.series.values())}
    if args.json:
        serve_bench.write_results(doc, args.json)


if __name__ == "__main__":
    main()
