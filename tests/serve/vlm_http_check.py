"""Image requests to tessera-serve with the `openai` Python client.

    vlm_http_check.py --base-url http://127.0.0.1:PORT/v1 --cases cases.json

Run by serve_test (VlmHttp.OpenAiClientWithImageParts), which starts the
server on a vision-language model and writes cases.json: per case a
question, PNG files, the answer's bytes token by token and the prompt's
token count, all computed in process with nn::generate_vlm. Checks: each
case asked with its images as base64 data: URLs answers with those tokens
and counts the image tokens in usage.prompt_tokens; the same through
file:// URLs under the allowed media path and streamed; eight concurrent
requests; bad image parts are 400 errors naming the part (truncated PNG,
truncated base64, a remote URL, a file outside the media path, too many
images) and the server still answers afterwards.

Exit 0: passed; 1: a check failed.
"""
import argparse
import base64
import concurrent.futures
import json
import os
import sys

FAILURES = []


def check(cond, what):
    print(("ok    " if cond else "FAIL  ") + what)
    if not cond:
        FAILURES.append(what)


def data_url(path):
    with open(path, "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode()


def message(question, urls):
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    parts.append({"type": "text", "text": question})
    return [{"role": "user", "content": parts}]


def answer_bytes(choice):
    return [list(t.bytes) for t in (choice.logprobs.content or [])]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--cases", required=True)
    args = ap.parse_args()
    import openai

    with open(args.cases) as f:
        spec = json.load(f)
    client = openai.OpenAI(base_url=args.base_url, api_key="none", max_retries=0)
    model = client.models.list().data[0].id

    def ask(case, urls, **kw):
        return client.chat.completions.create(model=model, messages=message(case["question"], urls),
                                              max_tokens=12, temperature=0, logprobs=True, **kw)

    for i, case in enumerate(spec["cases"]):
        r = ask(case, [data_url(p) for p in case["images"]])
        check(answer_bytes(r.choices[0]) == case["token_bytes"],
              f"case {i}: data: URL answer equals generate_vlm's tokens")
        check(r.usage.prompt_tokens == case["prompt_tokens"],
              f"case {i}: usage.prompt_tokens {r.usage.prompt_tokens} counts the image tokens "
              f"({case['prompt_tokens']})")
        r = ask(case, ["file://" + p for p in case["images"]])
        check(answer_bytes(r.choices[0]) == case["token_bytes"], f"case {i}: file:// URL answer")

    # Streamed: the concatenated deltas' text equals the non-streamed text.
    case = spec["cases"][0]
    urls = [data_url(p) for p in case["images"]]
    whole = client.chat.completions.create(model=model, messages=message(case["question"], urls),
                                           max_tokens=12, temperature=0).choices[0].message.content
    pieces = []
    for chunk in client.chat.completions.create(model=model, messages=message(case["question"], urls),
                                                max_tokens=12, temperature=0, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
    check("".join(pieces) == whole, "streamed answer equals the whole answer")

    # Concurrent requests, every case twice.
    jobs = [c for c in spec["cases"] for _ in range(2)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda c: ask(c, [data_url(p) for p in c["images"]]), jobs))
    check(all(answer_bytes(r.choices[0]) == c["token_bytes"] for r, c in zip(results, jobs)),
          f"{len(jobs)} concurrent image requests answer as alone")

    # Bad parts: 400 naming the part.
    good = data_url(case["images"][0])
    outside = os.path.join(os.path.dirname(spec["media_root"]), "outside.png")
    with open(case["images"][0], "rb") as src, open(outside, "wb") as dst:
        dst.write(src.read())
    bad_cases = [
        ("truncated PNG", [good[:len("data:image/png;base64,") + 200]], "messages[0].content[0]"),
        ("base64 with stray bits", [good[:201]], "messages[0].content[0]"),
        ("not an image", ["data:image/png;base64," + base64.b64encode(b"hello world").decode()],
         "messages[0].content[0]"),
        ("bad base64", ["data:image/png;base64,iVBORw0K!!!"], "messages[0].content[0]"),
        ("no base64 marker", ["data:image/png," + good.split(",", 1)[1]], "messages[0].content[0]"),
        ("remote URL", ["https://example.com/cat.png"], "messages[0].content[0]"),
        ("outside the media path", ["file://" + outside], "messages[0].content[0]"),
        ("three images (limit 2)", [good, good, good], "messages[0].content[2]"),
    ]
    for what, urls, where in bad_cases:
        try:
            client.chat.completions.create(model=model, messages=message("x", urls), max_tokens=4)
            check(False, f"{what}: refused")
        except openai.BadRequestError as e:
            text = str(e)
            check(where in text, f"{what}: 400 naming {where} ({text[:160]})")
    r = ask(spec["cases"][0], [good])
    check(answer_bytes(r.choices[0]) == spec["cases"][0]["token_bytes"],
          "the server still answers after the bad requests")

    print(f"{len(FAILURES)} failed")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
