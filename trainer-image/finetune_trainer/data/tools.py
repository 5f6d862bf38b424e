"""Tool descriptions and tool calls written in each model family's own format, as LLaMA-Factory writes them.

A template names a format for its tool list (`tools_format`) and one for the calls in function turns
(`function_format`); each format is a pair of functions here. The prompt texts are LLaMA-Factory 0.9.5's
(llamafactory/data/tool_utils.py), so a sample trains on the same text there and here; tests/parity proves it.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable
from typing import Any, NamedTuple


class FunctionCall(NamedTuple):
    name: str
    arguments: str  # JSON text


class ToolFormatError(Exception):
    """The tool list or a function call cannot be written in this format; the sample is dropped."""


def today() -> str:
    """The date llama3's tool prompt prints (a function, so tests can fix it)."""
    return datetime.date.today().strftime("%d %b %Y")


DEFAULT_TOOL_PROMPT = (
    "You have access to the following tools:\n{tool_text}"
    "Use the following format if using a tool:\n"
    "```\n"
    "Action: tool name (one of [{tool_names}])\n"
    "Action Input: the input to the tool, in a JSON format representing the kwargs "
    """(e.g. ```{{"input": "hello world", "num_beams": 5}}```)\n"""
    "```\n"
)

GLM4_TOOL_PROMPT = (
    "你是一个名为 ChatGLM 的人工智能助手。你是基于智谱 AI 公司训练的语言模型 GLM-4 模型开发的，"  # noqa: RUF001
    "你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具{tool_text}"
)

GLM4_MOE_TOOL_PROMPT = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>{tool_text}"
    "\n</tools>\n\nFor each function call, output the function name and arguments within the following XML format:"
    "\n<tool_call>{{function-name}}"
    "\n<arg_key>{{arg-key-1}}</arg_key>"
    "\n<arg_value>{{arg-value-1}}</arg_value>"
    "\n<arg_key>{{arg-key-2}}</arg_key>"
    "\n<arg_value>{{arg-value-2}}</arg_value>"
    "\n...\n</tool_call>\n"
)

LLAMA3_TOOL_PROMPT = (
    "Cutting Knowledge Date: December 2023\nToday Date: {date}\n\n"
    "You have access to the following functions. To call a function, please respond with JSON for a function call. "
    """Respond in the format {{"name": function name, "parameters": dictionary of argument name and its value}}. """
    "Do not use variables.\n\n{tool_text}"
)

MINIMAX_M1_TOOL_PROMPT = (
    "You are provided with these tools:\n<tools>\n{tool_text}</tools>\n\n"
    "If you need to call tools, please respond with <tool_calls></tool_calls> XML tags, and provide tool-name and "
    "json-object of arguments, following the format below:\n<tool_calls>\n"
    """{{"name": <tool-name-1>, "arguments": <args-json-object-1>}}\n...\n</tool_calls>"""
)

MINIMAX_M2_TOOL_PROMPT = (
    "\n\n# Tools\n\nYou may call one or more tools to assist with the user query.\n"
    "Here are the tools available in JSONSchema format:\n\n<tools>\n{tool_text}</tools>\n\n"
    "When making tool calls, use XML format to invoke tools and pass parameters:\n"
    """\n<minimax:tool_call>\n<invoke name="tool-name-1">\n<parameter name="param-key-1">param-value-1</parameter>\n"""
    """<parameter name="param-key-2">param-value-2</parameter>\n...\n</invoke>\n</minimax:tool_call>"""
)

QWEN_TOOL_PROMPT = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>{tool_text}"
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    """<tool_call></tool_call> XML tags:\n<tool_call>\n{{"name": <function-name>, """
    """"arguments": <args-json-object>}}\n</tool_call>"""
)

QWEN35_TOOL_PROMPT = (
    "\n\n# Tools\n\nYou have access to the following functions:\n\n<tools>{tool_text}"
    "\n</tools>\n\nIf you choose to call a function ONLY reply in the following format with NO suffix:\n\n"
    "<tool_call>\n<function=example_function_name>\n<parameter=example_parameter_1>\nvalue_1\n</parameter>\n"
    "<parameter=example_parameter_2>\nThis is the value for the second parameter\nthat can span\nmultiple lines\n"
    "</parameter>\n</function>\n</tool_call>\n\n<IMPORTANT>\nReminder:\n"
    "- Function calls MUST follow the specified format: "
    "an inner <function=...></function> block must be nested within <tool_call></tool_call> XML tags\n"
    "- Required parameters MUST be specified\n"
    "- You may provide optional reasoning for your function call in natural language "
    "BEFORE the function call, but NOT after\n"
    "- If there is no function call available, answer the question like normal with your current knowledge "
    "and do not tell the user about function calls\n</IMPORTANT>"
)

SEED_TOOL_PROMPT = (
    "system\nYou are Doubao, a helpful AI assistant. You may call one or more functions to assist with the user query."
    "Tool List:\nYou are authorized to use the following tools (described in JSON Schema format). Before performing "
    "any task, you must decide how to call them based on the descriptions and parameters of these tools.{tool_text}\n"
    "工具调用请遵循如下格式:\n<seed:tool_call>\n<function=example_function_name>\n<parameter=example_parameter_1>value_1"
    "</parameter>\n<parameter=example_parameter_2>This is the value for the second parameter\nthat can span\nmultiple "
    "lines</parameter>\n</function>\n</seed:tool_call>\n"
)

LING_TOOL_PROMPT = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>{tool_text}"
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    """<tool_call></tool_call> XML tags:\n<tool_call>\n{{"name": <function-name>, """
    """"arguments": <args-json-object>}}\n</tool_call>"""
)

LFM2_TOOL_PROMPT = "List of tools: <|tool_list_start|>{tool_text}<|tool_list_end|>"


def _dumps(value: Any, **kwargs: Any) -> str:
    return json.dumps(value, ensure_ascii=False, **kwargs)


def _unwrap(tool: dict[str, Any], default: Any = "") -> Any:
    # {"type": "function", "function": {...}} (OpenAI style) or the function description itself.
    return tool.get("function", default) if tool.get("type") == "function" else tool


def _wrap(tool: dict[str, Any]) -> dict[str, Any]:
    return tool if tool.get("type") == "function" else {"type": "function", "function": tool}


def _text(value: Any) -> str:
    return value if isinstance(value, str) else _dumps(value)


# --- tool lists -------------------------------------------------------------------------------------------------


def _tools_default(tools: list[dict[str, Any]]) -> str:
    tool_text = ""
    tool_names = []
    for raw in tools:
        tool = _unwrap(raw)
        param_text = ""
        for name, param in tool["parameters"]["properties"].items():
            required = ", required" if name in tool["parameters"].get("required", []) else ""
            enum = ", should be one of [{}]".format(", ".join(param["enum"])) if param.get("enum") else ""
            items = (
                ", where each item should be {}".format(param["items"].get("type", "")) if param.get("items") else ""
            )
            param_text += "  - {name} ({type}{required}): {desc}{enum}{items}\n".format(
                name=name,
                type=param.get("type", ""),
                required=required,
                desc=param.get("description", ""),
                enum=enum,
                items=items,
            )
        tool_text += "> Tool Name: {name}\nTool Description: {desc}\nTool Args:\n{args}\n".format(
            name=tool["name"], desc=tool.get("description", ""), args=param_text
        )
        tool_names.append(tool["name"])
    return DEFAULT_TOOL_PROMPT.format(tool_text=tool_text, tool_names=", ".join(tool_names))


def _tools_glm4(tools: list[dict[str, Any]]) -> str:
    tool_text = ""
    for raw in tools:
        tool = _unwrap(raw)
        tool_text += "\n\n## {name}\n\n{body}\n在调用上述函数时，请使用 Json 格式表示调用的参数。".format(  # noqa: RUF001
            name=tool["name"], body=_dumps(tool, indent=4)
        )
    return GLM4_TOOL_PROMPT.format(tool_text=tool_text)


def _tools_llama3(tools: list[dict[str, Any]]) -> str:
    tool_text = "".join(_dumps(_wrap(tool), indent=4) + "\n\n" for tool in tools)
    return LLAMA3_TOOL_PROMPT.format(date=today(), tool_text=tool_text)


def _tools_minimax1(tools: list[dict[str, Any]]) -> str:
    return MINIMAX_M1_TOOL_PROMPT.format(tool_text="".join(_dumps(_unwrap(tool)) + "\n" for tool in tools))


def _tools_minimax2(tools: list[dict[str, Any]]) -> str:
    text = "".join("<tool>" + _dumps(_unwrap(tool)) + "</tool>\n" for tool in tools)
    return MINIMAX_M2_TOOL_PROMPT.format(tool_text=text)


def _tools_mistral(tools: list[dict[str, Any]]) -> str:
    return "[AVAILABLE_TOOLS] " + _dumps([_wrap(tool) for tool in tools]) + "[/AVAILABLE_TOOLS]"


def _tools_qwen(tools: list[dict[str, Any]]) -> str:
    return QWEN_TOOL_PROMPT.format(tool_text="".join("\n" + _dumps(_wrap(tool)) for tool in tools))


def _tools_qwen35(tools: list[dict[str, Any]]) -> str:
    return QWEN35_TOOL_PROMPT.format(tool_text="".join("\n" + _dumps(_unwrap(tool, tool)) for tool in tools))


def _tools_glm4_moe(tools: list[dict[str, Any]]) -> str:
    return GLM4_MOE_TOOL_PROMPT.format(tool_text="".join("\n" + _dumps(_wrap(tool)) for tool in tools))


def _tools_seed(tools: list[dict[str, Any]]) -> str:
    return SEED_TOOL_PROMPT.format(tool_text="\n" + _dumps(tools))


def _tools_ling(tools: list[dict[str, Any]]) -> str:
    text = "".join("\n" + _dumps(_wrap(tool)) for tool in tools)
    return LING_TOOL_PROMPT.format(tool_text=text) + "\n" + "detailed thinking off"


def _tools_lfm2(tools: list[dict[str, Any]]) -> str:
    return LFM2_TOOL_PROMPT.format(tool_text=_dumps([_unwrap(tool, tool) for tool in tools]))


def _tools_gemma4(tools: list[dict[str, Any]]) -> str:
    def parameters(properties: dict[str, Any]) -> str:
        parts: list[str] = []
        for name, schema in properties.items():
            items: list[str] = []
            if schema.get("description"):
                items.append(f'description:<|"|>{schema["description"]}<|"|>')
            if schema.get("type"):
                items.append(f'type:<|"|>{str(schema["type"]).upper()}<|"|>')
            parts.append(f"{name}:{{{','.join(items)}}}")
        return ",".join(parts)

    declarations: list[str] = []
    for tool in tools:
        function = _unwrap(tool, tool)
        declaration = f'declaration:{function["name"]}{{description:<|"|>{function.get("description", "")}<|"|>'
        params = function.get("parameters")
        if params:
            param_parts: list[str] = []
            if params.get("properties"):
                param_parts.append(f"properties:{{{parameters(params['properties'])}}}")
            if params.get("required"):
                required = ",".join(f'<|"|>{item}<|"|>' for item in params["required"])
                param_parts.append(f"required:[{required}]")
            if params.get("type"):
                param_parts.append(f'type:<|"|>{str(params["type"]).upper()}<|"|>')
            declaration += f",parameters:{{{','.join(param_parts)}}}"
        response = function.get("response")
        if response:
            response_parts: list[str] = []
            if response.get("description"):
                response_parts.append(f'description:<|"|>{response["description"]}<|"|>')
            response_type = str(response.get("type", "")).upper()
            if response_type == "OBJECT":
                response_parts.append(f'type:<|"|>{response_type}<|"|>')
            declaration += f",response:{{{','.join(response_parts)}}}"
        declarations.append(declaration + "}")
    return "\n".join(declarations)


# --- function calls ---------------------------------------------------------------------------------------------


def _calls_default(calls: list[FunctionCall]) -> str:
    return "\n".join(f"Action: {name}\nAction Input: {arguments}" for name, arguments in calls)


def _calls_glm4(calls: list[FunctionCall]) -> str:
    if len(calls) > 1:
        raise ToolFormatError("glm4 tool calls cannot be parallel (more than one call in a turn)")
    return f"{calls[0].name}\n{calls[0].arguments}"


def _calls_llama3(calls: list[FunctionCall]) -> str:
    objects = [{"name": name, "parameters": json.loads(arguments)} for name, arguments in calls]
    return _dumps(objects[0] if len(objects) == 1 else objects)


def _calls_minimax1(calls: list[FunctionCall]) -> str:
    texts = [_dumps({"name": name, "arguments": json.loads(arguments)}) for name, arguments in calls]
    return "<tool_calls>\n" + "\n".join(texts) + "\n</tool_calls>"


def _calls_minimax2(calls: list[FunctionCall]) -> str:
    texts = []
    for name, arguments in calls:
        text = f'<invoke name="{name}">'
        for key, value in json.loads(arguments).items():
            text += f'\n<parameter name="{key}">' + _text(value) + "</parameter>"
        texts.append(text + "\n</invoke>")
    return "\n".join(texts)


def _calls_mistral(calls: list[FunctionCall]) -> str:
    return _dumps([{"name": name, "arguments": json.loads(arguments)} for name, arguments in calls])


def _calls_qwen(calls: list[FunctionCall]) -> str:
    texts = [_dumps({"name": name, "arguments": json.loads(arguments)}) for name, arguments in calls]
    return "\n".join(f"<tool_call>\n{text}\n</tool_call>" for text in texts)


def _calls_qwen35(calls: list[FunctionCall]) -> str:
    texts = []
    for name, arguments in calls:
        text = f"<tool_call>\n<function={name}>"
        for key, value in json.loads(arguments).items():
            text += f"\n<parameter={key}>\n{_text(value)}\n</parameter>"
        texts.append(text + "\n</function>\n</tool_call>")
    return "\n".join(texts)


def _calls_glm4_moe(calls: list[FunctionCall]) -> str:
    texts = []
    for name, arguments in calls:
        text = "\n<tool_call>" + name
        for key, value in json.loads(arguments).items():
            text += "\n<arg_key>" + key + "</arg_key>" + "\n<arg_value>" + _text(value) + "</arg_value>"
        texts.append(text)
    return "\n".join(texts)


def _calls_seed(calls: list[FunctionCall]) -> str:
    texts = []
    for name, arguments in calls:
        text = "\n<seed:tool_call>\n<function=" + name
        for key, value in json.loads(arguments).items():
            text += "\n<parameter=" + key + ">" + _text(value) + "</parameter>"
        texts.append(text + "\n</function>\n</seed:tool_call>")
    return "\n".join(texts)


def _calls_lfm2(calls: list[FunctionCall]) -> str:
    texts = []
    for name, arguments in calls:
        parts = [
            f'{key}="{value}"' if isinstance(value, str) else f"{key}={_dumps(value)}"
            for key, value in json.loads(arguments).items()
        ]
        texts.append(f"{name}({', '.join(parts)})")
    return f"<|tool_call_start|>[{', '.join(texts)}]<|tool_call_end|>"


def _calls_gemma4(calls: list[FunctionCall]) -> str:
    def argument(value: Any, escape_keys: bool = True) -> str:
        if isinstance(value, str):
            return f'<|"|>{value}<|"|>'
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, dict):
            items = []
            for key in sorted(value):
                shown = f'<|"|>{key}<|"|>' if escape_keys else str(key)
                items.append(f"{shown}:{argument(value[key], escape_keys)}")
            return "{" + ",".join(items) + "}"
        if isinstance(value, list | tuple):
            return "[" + ",".join(argument(item, escape_keys) for item in value) + "]"
        if value is None:
            return "null"
        return str(value)

    texts = []
    for name, raw in calls:
        try:
            parsed = json.loads(raw)
        except (TypeError, json.JSONDecodeError):
            parsed = raw
        text = f"<|tool_call>call:{name}" + "{"
        if isinstance(parsed, dict):
            text += ",".join(f"{key}:{argument(parsed[key], escape_keys=False)}" for key in sorted(parsed))
        elif isinstance(parsed, str):
            text += parsed
        else:
            text += argument(parsed, escape_keys=False)
        texts.append(text + "}<tool_call|>")
    return "".join(texts)


class ToolFormat(NamedTuple):
    tools: Callable[[list[dict[str, Any]]], str]
    calls: Callable[[list[FunctionCall]], str]


FORMATS: dict[str, ToolFormat] = {
    "default": ToolFormat(_tools_default, _calls_default),
    "gemma4": ToolFormat(_tools_gemma4, _calls_gemma4),
    "glm4": ToolFormat(_tools_glm4, _calls_glm4),
    "llama3": ToolFormat(_tools_llama3, _calls_llama3),
    "lfm2": ToolFormat(_tools_lfm2, _calls_lfm2),
    "minimax1": ToolFormat(_tools_minimax1, _calls_minimax1),
    "minimax2": ToolFormat(_tools_minimax2, _calls_minimax2),
    "mistral": ToolFormat(_tools_mistral, _calls_mistral),
    "qwen": ToolFormat(_tools_qwen, _calls_qwen),
    "qwen3_5": ToolFormat(_tools_qwen35, _calls_qwen35),
    "glm4_moe": ToolFormat(_tools_glm4_moe, _calls_glm4_moe),
    "seed_oss": ToolFormat(_tools_seed, _calls_seed),
    "ling": ToolFormat(_tools_ling, _calls_qwen),
}


def format_tools(name: str, tools: Any) -> str:
    """The tool list (parsed JSON) in format `name`; "" for an empty list. ToolFormatError when it does not fit."""
    if not tools:
        return ""
    try:
        return FORMATS[name].tools(tools)
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise ToolFormatError(f"the tool description does not fit the {name} tool format ({exc!r})") from None


def parse_calls(text: str) -> list[FunctionCall]:
    """The calls of a function turn: one {"name", "arguments"} object or a list of them (LLaMA-Factory's form)."""
    try:
        calls = json.loads(text)
    except json.JSONDecodeError:
        raise ToolFormatError("a function_call turn is not valid JSON") from None
    calls = calls if isinstance(calls, list) else [calls]
    try:
        return [FunctionCall(call["name"], _dumps(call["arguments"])) for call in calls]
    except (KeyError, TypeError):
        raise ToolFormatError('a function_call turn lacks "name" or "arguments"') from None


def format_calls(name: str, calls: list[FunctionCall]) -> str:
    try:
        return FORMATS[name].calls(calls)
    except ToolFormatError:
        raise
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise ToolFormatError(f"the function call does not fit the {name} tool format ({exc!r})") from None
