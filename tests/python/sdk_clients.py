"""The official OpenAI and Anthropic Python SDKs against a Cordon gateway.

Run by tests/tests/sdk.rs with the address of a loopback forward to `gateway:80` on a node that joined
the tailnet. The SDKs hold no real key: the gateway adds the upstream's. Each check prints `ok <name>`;
the first failure raises and exits non-zero.

    python3 sdk_clients.py http://127.0.0.1:PORT basics|budget|oversized|person|ci
"""

import sys

import anthropic
import openai

base = sys.argv[1]
phase = sys.argv[2]
# The SDKs' own retries stay on: a denial carries `x-should-retry: false`, which they honour.
oa = openai.OpenAI(base_url=base + "/v1", api_key="no-key-here")
an = anthropic.Anthropic(base_url=base, api_key="no-key-here")
WEATHER = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


def ok(name):
    print("ok", name, flush=True)


def expect(error_type, fn):
    try:
        fn()
    except error_type as e:
        return e
    raise AssertionError(f"expected {error_type.__name__}")


def basics():
    r = oa.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hello"}])
    assert r.choices[0].message.content == "echo: hello", r
    assert r.usage.prompt_tokens == 10 and r.usage.completion_tokens == 20, r.usage
    ok("openai chat")

    chunks = list(oa.chat.completions.create(
        model="openai/gpt-4o-mini", stream=True, messages=[{"role": "user", "content": "one two"}]))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "echo: one two", text
    assert all(c.usage is None for c in chunks), "no usage chunk the client did not ask for"
    ok("openai chat stream")

    r = oa.chat.completions.create(
        model="gpt-4o-mini", tools=WEATHER, messages=[{"role": "user", "content": "tool:get_weather"}])
    assert r.choices[0].message.tool_calls[0].function.name == "get_weather", r
    ok("openai tool call")

    e = expect(openai.PermissionDeniedError,
               lambda: oa.chat.completions.create(model="o1", messages=[{"role": "user", "content": "x"}]))
    assert "rule models" in e.message, e.message
    ok("openai denied model")

    e = expect(openai.PermissionDeniedError, lambda: oa.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "tool:shell.exec"}]))
    assert e.code == "tool_denied", e.body
    ok("openai denied tool")

    def stream_denied_tool():
        for _ in oa.chat.completions.create(
                model="gpt-4o-mini", stream=True, messages=[{"role": "user", "content": "tool:shell.exec"}]):
            pass
    e = expect(openai.APIError, stream_denied_tool)
    assert "shell.exec" in e.message, e.message
    ok("openai denied tool, streamed")

    r = oa.responses.create(model="gpt-4o-mini", input="hi")
    assert r.output_text == "echo: hi", r
    assert r.usage.input_tokens == 10, r.usage
    ok("openai responses")

    events = list(oa.responses.create(model="gpt-4o-mini", input="hi", stream=True))
    assert events[-1].type == "response.completed", events[-1]
    ok("openai responses stream")

    models = [m.id for m in oa.models.list()]
    assert models == ["openai/gpt-4o-mini", "anthropic/claude-sonnet-4"], models
    ok("openai models")

    m = an.messages.create(model="claude-sonnet-4", max_tokens=100, messages=[{"role": "user", "content": "hi"}])
    assert m.content[0].text == "echo: hi", m
    assert m.usage.output_tokens == 20, m.usage
    ok("anthropic messages")

    with an.messages.stream(model="anthropic/claude-sonnet-4", max_tokens=100,
                            messages=[{"role": "user", "content": "hi there"}]) as s:
        text = s.get_final_text()
        final = s.get_final_message()
    assert text == "echo: hi there", text
    assert final.usage.output_tokens == 20, final.usage
    ok("anthropic stream")

    m = an.messages.create(model="claude-sonnet-4", max_tokens=100,
                           tools=[{"name": "get_weather", "input_schema": {"type": "object"}}],
                           messages=[{"role": "user", "content": "tool:get_weather"}])
    assert m.content[0].type == "tool_use" and m.content[0].name == "get_weather", m
    ok("anthropic tool use")

    def anthropic_stream_denied():
        with an.messages.stream(model="claude-sonnet-4", max_tokens=100,
                                messages=[{"role": "user", "content": "tool:shell.exec"}]) as s:
            s.get_final_message()
    e = expect(anthropic.APIError, anthropic_stream_denied)
    assert "shell.exec" in str(e), e
    ok("anthropic denied tool, streamed")

    e = expect(anthropic.PermissionDeniedError, lambda: an.messages.create(
        model="claude-opus-1", max_tokens=10, messages=[{"role": "user", "content": "x"}]))
    assert "rule models" in e.message, e.message
    ok("anthropic denied model")

    n = an.messages.count_tokens(model="claude-sonnet-4", messages=[{"role": "user", "content": "hi"}])
    assert n.input_tokens == 10, n
    ok("anthropic count tokens")


def person():
    # A person in the IdP group `engineering`: any Anthropic model.
    m = an.messages.create(model="claude-sonnet-4", max_tokens=100, messages=[{"role": "user", "content": "hi"}])
    assert m.content[0].text == "echo: hi", m
    ok("person anthropic")
    r = oa.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hello"}])
    assert r.choices[0].message.content == "echo: hello", r
    ok("person openai")


def ci():
    # A CI run admitted as tag:ci: one cheap model, and not Anthropic's.
    r = oa.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hello"}])
    assert r.choices[0].message.content == "echo: hello", r
    ok("ci openai")
    e = expect(anthropic.PermissionDeniedError, lambda: an.messages.create(
        model="claude-sonnet-4", max_tokens=10, messages=[{"role": "user", "content": "x"}]))
    assert "rule models" in e.message, e.message
    ok("ci denied anthropic")


def budget():
    # The first request fits the budget; then it is spent.
    oa.chat.completions.create(model="gpt-4o-mini", max_tokens=50, messages=[{"role": "user", "content": "a"}])
    e = expect(openai.RateLimitError, lambda: oa.chat.completions.create(
        model="gpt-4o-mini", max_tokens=50, messages=[{"role": "user", "content": "b"}]))
    assert "budget" in e.message and e.response.headers.get("x-should-retry") == "false", e.message
    ok("openai exhausted budget")
    e = expect(anthropic.RateLimitError, lambda: an.messages.create(
        model="claude-sonnet-4", max_tokens=50, messages=[{"role": "user", "content": "c"}]))
    assert "budget" in e.message, e.message
    ok("anthropic exhausted budget")


def oversized():
    # 40 MiB, over the gateway's 32 MiB limit: a 413 in each API's format, at once. No retries and a
    # deadline far below the SDKs' 600 s, so a stalled upload fails here instead of hanging.
    big = "x" * (40 << 20)
    strict_oa = openai.OpenAI(base_url=base + "/v1", api_key="no-key-here", max_retries=0, timeout=120)
    e = expect(openai.APIStatusError, lambda: strict_oa.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": big}]))
    assert e.status_code == 413 and "limit" in e.message, (e.status_code, e.message)
    ok("openai oversized request")
    strict_an = anthropic.Anthropic(base_url=base, api_key="no-key-here", max_retries=0, timeout=120)
    e = expect(anthropic.APIStatusError, lambda: strict_an.messages.create(
        model="claude-sonnet-4", max_tokens=10, messages=[{"role": "user", "content": big}]))
    assert e.status_code == 413 and e.body["error"]["type"] == "request_too_large", (e.status_code, e.body)
    ok("anthropic oversized request")


{"basics": basics, "budget": budget, "oversized": oversized, "person": person, "ci": ci}[phase]()
