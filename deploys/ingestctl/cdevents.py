"""Change events in the CDEvents shape (spec v0.4.1: a `context`, a `subject`, optional `customData`).

Pure builders, one per event ingestctl sends: a deploy's pipeline run started/finished, the service deployed
(first release on the environment), upgraded or rolled back, a failed gate (a test case run that failed), an
incident detected or resolved. ingestctl's own facts (run id, gate numbers, SEV) go in `customData`.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import quote

SPEC_VERSION = "0.4.1"
SERVICE = "ingest"
TYPES = {
    "pipelinerun.started": "dev.cdevents.pipelinerun.started.0.2.0",
    "pipelinerun.finished": "dev.cdevents.pipelinerun.finished.0.2.0",
    "service.deployed": "dev.cdevents.service.deployed.0.2.0",
    "service.upgraded": "dev.cdevents.service.upgraded.0.2.0",
    "service.rolledback": "dev.cdevents.service.rolledback.0.2.0",
    "testcaserun.finished": "dev.cdevents.testcaserun.finished.0.2.0",
    "incident.detected": "dev.cdevents.incident.detected.0.2.0",
    "incident.resolved": "dev.cdevents.incident.resolved.0.2.0",
}
PipelineOutcome = Literal["success", "failure", "error", "cancel"]


def source(env: str) -> str:
    return f"/ingestctl/{env}"


def artifact_id(release: str | None, image_id: str | None) -> str:
    """A package URL for the release's image: pkg:oci/ingest@sha256%3A<digest>?tag=<release>."""
    version = f"@{quote(image_id, safe='')}" if image_id else ""
    return f"pkg:oci/{SERVICE}{version}" + (f"?tag={quote(release, safe='')}" if release else "")


def event(kind: str, env: str, subject_id: str, subject_type: str, content: dict[str, Any],
          custom: dict[str, Any] | None = None, at: datetime | None = None) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "context": {"version": SPEC_VERSION, "id": str(uuid.uuid4()), "source": source(env), "type": TYPES[kind],
                    "timestamp": (at or datetime.now(UTC)).astimezone(UTC).isoformat().replace("+00:00", "Z")},
        "subject": {"id": subject_id, "source": source(env), "type": subject_type, "content": content},
    }
    if custom:
        payload["customData"] = custom
        payload["customDataContentType"] = "application/json"
    return payload


def environment(env: str) -> dict[str, str]:
    return {"id": env, "source": source(env)}


def pipeline_started(env: str, run_id: str, release: str | None) -> dict[str, Any]:
    return event("pipelinerun.started", env, run_id, "pipelineRun", {"pipelineName": f"deploy {env}"},
                 {"runId": run_id, "release": release})


def pipeline_finished(env: str, run_id: str, release: str | None, outcome: PipelineOutcome, exit_code: int,
                      errors: str | None = None) -> dict[str, Any]:
    content: dict[str, Any] = {"pipelineName": f"deploy {env}", "outcome": outcome}
    if errors:
        content["errors"] = errors
    return event("pipelinerun.finished", env, run_id, "pipelineRun", content,
                 {"runId": run_id, "release": release, "exitCode": exit_code})


def service_changed(kind: Literal["service.deployed", "service.upgraded", "service.rolledback"], env: str,
                    release: str | None, image_id: str | None, run_id: str,
                    previous_release: str | None = None) -> dict[str, Any]:
    return event(kind, env, f"{env}/{SERVICE}", "service",
                 {"environment": environment(env), "artifactId": artifact_id(release, image_id)},
                 {"runId": run_id, "release": release, "previousRelease": previous_release})


def gate_failed(env: str, run_id: str, gate: str, numbers: dict[str, Any], message: str | None) -> dict[str, Any]:
    return event("testcaserun.finished", env, f"{run_id}/{gate}", "testCaseRun",
                 {"outcome": "fail", "environment": environment(env), "testCase": {"id": gate, "name": f"{gate} gate"},
                  "reason": message or f"{gate} gate failed"},
                 {"runId": run_id, "numbers": numbers})


def incident(kind: Literal["incident.detected", "incident.resolved"], env: str, incident_id: str, title: str,
             sev: int, release: str | None, status: str, run_id: str | None) -> dict[str, Any]:
    content: dict[str, Any] = {"description": title, "environment": environment(env),
                               "service": {"id": SERVICE, "source": source(env)}}
    if release:
        content["artifactId"] = artifact_id(release, None)
    return event(kind, env, incident_id, "incident", content,
                 {"severity": f"SEV-{sev}", "status": status, "runId": run_id})
