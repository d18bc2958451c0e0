"""The HTTP routes: OpenAI's audio endpoints, whisper-asr-webservice's (as Bazarr calls them), health.

Every transcription is a journal job in the API's folder (see `jobs`); a request waits for it,
polling the journal, and answers from the outputs the worker published.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from pathlib import PurePosixPath
from typing import Annotated, Any, Literal, Optional
from urllib.parse import quote

import structlog
from fastapi import FastAPI, File, Form, Query, Request, Response, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.concurrency import run_in_threadpool

from daemon.errors import RequestRefused
from daemon.http.async_jobs import add_async_routes
from daemon.http.jobs import ApiJobs, Ask, Finished, safe_suffix
from daemon.http.metrics import Metrics, RequestMetrics, add_metrics_route
from daemon.http.status_page import BASIC_CHALLENGE, BASIC_PATHS, PAGE_PATHS, add_status_routes
from daemon.http.tokens import TokenGate
from daemon.languages import LANGUAGES

log = structlog.get_logger("whisperd")

POLL_S = 0.1  # how often a waiting request looks at its job in the journal
OPEN_PATHS = frozenset({"/healthz"})  # liveness answers without a token (a load balancer's probe)

OpenAIFormat = Literal["json", "text", "srt", "verbose_json", "vtt"]
AsrOutput = Literal["txt", "vtt", "srt", "tsv", "json"]
# The whisperd output each OpenAI response_format is answered from.
OPENAI_SOURCE = {"json": "json", "text": "json", "verbose_json": "json", "srt": "srt", "vtt": "vtt"}
Granularity = Literal["segment", "word"]
# The fields of OpenAI's TranscriptionSegment: whisper's segment has them all, and words besides.
OPENAI_SEGMENT_FIELDS = ("id", "seek", "start", "end", "text", "tokens", "temperature", "avg_logprob",
                         "compression_ratio", "no_speech_prob")


def create_app(
    jobs: ApiJobs, *, tokens: Sequence[str] | None, timeout_s: float, keep_results_s: float = 3600.0,
    metrics: Metrics | None = None, metrics_open: bool = False,
) -> FastAPI:
    """Return the API's FastAPI application over the daemon's journal (no docs page: it would need a CDN)."""
    app = FastAPI(title="whisperd", docs_url=None, redoc_url=None)
    metrics = metrics or Metrics(jobs.config, jobs.journal, jobs.registry)
    open_paths = OPEN_PATHS | ({"/metrics"} if metrics_open else set())
    add_async_routes(app, jobs, keep_results_s)

    app.add_middleware(TokenGate, tokens=tokens, open_paths=open_paths, basic_paths=BASIC_PATHS,
                       challenge_paths=PAGE_PATHS, basic_challenge=BASIC_CHALLENGE,
                       refuse=lambda reason, headers: _refusal(RequestRefused(401, reason), headers))

    # Added last, so outermost: refusals are counted too.
    app.add_middleware(RequestMetrics, metrics=metrics, routes=lambda: app.router.routes)
    add_metrics_route(app, metrics)
    add_status_routes(app, jobs)

    @app.exception_handler(RequestRefused)
    async def refused(_request: Request, err: RequestRefused) -> Response:
        return _refusal(err)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, err: RequestValidationError) -> Response:
        # A missing file or a response_format it does not know: 400 as OpenAI answers, not FastAPI's 422.
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ())[1:]) or 'request'}: {e.get('msg')}"
                             for e in err.errors())
        return _refusal(RequestRefused(400, problems or "invalid request"))

    @app.api_route("/healthz", methods=["GET", "HEAD"])
    async def healthz() -> dict[str, str]:
        """Liveness: the process runs and answers."""
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> Response:
        """Readiness: not stopping, the API's folder not paused, its model not failing to load."""
        reason = await run_in_threadpool(jobs.unready)
        if reason is not None:
            return JSONResponse({"status": "unavailable", "reason": reason}, status_code=503)
        return JSONResponse({"status": "ready"})

    async def run(request: Request, upload: UploadFile, ask: Ask, *, raw_pcm: bool = False) -> Finished:
        """Return the finished job of an upload; raise RequestRefused when it cannot give outputs.

        The job ends with its request: a client that hangs up, a timeout or a stop cancels it (a
        running one between two windows), so nothing is transcribed for nobody.
        """
        job, stem = await run_in_threadpool(jobs.submit, upload.file, safe_suffix(upload.filename), ask,
                                            raw_pcm=raw_pcm)
        deadline = time.monotonic() + timeout_s
        try:
            while (ended := await run_in_threadpool(jobs.wait_step, job.id, deadline)) is None:
                if await request.is_disconnected():
                    log.info("api_request_gone", job_id=job.id, reason="its client hung up")
                    raise RequestRefused(499, "the client closed the connection")
                await asyncio.sleep(POLL_S)
        except BaseException:  # a refusal, a hang-up, or the request cancelled (the server stopping)
            if jobs.stopping.is_set():  # a stop hands running jobs back itself; a new start drops them
                jobs.abandon(stem)
            else:  # cancel() abandons the upload too
                await run_in_threadpool(jobs.cancel, job, stem)
            raise
        try:
            finished = await run_in_threadpool(jobs.finished, ended, stem)
        finally:
            await run_in_threadpool(jobs.discard, stem)
        refusal = finished.refusal()
        if refusal is not None:
            raise refusal
        if not finished.outputs:
            raise RequestRefused(500, f"job {finished.job.id} is done but its outputs are missing")
        return finished

    async def openai(request: Request, task: str, file: UploadFile, model: Optional[str], language: Optional[str],
                     prompt: Optional[str], response_format: OpenAIFormat, temperature: Optional[float],
                     granularities: Sequence[Granularity] = ()) -> Response:
        source = OPENAI_SOURCE[response_format]
        # Word timings cost a second pass over the cross-attention: only when the answer shows them.
        words = response_format == "verbose_json" and "word" in granularities
        ask = Ask((source,), task=task, language=language, prompt=prompt, temperature=temperature, model=model,
                  word_timestamps=words)
        finished = await run(request, file, ask)
        output = finished.outputs[source]
        if response_format in ("srt", "vtt"):
            return PlainTextResponse(output)
        result = json.loads(output)
        if response_format == "text":
            return PlainTextResponse(result["text"].strip() + "\n")
        if response_format == "json":
            return JSONResponse({"text": result["text"].strip()})
        return JSONResponse(verbose_json(result, task=task, duration=finished.job.audio_s,
                                         granularities=granularities or ("segment",)))

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(
        request: Request,
        file: Annotated[UploadFile, File()],
        model: Annotated[Optional[str], Form()] = None,
        language: Annotated[Optional[str], Form()] = None,
        prompt: Annotated[Optional[str], Form()] = None,
        response_format: Annotated[OpenAIFormat, Form()] = "json",
        temperature: Annotated[Optional[float], Form(ge=0, le=1)] = None,
        timestamp_granularities: Annotated[Optional[list[Granularity]], Form(
            alias="timestamp_granularities[]",
            description="with verbose_json: segment (the default), word, or both")] = None,
    ) -> Response:
        """OpenAI-compatible transcription (model: a model the config uses, else the default one)."""
        return await openai(request, "transcribe", file, model, language, prompt, response_format, temperature,
                            tuple(timestamp_granularities or ()))

    @app.post("/v1/audio/translations")
    async def translations(
        request: Request,
        file: Annotated[UploadFile, File()],
        model: Annotated[Optional[str], Form()] = None,
        prompt: Annotated[Optional[str], Form()] = None,
        response_format: Annotated[OpenAIFormat, Form()] = "json",
        temperature: Annotated[Optional[float], Form(ge=0, le=1)] = None,
    ) -> Response:
        """OpenAI-compatible translation into English."""
        return await openai(request, "translate", file, model, None, prompt, response_format, temperature)

    @app.post("/recognise")
    async def recognise(
        request: Request,
        file: Annotated[UploadFile, File()],
        language: Annotated[Optional[str], Form()] = None,
        task: Annotated[Literal["transcribe", "translate"], Form()] = "transcribe",
    ) -> Response:
        """The first whisperd's /recognise: whisper's own result (text, segments, language), its json output."""
        finished = await run(request, file, Ask(("json",), task=task, language=language))
        return JSONResponse(json.loads(finished.outputs["json"]))

    @app.post("/asr")
    async def asr(
        request: Request,
        audio_file: Annotated[UploadFile, File()],
        task: Annotated[Literal["transcribe", "translate"], Query()] = "transcribe",
        language: Annotated[Optional[str], Query()] = None,
        initial_prompt: Annotated[Optional[str], Query()] = None,
        output: Annotated[AsrOutput, Query()] = "txt",
        encode: Annotated[bool, Query(description="false: the upload is raw 16-bit 16 kHz mono PCM")] = True,
        word_timestamps: Annotated[bool, Query()] = False,
        vad_filter: Annotated[bool, Query(description="accepted; whisperd's own silence and speech detection "
                                                      "follow its config")] = False,
    ) -> Response:
        """whisper-asr-webservice's /asr, as Bazarr's whisper provider calls it."""
        ask = Ask((output,), task=task, language=language, prompt=initial_prompt, word_timestamps=word_timestamps)
        finished = await run(request, audio_file, ask, raw_pcm=not encode)
        # The upload's own name, without any folders it named: nothing of a path goes back either.
        name = quote(PurePosixPath((audio_file.filename or "").replace("\\", "/")).name or "audio")
        return PlainTextResponse(finished.outputs[output], headers={
            "Asr-Engine": "whisperd", "Content-Disposition": f'attachment; filename="{name}.{output}"'})

    @app.post("/detect-language")
    async def detect_language(
        request: Request,
        audio_file: Annotated[UploadFile, File()],
        encode: Annotated[bool, Query()] = True,
    ) -> dict[str, Any]:
        """whisper-asr-webservice's /detect-language: the language whisper detects (the whole file is decoded)."""
        finished = await run(request, audio_file, Ask(("json",)), raw_pcm=not encode)
        code = json.loads(finished.outputs["json"]).get("language", "")
        return {"detected_language": LANGUAGES.get(code, code), "language_code": code}

    return app


def verbose_json(result: dict[str, Any], *, task: str, duration: float | None,
                 granularities: Sequence[str]) -> dict[str, Any]:
    """Return OpenAI's verbose_json (TranscriptionVerbose, TranslationVerbose) made of whisper's result.

    `segments` and `words` each appear only when asked for, as OpenAI answers; OpenAI's words carry
    no leading space (whisper's do) and no probability.
    """
    code = result.get("language") or ""
    answer: dict[str, Any] = {
        "task": task,
        # OpenAI names the language in full, lower case; a translation's is the language it is in.
        "language": "english" if task == "translate" else LANGUAGES.get(code, code),
        "duration": duration if duration is not None else 0.0,
        "text": result["text"].strip(),
    }
    if "segment" in granularities:
        answer["segments"] = [{k: s[k] for k in OPENAI_SEGMENT_FIELDS} for s in result["segments"]]
    if "word" in granularities:
        answer["words"] = [{"word": w["word"].strip(), "start": w["start"], "end": w["end"]}
                           for s in result["segments"] for w in s.get("words", ()) if w["word"].strip()]
    return answer


def _refusal(err: RequestRefused, headers: dict[str, str] | None = None) -> Response:
    """Return a refusal both ways clients read one: OpenAI's `error.message` and FastAPI's `detail`."""
    kind = "invalid_request_error" if err.status < 500 else "server_error"
    if err.retry_after is not None:
        headers = {**(headers or {}), "Retry-After": str(err.retry_after)}
    return JSONResponse({"error": {"message": err.reason, "type": kind}, "detail": err.reason},
                        status_code=err.status, headers=headers)
