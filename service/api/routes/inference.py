"""Using a trained job over HTTP (docs/guide.md, "Over HTTP"): generate (Server-Sent
Events), predict, and inference sessions whose hidden state the service keeps in Redis.

Every route runs the model of one checkpoint of the caller's own job (another project's
job or session is a 404, like an unknown one): generate, predict and a new session take
the job's latest checkpoint; a session keeps the one it was created with. Models come from
the process's cache (service.api.models), loaded once, off the event loop; every model
call runs in a thread. The bounds are trainer.inference's.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Response, status
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from service.api import forecast
from service.api.deps import ProjectDep, RuntimeDep
from service.api.downloads import BINARY, stored_file
from service.api.errors import ApiError, Invalid, responses
from service.api.models import dump_state, load_state
from service.api.runtime import Runtime
from service.api.submission import inside_data_roots
from service.store.db import repo
from service.store.db.errors import NotFound
from service.store.db.models import Checkpoint, Job
from service.store.model_sessions import LockLost, ModelSession, SessionBusy
from trainer.artifact import ArtifactError
from trainer.inference import (
    MAX_HORIZON,
    MAX_PROMPT_CHARS,
    MAX_TEMPERATURE,
    MAX_TOKENS,
    Model,
)

router = APIRouter(tags=["inference"])

JobId = Annotated[str, Path(min_length=1, max_length=64, description="A job id (`job_...`)")]
SessionId = Annotated[str, Path(min_length=1, max_length=64, description="A session id (`ses_...`)")]
# outputs="all" of one step returns at most this many numbers (else 422: step in shorter chunks).
MAX_RETURNED_VALUES = 1_000_000
# A generation hands its pieces to the event loop in batches of at most this many, or
# what it sampled in this many seconds.
_BATCH, _BATCH_S = 64, 0.05


# --- bodies -------------------------------------------------------------------------------


class GenerateBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    max_tokens: int = Field(200, ge=1, le=MAX_TOKENS)
    temperature: float = Field(1.0, ge=0, le=MAX_TEMPERATURE)
    top_k: int | None = Field(None, ge=1)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)


Table = list[list[float]] | list[float] | dict[str, list[float]]


class PredictBody(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    series: Table = Field(description="Past rows in the model's columns order, or {column: values}; original units")
    horizon: int = Field(1, ge=1, le=MAX_HORIZON)
    future: Table | None = Field(None, description="horizon > 1: the coming rows of the input columns that are not the target")


class StepBody(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    inputs: str | list[Any] = Field(description="Text (text models), token ids, or rows of numbers (time series)")
    outputs: Literal["last", "all"] = Field("last", description="Return the outputs of the last step only, or of every step")


class SessionPublic(BaseModel):
    id: str
    job_id: str
    step: int = Field(description="The training step of the checkpoint the session runs")
    kind: str
    predicts: str
    expires_in_s: int


class Forecast(BaseModel):
    job_id: str
    step: int
    target: str | None
    forecast: list[float]


class StepResult(BaseModel):
    session_id: str
    steps: int = Field(description="Steps run by this call")
    outputs: list[Any] = Field(description="Per step: the logits (token models) or the target's next value")
    next: dict[str, Any] | None = Field(None, description="Text models: the likeliest next token and its probability")
    unknown: list[str] | None = Field(None, description="Text inputs: characters or words read as <unk>")


# --- the model of a job -------------------------------------------------------------------


@dataclass(frozen=True)
class ModelFile:
    """A completed job's model artifact (its summary's `model`), used like a checkpoint row."""

    job_id: str
    step: int
    sha256: str
    uri: str

    @classmethod
    def of(cls, job: Job) -> "ModelFile | None":
        model = (job.summary or {}).get("model")
        return None if model is None else cls(job.id, model["step"], model["sha256"], model["uri"])


async def _checkpoint(runtime: Runtime, job_id: str, project_id: str, step: int | None = None) -> Checkpoint | ModelFile:
    """What a job's model is read from: its model artifact once it completed (the one of
    `step` when given), else its latest checkpoint (or the one of `step`)."""
    async with runtime.sessions() as db:
        job = await db.run_sync(repo.get_job, job_id, project_id)  # NotFound: 404
        model = ModelFile.of(job)
        if model is not None and step in (None, model.step):
            return model
        if step is None:
            row = await db.run_sync(repo.latest_checkpoint, job_id)
        else:
            try:
                row = await db.run_sync(repo.get_checkpoint, job_id, step)
            except NotFound:
                raise ApiError(409, "checkpoint_gone", f"job {job_id!r} no longer has the checkpoint of step {step} this session runs; start a new session") from None
    if row is None:
        raise ApiError(409, "no_checkpoint", f"job {job_id!r} has no checkpoint yet: a model exists once its first checkpoint is written")
    return row


async def _model(runtime: Runtime, row: Checkpoint | ModelFile) -> Model:
    try:
        return await runtime.models.get((row.job_id, row.step, row.sha256), row.uri)
    except ArtifactError as exc:
        raise ApiError(409, "not_usable", str(exc)) from None
    except FileNotFoundError:
        raise NotFound("checkpoint file", f"{row.job_id}@{row.step}") from None


def _require(model: Model, kind: str, what: str) -> None:
    if model.kind != kind:
        raise ApiError(409, "wrong_kind", f"{what} needs a {kind} model; this job's is {model.kind} ({model.predicts})")


def _invalid(exc: ValueError) -> Invalid:
    """trainer.inference's ValueError ("name: what is wrong") as a 422 naming the field."""
    text = str(exc)
    match = re.match(r"([A-Za-z_][\w.]*): (.*)", text, re.S)
    return Invalid(match.group(1), match.group(2)) if match else Invalid(None, text)


# --- the model artifact -------------------------------------------------------------------


@router.get(
    "/v1/jobs/{job_id}/model",
    response_class=StreamingResponse,
    summary="Download a completed job's model (config, weights, vocabulary or normalisation)",
    description="The `model` artifact written when the job completed (`train.model`: the last or the best "
    "weights); `trainer.load` reads it with no other file. 409 while the job has none (not completed yet, "
    "or finished before this version wrote models): its checkpoints serve then.",
    responses={200: {**BINARY, "description": "The model file (a torch.save dict)"}, **responses(401, 404, 409, 503)},
)
async def download_model(job_id: JobId, project: ProjectDep, runtime: RuntimeDep) -> StreamingResponse:
    async with runtime.sessions() as db:
        job = await db.run_sync(repo.get_job, job_id, project.project_id)
    model = (job.summary or {}).get("model")
    if model is None:
        raise ApiError(409, "no_model", f"job {job_id!r} has no model artifact: one is written when a job completes ({job.state.value} now)")
    return await stored_file(
        runtime, model["uri"], size=model["bytes"], sha256=model["sha256"], filename=f"{job_id}-model.pt",
        what=("model file", job_id),
    )


# --- the validation forecast of a time-series job -----------------------------------------


@router.get(
    "/v1/jobs/{job_id}/forecast",
    summary="A time-series job's one-step-ahead forecasts over its validation split, and the values that came",
    description="What the job page plots (service/api/forecast.py): the model (as generate's) run from a fresh "
    "state over the first `rows` validation rows of the job's data file. 409 when the data is gone or too large.",
    responses=responses(401, 404, 409, 422, 503),
)
async def validation_forecast(
    job_id: JobId, project: ProjectDep, runtime: RuntimeDep, rows: Annotated[int, Query(ge=1, le=forecast.MAX_ROWS)] = 500,
) -> dict[str, Any]:
    row = await _checkpoint(runtime, job_id, project.project_id)
    model = await _model(runtime, row)
    _require(model, "timeseries", "a forecast")
    data = model.config.data
    try:
        if data.dataset is not None:
            async with runtime.sessions() as db:
                uri = (await db.run_sync(repo.get_dataset, data.dataset, project.project_id)).uri
            try:
                path = await asyncio.to_thread(runtime.store.local_path, uri, forecast.DATASET_CACHE)
            except OSError:
                raise forecast.Unavailable(f"the file of dataset {data.dataset!r} is gone from the store") from None
        else:  # read only inside the data roots, as the job's submission was checked
            path = await asyncio.to_thread(inside_data_roots, data.path, runtime.settings.data_roots)
            if path is None:
                raise forecast.Unavailable(f"the job's data file {data.path} is not inside the data roots (UNROLL_DATA_ROOTS) now")
        drawn = await asyncio.to_thread(forecast.validation_forecast, model, path, data.valid_fraction, rows)
    except NotFound:
        raise ApiError(409, "data_gone", f"job {job_id!r}: its dataset {data.dataset!r} was deleted") from None
    except forecast.Unavailable as exc:
        raise ApiError(409, "no_forecast", str(exc)) from None
    return {"job_id": job_id, "step": row.step, **drawn}


# --- generate -----------------------------------------------------------------------------

_GENERATE_DOC = """Sample a continuation of `prompt` from the job's latest checkpoint (a text
model), as Server-Sent Events: one `token` event per piece (`{"text": piece}`: a character,
or a word with its space, or a line break), then `done` (`{"tokens": n, "unknown": [...],
"step": checkpoint step}`; `unknown`: the prompt's characters or words outside the
vocabulary, read as `<unk>`). The same `seed` gives the same text as `trainer.load(...)
.generate` with that seed. An `error` event ends a stream that failed midway."""


@router.post(
    "/v1/jobs/{job_id}/generate",
    response_class=StreamingResponse,
    summary="Generate text from a job's model (Server-Sent Events)",
    description=_GENERATE_DOC,
    responses={
        200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}, "description": "An event stream"},
        **responses(401, 404, 409, 422, 503),
    },
)
async def generate(job_id: JobId, body: GenerateBody, project: ProjectDep, runtime: RuntimeDep) -> StreamingResponse:
    row = await _checkpoint(runtime, job_id, project.project_id)
    model = await _model(runtime, row)
    _require(model, "text", "generate")
    try:  # validates every argument before the response starts
        stream = await asyncio.to_thread(model.stream, body.prompt, body.max_tokens, body.temperature, body.top_k, body.seed)
    except ValueError as exc:
        raise _invalid(exc) from None

    async def events() -> AsyncIterator[str]:
        count = 0
        try:
            while batch := await asyncio.to_thread(_take, stream):
                count += len(batch)
                yield "".join(_sse("token", {"text": piece}) for piece in batch)
        except Exception as exc:  # noqa: BLE001 - the stream has started: say so in it
            yield _sse("error", {"message": f"generation failed: {type(exc).__name__}"})
            return
        yield _sse("done", {"tokens": count, "unknown": stream.unknown, "step": row.step})

    return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _take(pieces: Iterator[str]) -> list[str]:
    batch: list[str] = []
    deadline = time.monotonic() + _BATCH_S
    for piece in pieces:
        batch.append(piece)
        if len(batch) >= _BATCH or time.monotonic() > deadline:
            break
    return batch


def _sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


# --- predict ------------------------------------------------------------------------------


@router.post(
    "/v1/jobs/{job_id}/predict",
    response_model=Forecast,
    summary="Forecast with a job's time-series model",
    description="The target for the `horizon` rows after the last row of `series` (original units), "
    "from the job's latest checkpoint; see docs/guide.md, \"Time series: predict\".",
    responses=responses(401, 404, 409, 413, 422, 503),
)
async def predict(job_id: JobId, body: PredictBody, project: ProjectDep, runtime: RuntimeDep) -> Forecast:
    row = await _checkpoint(runtime, job_id, project.project_id)
    model = await _model(runtime, row)
    _require(model, "timeseries", "predict")
    try:
        values = await asyncio.to_thread(model.predict, body.series, body.horizon, body.future)
    except ValueError as exc:
        raise _invalid(exc) from None
    return Forecast(job_id=job_id, step=row.step, target=model.target, forecast=values)


# --- sessions -----------------------------------------------------------------------------


@router.post(
    "/v1/jobs/{job_id}/sessions",
    status_code=status.HTTP_201_CREATED,
    response_model=SessionPublic,
    summary="Start an inference session on a job's latest checkpoint",
    description="The session keeps the model's hidden state between `POST /v1/sessions/{id}/step` calls, "
    "in Redis, for UNROLL_SESSION_TTL_S after its last use. At most UNROLL_MAX_SESSIONS_PER_PROJECT "
    "live sessions per project (429).",
    responses=responses(401, 404, 409, 429, 503),
)
async def create_session(job_id: JobId, project: ProjectDep, runtime: RuntimeDep) -> SessionPublic:
    row = await _checkpoint(runtime, job_id, project.project_id)
    model = await _model(runtime, row)  # a checkpoint that cannot be used: 409 now, not at the first step
    created = await runtime.model_sessions.create(project.project_id, job_id, row.step, row.sha256)
    if created is None:
        limit = runtime.settings.max_sessions_per_project
        raise ApiError(429, "too_many_sessions", f"this project has {limit} live inference sessions "
                       "(UNROLL_MAX_SESSIONS_PER_PROJECT): delete some, or let them expire")
    return SessionPublic(id=created.id, job_id=job_id, step=row.step, kind=model.kind, predicts=model.predicts,
                         expires_in_s=runtime.settings.session_ttl_s)


@router.post(
    "/v1/sessions/{session_id}/step",
    response_model=StepResult,
    summary="Run inputs through a session's model from its state, and keep the new state",
    description="Steps of one session run one at a time (a second waits for the first). Feeding a text "
    "in pieces gives the outputs of feeding it at once (character models; word models: cut at spaces).",
    responses=responses(401, 404, 409, 413, 422, 503),
)
async def step_session(session_id: SessionId, body: StepBody, project: ProjectDep, runtime: RuntimeDep) -> StepResult:
    store = runtime.model_sessions
    found = await store.get(session_id, project.project_id)
    if found is None:
        raise NotFound("session", session_id)
    model = await _model(runtime, await _checkpoint(runtime, found.job_id, project.project_id, found.step))
    inputs, unknown = _session_inputs(model, body.inputs)
    try:
        token = await store.lock(session_id)
    except SessionBusy:
        raise ApiError(409, "busy", f"session {session_id!r} is busy with another step; try again") from None
    try:
        current = await store.get(session_id, project.project_id)  # its state now, under the lock
        if current is None:
            raise NotFound("session", session_id)
        try:
            outputs, state = await asyncio.to_thread(_run, model, inputs, current)
        except ValueError as exc:
            raise _invalid(exc) from None
        try:
            if not await store.save(current, token, state):
                raise NotFound("session", session_id)  # deleted while the step ran
        except LockLost:
            raise ApiError(409, "busy", f"session {session_id!r}: the step outlived its lock; its state was not saved") from None
    finally:
        await store.unlock(session_id, token)
    return _result(model, session_id, outputs, body.outputs, unknown)


def _session_inputs(model: Model, inputs: str | list[Any]) -> tuple[Any, list[str] | None]:
    if not isinstance(inputs, str):
        return inputs, None
    if model.kind != "text":
        raise Invalid("inputs", f"text is for text models; this one ({model.kind}) reads " + (
            "token ids" if model.artifact.task.vocab is not None else "rows of numbers"))
    if not inputs:
        raise Invalid("inputs", "empty text")
    ids, unknown = model.encode(inputs)
    if not ids:
        raise Invalid("inputs", "the text has no tokens")
    return ids, unknown


def _run(model: Model, inputs: Any, session: ModelSession) -> tuple[Any, bytes]:
    outputs, state = model.step(inputs, load_state(session.state))
    return outputs, dump_state(state)


def _result(model: Model, session_id: str, outputs: Any, which: str, unknown: list[str] | None) -> StepResult:
    steps = int(outputs.shape[0])
    chosen = outputs if which == "all" else outputs[-1:]
    if chosen.numel() > MAX_RETURNED_VALUES:
        raise Invalid("outputs", f"'all' would return {chosen.numel()} values, more than {MAX_RETURNED_VALUES}: ask for 'last', or step in shorter chunks")
    following = None
    if model.kind == "text":
        probabilities = outputs[-1].float().softmax(-1)
        best = int(probabilities.argmax())
        following = {"token": model.vocab[best], "id": best, "probability": float(probabilities[best])}
    return StepResult(session_id=session_id, steps=steps, outputs=chosen.tolist(), next=following, unknown=unknown)


@router.delete(
    "/v1/sessions/{session_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    summary="End an inference session (its state is dropped)",
    responses=responses(401, 404, 503),
)
async def delete_session(session_id: SessionId, project: ProjectDep, runtime: RuntimeDep) -> Response:
    if not await runtime.model_sessions.delete(session_id, project.project_id):
        raise NotFound("session", session_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
