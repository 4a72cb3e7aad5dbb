"""Ray Serve: the strong model with weak-to-strong guided decoding (CBS) behind an OpenAI-compatible HTTP API.

    serve run configs/serve.yaml            (or: python -m jobs.serve --config configs/serve.yaml)
    POST /v1/completions, POST /v1/chat/completions   (extra body fields w, k, l: the search's shape)
    GET /v1/models, GET /healthz

One replica owns three model hosts (actors.model_host: strong, tuned, untuned; each on its own GPU where the
config asks for GPUs) and runs `actors.search.search_batch` on them: concurrent requests with the same search
settings are batched (`serve.batch`) into one search, every model call covering all of them. Requests are read
with the `openai` package's own request types (TypedDicts, validated by pydantic) and answered with its response
types (`openai.types.Completion`, `ChatCompletion`): Ray 2.60's `ray.serve.llm` has OpenAI protocol models, but
importing them needs vLLM or SGLang. Bad requests get a 400 with the reason; over `max_ongoing_requests` +
`max_queued_requests` Serve answers 503; a replica that dies is restarted by Serve (its hosts die with it and the
new replica starts its own).
"""

import asyncio
import secrets
import time
import uuid
from pathlib import Path

# no `from __future__ import annotations` here: FastAPI reads the endpoints' annotations as objects (Serve wraps
# the methods, so names as strings would not resolve), and at module level
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import Field, TypeAdapter, ValidationError
from ray import serve

from actors.resources import HostResources
from w2s.config import StrictModel
from w2s.modeling import ModelSpec, encode_prompts
from w2s.search import BeamShape, Sampling


class Limits(StrictModel):
    """What one request may ask for; more is a 400, never a cut."""

    max_prompt_tokens: int = Field(256, ge=1)
    max_tokens: int = Field(128, ge=1, description="new tokens per response")
    max_rows: int = Field(64, ge=1, description="w * k: rows sampled per prompt")


class ServeConfig(StrictModel):
    """The application's arguments (`args:` of configs/serve.yaml)."""

    model_name: str = "w2s-cbs"
    strong: ModelSpec
    tuned: ModelSpec
    untuned: ModelSpec
    search: BeamShape = BeamShape()  # a request's default w, k, l
    sampling: Sampling = Sampling()  # default max_tokens (its max_new_tokens), temperature, top_k
    limits: Limits = Limits()
    max_batch_size: int = Field(8, ge=1, description="requests batched into one search")
    max_ongoing_requests: int = Field(32, ge=1, description="requests a replica works on at once (Serve)")
    max_queued_requests: int = Field(32, ge=0, description="requests waiting for a replica; more get a 503 (Serve)")
    batch_wait_timeout_s: float = Field(0.05, ge=0)
    hosts: HostResources = HostResources()  # what each model host asks for (GPUs...)


class RequestError(ValueError):
    """A request the server refuses (HTTP 400), with the reason."""


class SearchRequest(StrictModel):
    """The search settings of one request (the OpenAI fields that apply, and CBS's extra w, k, l)."""

    prompt: str
    prompt_tokens: int  # the prompt's length in the strong model's tokens (limits, usage)
    max_tokens: int = Field(ge=1)
    temperature: float = Field(gt=0)
    top_k: int = Field(ge=0)
    w: int = Field(ge=1)
    k: int = Field(ge=1)
    l: int | None = Field(ge=1)
    seed: int

    def group(self) -> tuple:
        """Requests that can share one search batch."""
        return (self.max_tokens, self.temperature, self.top_k, self.w, self.k, self.l)


def read_request(body: dict, config: ServeConfig, tokenizer, chat: bool) -> SearchRequest:
    """A request body -> its search settings, checked against the OpenAI request type and the limits."""
    from openai.types import completion_create_params
    from openai.types.chat import completion_create_params as chat_params

    params = (chat_params if chat else completion_create_params).CompletionCreateParamsNonStreaming
    if not isinstance(body, dict):
        raise RequestError("the body must be a JSON object")
    try:
        request = TypeAdapter(params).validate_python(body)
    except ValidationError as err:
        raise RequestError(_validation_message(err)) from None
    if body.get("stream"):
        raise RequestError("stream: true is not supported; the search returns whole responses")
    if body.get("n", 1) != 1:
        raise RequestError("n must be 1: the search returns its best response")
    prompt = _chat_prompt(list(request["messages"]), tokenizer) if chat else _completion_prompt(request["prompt"])
    def given(*names: str, default):  # the first field the request sets; a 0 is a value, not "unset"
        return next((request[n] for n in names if request.get(n) is not None), default)

    fields = {"w": body.get("w", config.search.w), "k": body.get("k", config.search.k),
              "l": body.get("l", config.search.l),
              "max_tokens": given(*(("max_completion_tokens",) if chat else ()), "max_tokens",
                                  default=config.sampling.max_new_tokens),
              "temperature": given("temperature", default=config.sampling.temperature),
              "top_k": body.get("top_k", config.sampling.top_k),
              "seed": given("seed", default=None)}
    if fields["seed"] is None:
        fields["seed"] = secrets.randbits(31)
    if fields["temperature"] == 0:  # OpenAI's greedy decoding: the most likely token (top-k 1) at every step
        fields.update(temperature=1.0, top_k=1)
    try:
        search = SearchRequest(prompt=prompt, prompt_tokens=len(encode_prompts(tokenizer, [prompt])[0]), **fields)
    except ValidationError as err:
        raise RequestError(_validation_message(err)) from None
    _check_limits(search, config.limits)
    return search


def _validation_message(err: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in err.errors()[:5])


def _completion_prompt(prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        return prompt[0]
    raise RequestError("prompt: one string (a list of prompts or of token ids is not supported)")


def _chat_prompt(messages: list, tokenizer) -> str:
    """The conversation rendered by the strong model's chat template (without one: the last user message)."""
    turns = []
    for i, message in enumerate(messages):
        if not isinstance(message.get("content"), str):
            raise RequestError(f"messages.{i}.content: must be a string")
        turns.append({"role": message["role"], "content": message["content"]})
    if not turns or turns[-1]["role"] != "user":
        raise RequestError("messages: the last message must be the user's")
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    return turns[-1]["content"]


def _check_limits(search: SearchRequest, limits: Limits) -> None:
    if search.w * search.k > limits.max_rows:
        raise RequestError(f"w * k = {search.w * search.k} is over this server's limit of {limits.max_rows}")
    if search.max_tokens > limits.max_tokens:
        raise RequestError(f"max_tokens {search.max_tokens} is over this server's limit of {limits.max_tokens}")
    if search.prompt_tokens > limits.max_prompt_tokens:
        raise RequestError(f"the prompt has {search.prompt_tokens} tokens, over this server's limit of "
                           f"{limits.max_prompt_tokens}")


def completion(found, text: str, prompt_tokens: int, model: str, chat: bool):
    """The OpenAI response object (openai.types) of one search result."""
    from openai.types import Completion, CompletionChoice, CompletionUsage
    from openai.types.chat import ChatCompletion, ChatCompletionMessage
    from openai.types.chat.chat_completion import Choice

    finish = "stop" if found.finished else "length"
    usage = CompletionUsage(prompt_tokens=prompt_tokens, completion_tokens=len(found.tokens),
                            total_tokens=prompt_tokens + len(found.tokens))
    common = dict(id=f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", created=int(time.time()), model=model,
                  usage=usage)
    if chat:
        return ChatCompletion(object="chat.completion", choices=[Choice(
            index=0, finish_reason=finish, message=ChatCompletionMessage(role="assistant", content=text))], **common)
    return Completion(object="text_completion", choices=[CompletionChoice(index=0, finish_reason=finish, text=text)],
                      **common)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": "invalid_request_error",
                                                               "code": status}})


# Defined after everything its endpoints use: Serve captures the class, and what it refers to, when it is decorated.
api = FastAPI()


@serve.deployment(health_check_period_s=10, ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class GuidedCompletions:
    """One replica: the config's three model hosts, and the endpoints (see the module docstring)."""

    def __init__(self, config: ServeConfig):
        from actors.model_host import HostPool
        from actors.search import ALONE, ROLES, Guides
        from w2s.modeling import end_of_turn_id, load_tokenizer

        self.config, self.tokenizer = config, load_tokenizer(config.strong.path)
        self.pool = HostPool(max_hosts=len(ROLES), resources=config.hosts)
        hosts = self.pool.hosts({r: getattr(config, r) for r in ROLES}, alone=ALONE)
        self.guides = Guides(hosts, self.tokenizer, end_of_turn_id(self.tokenizer), True)
        self.search_batch = serve.batch(max_batch_size=config.max_batch_size,
                                        batch_wait_timeout_s=config.batch_wait_timeout_s)(self._searches)

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @api.get("/v1/models")
    async def models(self) -> dict:
        from openai.types import Model

        model = Model(id=self.config.model_name, created=0, object="model", owned_by="w2s")
        return {"object": "list", "data": [model.model_dump()]}

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._answer(request, chat=False)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._answer(request, chat=True)

    async def _answer(self, request: Request, chat: bool):
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "the body is not valid JSON")
        try:
            search = read_request(body, self.config, self.tokenizer, chat)
        except RequestError as err:
            return _error(400, str(err))
        found = await self.search_batch(search)
        text = self.tokenizer.decode(found.tokens, skip_special_tokens=True)
        return completion(found, text, search.prompt_tokens, self.config.model_name, chat).model_dump()

    async def _searches(self, requests: list[SearchRequest]) -> list:
        """One search per group of requests with the same settings, run off the event loop."""
        from actors.search import search_batch

        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(r.group(), []).append(i)
        out: list = [None] * len(requests)
        for members in groups.values():
            first = requests[members[0]]
            shape = BeamShape(w=first.w, k=first.k, l=first.l)
            sampling = Sampling(max_new_tokens=first.max_tokens, temperature=first.temperature, top_k=first.top_k)
            found = await asyncio.to_thread(search_batch, self.guides, [requests[i].prompt for i in members],
                                            [requests[i].seed for i in members], shape, sampling)
            for i, f in zip(members, found):
                out[i] = f
        return out


def build_app(args: dict):
    """The Serve application of `args` (configs/serve.yaml's `args:`); `serve run` calls this. Model paths are made
    absolute where this runs, and the models checked before any replica starts."""
    from actors.search import ROLES

    config = ServeConfig(**args)
    for role in ROLES:
        spec = getattr(config, role)
        setattr(config, role, spec.model_copy(update={"path": str(Path(spec.path).resolve())}))
    _check_models(config)
    return GuidedCompletions.options(max_ongoing_requests=config.max_ongoing_requests,
                                     max_queued_requests=config.max_queued_requests).bind(config)


def _check_models(config: ServeConfig) -> None:
    """Refused before any replica starts: missing models, or guides that do not share the strong model's tokenizer
    (the server scores incrementally)."""
    from actors.search import ROLES
    from w2s.modeling import check_same_tokenizer

    check_same_tokenizer({r: getattr(config, r) for r in ROLES})
