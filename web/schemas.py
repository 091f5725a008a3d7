"""Request and response schemas (pydantic): validation at the boundary and the OpenAPI source.

Requests are strict (no string-to-number coercion, no bools as ints) and reject unknown
fields, so a typo such as ``max_challenge`` is an error rather than a silent default.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, TypeAdapter

from rev_tasks.inference.budget import MAX_BUDGET_MB, MIN_BUDGET_MB

MODEL_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"

ModelId = Annotated[
    str,
    StringConstraints(pattern=MODEL_ID_PATTERN, min_length=1, max_length=128),
    Field(description="id of a registered model"),
]


# A server path: no NUL (the OS cannot take it, PostgreSQL cannot store it), no control
# characters (they only serve to forge log lines).
ServerPath = Annotated[
    str,
    StringConstraints(min_length=1, max_length=4096, pattern=r"^[^\x00-\x1f\x7f]+$"),
    Field(description="folder under REV_MODEL_ROOTS (resolved, symlinks included)"),
]


# The compute dtype of a job's models, or of a registered model's fingerprint (as
# ``rev verify --dtype``): float32 upcasts stored fp16/bf16 weights; float16 and bfloat16 run
# the models in that precision (half the memory; the operations guide's choice on GPUs).
Dtype = Annotated[
    Literal["float32", "float16", "bfloat16"],
    Field(
        description=(
            "compute dtype of the models (as `rev verify --dtype`); a registered reference "
            "must have been registered with the same dtype"
        )
    ),
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class PathRef(_Strict):
    """A model folder on the server, confined to ``REV_MODEL_ROOTS``."""

    path: ServerPath


ModelRef = ModelId | PathRef


class _JobParams(_Strict):
    candidate: ModelRef
    tolerance: Literal["exact", "precision"] = "exact"
    alpha: float = Field(0.01, gt=0.0, le=0.5, description="error rate of the sequential test")
    max_challenges: int = Field(64, ge=1, le=1024, description="challenge budget")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Dtype = "float32"
    batch_size: int | None = Field(None, ge=1, le=256, description="challenges per batch")
    memory_budget_mb: int | None = Field(
        None,
        ge=MIN_BUDGET_MB,
        le=MAX_BUDGET_MB,
        description=(
            "run the models layer by layer within this many MiB (GPT-2, Llama and BERT "
            "families; same signatures as a full load). Default: the worker's "
            "REV_MEMORY_BUDGET_MB, else the whole model is loaded in memory"
        ),
    )


class VerifyJobRequest(_JobParams):
    """Is ``candidate`` the model ``reference``?"""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"kind": "verify", "reference": "minilm", "candidate": {"path": "minilm-copy"}},
                {
                    "kind": "verify",
                    "reference": {"path": "gpt2-medium"},
                    "candidate": {"path": "gpt2-medium-copy"},
                    "memory_budget_mb": 512,
                },
                {
                    "kind": "verify",
                    "reference": {"path": "minilm"},
                    "candidate": {"path": "minilm-copy"},
                    "tolerance": "exact",
                    "alpha": 0.01,
                    "max_challenges": 64,
                    "device": "cpu",
                    "dtype": "float32",
                    "batch_size": 8,
                },
            ]
        }
    )

    kind: Literal["verify"]
    reference: ModelRef


class IdentifyJobRequest(_JobParams):
    """Which registered model is ``candidate``?"""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"kind": "identify", "candidate": {"path": "minilm-copy"}}]}
    )

    kind: Literal["identify"]


JobRequest = Annotated[VerifyJobRequest | IdentifyJobRequest, Field(discriminator="kind")]
JOB_REQUEST = TypeAdapter(JobRequest)


class ModelRegistration(_Strict):
    """Register a reference model folder; its fingerprint is computed asynchronously."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"id": "minilm", "path": "minilm"},
                {"id": "smollm2-bf16", "path": "smollm2", "dtype": "bfloat16"},
            ]
        }
    )

    id: ModelId
    path: ServerPath
    dtype: Dtype = "float32"


# ----------------------------------------------------------------------------- responses
class ErrorBody(BaseModel):
    code: str
    message: str
    details: Any | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class JobAccepted(BaseModel):
    id: str
    status: Literal["queued"]
    url: str


class Progress(BaseModel):
    challenges_done: int
    challenges_max: int


class Vote(BaseModel):
    validator: int
    verdict: Literal["SAME", "DIFFERENT", "UNDECIDED", "INVALID"]
    digest: str
    reexecuted: list[int] | None = Field(
        None,
        description="transcript record positions this validator re-executed on the models, "
        "drawn at random after the transcript was stored (null for votes before 0003)",
    )
    executed_on: dict[str, Any] | None = Field(
        None,
        description="where this validator re-executed: worker, device and dtype (null for "
        "votes before 0008, and device/dtype null when it re-executed nothing)",
    )


class Consensus(BaseModel):
    validators: int
    quorum: int
    votes: list[Vote]
    agreeing: int
    verdict: str | None
    agreed: bool
    abstained: list[int] = Field(
        default_factory=list, description="validators that crashed and cast no vote"
    )


class DistanceSummary(BaseModel):
    count: int
    mean: float | None
    min: float | None
    max: float | None


class VerifyResult(BaseModel):
    model_config = ConfigDict(extra="allow")

    verdict: Literal["SAME", "DIFFERENT", "UNDECIDED"] | None
    challenges_used: int
    statistic: float
    transcript_root: str
    sites: list[int]
    distances: DistanceSummary
    consensus: Consensus


class IdentifyMatch(BaseModel):
    model_config = ConfigDict(extra="allow")

    model_id: str
    mean_distance: float
    verdict: str


class IdentifyResult(BaseModel):
    model_config = ConfigDict(extra="allow")

    ranking: list[IdentifyMatch]
    best: str | None
    verdict: str | None


class JobDocument(BaseModel):
    id: str
    tenant: str
    kind: Literal["verify", "identify"]
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    stage: str
    device: str
    queue: str
    request: dict[str, Any]
    progress: Progress
    result: VerifyResult | IdentifyResult | None
    error: ErrorBody | None
    created_at: str
    started_at: str | None
    finished_at: str | None
    url: str
    transcript_url: str | None


class JobPage(BaseModel):
    jobs: list[JobDocument]
    next_cursor: str | None


class FingerprintInfo(BaseModel):
    key_id: str
    challenges: int
    bits: int
    sites: list[int]
    created_at: str


class ModelDocument(BaseModel):
    id: str
    tenant: str
    path: str
    status: Literal["pending", "ready", "failed"]
    dtype: str = Field(description="compute dtype its fingerprint is computed in")
    descriptor: dict[str, Any] | None
    error: ErrorBody | None
    fingerprint: FingerprintInfo | None
    created_at: str
    updated_at: str
    url: str


class ModelList(BaseModel):
    models: list[ModelDocument]


class Health(BaseModel):
    status: str
    checks: dict[str, Any] | None = None
    reason: str | None = None
