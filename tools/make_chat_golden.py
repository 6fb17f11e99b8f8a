#!/usr/bin/env python3
"""Golden chat-template renderings for tests/test_chat_template.cpp.

Renders ~30 conversations with each known Qwen chat template, exactly as
transformers' tokenizer.apply_chat_template(..., tokenize=False) does, and writes
tests/data/chat/golden_<template>.json:
  {"template_file": ..., "engine": ..., "cases": [{"name", "messages", "tools"?,
   "add_generation_prompt", "enable_thinking"?, "expected" | "error", "ids"?}]}
"ids" (HF `tokenizers` ids of the expected text) are added with --tokenizer DIR.

Engines:
  transformers (default, the reference; run on the GPU machine: transformers + jinja2, no network)
  jinja        the same Jinja environment as transformers' chat-template renderer (sandboxed,
               trim_blocks, lstrip_blocks, loopcontrols, tojson = json.dumps(ensure_ascii=False));
               for development where transformers is not installed.

Usage: python3 tools/make_chat_golden.py [--engine transformers|jinja] [--tokenizer DIR] [--out DIR]
"""
import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
CHAT_DIR = os.path.join(HERE, "..", "tests", "data", "chat")
TEMPLATES = {  # golden name -> config file holding the template
    "qwen3": "qwen3_tokenizer_config.json",
    "qwen3_v2": "qwen3_v2_tokenizer_config.json",
    "qwen2.5": "qwen2.5_tokenizer_config.json",
    "qwen2": "qwen2_tokenizer_config.json",
    "chatml": "chatml_tokenizer_config.json",
}

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "City name, e.g. Zürich"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}
SEARCH_TOOL = {
    "type": "function",
    "function": {
        "name": "search",
        "description": "Search the web; returns \"snippets\"\nwith\ttabs",
        "parameters": {"type": "object", "properties": {"query": {"type": "string"}, "top_k": {"type": "integer", "default": 3}}},
    },
}


def call(name, arguments, wrap=True):
    if wrap:
        return {"type": "function", "function": {"name": name, "arguments": arguments}}
    return {"name": name, "arguments": arguments}


def cases():
    u = lambda c: {"role": "user", "content": c}
    a = lambda c, **kw: dict({"role": "assistant", "content": c}, **kw)
    s = lambda c: {"role": "system", "content": c}
    t = lambda c: {"role": "tool", "content": c}
    out = []

    def add(name, messages, tools=None, gen=False, thinking=None):
        c = {"name": name, "messages": messages, "add_generation_prompt": gen}
        if tools is not None:
            c["tools"] = tools
        if thinking is not None:
            c["enable_thinking"] = thinking
        out.append(c)

    add("single_turn", [u("Hello!"), a("Hi! How can I help?")])
    add("with_system", [s("You are terse."), u("2+2?"), a("4")])
    add("multi_turn", [u("Name a fruit."), a("Apple."), u("Another?"), a("Banana."), u("One more."), a("Cherry.")])
    add("system_mid_conversation", [u("Hi"), a("Hello."), s("Switch to French."), u("Bonjour?"), a("Oui.")])
    add("gen_prompt", [u("Write a haiku.")], gen=True)
    add("gen_prompt_system", [s("Be brief."), u("Why is the sky blue?")], gen=True)
    add("gen_prompt_thinking_off", [u("Quick answer: capital of France?")], gen=True, thinking=False)
    add("gen_prompt_thinking_on", [u("Think about 17*23.")], gen=True, thinking=True)
    add("gen_prompt_after_assistant", [u("Hi"), a("Hello!")], gen=True)
    add("tools_no_system", [u("Weather in Paris?"), a("Let me check.")], tools=[WEATHER_TOOL])
    add("tools_with_system", [s("You are a weather bot."), u("Weather in Oslo?")], tools=[WEATHER_TOOL, SEARCH_TOOL], gen=True)
    add("tool_call_dict_args", [u("Weather in Zürich in celsius?"),
                                a("", tool_calls=[call("get_weather", {"city": "Zürich", "unit": "celsius"})])],
        tools=[WEATHER_TOOL])
    add("tool_call_with_content", [u("Weather in Rome?"),
                                   a("I will look it up.", tool_calls=[call("get_weather", {"city": "Rome"})])],
        tools=[WEATHER_TOOL])
    add("tool_calls_several", [u("Compare Oslo and Lima."),
                               a("", tool_calls=[call("get_weather", {"city": "Oslo"}), call("get_weather", {"city": "Lima"}),
                                                 call("search", {"query": "Oslo vs Lima climate", "top_k": 2})])],
        tools=[WEATHER_TOOL, SEARCH_TOOL])
    add("tool_call_string_args", [u("Weather in Kyiv?"),
                                  a("", tool_calls=[call("get_weather", "{\"city\": \"Kyiv\"}")])], tools=[WEATHER_TOOL])
    add("tool_call_unwrapped", [u("Weather in Cairo?"),
                                a("", tool_calls=[call("get_weather", {"city": "Cairo"}, wrap=False)])], tools=[WEATHER_TOOL])
    add("tool_response_single", [u("Weather in Rome?"), a("", tool_calls=[call("get_weather", {"city": "Rome"})]),
                                 t("{\"temp\": 21, \"sky\": \"clear\"}"), a("It is 21 °C and clear in Rome.")],
        tools=[WEATHER_TOOL])
    add("tool_responses_in_a_row", [u("Oslo and Lima?"),
                                    a("", tool_calls=[call("get_weather", {"city": "Oslo"}), call("get_weather", {"city": "Lima"})]),
                                    t("{\"temp\": -3}"), t("{\"temp\": 19}"), t("extra note"),
                                    a("Oslo -3 °C, Lima 19 °C.")], tools=[WEATHER_TOOL])
    add("tool_response_then_gen", [u("Weather in Rome?"), a("", tool_calls=[call("get_weather", {"city": "Rome"})]),
                                   t("{\"temp\": 21}")], tools=[WEATHER_TOOL], gen=True)
    add("multi_step_tools_reasoning", [
        u("Plan a trip: weather in Oslo, then search flights."),
        a("", reasoning_content="First get the weather.", tool_calls=[call("get_weather", {"city": "Oslo"})]),
        t("{\"temp\": 5}"),
        a("", reasoning_content="Now search flights.", tool_calls=[call("search", {"query": "flights to Oslo"})]),
        t("cheap flights found"),
        a("Oslo is 5 °C; flights are cheap.", reasoning_content="Summarise both results.")],
        tools=[WEATHER_TOOL, SEARCH_TOOL])
    add("reasoning_last_turn", [u("What is 12*12?"), a("144", reasoning_content="12*12 = 144.")])
    add("reasoning_earlier_turn_dropped", [u("What is 2*3?"), a("6", reasoning_content="2*3=6"),
                                           u("And 3*3?"), a("9", reasoning_content="3*3=9")])
    add("inline_think_last", [u("Solve x+1=3."), a("<think>\nSubtract 1.\n</think>\n\nx = 2")])
    add("inline_think_earlier", [u("Hi"), a("<think>greet back</think>Hello!"), u("Bye"), a("<think>\nfarewell\n</think>\n\nGoodbye!")])
    add("close_think_only", [u("Answer?"), a("some thought</think>\n\nThe answer.")])
    add("reasoning_with_newlines", [u("Q"), a("\n\nA with leading newlines", reasoning_content="\n\nthought with newlines\n\n")])
    add("empty_assistant", [u("Say nothing."), a("")])
    add("empty_reasoning_multi_turn", [u("One"), a("1", reasoning_content=""), u("Two"), a("2", reasoning_content="")])
    add("unicode", [s("Réponds en français. 你好 🌍"), u("Ünïcödé: naïve café, עברית, 日本語, emoji 👩‍👩‍👧 and e\u0301"),
                    a("D'accord — «très bien» ✓\n\tindented line")])
    add("tool_args_json_edge", [u("Edge cases."),
                                a("", tool_calls=[call("search", {
                                    "query": "quote \" backslash \\ newline \n tab \t ctrl \u0001 del \u007f é 中 😀",
                                    "float": 1.5, "int": 3, "neg": -0.25, "big": 1e20, "small": 1e-07, "whole": 2.0,
                                    "bool": True, "none": None, "list": [1, "two", [3.0], {}], "nested": {"b": 1, "a": [False]}})])],
        tools=[SEARCH_TOOL])
    add("user_looks_like_tool_response", [u("Hi"), a("", tool_calls=[call("search", {"query": "x"})]),
                                          u("<tool_response>\nmanual result\n</tool_response>"), a("Thanks.", reasoning_content="r")],
        tools=[SEARCH_TOOL])
    add("assistant_leading_newlines_after_query", [u("Q1"), a("A1"), u("Q2"), a("\n\nA2")])
    add("tool_call_null_content", [u("Weather in Rome?"), a(None, tool_calls=[call("get_weather", {"city": "Rome"})])],
        tools=[WEATHER_TOOL])
    return out


def jinja_renderer(template_text):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    tmpl = env.from_string(template_text)

    def render(case, special):
        kw = dict(special)
        if "enable_thinking" in case:
            kw["enable_thinking"] = case["enable_thinking"]
        return tmpl.render(messages=case["messages"], tools=case.get("tools"),
                           add_generation_prompt=case["add_generation_prompt"], **kw)
    return render


def transformers_renderer(template_text, tokenizer_file):
    from transformers import PreTrainedTokenizerFast
    if tokenizer_file:
        tok = PreTrainedTokenizerFast(tokenizer_file=tokenizer_file, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    else:  # a one-token vocabulary is enough for tokenize=False
        from tokenizers import Tokenizer, models
        tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>")),
                                      eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.chat_template = template_text

    def render(case, special):
        kw = {}
        if "enable_thinking" in case:
            kw["enable_thinking"] = case["enable_thinking"]
        out = tok.apply_chat_template(case["messages"], tools=case.get("tools"), tokenize=False,
                                      add_generation_prompt=case["add_generation_prompt"], **kw)
        assert isinstance(out, str), type(out)
        return out
    return render


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--engine", choices=["transformers", "jinja"], default="transformers")
    ap.add_argument("--tokenizer", help="directory with tokenizer.json: adds HF token ids to the qwen3 goldens")
    ap.add_argument("--out", default=CHAT_DIR)
    args = ap.parse_args()
    tok_file = os.path.join(args.tokenizer, "tokenizer.json") if args.tokenizer else None
    encoder = None
    if tok_file:
        from tokenizers import Tokenizer
        encoder = Tokenizer.from_file(tok_file)
    engine_desc = args.engine
    if args.engine == "transformers":
        import transformers
        engine_desc = f"transformers {transformers.__version__} apply_chat_template(tokenize=False)"
    os.makedirs(args.out, exist_ok=True)
    for name, cfg_file in TEMPLATES.items():
        cfg = json.load(open(os.path.join(CHAT_DIR, cfg_file), encoding="utf-8"))
        special = {"bos_token": cfg.get("bos_token") or "", "eos_token": cfg.get("eos_token"),
                   "pad_token": cfg.get("pad_token")}
        if args.engine == "jinja":
            render = jinja_renderer(cfg["chat_template"])
        else:
            render = transformers_renderer(cfg["chat_template"], tok_file)
        results = []
        for case in cases():
            c = json.loads(json.dumps(case))  # a fresh copy (templates must not see shared objects)
            try:
                c["expected"] = render(c, special)
                if encoder is not None and name.startswith("qwen3"):
                    c["ids"] = encoder.encode(c["expected"], add_special_tokens=False).ids
            except Exception as e:  # the template itself fails on this input (e.g. None + str)
                c["error"] = f"{type(e).__name__}: {e}"
            results.append(c)
        path = os.path.join(args.out, f"golden_{name}.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"template_file": cfg_file, "engine": engine_desc, "cases": results}, f, ensure_ascii=False, indent=1)
            f.write("\n")
        n_err = sum("error" in r for r in results)
        print(f"{path}: {len(results)} cases ({n_err} template errors)")


if __name__ == "__main__":
    sys.exit(main())
