"""The parts of the OpenAPI document that are not an endpoint's own: shared schemas."""

from __future__ import annotations

from typing import Any

from domain.job import JobStatus

_ERROR = {
    "type": "object",
    "required": ["detail"],
    "properties": {
        "detail": {"type": "string"},
        "errors": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["field", "reason"],
                "properties": {"field": {"type": "string"}, "reason": {"type": "string"}},
            },
        },
    },
}
_STATUS = {"type": "string", "enum": [s.value for s in JobStatus]}
_NULLABLE_STRING = {"type": ["string", "null"]}
_JOB = {
    "type": "object",
    "required": ["job_id", "status", "attempt", "projected"],
    "properties": {
        "job_id": {"type": "string", "format": "uuid"},
        "status": _STATUS,
        "attempt": {"type": "integer"},
        "node_id": _NULLABLE_STRING,
        "submitted_at": {"type": "string", "format": "date-time"},
        "updated_at": {"type": "string", "format": "date-time"},
        "started_at": _NULLABLE_STRING,
        "finished_at": _NULLABLE_STRING,
        "reason": _NULLABLE_STRING,
        "cancel_requested": {"type": "boolean"},
        "model_sha256": _NULLABLE_STRING,
        "latest": {
            "type": ["object", "null"],
            "properties": {
                "seq": {"type": "integer"},
                "step": {"type": "integer"},
                "stats": {"type": "object"},
            },
        },
        "position": {"type": "integer", "description": "log position of the last event shown"},
        "projected": {
            "type": "boolean",
            "description": "false while the job board has not caught up with a new job",
        },
    },
}

BASE_SCHEMA: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "Trainyard gateway",
        "version": "0.1.0",
        "description": "Submit Unity ML-Agents training jobs and follow them.",
    },
    "security": [{"bearer": []}],
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        "parameters": {
            "JobId": {
                "name": "job_id",
                "in": "path",
                "required": True,
                "schema": {"type": "string", "format": "uuid"},
            }
        },
        "responses": {
            "Error": {
                "description": "An error",
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
            }
        },
        "schemas": {
            "Error": _ERROR,
            "JobSubmission": {
                "type": "object",
                "required": ["config", "env"],
                "properties": {
                    "config": {"type": "string", "description": "ML-Agents trainer config YAML"},
                    "env": {
                        "type": "object",
                        "properties": {
                            "builtin": {"type": "string"},
                            "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                        },
                    },
                    "seed": {"type": "integer", "minimum": 0, "default": 0},
                    "max_steps": {"type": ["integer", "null"], "minimum": 1},
                    "num_envs": {"type": "integer", "minimum": 1, "maximum": 16, "default": 1},
                    "time_limit_s": {"type": "integer", "minimum": 1, "default": 3600},
                    "request_id": {"type": "string", "maxLength": 128},
                },
            },
            "JobCreated": {
                "type": "object",
                "required": ["job_id"],
                "properties": {"job_id": {"type": "string", "format": "uuid"}},
            },
            "JobStatus": {
                "type": "object",
                "properties": {"job_id": {"type": "string"}, "status": _STATUS},
            },
            "Job": _JOB,
            "JobPage": {
                "type": "object",
                "properties": {
                    "jobs": {"type": "array", "items": {"$ref": "#/components/schemas/Job"}},
                    "next_cursor": _NULLABLE_STRING,
                },
            },
            "MetricsPage": {
                "type": "object",
                "properties": {
                    "job_id": {"type": "string"},
                    "metrics": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {
                                "attempt": {"type": "integer"},
                                "seq": {"type": "integer"},
                                "step": {"type": "integer"},
                                "stats": {"type": "object"},
                                "position": {"type": "integer"},
                            },
                        },
                    },
                    "next_cursor": _NULLABLE_STRING,
                },
            },
            "EventPage": {
                "type": "object",
                "properties": {
                    "job_id": {"type": "string"},
                    "events": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {
                                "position": {"type": "integer"},
                                "stream": {"type": "string", "enum": ["job", "metrics"]},
                                "version": {"type": "integer"},
                                "type": {"type": "string", "examples": ["Job.Submitted"]},
                                "timestamp": {"type": "string", "format": "date-time"},
                                "data": {"type": "object"},
                            },
                        },
                    },
                    "next_after": {"type": ["integer", "null"]},
                },
            },
            "Health": {
                "type": "object",
                "properties": {
                    "status": {"type": "string", "enum": ["ok", "degraded"]},
                    "checks": {"type": "object"},
                },
            },
        },
    },
}
