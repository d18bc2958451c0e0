"""Async jobs: `POST /v1/jobs` queues an upload and answers at once with an id; the client polls
`GET /v1/jobs/{id}` for state, progress and ETA, fetches `GET /v1/jobs/{id}/result?format=…`, and may
`DELETE /v1/jobs/{id}` (cancel it, or remove its results).

An async job is a journal job in the API's folder like a request's, but nobody holds a connection
for it: it waits through a pause, survives a restart, and its results stay for http.keep_results.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Annotated, Any, Literal, Optional

from fastapi import FastAPI, File, Form, Path, Query, Response, UploadFile
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.concurrency import run_in_threadpool

from daemon.errors import RequestRefused
from daemon.http.jobs import ASYNC_FORMATS, ApiJobs, Ask, failure_of, safe_suffix
from daemon.journal import Job, JobState
from daemon.operations import job_view

ResultFormat = Literal["txt", "srt", "vtt", "tsv", "json"]
MEDIA_TYPES = {"txt": "text/plain", "srt": "application/x-subrip", "vtt": "text/vtt",
               "tsv": "text/tab-separated-values", "json": "application/json"}
JobId = Annotated[str, Path(max_length=80, description="the id POST /v1/jobs answered with")]


def add_async_routes(app: FastAPI, jobs: ApiJobs, keep_results_s: float) -> None:
    """Add the routes of async jobs over the API's journal side (on the app itself, not an included
    router: /metrics labels requests by the app's own route templates)."""

    def view(job: Job, stem: str) -> dict[str, Any]:
        """Return what a client sees of its job: state, progress, ETA, attempts, error, when it ends."""
        full = job_view(job, time.time())
        failure = failure_of(job)
        state = "cancelled" if failure == "cancelled" else job.state.value
        found: dict[str, Any] = {"id": jobs.public_id(job, stem), "state": state, "attempts": full["attempts"],
                                 "created_at": full["created_at"]}
        for key in ("progress", "eta_s", "elapsed_s", "next_attempt_at", "finished_at", "warning"):
            if full.get(key) is not None:
                found[key] = full[key]
        if job.state == JobState.RUNNING:
            found["stage"] = job.running_stage
        if job.state in (JobState.RETRY_WAIT, JobState.FAILED) and job.last_error:
            found["error"] = job.last_error
        if failure is not None:
            found["failure"] = failure
        if job.state == JobState.DONE:
            found |= {"audio_s": job.audio_s, "formats": list(ASYNC_FORMATS)}
        if job.finished_at is not None:
            found["expires_at"] = datetime.fromtimestamp(job.finished_at + keep_results_s, tz=timezone.utc) \
                .isoformat(timespec="seconds")
        return found

    def find(job_id: str) -> tuple[Job, str]:
        found = jobs.lookup(job_id)
        if found is None:
            raise RequestRefused(404, f"no job {job_id!r} (a wrong id, cancelled after it ended, or expired)")
        return found

    @app.post("/v1/jobs", status_code=202, tags=["async jobs"])
    async def create(
        file: Annotated[UploadFile, File()],
        task: Annotated[Literal["transcribe", "translate"], Form()] = "transcribe",
        model: Annotated[Optional[str], Form()] = None,
        language: Annotated[Optional[str], Form()] = None,
        prompt: Annotated[Optional[str], Form()] = None,
        temperature: Annotated[Optional[float], Form(ge=0, le=1)] = None,
        word_timestamps: Annotated[bool, Form()] = False,
    ) -> Response:
        """Queue an upload for transcription (or translation) and answer at once: 202 with the job and
        its Location. It is transcribed into every format; fetch any of them from its result."""
        ask = Ask(ASYNC_FORMATS, task=task, language=language, prompt=prompt, temperature=temperature,
                  word_timestamps=word_timestamps, model=model)
        job, stem = await run_in_threadpool(jobs.submit, file.file, safe_suffix(file.filename), ask,
                                            asynchronous=True)
        body = view(job, stem)
        return JSONResponse(body, status_code=202, headers={"Location": f"/v1/jobs/{body['id']}"})

    @app.get("/v1/jobs/{job_id}", tags=["async jobs"])
    async def state(job_id: JobId) -> dict[str, Any]:
        """The job's state (queued, running, retry_wait, done, failed, cancelled), progress and ETA."""
        job, stem = await run_in_threadpool(find, job_id)
        return view(job, stem)

    @app.get("/v1/jobs/{job_id}/result", tags=["async jobs"])
    async def result(job_id: JobId, format: Annotated[ResultFormat, Query()] = "txt") -> Response:
        """The job's transcript in one format; 409 while it runs, the job's error once it failed."""
        job, stem = await run_in_threadpool(find, job_id)
        if job.state in JobState.active():
            raise RequestRefused(409, f"job {job_id} is {job.state.value}; its result is not ready", retry_after=5)
        finished = await run_in_threadpool(jobs.finished, job, stem, (format,))
        refusal = finished.refusal()
        if refusal is not None:
            raise refusal
        if format not in finished.outputs:
            raise RequestRefused(410, f"the results of job {job_id} were removed (http.keep_results passed)")
        return PlainTextResponse(finished.outputs[format], media_type=MEDIA_TYPES[format])

    @app.delete("/v1/jobs/{job_id}", tags=["async jobs"])
    async def cancel(job_id: JobId) -> Response:
        """Cancel a waiting or running job (a running one stops between two windows), or remove a
        finished one's results. 200 with the job as it is now; 204 when it is gone."""
        job, stem = await run_in_threadpool(find, job_id)
        now = await run_in_threadpool(jobs.cancel, job, stem)
        if now is None:
            return Response(status_code=204)
        return JSONResponse(view(now, stem))
