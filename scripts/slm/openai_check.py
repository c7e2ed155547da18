#!/usr/bin/env python3
"""Check a Pollen node's OpenAI-compatible API with the stock `openai` client.

    python3 scripts/slm/openai_check.py --base-url http://127.0.0.1:PORT/v1 \
        --model lm --expected scripts/slm/tiny_expected.json

For every prompt of the expected file (made by make_tiny_lm.py with onnxruntime), asks
the node greedily (temperature 0) for the chat completion, once whole and once streamed,
and for the raw completion of the rendered prompt; each answer must be the text
onnxruntime gave, with its finish reason and token counts. Also checks `models.list()`,
a stop sequence, seeded sampling (the same seed twice gives the same text), and that a
prompt past the context, an unknown model, bad parameters, a token outside the
vocabulary and a body over 4 MiB are refused with the right status while the node goes
on answering. Prints
one line per check; exits 1 on the first failure.
"""

import argparse
import json
import sys

import openai


def fail(msg):
    print(f"FAIL: {msg}")
    sys.exit(1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--expected", required=True)
    a = ap.parse_args()
    expected = json.load(open(a.expected))
    client = openai.OpenAI(base_url=a.base_url, api_key="not-needed", max_retries=0, timeout=120)

    ids = [m.id for m in client.models.list().data]
    if a.model not in ids:
        fail(f"models.list() gives {ids}, not {a.model}")
    print(f"ok models.list: {ids}")

    for p in expected["prompts"]:
        want = p["text"]
        finish = "stop" if p["stopped_at_eos"] else "length"
        n = len(p["greedy_ids"])
        r = client.chat.completions.create(
            model=a.model, messages=p["messages"], temperature=0, max_tokens=32)
        got = r.choices[0].message.content
        if got != want or r.choices[0].finish_reason != finish:
            fail(f"chat {p['messages']!r}: {got!r} ({r.choices[0].finish_reason}), want {want!r} ({finish})")
        if r.usage.prompt_tokens != len(p["prompt_ids"]) or r.usage.completion_tokens != n:
            fail(f"usage {r.usage}, want {len(p['prompt_ids'])} prompt and {n} completion tokens")
        print(f"ok chat: {got!r} {finish} usage {r.usage.prompt_tokens}+{r.usage.completion_tokens}")

        stream = client.chat.completions.create(
            model=a.model, messages=p["messages"], temperature=0, max_tokens=32, stream=True,
            stream_options={"include_usage": True})
        text, reasons, usage, chunks = "", [], None, 0
        for c in stream:
            chunks += 1
            if c.usage is not None:
                usage = c.usage
            for ch in c.choices:
                text += ch.delta.content or ""
                if ch.finish_reason:
                    reasons.append(ch.finish_reason)
        if text != want or reasons != [finish] or usage is None or usage.completion_tokens != n:
            fail(f"stream: {text!r} {reasons} {usage}, want {want!r} [{finish}] {n} tokens")
        print(f"ok chat stream: {chunks} chunks, {text!r}")

        r = client.completions.create(
            model=a.model, prompt=p["prompt"], temperature=0, max_tokens=32)
        if r.choices[0].text != want:
            fail(f"completion: {r.choices[0].text!r}, want {want!r}")
        print(f"ok completion: {r.choices[0].text!r}")

    # A stop sequence cuts the answer before it, and is not part of it.
    p = next(p for p in expected["prompts"] if len(p["text"]) >= 8)
    stop = p["text"][4:7]
    cut = p["text"][: p["text"].index(stop)]
    r = client.chat.completions.create(
        model=a.model, messages=p["messages"], temperature=0, max_tokens=32, stop=[stop])
    if r.choices[0].message.content != cut or r.choices[0].finish_reason != "stop":
        fail(f"stop {stop!r}: {r.choices[0].message.content!r}, want {cut!r}")
    text = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(
            model=a.model, messages=p["messages"], temperature=0, max_tokens=32, stop=stop,
            stream=True)
        if c.choices)
    if text != cut:
        fail(f"streamed stop {stop!r}: {text!r}, want {cut!r}")
    print(f"ok stop {stop!r}: {cut!r}")

    # Sampling: the same seed gives the same text; the answer is still text of the model.
    texts = [
        client.chat.completions.create(
            model=a.model, messages=p["messages"], temperature=0.9, top_p=0.95, seed=s,
            max_tokens=24).choices[0].message.content
        for s in (7, 7, 8)
    ]
    if texts[0] != texts[1]:
        fail(f"seed 7 twice gave {texts[0]!r} and {texts[1]!r}")
    print(f"ok seeded sampling: {texts}")

    # Refusals in OpenAI's error shape.
    try:
        client.chat.completions.create(
            model=a.model, messages=[{"role": "user", "content": "x" * 4000}], max_tokens=8)
        fail("a prompt past the context was answered")
    except openai.BadRequestError as e:
        if e.code != "context_length_exceeded":
            fail(f"context: {e}")
        print(f"ok context refused: {e.message[:80]}")
    try:
        client.chat.completions.create(model="nope", messages=p["messages"])
        fail("an unknown model was answered")
    except openai.NotFoundError as e:
        print(f"ok unknown model: {e.message[:60]}")
    try:
        client.chat.completions.create(model=a.model, messages=p["messages"], temperature=5)
        fail("temperature 5 was answered")
    except openai.BadRequestError as e:
        print(f"ok bad temperature: {e.message[:60]}")
    for what, call in [
        ("a token id outside the vocabulary",
         lambda: client.completions.create(model=a.model, prompt=[10**9], max_tokens=4)),
        ("n = 2", lambda: client.chat.completions.create(
            model=a.model, messages=p["messages"], n=2, max_tokens=4)),
        ("five stop strings", lambda: client.chat.completions.create(
            model=a.model, messages=p["messages"], stop=["a", "b", "c", "d", "e"], max_tokens=4)),
    ]:
        try:
            call()
            fail(f"{what} was answered")
        except openai.BadRequestError as e:
            print(f"ok {what} refused: {e.message[:60]}")
    try:
        client.completions.create(model=a.model, prompt="x" * (5 << 20), max_tokens=4)
        fail("a 5 MiB body was answered")
    except openai.APIStatusError as e:
        if e.status_code != 413:
            fail(f"a 5 MiB body: {e.status_code}")
        print("ok a 5 MiB body refused with 413")
    # Nothing was lost: the node still answers as before.
    r = client.chat.completions.create(
        model=a.model, messages=p["messages"], temperature=0, max_tokens=32)
    if r.choices[0].message.content != p["text"]:
        fail(f"after the refusals: {r.choices[0].message.content!r}")
    print("ok still serving after the refusals")
    print("all checks passed")


if __name__ == "__main__":
    main()
