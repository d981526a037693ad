"""The two-step tool-call round trip a GLM-4.5 user runs against any OpenAI-compatible server.

    glm45 serve                       # or: vllm serve zai-org/GLM-4.5-Air --tool-call-parser glm45 ...
    python examples/tool_call_roundtrip.py --base-url http://127.0.0.1:8000/v1

1. Ask a question with a `get_weather` tool; the model answers with a tool call (arguments as a JSON string).
2. Run the tool here, send the call and its result back, and get the final answer — with thinking off,
   as GLM-4.5 recipes do for the turn after a tool result.
Only the official `openai` package is used, so the script works unchanged against vLLM or SGLang.
"""

from __future__ import annotations

import argparse
import json

from openai import OpenAI

TOOLS = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "the city, e.g. Beijing"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}]


def get_weather(city: str, unit: str = "celsius") -> dict:
    """The tool itself: a stand-in for a real weather service."""
    temperature = 21 if unit == "celsius" else 70
    return {"city": city, "temperature": temperature, "unit": unit, "sky": "clear"}


def call_tool(name: str, arguments: dict) -> dict:
    """Run a requested tool; a model can name an unknown tool or invent an argument, and gets an error back."""
    if name != "get_weather":
        return {"error": f"unknown tool {name!r}"}
    try:
        return get_weather(**arguments)
    except TypeError as e:
        return {"error": str(e)}


def run(base_url: str, api_key: str = "EMPTY", model: str | None = None, question: str | None = None,
        verbose: bool = True) -> dict:
    """Run both steps; returns what happened (the calls made and the final message) for callers and tests."""
    client = OpenAI(base_url=base_url, api_key=api_key)
    model = model or client.models.list().data[0].id
    messages = [{"role": "user", "content": question or "What's the weather like in Beijing right now?"}]

    first = client.chat.completions.create(model=model, messages=messages, tools=TOOLS, temperature=0,
                                           max_tokens=512)
    message = first.choices[0].message
    if verbose:
        print("reasoning:", getattr(message, "reasoning_content", None))
        print("content:  ", message.content)
        print("finish:   ", first.choices[0].finish_reason)
    calls = message.tool_calls or []
    if not calls:
        if verbose:
            print("the model answered without calling the tool")
        return {"calls": [], "final": message}

    messages.append(message.model_dump(exclude_none=True))  # the assistant turn with its tool_calls
    for call in calls:
        arguments = json.loads(call.function.arguments)
        result = call_tool(call.function.name, arguments)
        if verbose:
            print(f"tool call: {call.function.name}({arguments}) -> {result}")
        messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps(result)})

    second = client.chat.completions.create(model=model, messages=messages, tools=TOOLS, temperature=0,
                                            max_tokens=512,
                                            extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    final = second.choices[0].message
    if verbose:
        print("answer:   ", final.content)
    return {"calls": [(c.function.name, json.loads(c.function.arguments)) for c in calls], "final": final,
            "finish_reason": second.choices[0].finish_reason}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--api-key", default="EMPTY")
    parser.add_argument("--model", default=None, help="default: the first model the server lists")
    parser.add_argument("--question", default=None)
    args = parser.parse_args()
    run(args.base_url, args.api_key, args.model, args.question)


if __name__ == "__main__":
    main()
