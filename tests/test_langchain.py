"""A client no one here wrote: LangChain's ChatOpenAI (langchain-openai) against a real `chatforge serve`
on the demo model: plain invoke and stream, bind_tools with a forced call, with_structured_output."""
from __future__ import annotations

from typing import Literal

import pytest
from pydantic import BaseModel, Field

from chatforge.loader import DEMO_MODEL
from chatforge.server.process import ServerProcess

langchain_openai = pytest.importorskip("langchain_openai")


class Weather(BaseModel):
    """The weather forecast asked for."""

    city: Literal["Paris", "Rome", "Oslo"]
    days: int = Field(ge=1, le=7)
    sunny: bool


class get_weather(BaseModel):  # noqa: N801 (a tool's name is its class name)
    """Look up the weather in a city for the next days."""

    city: Literal["Paris", "Rome", "Oslo"]
    days: int = Field(ge=1, le=7)


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    db = tmp_path_factory.mktemp("langchain") / "c.db"
    with ServerProcess("--db", str(db), "--threads", "1", "--log-level", "warning") as s:
        yield langchain_openai.ChatOpenAI(base_url=s.url + "/v1", api_key="none", model=DEMO_MODEL, temperature=0,
                                          max_tokens=60, max_retries=0)


def test_invoke_and_stream(llm):
    reply = llm.invoke("Hello, how are you?")
    assert isinstance(reply.content, str) and reply.content
    assert reply.response_metadata["finish_reason"] in ("stop", "length")
    pieces = list(llm.stream("Hello, how are you?"))
    assert len(pieces) > 1 and "".join(p.content for p in pieces) == reply.content  # greedy: the same text


def test_bind_tools_with_a_forced_call(llm):
    reply = llm.bind_tools([get_weather], tool_choice="required").invoke("What is the weather in Rome?")
    [call] = reply.tool_calls
    assert call["name"] == "get_weather" and call["id"].startswith("call_")
    get_weather(**call["args"])  # the arguments fit the tool's schema
    streamed = None
    for chunk in llm.bind_tools([get_weather], tool_choice="get_weather").stream("Weather in Oslo?"):
        streamed = chunk if streamed is None else streamed + chunk
    [call] = streamed.tool_calls
    assert call["name"] == "get_weather"
    get_weather(**call["args"])


def test_with_structured_output(llm):
    forecast = llm.with_structured_output(Weather).invoke("Will it be sunny in Paris for the next 3 days?")
    assert isinstance(forecast, Weather)
    via_tools = llm.with_structured_output(Weather, method="function_calling").invoke("And in Oslo?")
    assert isinstance(via_tools, Weather)
