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
_JOB_PROPERTIES = {
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
}
_JOB = {
    "type": "object",
    "required": ["job_id", "status", "attempt", "projected"],
    "properties": {
        **_JOB_PROPERTIES,
        "projected": {
            "type": "boolean",
            "description": "false while the job board has not caught up with a new job",
        },
    },
}
_LISTED_JOB = {
    "type": "object",
    "description": "A job as the job board shows it in a list",
    "required": ["job_id", "status", "attempt", "submitted_at", "updated_at", "position"],
    "properties": _JOB_PROPERTIES,
}

_NODE = {
    "type": "object",
    "required": [
        "node_id",
        "slots",
        "free_slots",
        "draining",
        "running_jobs",
        "jobs",
        "last_seen",
        "expires_at",
    ],
    "properties": {
        "node_id": {"type": "string"},
        "slots": {"type": "integer", "minimum": 0, "description": "jobs it can run at once"},
        "free_slots": {"type": "integer", "minimum": 0},
        "draining": {
            "type": "boolean",
            "description": "it finishes its jobs and takes no new ones",
        },
        "running_jobs": {"type": "integer", "minimum": 0, "description": "every client's"},
        "jobs": {
            "type": "array",
            "description": "the caller's own jobs among those it runs",
            "items": {
                "type": "object",
                "required": ["job_id", "attempt"],
                "properties": {
                    "job_id": {"type": "string", "format": "uuid"},
                    "attempt": {"type": "integer", "minimum": 1},
                },
            },
        },
        "last_seen": {
            "type": ["string", "null"],
            "format": "date-time",
            "description": "when its last heartbeat was recorded (derived from the key's expiry)",
        },
        "expires_at": {
            "type": ["string", "null"],
            "format": "date-time",
            "description": "when it stops counting as live unless another heartbeat arrives",
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
                "additionalProperties": False,
                "properties": {
                    "config": {"type": "string", "description": "ML-Agents trainer config YAML"},
                    "env": {
                        "description": "a built-in stand-in environment, or an uploaded build",
                        "oneOf": [
                            {
                                "type": "object",
                                "required": ["builtin"],
                                "additionalProperties": False,
                                "properties": {
                                    "builtin": {
                                        "type": "string",
                                        "pattern": "^[a-z][a-z0-9_-]{0,63}$",
                                    }
                                },
                            },
                            {
                                "type": "object",
                                "required": ["sha256"],
                                "additionalProperties": False,
                                "properties": {
                                    "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"}
                                },
                            },
                        ],
                    },
                    "seed": {"type": "integer", "minimum": 0, "maximum": 2**31 - 1, "default": 0},
                    "max_steps": {"type": ["integer", "null"], "minimum": 1, "maximum": 10**9},
                    "num_envs": {"type": "integer", "minimum": 1, "maximum": 16, "default": 1},
                    "time_limit_s": {
                        "type": "integer",
                        "minimum": 1,
                        "maximum": 7 * 24 * 3600,
                        "default": 3600,
                    },
                    "request_id": {"type": "string", "minLength": 1, "maxLength": 128},
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
            "ListedJob": _LISTED_JOB,
            "JobPage": {
                "type": "object",
                "properties": {
                    "jobs": {"type": "array", "items": {"$ref": "#/components/schemas/ListedJob"}},
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
            "NodeList": {
                "type": "object",
                "required": ["nodes"],
                "properties": {
                    "nodes": {"type": "array", "items": {"$ref": "#/components/schemas/Node"}}
                },
            },
            "Node": _NODE,
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
